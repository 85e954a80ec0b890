"""Spectral expansion of attention patterns, and how diffusion reshapes an attention spectrum.

Conventions for pattern graphs: the pattern is symmetrised and unweighted (``S = 1[A + A^T > 0]``),
self-loops are excluded, ``P = D^{-1/2} S D^{-1/2}`` with eigenvalues ``1 = l1 >= l2 >= ... >= ln``.
The one-sided gap ``1 - l2`` is the smallest non-zero eigenvalue of the normalised Laplacian
``I - P``; Cheeger's inequality bounds the conductance ``phi`` by ``gap/2 <= phi <= sqrt(2 gap)``.
A d-regular graph is Ramanujan when ``max(|l2|, |ln|) <= 2 sqrt(d-1) / d``.

For an attention matrix ``A`` (row-stochastic, one head) every diffused operator is a function of
``A``, so its eigenvalues are that function of ``A``'s eigenvalues ``mu`` (spectral mapping):
PPR with K = inf gives ``alpha / (1 - (1-alpha) mu)``, truncated PPR and heat their polynomials.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import LinearOperator, eigsh

from .diffusion import Diffusion
from .graph import GraphLike, as_csr

DENSE_MAX_NODES = 1500  # dense eigh below this size: exact, and faster than Lanczos


def symmetrised(graph: GraphLike) -> sp.csr_matrix:
    """Unweighted symmetric adjacency without self-loops: ``S = 1[A + A^T > 0]``, ``diag S = 0``."""
    adj = as_csr(graph)
    sym = ((abs(adj) + abs(adj).T) > 0).astype(np.float64).tolil()
    sym.setdiag(0)
    return sym.tocsr()


def _normalised(sym: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    n = sym.shape[0]
    if n < 2:
        raise ValueError(f"spectral statistics need a graph with at least 2 nodes, got {n}")
    degree = np.asarray(sym.sum(axis=1)).ravel()
    isolated = np.flatnonzero(degree == 0)
    if isolated.size:
        raise ValueError(f"graph has {isolated.size} isolated node(s) (no edge but a self-loop), "
                         f"e.g. node {isolated[0]}; P = D^-1/2 S D^-1/2 is undefined")
    scale = sp.diags(1.0 / np.sqrt(degree))
    return (scale @ sym @ scale).tocsr(), degree


@dataclass(frozen=True)
class SpectralStats:
    """Spectral expansion of one pattern (see the module docstring for conventions)."""

    n: int
    edges: int  # undirected edges of S
    mean_degree: float
    min_degree: int
    max_degree: int
    connected: bool
    lambda_2: float
    lambda_min: float
    one_sided_gap: float  # 1 - l2
    two_sided_gap: float  # 1 - max(|l2|, |ln|)
    ramanujan_bound: float  # 2 sqrt(d-1)/d for the mean degree d
    ramanujan_ratio: float  # max(|l2|, |ln|) / ramanujan_bound: 1 is optimal, larger is worse
    cheeger_lower: float  # gap / 2 <= conductance
    cheeger_upper: float  # conductance <= sqrt(2 gap)
    sweep_conductance: float  # conductance of the best Fiedler sweep cut (an actual cut)
    method: str  # "dense" or "sparse"

    def as_dict(self) -> dict:
        return asdict(self)


def _extreme_eigenpairs(p: sp.csr_matrix, degree: np.ndarray, method: str, tol: float, seed: int):
    """(l2, Fiedler vector of P, ln) by dense eigh or by Lanczos on well-separated extremes."""
    n = p.shape[0]
    if method == "dense":
        values, vectors = scipy.linalg.eigh(p.toarray())
        return values[-2], vectors[:, -2], values[0]
    top = np.sqrt(degree / degree.sum())  # eigenvector of l1 = 1
    # Moving l1 to -1 (instead of 0) keeps l2 the largest eigenvalue even when l2 < 0.
    deflated = LinearOperator((n, n), dtype=np.float64,
                              matvec=lambda x: p @ x - 2.0 * top * (top @ x))
    start = np.random.default_rng(seed).standard_normal(n)
    value, vector = eigsh(deflated, k=1, which="LA", tol=tol, v0=start)
    lowest = eigsh(p, k=1, which="SA", tol=tol, v0=start, return_eigenvectors=False)
    return float(value[0]), vector[:, 0], float(lowest[0])


def sweep_conductance(sym: sp.csr_matrix, score: np.ndarray) -> float:
    """Lowest conductance among the n-1 prefix cuts of the nodes sorted by ``score``.

    ``conductance(S) = cut(S, V - S) / min(vol S, vol V - S)``; each prefix is a real cut, so the
    result is an upper bound on the graph's conductance.
    """
    n = sym.shape[0]
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(score, kind="stable")] = np.arange(n)
    upper = sp.triu(sym, k=1).tocoo()
    first = np.minimum(rank[upper.row], rank[upper.col])
    last = np.maximum(rank[upper.row], rank[upper.col])
    # An edge is cut by the prefixes of sizes first+1 .. last.
    delta = np.bincount(first + 1, minlength=n + 1) - np.bincount(last + 1, minlength=n + 1)
    cut = np.cumsum(delta)[1:n]
    degree = np.asarray(sym.sum(axis=1)).ravel()
    volume = np.cumsum(degree[np.argsort(score, kind="stable")])[: n - 1]
    smaller_side = np.minimum(volume, degree.sum() - volume)
    return float(np.min(cut / smaller_side))


def spectral_stats(graph: GraphLike, *, method: str = "auto", tol: float = 1e-8,
                   seed: int = 0) -> SpectralStats:
    """Spectral expansion statistics of a pattern (DGL graph or adjacency matrix).

    ``method``: ``"dense"`` (``scipy.linalg.eigh``), ``"sparse"`` (``eigsh`` on the extreme,
    well-separated eigenvalues; no slow ``which="SM"``) or ``"auto"`` (dense up to
    ``DENSE_MAX_NODES`` nodes). A disconnected graph has ``l2 = 1``: it is reported with
    ``connected=False``, gaps 0 and conductance 0 (a component is a cut of no edges).
    """
    if method not in ("auto", "dense", "sparse"):
        raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    sym = symmetrised(graph)
    p, degree = _normalised(sym)
    n = p.shape[0]
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_NODES else "sparse"
    if method == "sparse" and n < 4:
        method = "dense"  # ARPACK needs k < n - 1
    components, labels = connected_components(sym, directed=False)
    connected = components == 1
    lambda_2, fiedler, lambda_min = _extreme_eigenpairs(p, degree, method, tol, seed)
    if connected:
        lambda_2 = min(lambda_2, 1.0)
        conductance = sweep_conductance(sym, fiedler / np.sqrt(degree))
    else:
        lambda_2, conductance = 1.0, 0.0
    gap = 1.0 - lambda_2
    mean_degree = float(degree.mean())
    ramanujan = 2.0 * math.sqrt(mean_degree - 1.0) / mean_degree if mean_degree > 1 else 1.0
    second = max(abs(lambda_2), abs(lambda_min))
    return SpectralStats(
        n=n, edges=int(sym.nnz // 2), mean_degree=mean_degree, min_degree=int(degree.min()),
        max_degree=int(degree.max()), connected=connected, lambda_2=float(lambda_2),
        lambda_min=float(lambda_min), one_sided_gap=float(gap), two_sided_gap=float(1 - second),
        ramanujan_bound=ramanujan, ramanujan_ratio=second / ramanujan,
        cheeger_lower=gap / 2.0, cheeger_upper=math.sqrt(2.0 * max(gap, 0.0)),
        sweep_conductance=conductance, method=method)


def complete_graph_stats(n: int) -> SpectralStats:
    """Closed-form :class:`SpectralStats` of the complete graph ``K_n`` (full attention's limit).

    ``P = (J - I) / (n-1)`` has eigenvalues 1 and ``-1/(n-1)`` (n-1 times); the best cut halves the
    nodes, with conductance ``ceil(n/2) / (n-1)``.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    d = n - 1
    lam = -1.0 / d
    ramanujan = 2.0 * math.sqrt(d - 1) / d if d > 1 else 1.0
    gap = 1.0 - lam
    return SpectralStats(
        n=n, edges=n * d // 2, mean_degree=float(d), min_degree=d, max_degree=d, connected=True,
        lambda_2=lam, lambda_min=lam, one_sided_gap=gap, two_sided_gap=1.0 - abs(lam),
        ramanujan_bound=ramanujan, ramanujan_ratio=abs(lam) / ramanujan,
        cheeger_lower=gap / 2.0, cheeger_upper=math.sqrt(2.0 * gap),
        sweep_conductance=math.ceil(n / 2) / d, method="closed form")


def eigenvalues(graph: GraphLike, k: int | None = None, *, tol: float = 1e-8,
                seed: int = 0) -> np.ndarray:
    """The ``k`` largest eigenvalues of ``P`` (all of them when ``k`` is None), descending."""
    sym = symmetrised(graph)
    p, _ = _normalised(sym)
    n = p.shape[0]
    if k is None:
        k = n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}], got {k!r}")
    if n <= DENSE_MAX_NODES or k >= n - 1:
        return scipy.linalg.eigh(p.toarray(), eigvals_only=True)[::-1][:k]
    start = np.random.default_rng(seed).standard_normal(n)
    return np.sort(eigsh(p, k=k, which="LA", tol=tol, v0=start, return_eigenvectors=False))[::-1]


