"""Banded products on blocks of rows, computed piece by piece without copying any window.

Queries come in chunks of ``b`` rows; chunk ``c`` reaches keys ``[c b - left, (c + 1) b + right)``,
``width = left + b + right`` of them, which are slices of the neighbouring chunks
``c - p .. c + q``. With all chunks stacked as ``(M, b, D)`` (sequences and heads one after
another), each neighbour is the same stack shifted by a few chunks, so every product is one
batched matmul on views. Neighbours across a sequence's or head's edge are real rows of another
sequence: the band mask must give them weight 0 (scores there are finite, never read).

Three products, each the others' gradient:

- :func:`band_scores` ``S[c, i, w] = q[c, i] . k(c, w)``: ``(M, b, D)`` twice ``-> (M, b, width)``
  (``k(c, w)`` is the ``w``-th key row chunk ``c`` reaches);
- :func:`band_apply` ``out[c, i] = sum_w a[c, i, w] z(c, w)``: ``(M, b, width), (M, b, D) ->
  (M, b, D)``;
- :func:`band_apply_transposed` ``out(c, w) += a[c, i, w] g[c, i]``: the adjoint of
  :func:`band_apply` in its second argument.

:func:`banded_scores` and :func:`banded_apply` are the differentiable ones: backward saves only
the inputs, and no zero-filled window-sized gradient is ever made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .products import Rules, product


@dataclass(frozen=True)
class BandGeometry:
    """Queries in blocks of ``block`` tokens; block ``c`` holds queries ``[c b, (c+1) b)`` and
    sees keys ``[c b - left, (c+1) b + right)``."""

    block: int
    left: int
    right: int

    @property
    def width(self) -> int:
        return self.left + self.block + self.right

    @cached_property
    def pieces(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(offset, lo, hi, first)``: band columns ``[lo, hi)`` are rows
        ``[first, first + hi - lo)`` of the chunk ``offset`` chunks away."""
        b, left = self.block, self.left
        pieces = []
        for offset in range(-math.ceil(left / b), math.ceil(self.right / b) + 1):
            lo, hi = max(0, left + offset * b), min(self.width, left + (offset + 1) * b)
            if lo < hi:
                pieces.append((offset, lo, hi, lo - (left + offset * b)))
        return tuple(pieces)


def _spans(count: int, offset: int) -> tuple[slice, slice]:
    """The chunks ``c`` whose neighbour ``c + offset`` exists, and those neighbours."""
    return (slice(max(0, -offset), count - max(0, offset)),
            slice(max(0, offset), count + min(0, offset)))


def band_scores(geometry: BandGeometry, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q, k: (M, b, D) -> (M, b, width)``; 0 where the neighbouring chunk does not exist."""
    count = q.shape[0]
    out = q.new_empty(count, geometry.block, geometry.width)
    for offset, lo, hi, first in geometry.pieces:
        own, other = _spans(count, offset)
        keys = k[other, first:first + hi - lo]
        out[own, :, lo:hi] = torch.bmm(q[own], keys.transpose(1, 2))
        if offset:
            out[_outside(count, offset), :, lo:hi] = 0
    return out


def _outside(count: int, offset: int) -> slice:
    """The chunks whose neighbour ``c + offset`` does not exist."""
    return slice(0, min(count, -offset)) if offset < 0 else slice(max(0, count - offset), count)


def band_apply(geometry: BandGeometry, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``a: (M, b, width), z: (M, b, D) -> (M, b, D)``."""
    count = z.shape[0]
    out = torch.bmm(a[:, :, geometry.left:geometry.left + geometry.block], z)
    for offset, lo, hi, first in geometry.pieces:
        if offset:
            own, other = _spans(count, offset)
            out[own].baddbmm_(a[own, :, lo:hi], z[other, first:first + hi - lo])
    return out


def band_apply_transposed(geometry: BandGeometry, a: torch.Tensor,
                          g: torch.Tensor) -> torch.Tensor:
    """``a: (M, b, width), g: (M, b, D) -> (M, b, D)``: the adjoint of :func:`band_apply` in z."""
    count = g.shape[0]
    out = torch.bmm(a[:, :, geometry.left:geometry.left + geometry.block].transpose(1, 2), g)
    for offset, lo, hi, first in geometry.pieces:
        if offset:
            own, other = _spans(count, offset)
            out[other, first:first + hi - lo].baddbmm_(a[own, :, lo:hi].transpose(1, 2), g[own])
    return out


SCORES: Rules = (band_scores,  # S = q k^T on the band: dq = S' k, dk = S'^T q
                 lambda geometry, grad, q, k: band_apply(geometry, grad, k),
                 lambda geometry, grad, q, k: band_apply_transposed(geometry, grad, q))
APPLY: Rules = (band_apply,  # out = a z on the band: da = out' z^T, dz = a^T out'
                lambda geometry, grad, a, z: band_scores(geometry, grad, z),
                lambda geometry, grad, a, z: band_apply_transposed(geometry, a, grad))


def banded_scores(geometry: BandGeometry, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`band_scores` with its gradients."""
    return product(SCORES, geometry, q, k)


def banded_apply(geometry: BandGeometry, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`band_apply` with its gradients."""
    return product(APPLY, geometry, a, z)
