import itertools
import math

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from diffuser_graph import (
    Diffusion,
    PatternSpec,
    build_graph,
    complete_graph_stats,
    dense_attention_matrix,
    dense_mask,
    diffused_spectrum,
    diffusion_eigenvalue_map,
    diffusion_operator,
    eigenvalues,
    spectral_stats,
)
from diffuser_graph.spectral import diffused_operator_matrix


def adjacency(graph):
    return sp.csr_matrix(nx.to_scipy_sparse_array(graph, dtype=float))


def cycle(n):
    return adjacency(nx.cycle_graph(n))


def paley(q):
    residues = {(x * x) % q for x in range(1, q)}
    return np.array([[1.0 if (i - j) % q in residues else 0.0 for j in range(q)]
                     for i in range(q)])


def random_connected_graph(n, density, seed):
    """Symmetric 0/1 Erdos-Renyi adjacency plus a Hamiltonian cycle, so it is connected."""
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < density, 1)
    adj = (upper | upper.T).astype(float)
    ring = (np.arange(n) + 1) % n
    adj[np.arange(n), ring] = adj[ring, np.arange(n)] = 1
    return adj


@pytest.mark.parametrize("n", [5, 12, 40])
def test_cycle_eigenvalues_are_cosines(n):
    expected = np.sort(np.cos(2 * np.pi * np.arange(n) / n))[::-1]
    np.testing.assert_allclose(eigenvalues(cycle(n)), expected, atol=1e-12)
    stats = spectral_stats(cycle(n))
    assert stats.lambda_2 == pytest.approx(math.cos(2 * math.pi / n), abs=1e-12)
    assert stats.lambda_min == pytest.approx(math.cos(2 * math.pi * (n // 2) / n), abs=1e-12)


@pytest.mark.parametrize("n", [3, 10, 31])
def test_complete_graph_closed_form(n):
    measured = spectral_stats(np.ones((n, n)))  # self-loops are dropped
    expected = complete_graph_stats(n)
    assert measured.lambda_2 == pytest.approx(-1 / (n - 1), abs=1e-12)
    for field in ("lambda_2", "lambda_min", "one_sided_gap", "two_sided_gap", "mean_degree",
                  "ramanujan_bound", "cheeger_upper", "sweep_conductance"):
        assert getattr(measured, field) == pytest.approx(getattr(expected, field), abs=1e-12), field
    assert measured.edges == expected.edges == n * (n - 1) // 2


@pytest.mark.parametrize("q", [13, 29, 101])
def test_paley_graph_eigenvalues(q):
    d = (q - 1) / 2
    low, high = (-1 - math.sqrt(q)) / 2 / d, (-1 + math.sqrt(q)) / 2 / d
    half = (q - 1) // 2
    expected = np.array([1.0] + [high] * half + [low] * half)
    np.testing.assert_allclose(eigenvalues(paley(q)), expected, atol=1e-10)


@pytest.mark.parametrize("d,n", [(4, 1000), (10, 2000), (16, 4000)])
def test_random_regular_graphs_are_nearly_ramanujan(d, n):
    stats = spectral_stats(adjacency(nx.random_regular_graph(d, n, seed=1)), method="sparse")
    assert stats.min_degree == stats.max_degree == d
    assert stats.ramanujan_bound == pytest.approx(2 * math.sqrt(d - 1) / d)
    # Friedman: max(|l2|, |ln|) <= 2 sqrt(d-1)/d + eps with high probability
    assert max(abs(stats.lambda_2), abs(stats.lambda_min)) < stats.ramanujan_bound + 0.03


@pytest.mark.parametrize("seed", range(5))
def test_eigenvalues_match_numpy_on_random_graphs(seed):
    n = 30
    adj = random_connected_graph(n, 0.3, seed)
    degree = adj.sum(1)
    p = adj / np.sqrt(np.outer(degree, degree))
    expected = np.sort(np.linalg.eigvalsh(p))[::-1]
    np.testing.assert_allclose(eigenvalues(adj), expected, atol=1e-12)
    np.testing.assert_allclose(eigenvalues(adj, k=3), expected[:3], atol=1e-12)
    stats = spectral_stats(adj)
    assert stats.lambda_2 == pytest.approx(expected[1])
    assert stats.lambda_min == pytest.approx(expected[-1])


def test_dense_and_sparse_agree_on_patterns():
    for spec in (PatternSpec(window=8, num_random=3, num_global=1), PatternSpec(window=8),
                 PatternSpec(kind="official", window=16, num_random=4, num_global=4, max_len=2048)):
        g = build_graph(1600, spec)
        dense, sparse = spectral_stats(g, method="dense"), spectral_stats(g, method="sparse")
        assert (dense.method, sparse.method) == ("dense", "sparse")
        for field in ("lambda_2", "lambda_min", "one_sided_gap"):
            assert getattr(sparse, field) == pytest.approx(getattr(dense, field), abs=1e-7)


def brute_force_conductance(adj):
    n = adj.shape[0]
    degree = adj.sum(1)
    best = np.inf
    for size in range(1, n):
        for subset in itertools.combinations(range(n), size):
            inside = np.zeros(n, dtype=bool)
            inside[list(subset)] = True
            cut = adj[inside][:, ~inside].sum()
            best = min(best, cut / min(degree[inside].sum(), degree[~inside].sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_cheeger_bounds_and_sweep_cut(seed):
    adj = random_connected_graph(11, 0.35, seed)
    stats = spectral_stats(adj)
    phi = brute_force_conductance(adj)
    assert stats.cheeger_lower <= phi + 1e-12
    assert phi <= stats.sweep_conductance + 1e-12
    assert stats.sweep_conductance <= stats.cheeger_upper + 1e-12


def test_sweep_cut_finds_the_bridge_of_a_barbell():
    stats = spectral_stats(adjacency(nx.barbell_graph(8, 0)))
    volume = 8 * 7 + 1  # one clique's degrees plus the bridge
    assert stats.sweep_conductance == pytest.approx(1 / volume)


def test_expander_patterns_have_a_gap_that_does_not_vanish():
    window_gaps, expander_gaps = [], []
    for n in (512, 2048):
        window_gaps.append(spectral_stats(build_graph(n, PatternSpec(window=8))).one_sided_gap)
        expander_gaps.append(spectral_stats(
            build_graph(n, PatternSpec(window=8, num_random=4, num_global=2))).one_sided_gap)
    assert window_gaps[1] < window_gaps[0] / 8  # ~1/n^2 decay
    assert min(expander_gaps) > 0.2 and abs(expander_gaps[1] - expander_gaps[0]) < 0.1


def test_disconnected_graph_is_documented_not_an_error():
    adj = sp.block_diag([cycle(5), cycle(6)]).tocsr()
    stats = spectral_stats(adj)
    assert not stats.connected
    assert stats.lambda_2 == 1.0 and stats.one_sided_gap == 0.0 and stats.sweep_conductance == 0.0


@pytest.mark.parametrize("graph,message", [
    (np.zeros((0, 0)), "at least 2 nodes"),
    (np.ones((1, 1)), "at least 2 nodes"),
    (np.eye(4), "isolated node"),
    (np.ones((3, 4)), "square"),
    ("graph", "expected a DGLGraph"),
])
def test_bad_graphs_give_clear_errors(graph, message):
    with pytest.raises(ValueError, match=message):
        spectral_stats(graph)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="k must be an int in \\[1, n=5\\]"):
        eigenvalues(cycle(5), k=6)
    with pytest.raises(ValueError, match="k must be"):
        eigenvalues(cycle(5), k=0)
    with pytest.raises(ValueError, match="method"):
        spectral_stats(cycle(5), method="lanczos")
    with pytest.raises(ValueError, match="rows summing to 1"):
        diffused_spectrum(np.ones((3, 3)))
    with pytest.raises(ValueError, match="infinite=True needs kernel 'ppr' with alpha > 0"):
        diffusion_eigenvalue_map(np.array([0.5]), Diffusion(alpha=0.0), infinite=True)
    with pytest.raises(ValueError, match="infinite=True needs kernel 'ppr'"):
        diffusion_eigenvalue_map(np.array([0.5]), Diffusion(kernel="heat"), infinite=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        spectral_stats(np.array([[0.0, np.nan], [1.0, 0.0]]))


def random_row_stochastic(n, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, n)) * 2
    logits[rng.random((n, n)) < 0.5] = -np.inf
    np.fill_diagonal(logits, 0.0)
    weights = np.exp(logits)
    return weights / weights.sum(1, keepdims=True)


def assert_same_multiset(a, b, atol):
    rows, cols = linear_sum_assignment(np.abs(a[:, None] - b[None, :]))
    assert np.max(np.abs(a[rows] - b[cols])) < atol


@pytest.mark.parametrize("seed", range(4))
def test_eigenvalue_map_on_random_row_stochastic_matrices(seed):
    attn = random_row_stochastic(40, seed)
    spectra = diffused_spectrum(attn, alpha=0.15, hops=4, t=2.0)
    mu = spectra["A"]
    ppr, heat = Diffusion(alpha=0.15, hops=4), Diffusion(kernel="heat", hops=4, t=2.0)
    assert_same_multiset(spectra["ppr_inf"], diffusion_eigenvalue_map(mu, ppr, infinite=True),
                         1e-8)
    assert_same_multiset(spectra["ppr"], diffusion_eigenvalue_map(mu, ppr), 1e-8)
    assert_same_multiset(spectra["heat"], diffusion_eigenvalue_map(mu, heat), 1e-8)
    # The operators themselves are the dense reference's explicit matrix series.
    for diffusion, kwargs in ((ppr, dict(alpha=0.15, hops=4)),
                              (heat, dict(kernel="heat", hops=4, t=2.0))):
        np.testing.assert_allclose(
            diffused_operator_matrix(attn, diffusion),
            diffusion_operator(torch.from_numpy(attn), **kwargs).numpy(), rtol=0, atol=1e-12)
    # The eigenvalue 1 of a stochastic matrix stays 1: diffused operators are stochastic too.
    assert np.min(np.abs(spectra["ppr_inf"] - 1)) < 1e-10


def test_low_pass_laplacian_form_and_gap_enlargement():
    alpha = 0.1
    lam = np.linspace(1e-3, 1.0, 200)  # Laplacian eigenvalues, lam = 1 - mu
    mapped = 1 - diffusion_eigenvalue_map(1 - lam, Diffusion(alpha=alpha), infinite=True)
    np.testing.assert_allclose(mapped, (1 - alpha) * lam / (alpha + (1 - alpha) * lam), rtol=1e-12)
    small = lam < 1 - 2 * alpha  # large-scale structure: amplified
    assert np.all(mapped[small] > lam[small])
    assert np.all(mapped[lam > 0.95] < lam[lam > 0.95])  # noise: shrunk
    # On a real attention layer the diffused operator has a larger spectral gap.
    g = build_graph(200, PatternSpec(window=2))
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(200, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    attn = dense_attention_matrix(dense_mask(g), q, k)[0].numpy()
    spectra = diffused_spectrum(attn, alpha=alpha, hops=5)

    def gap(values):
        return 1 - np.sort(np.abs(values))[-2]

    assert gap(spectra["ppr_inf"]) > 5 * gap(spectra["A"])
    assert gap(spectra["ppr"]) > gap(spectra["A"])
