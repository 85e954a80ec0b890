"""Token graphs: patterns become DGL graphs, sequences of different lengths one batched graph.

A sequence of L tokens is a graph of L nodes whose edges are its attention pattern (edge
``u -> v``: query v attends to key u). A batch of sequences is ``dgl.batch`` of their graphs, so
sequences of different lengths need no padding and padding can never leak into real tokens.
Graphs convert to scipy and networkx for analysis (:func:`to_scipy`, :func:`to_networkx`,
:func:`as_csr`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TypeAlias

import dgl
import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from .checks import as_int
from .patterns import PatternSpec, pattern_edges

GraphLike: TypeAlias = dgl.DGLGraph | sp.spmatrix | sp.sparray | np.ndarray


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


def check_lengths(lengths: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Sequence lengths as a tuple of ints >= 1 (a 1-D integer tensor or numpy ints accepted)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be a 1-D integer tensor, got {tuple(lengths.shape)} "
                             f"{lengths.dtype}")
        lengths = lengths.tolist()
    if isinstance(lengths, np.ndarray):
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise ValueError(f"lengths must be a sequence of ints, got {type(lengths).__name__}")
    checked = tuple(as_int("every length", n, minimum=1) for n in lengths)
    if not checked:
        raise ValueError("lengths must name at least one sequence")
    return checked


def batch_graphs(lengths: Sequence[int] | torch.Tensor, spec: PatternSpec) -> dgl.DGLGraph:
    """One batched graph for sequences of the given ``lengths`` (nodes concatenated in order)."""
    return dgl.batch([build_graph(n, spec) for n in check_lengths(lengths)])


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


def as_csr(graph: GraphLike) -> sp.csr_matrix:
    """Adjacency of a DGL graph, scipy sparse matrix or dense array as CSR (``[u, v]``: u -> v)."""
    if isinstance(graph, dgl.DGLGraph):
        return to_scipy(graph)
    if isinstance(graph, np.ndarray) or sp.issparse(graph):
        if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
            raise ValueError(f"adjacency must be a square matrix, got shape {graph.shape}")
        csr = sp.csr_matrix(graph, dtype=np.float64)
        if not np.isfinite(csr.data).all():
            raise ValueError("adjacency has NaN or infinite entries")
        return csr
    raise ValueError(f"expected a DGLGraph, scipy sparse matrix or ndarray, got "
                     f"{type(graph).__name__}")
