"""Products with gathered rows that never hold all the gathered rows at once.

A query that attends to ``R`` scattered keys needs ``q_i . k_{keys[i, r]}`` (scores) and
``sum_r a_{ir} z_{keys[i, r]}`` (one hop). Gathering ``k[keys]`` whole costs ``(B, n, R, D)``
memory, and autograd would keep it for the backward pass: 1.2 GB per product for the official
pattern at 4,096 tokens with 12 heads. Here both products are autograd functions built on fused
kernels: a weighted sum of gathered rows is ``F.embedding_bag``, and so is each backward pass,
over the *transposed* gather (for every key, the queries that gathered it), which
:class:`GatherIndex` sorts once per batch; the scores are a sampled matrix product
(``torch.sparse.sampled_addmm`` on the gather's CSR pattern). Nothing keeps more than its
inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .products import Rules, product


@dataclass(frozen=True)
class GatherIndex:
    """Which rows each query gathers, in ``batch`` stacked tables of ``rows`` rows.

    ``index: (batch * n, R)`` rows of the stacked table (padding entries point at row 0 of their
    table and must get weight 0); ``queries``, ``order`` and ``offsets`` hold the real entries
    grouped by the row they gather: entry ``e`` of the groups is ``index.flatten()[order[e]]``,
    gathered by query ``queries[e]``, and row ``j``'s group starts at ``offsets[j]``.
    """

    index: torch.Tensor
    queries: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    # Every entry of one table, padding included, as a CSR pattern of R entries per row (rows =
    # queries, columns = keys, non-decreasing: a padding entry repeats its row's last key), so
    # a sampled matrix product writes the padded (n, R) layout directly.
    col: torch.Tensor  # (batch, n * R)
    shape: tuple[int, int, int]  # (batch, n, rows)
    patterns: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, keys: torch.Tensor, mask: torch.Tensor, batch: int,
              rows: int) -> GatherIndex:
        """``keys, mask: (n, R)``, the same for every one of the ``batch`` tables; each query's
        real keys come first (padding after them) and ascending."""
        n, width = keys.shape
        shift = torch.arange(batch, device=keys.device).view(batch, 1, 1) * rows
        index = (keys.unsqueeze(0) + shift).reshape(batch * n, width)
        flat = index.reshape(-1)
        real = torch.nonzero(mask.expand(batch, n, width).reshape(-1)).flatten()
        order = real[torch.argsort(flat[real], stable=True)]
        counts = torch.bincount(flat[order], minlength=batch * rows)
        offsets = torch.cumsum(counts, 0) - counts
        last = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        filled = torch.where(mask, keys, keys.gather(1, last))
        return cls(index, torch.div(order, width, rounding_mode="floor"), order, offsets,
                   filled.reshape(1, -1).expand(batch, -1).contiguous(), (batch, n, rows))

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """The CSR pattern ``(batch, n, rows)`` with zero values (made once per dtype)."""
        if dtype not in self.patterns:
            batch, n, rows = self.shape
            width = self.col.shape[1] // n
            crow = torch.arange(0, n * width + 1, width, device=self.col.device)
            with warnings.catch_warnings():  # torch calls its CSR support "beta" at every tensor
                warnings.simplefilter("ignore", UserWarning)
                self.patterns[dtype] = torch.sparse_csr_tensor(
                    crow.expand(batch, -1).contiguous(), self.col,
                    torch.zeros(self.col.shape, dtype=dtype, device=self.col.device),
                    (batch, n, rows))
        return self.patterns[dtype]

    def gather_sum(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``sum_r weights[i, r] table[index[i, r]]``: ``(N, R), (M, D) -> (N, D)``."""
        return F.embedding_bag(self.index, table, mode="sum", per_sample_weights=weights)

    def scatter_sum(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The transpose: row ``j`` gets ``sum weights[i, r] values[i]`` over the entries with
        ``index[i, r] = j``: ``(N, R), (N, D) -> (M, D)``."""
        return F.embedding_bag(self.queries, values, self.offsets, mode="sum",
                               per_sample_weights=weights.reshape(-1)[self.order])

    def gather_dot(self, queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``queries[i] . table[index[i, r]]``: ``(N, D), (M, D) -> (N, R)`` as a sampled matrix
        product (SDDMM); padding entries hold the score of their row's last key (callers mask
        them)."""
        batch, n, rows = self.shape
        dim, width = queries.shape[1], self.index.shape[1]
        values = torch.sparse.sampled_addmm(self.pattern(queries.dtype),
                                            queries.view(batch, n, dim),
                                            table.view(batch, rows, dim).transpose(1, 2),
                                            beta=0.0).values()
        return values.view(batch * n, width)


DOT: Rules = (GatherIndex.gather_dot,  # s = q . k[index]: dq = s' k[index], dk = scatter s' q
              lambda gather, grad, q, k: gather.gather_sum(grad, k),
              lambda gather, grad, q, k: gather.scatter_sum(grad, q))
SUM: Rules = (GatherIndex.gather_sum,  # out = a z[index]: da = out' . z[index], dz = a^T out'
              lambda gather, grad, a, z: gather.gather_dot(grad, z),
              lambda gather, grad, a, z: gather.scatter_sum(a, grad))


def gather_dot(q: torch.Tensor, k: torch.Tensor, gather: GatherIndex) -> torch.Tensor:
    """Each query with its gathered keys: ``(B, n, D), (B, m, D) -> (B, n, R)``."""
    batch, n, dim = q.shape
    scores = product(DOT, gather, q.reshape(batch * n, dim), k.reshape(-1, dim))
    return scores.view(batch, n, -1)


def gather_sum(a: torch.Tensor, z: torch.Tensor, gather: GatherIndex) -> torch.Tensor:
    """Weighted sums of gathered rows: ``(B, n, R), (B, m, D) -> (B, n, D)``."""
    batch, n, width = a.shape
    out = product(SUM, gather, a.reshape(batch * n, width), z.reshape(-1, z.shape[-1]))
    return out.view(batch, n, -1)
