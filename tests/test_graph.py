import numpy as np
import pytest
import torch

from diffuser_graph import (
    PackedBatch,
    PatternSpec,
    batch_graphs,
    build_graph,
    pattern_edges,
    to_networkx,
    to_scipy,
)

SPEC = PatternSpec(window=2, num_global=1, num_random=2, seed=0)


def test_build_graph_has_pattern_edges_and_is_cached():
    g = build_graph(40, SPEC)
    src, dst = pattern_edges(40, SPEC)
    assert g.num_nodes() == 40
    assert np.array_equal(g.edges()[0].numpy(), src) and np.array_equal(g.edges()[1].numpy(), dst)
    assert build_graph(40, SPEC) is g
    assert build_graph(np.int64(40), PatternSpec(**SPEC.model_dump())) is g


def test_build_graph_rejects_bad_input():
    with pytest.raises(ValueError, match="spec must be a PatternSpec"):
        build_graph(10, {"window": 2})
    with pytest.raises(ValueError, match="seq_len"):
        build_graph(0, SPEC)


def test_batch_graphs_concatenates_sequences():
    g = batch_graphs([5, 9, 3], SPEC)
    assert g.batch_num_nodes().tolist() == [5, 9, 3]
    expected = sum(pattern_edges(n, SPEC)[0].size for n in (5, 9, 3))
    assert g.num_edges() == expected
    with pytest.raises(ValueError, match="lengths"):
        batch_graphs([], SPEC)
    with pytest.raises(ValueError, match=">= 1"):
        batch_graphs([3, 0], SPEC)
    with pytest.raises(ValueError, match="every length must be an integer, got 2.5"):
        batch_graphs([2.5], SPEC)
    with pytest.raises(ValueError, match="every length must be an integer, got True"):
        batch_graphs([True], SPEC)
    assert batch_graphs(np.array([4, 2]), SPEC).batch_num_nodes().tolist() == [4, 2]


def test_packed_batch_round_trip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    packed = PackedBatch.from_mask(mask, SPEC)
    assert packed.lengths == (3, 2, 4)
    x = torch.arange(24.0).reshape(3, 4, 2)
    nodes = packed.pack(x)
    assert nodes.shape == (9, 2)
    back = packed.unpack(nodes, fill_value=-1.0)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert torch.all(back[~mask.bool()] == -1.0)


@pytest.mark.parametrize("mask,message", [
    (torch.ones(4), "\\(B, L\\)"),
    (torch.tensor([[1, 0], [0, 0]]), "rows \\[1\\] have no real token"),
    (torch.tensor([[0.5, 1.0]]), "bool or integer"),
    (torch.tensor([[2, 1]]), "bool or integer"),
])
def test_packed_batch_rejects_bad_masks(mask, message):
    with pytest.raises(ValueError, match=message):
        PackedBatch.from_mask(mask, SPEC)


def test_packed_batch_rejects_mismatched_tensors():
    packed = PackedBatch.from_mask(torch.ones(2, 3, dtype=torch.bool), SPEC)
    with pytest.raises(ValueError, match="\\(2, 3\\)"):
        packed.pack(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="6 rows"):
        packed.unpack(torch.zeros(5, 4))


def test_to_scipy_and_networkx_agree_with_edges():
    g = build_graph(25, SPEC)
    csr = to_scipy(g)
    src, dst = pattern_edges(25, SPEC)
    assert csr.shape == (25, 25) and csr.nnz == src.size
    assert np.all(csr[src, dst] == 1)
    nxg = to_networkx(g)
    assert nxg.number_of_nodes() == 25 and nxg.number_of_edges() == src.size
    pairs = zip(src[:50].tolist(), dst[:50].tolist(), strict=True)
    assert all(nxg.has_edge(u, v) for u, v in pairs)


def test_padding_from_lengths():
    from diffuser_graph import Padding

    padding = Padding.from_lengths([3, 1])
    assert padding.padded_shape == (2, 3)
    assert padding.mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match=">= 1"):
        Padding.from_lengths([3, 0])
    with pytest.raises(ValueError, match="at least one"):
        Padding.from_lengths([])
