"""Banded products on blocks of rows, computed piece by piece without copying any window.

Queries come in chunks of ``b`` rows; chunk ``c`` reaches keys ``[c b - left, (c + 1) b + right)``,
``width = left + b + right`` of them. With all chunks stacked as ``(M, b, D)`` (sequences and
heads one after another), those keys are ``width`` consecutive rows of the stack, so every
chunk's window is a strided view of the stack (windows overlap; nothing is copied but the few
windows that run past either end, which are padded with zero rows) and a product is one batched
matmul over all chunks. Windows across a sequence's or head's edge hold real rows of another
sequence: the band mask must give them weight 0 (scores there are finite, never read).

Three products, each the others' gradient:

- :func:`band_scores` ``S[c, i, w] = q[c, i] . k(c, w)``: ``(M, b, D)`` twice ``-> (M, b, width)``
  (``k(c, w)`` is the ``w``-th key row chunk ``c`` reaches);
- :func:`band_apply` ``out[c, i] = sum_w a[c, i, w] z(c, w)``: ``(M, b, width), (M, b, D) ->
  (M, b, D)``;
- :func:`band_apply_transposed` ``out(c, w) += a[c, i, w] g[c, i]``: the adjoint of
  :func:`band_apply` in its second argument (or :func:`band_transpose` once, then
  :func:`band_apply` on the transposed geometry, for several products with one ``a``).

:func:`banded_apply` is the differentiable one (the block engine's scores have their own autograd
function): backward saves only the inputs, and no zero-filled window-sized gradient is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .products import Rules, product


@dataclass(frozen=True)
class BandGeometry:
    """Queries in blocks of ``block`` tokens; block ``c`` holds queries ``[c b, (c+1) b)`` and
    sees keys ``[c b - left, (c+1) b + right)``."""

    block: int
    left: int
    right: int

    @classmethod
    def empty(cls) -> BandGeometry:
        """No band (width 0, blocks of one query: nothing to pad): every product is zero, so
        a layout can gather all its local edges instead."""
        return cls(1, 0, -1)

    @property
    def width(self) -> int:
        return self.left + self.block + self.right

    @property
    def transposed(self) -> BandGeometry:
        """The band of the transposed matrix: the keys of block ``c`` are reached by the query
        blocks ``c - ceil(right / b)`` to ``c + ceil(left / b)``."""
        if not self.width:
            return self
        b = self.block
        return BandGeometry(b, b * math.ceil(self.right / b), b * math.ceil(self.left / b))

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


def _windows(geometry: BandGeometry, x: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
    """Each chunk's ``width`` key rows of ``x: (M, b, D)``, as ``(chunks, (count, width, D))``
    pairs covering every chunk: a strided view of ``x`` for the chunks whose window lies inside
    the stack, zero-padded copies for the few at either end."""
    count, b, dim = x.shape
    flat = x.reshape(count * b, dim).contiguous()  # the views below assume contiguous rows
    first = min(count, math.ceil(geometry.left / b))  # windows that start before row 0
    last = max(first, count - math.ceil(geometry.right / b))  # from here, end past the last
    windows = []
    if first < last:
        start = first * b - geometry.left
        windows.append((slice(first, last), flat[start:].as_strided(
            (last - first, geometry.width, dim), (b * dim, dim, 1))))
    for lo, hi in ((0, first), (last, count)):
        if lo < hi:
            top, bottom = lo * b - geometry.left, hi * b + geometry.right
            rows = F.pad(flat[max(0, top):min(count * b, bottom)],
                         (0, 0, max(0, -top), max(0, bottom - count * b)))
            windows.append((slice(lo, hi), rows.as_strided((hi - lo, geometry.width, dim),
                                                           (b * dim, dim, 1))))
    return windows


def band_scores(geometry: BandGeometry, q: torch.Tensor, k: torch.Tensor,
                add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``q, k: (M, b, D) -> (M, b, width)``; 0 where the window runs past the stack. With
    ``add_to``, the scores are added to it in place (inside the matmuls) and it is returned."""
    if not geometry.width:
        return q.new_empty(q.shape[0], geometry.block, 0) if add_to is None else add_to
    if add_to is None:
        out = q.new_empty(q.shape[0], geometry.block, geometry.width)
        for chunks, keys in _windows(geometry, k):
            torch.bmm(q[chunks], keys.transpose(1, 2), out=out[chunks])
        return out
    for chunks, keys in _windows(geometry, k):
        add_to[chunks].baddbmm_(q[chunks], keys.transpose(1, 2))
    return add_to


