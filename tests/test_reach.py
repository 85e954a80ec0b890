import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from diffuser_graph import (
    PatternSpec,
    build_graph,
    khop_receptive_field,
    reach_stats,
    to_networkx,
    to_scipy,
    ua_conditions,
)


def networkx_hops(g):
    """Pairwise directed hop counts by networkx: an independent reference."""
    lengths = dict(nx.all_pairs_shortest_path_length(to_networkx(g)))
    n = g.num_nodes()
    return [lengths[u].get(v, -1) for u in range(n) for v in range(n)]


@pytest.mark.parametrize("spec", [PatternSpec(window=1), PatternSpec(window=2, num_random=2),
                                  PatternSpec(window=1, causal=True, num_random=1),
                                  PatternSpec(kind="grid", image_size=(5, 6), window=1)])
def test_exact_histogram_and_coverage_match_networkx(spec):
    n = 30
    g = build_graph(n, spec)
    hops = np.array(networkx_hops(g))
    stats = reach_stats(g, max_hops=6)
    assert stats.exact and stats.sources == n
    values, counts = np.unique(hops, return_counts=True)
    expected_hist = {int(h): c / hops.size for h, c in zip(values, counts, strict=True)}
    assert stats.hop_histogram == pytest.approx(expected_hist)
    for k in range(1, 7):
        assert stats.coverage[k] == pytest.approx(np.mean((hops >= 0) & (hops <= k)))
    reachable = hops[hops >= 0]
    if (hops >= 0).all():
        assert stats.diameter == reachable.max()
    else:
        assert stats.diameter == np.inf and not stats.strongly_connected


def test_window_one_diameter_and_coverage():
    stats = reach_stats(build_graph(20, PatternSpec(window=1)), max_hops=3)
    assert stats.diameter == 19
    # pairs within k hops on a path of 20 nodes: 20 + 2 * sum_{j=1..k} (20 - j)
    assert stats.coverage[3] == pytest.approx((20 + 2 * (19 + 18 + 17)) / 400)


def test_sampled_bounds_contain_the_exact_diameter():
    g = build_graph(600, PatternSpec(window=3, num_random=1, seed=2))
    exact = reach_stats(g, exact=True)
    sampled = reach_stats(g, exact=False, samples=16)
    assert not sampled.exact and sampled.sources == 16
    assert sampled.diameter_lower <= exact.diameter <= sampled.diameter_upper
    assert abs(sampled.coverage[2] - exact.coverage[2]) < 0.05


def test_global_tokens_bring_every_pair_within_two_hops():
    stats = reach_stats(build_graph(3000, PatternSpec(window=4, num_global=1)), samples=8)
    assert stats.diameter_upper <= 2 and stats.coverage[2] == 1.0


def test_ua_conditions():
    window = ua_conditions(build_graph(40, PatternSpec(window=2)), max_hops=20)
    assert all(c.holds for c in window.values()), window
    far = ua_conditions(build_graph(40, PatternSpec(window=2)), max_hops=5)
    assert far["bounded_reach"].holds is False and "20 > 5" in far["bounded_reach"].reason
    dilated = ua_conditions(build_graph(40, PatternSpec(window=1, dilation=2, num_global=1)),
                            max_hops=4)
    assert dilated["hamiltonian_path"].holds is False
    assert "0 -> 1" not in dilated["hamiltonian_path"].reason  # the global covers edge 0 -> 1
    assert "1 -> 2 is missing" in dilated["hamiltonian_path"].reason
    no_loops = to_scipy(build_graph(10, PatternSpec(window=1))).tolil()
    no_loops.setdiag(0)
    assert ua_conditions(no_loops.tocsr(), max_hops=20)["self_loops"].holds is False


def test_ua_reach_undecided_when_bounds_straddle():
    g = build_graph(3000, PatternSpec(window=40, num_random=1, seed=0))
    stats = reach_stats(g, samples=4)
    assert stats.diameter_lower < stats.diameter_upper
    middle = int(stats.diameter_lower)
    result = ua_conditions(g, max_hops=middle, samples=4)["bounded_reach"]
    assert result.holds is None and "between" in result.reason


def test_khop_receptive_field():
    field = khop_receptive_field(build_graph(15, PatternSpec(window=1)), query=7, hops=3)
    assert field.tolist() == [4, 4, 4, 4, 3, 2, 1, 0, 1, 2, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError, match="query must be in \\[0, 15\\)"):
        khop_receptive_field(build_graph(15, PatternSpec(window=1)), query=15, hops=3)


def test_bad_arguments():
    g = build_graph(10, PatternSpec(window=1))
    with pytest.raises(ValueError, match="max_hops"):
        reach_stats(g, max_hops=0)
    with pytest.raises(ValueError, match="samples"):
        reach_stats(g, samples=0)
    with pytest.raises(ValueError, match="no nodes"):
        reach_stats(sp.csr_matrix((0, 0)))