# --- how diffusion maps an attention spectrum -------------------------------------------------

def second_modulus(values: np.ndarray) -> float:
    """The second largest ``|eigenvalue|``: how fast powers of the operator mix."""
    return float(np.sort(np.abs(values))[-2])


def _ppr_limit_alpha(diffusion: Diffusion) -> float:
    if diffusion.kernel != "ppr" or diffusion.alpha == 0:
        raise ValueError(f"infinite=True needs kernel 'ppr' with alpha > 0 (the series "
                         f"alpha sum (1-alpha)^k A^k diverges at alpha = 0), got {diffusion!r}")
    return diffusion.alpha


def diffusion_eigenvalue_map(mu: np.ndarray, diffusion: Diffusion | None = None, *,
                             infinite: bool = False) -> np.ndarray:
    """Eigenvalues of the diffused operator from eigenvalues ``mu`` of ``A`` (complex allowed).

    Finite K: the polynomial ``sum_k theta_k mu^k`` of ``diffusion``'s coefficients (default
    :class:`Diffusion`: PPR, alpha 0.1, K = 5). ``infinite=True`` (PPR only): the K -> inf limit
    ``alpha / (1 - (1-alpha) mu)``.
    """
    diffusion = diffusion or Diffusion()
    mu = np.asarray(mu)
    if infinite:
        alpha = _ppr_limit_alpha(diffusion)
        return alpha / (1.0 - (1.0 - alpha) * mu)
    return np.polynomial.polynomial.polyval(mu, diffusion.coefficients)


