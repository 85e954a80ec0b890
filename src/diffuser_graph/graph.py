"""Token graphs: patterns become DGL graphs, sequences of different lengths become one batch.

A sequence of L tokens is a graph of L nodes whose edges are its attention pattern (edge
``u -> v``: query v attends to key u). A batch of sequences is ``dgl.batch`` of their graphs, so
sequences of different lengths need no padding and padding can never leak into real tokens.
Models that hold padded ``(B, L, ...)`` tensors use :class:`PackedBatch` to move between the
padded layout and the packed ``(N, ...)`` node layout of the batched graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Tuple

import dgl
import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from .patterns import PatternSpec, pattern_edges


@lru_cache(maxsize=256)
def _cached_graph(seq_len: int, spec: PatternSpec) -> dgl.DGLGraph:
    src, dst = pattern_edges(seq_len, spec)
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=seq_len)
    g.create_formats_()  # build the sparse formats once, not on every message pass
    return g


def build_graph(seq_len: int, spec: PatternSpec) -> dgl.DGLGraph:
    """The DGL graph of ``spec`` on ``seq_len`` tokens, built once per ``(seq_len, spec)``.

    Edges are sorted by ``(dst, src)``. The returned graph is shared by every caller: read it or
    use ``g.local_scope()``; never add node or edge data to it directly.
    """
    if not isinstance(spec, PatternSpec):
        raise ValueError(f"spec must be a PatternSpec, got {type(spec).__name__}")
    if isinstance(seq_len, (int, np.integer)) and not isinstance(seq_len, bool):
        seq_len = int(seq_len)
    return _cached_graph(seq_len, spec)


def _check_lengths(lengths) -> Tuple[int, ...]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths must be a 1-D integer tensor, got {tuple(lengths.shape)} "
                             f"{lengths.dtype}")
        lengths = lengths.tolist()
    lengths = tuple(int(n) for n in lengths)
    if not lengths:
        raise ValueError("lengths must name at least one sequence")
    if min(lengths) < 1:
        raise ValueError(f"every length must be >= 1, got {list(lengths)}")
    return lengths


def batch_graphs(lengths: Sequence[int] | torch.Tensor, spec: PatternSpec) -> dgl.DGLGraph:
    """One batched graph for sequences of the given ``lengths`` (nodes concatenated in order)."""
    lengths = _check_lengths(lengths)
    return dgl.batch([build_graph(n, spec) for n in lengths])


@dataclass(frozen=True)
class Padding:
    """Maps a padded batch ``(B, L, ...)`` to packed tokens ``(N, ...)`` and back.

    Packed token ``i`` is padded position ``flat_index[i]`` of the flattened ``(B * L)`` layout;
    sequence b holds ``lengths[b]`` real tokens, in order.
    """

    lengths: Tuple[int, ...]
    flat_index: torch.Tensor  # (N,) int64
    padded_shape: Tuple[int, int]  # (B, L)

    @staticmethod
    def _mask_lengths(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a (B, L) tensor, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        if attention_mask.dtype != torch.bool:
            if attention_mask.dtype.is_floating_point or not bool(
                    ((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must be bool or integer 0/1")
            attention_mask = attention_mask.bool()
        lengths = attention_mask.sum(dim=1)
        if bool((lengths == 0).any()):
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"attention_mask rows {empty} have no real token")
        return attention_mask, lengths

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Padding":
        """``attention_mask: (B, L)``, bool or 0/1; tokens where it is true form each sequence."""
        mask, lengths = cls._mask_lengths(attention_mask)
        return cls(_check_lengths(lengths), torch.nonzero(mask.reshape(-1)).flatten(),
                   tuple(mask.shape))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor) -> "Padding":
        """Right-padded layout for sequences of ``lengths`` (``L = max(lengths)``)."""
        lengths = _check_lengths(lengths)
        width = max(lengths)
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return cls(lengths, torch.nonzero(mask.reshape(-1)).flatten(), (len(lengths), width))

    @property
    def mask(self) -> torch.Tensor:
        """``(B, L)`` bool: true at real tokens."""
        mask = torch.zeros(self.padded_shape[0] * self.padded_shape[1], dtype=torch.bool)
        mask[self.flat_index] = True
        return mask.reshape(self.padded_shape)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """``padded: (B, L, ...)`` -> node tensor ``(N, ...)`` of the real tokens."""
        if tuple(padded.shape[:2]) != self.padded_shape:
            raise ValueError(f"padded tensor must start with shape {self.padded_shape}, "
                             f"got {tuple(padded.shape)}")
        return padded.reshape(-1, *padded.shape[2:])[self.flat_index.to(padded.device)]

    def unpack(self, packed: torch.Tensor, fill_value: float = 0.0) -> torch.Tensor:
        """Node tensor ``(N, ...)`` -> ``(B, L, ...)`` with ``fill_value`` at padding."""
        if packed.shape[0] != self.flat_index.numel():
            raise ValueError(f"packed tensor must have {self.flat_index.numel()} rows, "
                             f"got {packed.shape[0]}")
        batch, length = self.padded_shape
        out = packed.new_full((batch * length, *packed.shape[1:]), fill_value)
        out = out.index_copy(0, self.flat_index.to(packed.device), packed)
        return out.reshape(batch, length, *packed.shape[1:])


@dataclass(frozen=True)
class PackedBatch(Padding):
    """A :class:`Padding` together with the batched graph of its sequences."""

    graph: dgl.DGLGraph = None

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, spec: PatternSpec) -> "PackedBatch":
        """``attention_mask: (B, L)``, bool or 0/1 integers; every row needs a real token."""
        padding = Padding.from_mask(attention_mask)
        return cls(padding.lengths, padding.flat_index, padding.padded_shape,
                   batch_graphs(padding.lengths, spec))


def to_scipy(g: dgl.DGLGraph) -> sp.csr_matrix:
    """Adjacency as a CSR matrix ``S`` with ``S[u, v] = 1`` for each edge ``u -> v``.

    Rows are keys (sources), columns queries; ``S.T`` is the query-major attention mask.
    """
    src, dst = (t.numpy() for t in g.edges())
    n = g.num_nodes()
    return sp.csr_matrix((np.ones(src.size, dtype=np.float64), (src, dst)), shape=(n, n))


def to_networkx(g: dgl.DGLGraph) -> nx.DiGraph:
    """A ``networkx.DiGraph`` with nodes ``0..N-1`` and the same edges (self-loops included)."""
    return nx.from_scipy_sparse_array(to_scipy(g), create_using=nx.DiGraph)
