"""Products with gathered rows that never hold all the gathered rows at once.

A query that attends to a few scattered keys needs ``q_i . k_j`` for each of its keys ``j``
(scores) and ``sum_j a_ij z_j`` (one hop). Gathering the keys whole costs ``(B, n, R, D)`` memory,
and autograd would keep it for the backward pass: 1.2 GB per product for the official pattern at
4,096 tokens with 12 heads. Here both products run on fused kernels: a weighted sum of gathered
rows is ``F.embedding_bag``, and so is its transpose, over the *transposed* gather (for every
key, the queries that gathered it), which :class:`GatherIndex` sorts once per batch; the scores
are a sampled matrix product (a compiled loop, or ``torch.sparse.sampled_addmm`` on the gather's
CSR pattern). :func:`gather_sum` is the weighted sum with its gradients (the block engine's
scores have their own autograd function); nothing keeps more than its inputs.

Values live *packed*: one per real entry, ``(E,)``, query after query, so no product spends work
on the padding a rectangular ``(n, R)`` layout needs for its longest row (the authors' random keys
give 61 keys per query on average and 93 at most at 4,096 tokens). :meth:`GatherIndex.unpack` and
:meth:`GatherIndex.pack` move values between the two layouts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .native import gathered_dot
from .products import Rules, product


@dataclass(frozen=True)
class GatherIndex:
    """Which rows each query gathers, in ``batch`` stacked tables of ``rows`` rows.

    Entry ``e`` (of ``E``, packed query after query) belongs to query ``row[e]``, sits at
    ``position[e]`` of the flattened rectangular ``(batch * n, R)`` layout and gathers row
    ``key[e]`` of the stacked table; query ``i``'s entries are ``bounds[i] <= e < bounds[i + 1]``
    (``offsets`` is ``bounds`` without its last value, the count E). ``by_key``
    orders the entries by the row they gather, ``key_queries`` is the query of each entry in that
    order and ``key_offsets[j]`` where row ``j``'s entries start in it. ``patterns`` caches the
    zero-valued CSR pattern per dtype.
    """

    row: torch.Tensor
    position: torch.Tensor
    key: torch.Tensor
    bounds: torch.Tensor
    by_key: torch.Tensor
    key_queries: torch.Tensor
    key_offsets: torch.Tensor
    crow: torch.Tensor  # (batch, n + 1): one table's CSR rows, repeated per table
    col: torch.Tensor  # (batch, E / batch): one table's keys, ascending within each query
    shape: tuple[int, int, int, int]  # (batch, n, rows, R)
    patterns: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, keys: torch.Tensor, mask: torch.Tensor, batch: int,
              rows: int) -> GatherIndex:
        """``keys, mask: (n, R)``, the same for every one of the ``batch`` tables: query ``i``
        gathers ``keys[i, r]`` where ``mask[i, r]``, in ascending order of key."""
        n, width = keys.shape
        query, column = torch.nonzero(mask, as_tuple=True)  # one table, query after query
        per_table, counts = query.numel(), mask.sum(dim=1)
        table = torch.arange(batch, device=keys.device).view(batch, 1)

        def tiled(x: torch.Tensor, step: int) -> torch.Tensor:
            """One table's ``x`` for every table, table ``t``'s plus ``t * step``."""
            return (x + table * step).flatten()

        key = keys[query, column]
        order = torch.argsort(key, stable=True)  # a table's; each table's keys have their range
        key_counts = torch.bincount(key, minlength=rows)
        crow = F.pad(torch.cumsum(counts, 0), (1, 0))
        return cls(tiled(query, n), tiled(query * width + column, n * width), tiled(key, rows),
                   F.pad(tiled(crow[:-1], per_table), (0, 1), value=batch * per_table),
                   tiled(order, per_table), tiled(query.index_select(0, order), n),
                   tiled(torch.cumsum(key_counts, 0) - key_counts, per_table),
                   crow.expand(batch, -1).contiguous(), key.expand(batch, -1).contiguous(),
                   (batch, n, rows, width))

    @property
    def offsets(self) -> torch.Tensor:
        """``(batch * n,)`` where each query's entries start (``F.embedding_bag``'s offsets)."""
        return self.bounds[:-1]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch * n, R) -> (E,)``: the real entries of the rectangular layout."""
        # index_select, not x[position]: on the CPU it runs 3-5x faster than advanced indexing
        return x.reshape(-1).index_select(0, self.position)

    def unpack(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``(E,) -> (batch * n, R)``, ``fill`` where a query has no entry."""
        batch, n, _, width = self.shape
        return values.new_full((batch * n * width,), fill).index_copy(
            0, self.position, values).view(batch * n, width)

    def pattern(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``(batch, n, rows)`` holding ``values: (E,)`` on the gather's entries."""
        batch, n, rows, _ = self.shape
        with warnings.catch_warnings():  # torch calls its CSR support "beta" at every tensor
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, values.view(batch, -1),
                                           (batch, n, rows))

    def gather_sum(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[i] = sum weights[e] table[key[e]]`` over query ``i``'s entries:
        ``(E,), (M, D) -> (batch * n, D)``."""
        return F.embedding_bag(self.key, table, self.offsets, mode="sum",
                               per_sample_weights=weights)

    def scatter_sum(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The transpose: ``out[j] = sum weights[e] values[row[e]]`` over the entries that gather
        row ``j``: ``(E,), (batch * n, D) -> (M, D)``."""
        return self.scatter_sum_by_key(weights.index_select(0, self.by_key), values)

    def scatter_sum_by_key(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """:meth:`scatter_sum` with ``weights`` already in ``by_key`` order (order them once for
        several products with the same weights)."""
        return F.embedding_bag(self.key_queries, values, self.key_offsets, mode="sum",
                               per_sample_weights=weights)

    def gather_dot(self, queries: torch.Tensor, table: torch.Tensor,
                   add_to: torch.Tensor | None = None) -> torch.Tensor:
        """``queries[row[e]] . table[key[e]]``: ``(batch * n, D), (M, D) -> (E,)`` as a sampled
        matrix product (SDDMM), on the CPU by the compiled loop of :mod:`.native` where it is
        available. With ``add_to: (E,)``, the products are added to it in place (in the same
        kernel) and it is returned."""
        products = gathered_dot(queries, table, self.bounds, self.key, add_to)
        if products is not None:
            return products
        batch, n, rows, _ = self.shape
        dim = queries.shape[1]
        queries, keys = queries.view(batch, n, dim), table.view(batch, rows, dim).transpose(1, 2)
        if add_to is not None:
            into = self.pattern(add_to)  # its values are add_to's storage
            torch.sparse.sampled_addmm(into, queries, keys, beta=1.0, out=into)
            return add_to
        if queries.dtype not in self.patterns:
            self.patterns[queries.dtype] = self.pattern(queries.new_zeros(self.col.numel()))
        return torch.sparse.sampled_addmm(self.patterns[queries.dtype], queries, keys,
                                          beta=0.0).values().flatten()


SUM: Rules = (GatherIndex.gather_sum,  # out = a k[key]: da = out' . z[key], dz = a^T out'
              lambda gather, grad, a, z: gather.gather_dot(grad, z),
              lambda gather, grad, a, z: gather.scatter_sum(a, grad))


def gather_sum(a: torch.Tensor, z: torch.Tensor, gather: GatherIndex) -> torch.Tensor:
    """Weighted sums of gathered rows: ``(E,), (B, m, D) -> (B, n, D)``."""
    batch, n = gather.shape[:2]
    return product(SUM, gather, a, z.reshape(-1, z.shape[-1])).view(batch, n, -1)
