"""How far information travels through a pattern: hop distances, K-hop coverage, diameter, and
the pattern conditions used by sparse-attention universal-approximation results.

Distances are directed and follow the flow of information: ``dist(u -> v)`` is the least number
of attention hops after which query v holds information from key u (edge ``u -> v``: v attends to
u). K rounds of diffusion give query v a non-zero weight on key u exactly when
``dist(u -> v) <= K`` (self-loops make "within K" and "exactly K" the same), so the K-hop coverage
is the fraction of non-zero entries of ``A^K``.

Small graphs are measured exactly (BFS from every node); larger ones from ``samples`` BFS sources,
which estimates the histogram and coverage and bounds the diameter from both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, shortest_path

from .graph import GraphLike, as_csr

EXACT_MAX_NODES = 2048


@dataclass(frozen=True)
class ReachStats:
    """Directed hop distances of a pattern, exact or estimated from sampled BFS sources."""

    n: int
    exact: bool  # all pairs measured; otherwise ``sources`` sampled queries
    sources: int
    weakly_connected: bool
    strongly_connected: bool
    diameter_lower: float  # inf when some pair is unreachable
    diameter_upper: float
    hop_histogram: dict[int, float]  # hops -> fraction of (key, query) pairs; -1: unreachable
    coverage: dict[int, float]  # K -> fraction of pairs with dist <= K

    @property
    def diameter(self) -> float | None:
        """The diameter when known exactly, else None (see the two bounds)."""
        return self.diameter_lower if self.diameter_lower == self.diameter_upper else None

    def as_dict(self) -> dict:
        return {**asdict(self), "diameter": self.diameter}


def _distances_to(adj: sp.csr_matrix, queries: np.ndarray) -> np.ndarray:
    """``(len(queries), n)`` hop counts ``dist(u -> q)`` (inf if unreachable)."""
    return shortest_path(adj.T.tocsr(), unweighted=True, directed=True, indices=queries)


def _distances_from(adj: sp.csr_matrix, keys: np.ndarray) -> np.ndarray:
    return shortest_path(adj, unweighted=True, directed=True, indices=keys)


def reach_stats(graph: GraphLike, *, max_hops: int = 8, samples: int = 64, seed: int = 0,
                exact: bool | None = None) -> ReachStats:
    """Hop-distance histogram, K-hop coverage for K = 1..``max_hops`` and diameter bounds.

    ``exact=None`` measures all pairs up to ``EXACT_MAX_NODES`` nodes and samples beyond.
    Sampled diameter bounds over centres c (the samples and the highest-degree nodes):
    ``max ecc(c) <= diameter <= min_c (in-ecc(c) + out-ecc(c))``.
    """
    adj = as_csr(graph)
    n = adj.shape[0]
    if n < 1:
        raise ValueError("graph has no nodes")
    if max_hops < 1:
        raise ValueError(f"max_hops must be >= 1, got {max_hops}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    exact = n <= EXACT_MAX_NODES if exact is None else exact
    queries = (np.arange(n) if exact
               else np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))
    to_queries = _distances_to(adj, queries)  # rows: queries, columns: keys
    lower, upper = _diameter_bounds(adj, queries, to_queries, exact)
    finite = to_queries[np.isfinite(to_queries)].astype(np.int64)
    total = to_queries.size
    histogram = {int(h): c / total for h, c in enumerate(np.bincount(finite)) if c}
    unreachable = total - finite.size
    if unreachable:
        histogram[-1] = unreachable / total
    coverage = {k: float(np.count_nonzero(finite <= k) / total) for k in range(1, max_hops + 1)}
    weak = connected_components(adj, directed=True, connection="weak")[0] == 1
    strong = connected_components(adj, directed=True, connection="strong")[0] == 1
    return ReachStats(n=n, exact=exact, sources=len(queries), weakly_connected=bool(weak),
                      strongly_connected=bool(strong), diameter_lower=lower, diameter_upper=upper,
                      hop_histogram=histogram, coverage=coverage)


def _diameter_bounds(adj: sp.csr_matrix, queries: np.ndarray, to_queries: np.ndarray,
                     exact: bool, hubs: int = 4) -> tuple[float, float]:
    """Every eccentricity bounds the diameter from below; ``in-ecc(c) + out-ecc(c)`` from above.

    The sampled queries plus the ``hubs`` highest-degree nodes (globals, when there are any)
    serve as centres; the hubs only tighten the bounds and never enter the estimates.
    """
    in_ecc = to_queries.max(axis=1)  # farthest key from each query
    if exact:
        diameter = float(in_ecc.max())
        return diameter, diameter
    degree = np.asarray(adj.sum(axis=0)).ravel() + np.asarray(adj.sum(axis=1)).ravel()
    centres = np.union1d(queries, np.argsort(degree)[-hubs:])
    in_ecc = _distances_to(adj, centres).max(axis=1)
    out_ecc = _distances_from(adj, centres).max(axis=1)
    return float(max(in_ecc.max(), out_ecc.max())), float(np.min(in_ecc + out_ecc))


@dataclass(frozen=True)
class Condition:
    """One universal-approximation condition: ``holds`` is None when it could not be decided."""

    holds: bool | None
    reason: str


def ua_conditions(graph: GraphLike, *, max_hops: int, samples: int = 64,
                  seed: int = 0) -> dict[str, Condition]:
    """Pattern conditions of sparse-attention universal approximation (Yun et al. 2020).

    - ``self_loops``: every token attends to itself.
    - ``hamiltonian_path``: edges ``i -> i+1`` for every i, a Hamiltonian path in token order
      (the sufficient condition checked; other orders are not searched).
    - ``bounded_reach``: every key reaches every query within ``max_hops`` hops.
    """
    adj = as_csr(graph)
    n = adj.shape[0]
    missing_loops = np.flatnonzero(adj.diagonal() == 0)
    conditions = {"self_loops": Condition(
        missing_loops.size == 0,
        "every token attends to itself" if missing_loops.size == 0 else
        f"{missing_loops.size} token(s) do not attend to themselves, e.g. token "
        f"{missing_loops[0]}")}
    chain = np.asarray(adj[np.arange(n - 1), np.arange(1, n)]).ravel() if n > 1 else np.ones(0)
    broken = np.flatnonzero(chain == 0)
    conditions["hamiltonian_path"] = Condition(
        broken.size == 0,
        "edges i -> i+1 form a Hamiltonian path in token order" if broken.size == 0 else
        f"edge {broken[0]} -> {broken[0] + 1} is missing ({broken.size} of {n - 1} chain edges)")
    reach = reach_stats(adj, max_hops=max_hops, samples=samples, seed=seed)
    if reach.diameter_upper <= max_hops:
        conditions["bounded_reach"] = Condition(
            True, f"every pair is connected within {reach.diameter_upper:g} <= {max_hops} hops")
    elif reach.diameter_lower > max_hops:
        conditions["bounded_reach"] = Condition(
            False, f"some pair needs {reach.diameter_lower:g} > {max_hops} hops")
    else:
        conditions["bounded_reach"] = Condition(
            None, f"diameter is between {reach.diameter_lower:g} and {reach.diameter_upper:g} "
                  f"(sampled); max_hops={max_hops} is inside that range")
    return conditions


def khop_receptive_field(graph: GraphLike, query: int, hops: int) -> np.ndarray:
    """``dist(u -> query)`` for every key u, capped at ``hops + 1`` (meaning: not within reach)."""
    adj = as_csr(graph)
    if not 0 <= query < adj.shape[0]:
        raise ValueError(f"query must be in [0, {adj.shape[0]}), got {query}")
    dist = _distances_to(adj, np.array([query]))[0]
    return np.minimum(dist, hops + 1)