def diffused_operator_matrix(attn: np.ndarray, diffusion: Diffusion | None = None, *,
                             infinite: bool = False) -> np.ndarray:
    """The diffused operator ``sum_k theta_k A^k`` of one row-stochastic ``attn: (N, N)``;
    ``infinite=True`` (PPR only): ``alpha (I - (1-alpha) A)^-1``."""
    diffusion = diffusion or Diffusion()
    attn = np.asarray(attn, dtype=np.float64)
    if infinite:
        alpha = _ppr_limit_alpha(diffusion)
        return alpha * np.linalg.inv(np.eye(attn.shape[0]) - (1.0 - alpha) * attn)
    return diffusion.apply(lambda z: attn @ z, np.eye(attn.shape[0]))


def check_row_stochastic(attn: np.ndarray, atol: float = 1e-8) -> np.ndarray:
    """Return ``attn`` as float64 if it is a square, non-negative, row-stochastic matrix."""
    attn = np.asarray(attn, dtype=np.float64)
    if attn.ndim != 2 or attn.shape[0] != attn.shape[1] or attn.shape[0] == 0:
        raise ValueError(f"attention matrix must be square (N, N) with N >= 1, got {attn.shape}")
    if not np.isfinite(attn).all():
        raise ValueError("attention matrix has NaN or infinite entries")
    if np.any(attn < -atol) or not np.allclose(attn.sum(axis=1), 1.0, atol=atol):
        raise ValueError("attention matrix must be non-negative with rows summing to 1")
    return attn


def diffused_spectrum(attn: np.ndarray, *, alpha: float = 0.1, hops: int = 5,
                      t: float = 1.0) -> dict[str, np.ndarray]:
    """Eigenvalues (complex) of ``A`` and of its diffused operators, computed from the matrices.

    Keys: ``"A"``, ``"ppr"`` (K = ``hops``), ``"ppr_inf"`` (K = inf), ``"heat"`` (K = ``hops``).
    """
    attn = check_row_stochastic(attn)
    ppr = Diffusion(alpha=alpha, hops=hops)
    operators = {
        "ppr": diffused_operator_matrix(attn, ppr),
        "ppr_inf": diffused_operator_matrix(attn, ppr, infinite=True),
        "heat": diffused_operator_matrix(attn, Diffusion(kernel="heat", hops=hops, t=t)),
    }
    return {"A": np.linalg.eigvals(attn),
            **{name: np.linalg.eigvals(matrix) for name, matrix in operators.items()}}
