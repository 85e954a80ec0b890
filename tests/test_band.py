"""The banded products against a dense reference, and their gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffuser_graph.engines.band import (
    BandGeometry,
    band_apply,
    band_apply_transposed,
    band_scores,
    band_transpose,
    banded_apply,
)

GEOMETRIES = [BandGeometry(4, 4, 4), BandGeometry(4, 3, 0), BandGeometry(4, 6, 9),
              BandGeometry(5, 0, 2), BandGeometry.empty()]


def dense_band(geometry: BandGeometry, chunks: int) -> torch.Tensor:
    """``(M * b, M * b)`` 0/1: which key rows each query row reaches, and at which band column."""
    b, rows = geometry.block, chunks * geometry.block
    column = torch.full((rows, rows), -1, dtype=torch.long)
    for query in range(rows):
        for w in range(geometry.width):
            key = (query // b) * b - geometry.left + w
            if 0 <= key < rows:
                column[query, key] = w
    return column


def as_dense(geometry: BandGeometry, band: torch.Tensor) -> torch.Tensor:
    """A band ``(M, b, width)`` as the dense ``(M b, M b)`` matrix it stands for."""
    chunks = band.shape[0]
    column = dense_band(geometry, chunks)
    flat = F.pad(band.reshape(chunks * geometry.block, geometry.width), (0, 1))  # column -1: 0
    return flat.gather(1, torch.where(column >= 0, column, geometry.width))


@pytest.mark.parametrize("chunks", [1, 2, 5])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_band_products_equal_dense_products(geometry, chunks):
    gen = torch.Generator().manual_seed(0)
    b, dim = geometry.block, 3
    q, k = (torch.randn(chunks, b, dim, dtype=torch.float64, generator=gen) for _ in range(2))
    a = torch.randn(chunks, b, geometry.width, dtype=torch.float64, generator=gen)
    column = dense_band(geometry, chunks)
    scores = band_scores(geometry, q, k).reshape(chunks * b, geometry.width)
    dense_scores = q.reshape(-1, dim) @ k.reshape(-1, dim).T
    reachable = column >= 0
    rows, keys = torch.nonzero(reachable, as_tuple=True)
    torch.testing.assert_close(scores[rows, column[rows, keys]], dense_scores[rows, keys])
    outside = torch.ones_like(scores, dtype=torch.bool)  # windows past either end of the stack
    outside[rows, column[rows, keys]] = False
    assert not scores[outside].any()
    start = torch.randn(chunks, b, geometry.width, dtype=torch.float64, generator=gen)
    total = start.clone()
    assert band_scores(geometry, q, k, add_to=total) is total  # accumulated in place
    torch.testing.assert_close(total, start + scores.view_as(start))
    dense_a = as_dense(geometry, a)
    torch.testing.assert_close(banded_apply(geometry, a, k).reshape(-1, dim),
                               dense_a @ k.reshape(-1, dim))
    start = torch.randn(chunks, b, dim, dtype=torch.float64, generator=gen)
    total = start.clone()
    assert band_apply(geometry, a, k, add_to=total) is total  # accumulated in place
    torch.testing.assert_close(total.reshape(-1, dim),
                               start.reshape(-1, dim) + dense_a @ k.reshape(-1, dim))
    torch.testing.assert_close(band_apply_transposed(geometry, a, q).reshape(-1, dim),
                               dense_a.T @ q.reshape(-1, dim))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_band_products_of_strided_inputs_equal_those_of_contiguous_ones(geometry):
    gen = torch.Generator().manual_seed(1)
    b, chunks = geometry.block, 3
    wide = torch.randn(chunks, b, 5, dtype=torch.float64, generator=gen)
    strided = wide[..., 1:4]  # rows of 3 features, 5 apart
    a = torch.randn(chunks, b, geometry.width, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(band_scores(geometry, strided, strided),
                               band_scores(geometry, strided.contiguous(), strided.contiguous()))
    torch.testing.assert_close(banded_apply(geometry, a, strided),
                               banded_apply(geometry, a, strided.contiguous()))


@pytest.mark.parametrize("chunks", [1, 2, 5])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_the_transposed_band_is_the_band_of_the_transpose(geometry, chunks):
    gen = torch.Generator().manual_seed(2)
    b, dim = geometry.block, 3
    a = torch.randn(chunks, b, geometry.width, dtype=torch.float64, generator=gen)
    g = torch.randn(chunks, b, dim, dtype=torch.float64, generator=gen)
    garbage = torch.full((chunks, b, geometry.transposed.width), math.nan, dtype=torch.float64)
    transposed = band_transpose(geometry, a, out=garbage)  # every entry written, none left
    assert transposed.shape == (chunks, b, geometry.transposed.width)
    torch.testing.assert_close(band_transpose(geometry, a), transposed, rtol=0, atol=0)
    torch.testing.assert_close(as_dense(geometry.transposed, transposed), as_dense(geometry, a).T)
    column = dense_band(geometry.transposed, chunks)
    rows, keys = torch.nonzero(column >= 0, as_tuple=True)
    outside = torch.ones(chunks * b, geometry.transposed.width, dtype=torch.bool)
    outside[rows, column[rows, keys]] = False
    assert not transposed.reshape(chunks * b, -1)[outside].any()  # past either end: zeros
    torch.testing.assert_close(banded_apply(geometry.transposed, transposed, g),
                               band_apply_transposed(geometry, a, g))
    start = torch.randn(chunks, b, dim, dtype=torch.float64, generator=gen)
    total = start.clone()
    assert band_apply_transposed(geometry, a, g, add_to=total) is total  # accumulated in place
    torch.testing.assert_close(total, start + band_apply_transposed(geometry, a, g))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_band_products_pass_gradcheck(geometry):
    gen = torch.Generator().manual_seed(1)
    chunks, b = 3, geometry.block
    k = torch.randn(chunks, b, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(chunks, b, geometry.width, dtype=torch.float64, generator=gen,
                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, k: banded_apply(geometry, a, k), (a, k))