def band_apply(geometry: BandGeometry, a: torch.Tensor, z: torch.Tensor,
               add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``a: (M, b, width), z: (M, b, D) -> (M, b, D)``. With ``add_to: (M, b, D)``, the
    products are added to it in place (inside the matmuls) and it is returned."""
    if not geometry.width:
        return torch.zeros_like(z, memory_format=torch.contiguous_format) if add_to is None \
            else add_to
    if add_to is None:
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
        for chunks, rows in _windows(geometry, z):
            torch.bmm(a[chunks], rows, out=out[chunks])
        return out
    for chunks, rows in _windows(geometry, z):
        add_to[chunks].baddbmm_(a[chunks], rows)
    return add_to


def band_apply_transposed(geometry: BandGeometry, a: torch.Tensor, g: torch.Tensor,
                          add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``a: (M, b, width), g: (M, b, D) -> (M, b, D)``: the adjoint of :func:`band_apply` in z;
    added to ``add_to: (M, b, D)`` in place when given."""
    if not geometry.width:
        return band_apply(geometry, a, g, add_to)
    count = g.shape[0]
    centre = a[:, :, geometry.left:geometry.left + geometry.block].transpose(1, 2)
    out = torch.bmm(centre, g) if add_to is None else add_to.baddbmm_(centre, g)
    for offset, lo, hi, first in geometry.pieces:
        if offset:
            own, other = _spans(count, offset)
            target = out[other, first:first + hi - lo]
            if hi - lo == geometry.block:
                target.baddbmm_(a[own, :, lo:hi].transpose(1, 2), g[own])
            else:  # in place on part of each chunk, baddbmm_ would loop over the chunks
                target += torch.bmm(a[own, :, lo:hi].transpose(1, 2), g[own])
    return out


def band_transpose(geometry: BandGeometry, a: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The band of ``A^T`` on ``geometry.transposed`` from the band ``a: (M, b, width)`` of ``A``:
    ``(M, b, left + b + right)``, written into ``out`` when given (any values: every entry is
    written). Then ``band_apply(geometry.transposed, band_transpose(a), g)`` is
    :func:`band_apply_transposed` ``(a, g)``, one batched matmul instead of one per piece: worth
    it when several products share ``a`` (the hops of a backward pass)."""
    count, b, width = a.shape
    transposed = geometry.transposed
    if out is None:
        out = a.new_empty(count, b, transposed.width)
    for offset, lo, hi, _ in transposed.pieces:  # they tile the columns
        # Column w of chunk c is query (c + offset) b + w - lo (whole chunks: first = 0); key
        # c b + j sits in that query's row of `a` at column `start + j`.
        start = geometry.left - offset * b
        j0, j1 = max(0, -start), min(b, width - start)
        own, other = _spans(count, offset)
        j1 = max(j0, j1)
        out[own, j0:j1, lo:hi] = a[other, :, start + j0:start + j1].transpose(1, 2)
        # zeros where no entry of `a` lands: past either end of the stack, or of the band
        out[:own.start, :, lo:hi] = 0
        out[own.stop:, :, lo:hi] = 0
        out[own, :j0, lo:hi] = 0
        out[own, j1:, lo:hi] = 0
    return out


APPLY: Rules = (band_apply,  # out = a z on the band: da = out' z^T, dz = a^T out'
                lambda geometry, grad, a, z: band_scores(geometry, grad, z),
                lambda geometry, grad, a, z: band_apply_transposed(geometry, a, grad))


def banded_apply(geometry: BandGeometry, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`band_apply` with its gradients."""
    return product(APPLY, geometry, a, z)
