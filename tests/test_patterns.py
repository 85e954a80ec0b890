import numpy as np
import pydantic
import pytest
import yaml

from diffuser_graph import PatternSpec, official_pattern, pattern_edges


def edge_set(src, dst):
    return set(zip(src.tolist(), dst.tolist(), strict=True))


def authors_adjacency(max_len, w, num_rand, num_glob):
    """Transcription of the authors' construction, global numpy RNG and all."""
    state = np.random.get_state()
    try:
        adj = np.zeros((max_len, max_len))
        for i in range(int(max_len / (w / 2)) - 1):
            s = int(i * w / 2)
            adj[s:s + w, s:s + w] = 1
        np.random.seed(0)
        idx = np.random.choice(range(max_len * max_len), max_len * num_rand, replace=False)
        adj[idx % max_len, idx // max_len] = 1
        glob = np.random.choice(range(w, max_len), num_glob, replace=False)
        adj[glob, :] = 1
        adj[:, glob] = 1
    finally:
        np.random.set_state(state)
    return adj


@pytest.mark.parametrize("seq_len,edges", [(1024, 148_938), (2048, 386_268), (4096, 1_147_411)])
def test_official_edge_counts(seq_len, edges):
    src, dst = official_pattern(seq_len)
    assert src.size == edges


@pytest.mark.parametrize("seq_len", [1, 37, 512, 1000])
def test_official_matches_authors_code_bit_for_bit(seq_len):
    adj = authors_adjacency(1024, 32, 8, 8)
    src, dst = official_pattern(seq_len, attention_window=32, num_rand=8, num_glob=8, max_len=1024)
    expected_src, expected_dst = np.nonzero(adj[:seq_len, :seq_len])
    assert edge_set(src, dst) == edge_set(expected_src, expected_dst)


def test_official_default_spec_is_the_authors_setting():
    spec = PatternSpec(kind="official")
    assert (spec.window, spec.num_random, spec.num_global, spec.max_len) == (64, 64, 64, 4096)


def brute_force_window(n, window, dilation):
    return {(u, v) for v in range(n) for u in range(n)
            if abs(u - v) <= window * dilation and (u - v) % dilation == 0}


@pytest.mark.parametrize("n,window,dilation", [(1, 2, 1), (7, 0, 1), (20, 3, 1), (20, 2, 3)])
def test_window_matches_definition(n, window, dilation):
    src, dst = pattern_edges(n, PatternSpec(window=window, dilation=dilation))
    assert edge_set(src, dst) == brute_force_window(n, window, dilation)


def test_edges_sorted_unique_with_self_loops():
    spec = PatternSpec(window=2, num_global=2, num_random=3, seed=4)
    src, dst = pattern_edges(50, spec)
    code = dst * 50 + src
    assert np.all(np.diff(code) > 0)
    assert {(i, i) for i in range(50)} <= edge_set(src, dst)


def test_globals_attend_and_are_attended_by_all():
    n = 30
    spec = PatternSpec(window=1, global_positions=(3, 17))
    edges = edge_set(*pattern_edges(n, spec))
    for g in (3, 17):
        assert all((g, v) in edges for v in range(n))
        assert all((u, g) in edges for u in range(n))
    assert len(edges) == len(brute_force_window(n, 1, 1)
                             | {(g, x) for g in (3, 17) for x in range(n)}
                             | {(x, g) for g in (3, 17) for x in range(n)})
    first = edge_set(*pattern_edges(n, PatternSpec(window=1, num_global=2)))
    assert all((0, v) in first and (1, v) in first for v in range(n))


def test_random_keys_are_exact_new_distinct_and_seeded():
    n, window, num_random = 200, 2, 5
    base = brute_force_window(n, window, 1)
    spec = PatternSpec(window=window, num_random=num_random, seed=11)
    src, dst = pattern_edges(n, spec)
    extra = edge_set(src, dst) - base
    assert len(edge_set(src, dst)) == src.size  # no duplicate edges
    per_query = np.bincount([v for _, v in extra], minlength=n)
    assert np.all(per_query == num_random)
    again = pattern_edges(n, spec)
    assert np.array_equal(src, again[0]) and np.array_equal(dst, again[1])
    other = pattern_edges(n, spec.model_copy(update={"seed": 12}))
    assert edge_set(*other) != edge_set(src, dst)


def test_random_keys_cover_everything_when_few_are_free():
    src, dst = pattern_edges(6, PatternSpec(window=1, num_random=50))
    assert src.size == 36


def test_random_keys_are_roughly_uniform():
    n = 400
    src, dst = pattern_edges(n, PatternSpec(window=0, num_random=20, seed=3))
    keys = src[src != dst]
    counts = np.bincount(keys, minlength=n)
    # 8000 draws over 400 keys: mean 20, sd ~4.5; every key is hit and none is hit absurdly often
    assert counts.min() > 0 and counts.max() < 45


def test_causal_keeps_only_past_keys():
    spec = PatternSpec(window=3, num_global=1, num_random=4, causal=True, seed=2)
    src, dst = pattern_edges(64, spec)
    assert np.all(src <= dst)
    in_degree = np.bincount(dst, minlength=64)
    # query v has v+1 candidate keys: the window's past half + global 0 + 4 random when free
    for v in range(64):
        assert in_degree[v] == min(v + 1, len({max(v - j, 0) for j in range(4)} | {0}) + 4)
    src_o, dst_o = pattern_edges(200, PatternSpec(kind="official", causal=True))
    assert np.all(src_o <= dst_o)


def test_grid_matches_chebyshev_neighbourhood():
    h, w, r = 4, 5, 1
    spec = PatternSpec(kind="grid", image_size=(h, w), window=r)
    expected = {(a, b) for a in range(h * w) for b in range(h * w)
                if abs(a // w - b // w) <= r and abs(a % w - b % w) <= r}
    assert edge_set(*pattern_edges(h * w, spec)) == expected
    with_globals = edge_set(*pattern_edges(h * w, spec.model_copy(update={"num_global": 1})))
    assert all((0, v) in with_globals for v in range(h * w))


def test_spec_round_trips_through_yaml():
    spec = PatternSpec(window=8, num_global=2, num_random=3, seed=5)
    loaded = PatternSpec(**yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert loaded == spec and hash(loaded) == hash(spec)


@pytest.mark.parametrize("fields,field_name", [
    ({"window": -1}, "window"),
    ({"dilation": 0}, "dilation"),
    ({"num_random": -2}, "num_random"),
    ({"kind": "official", "window": 63}, "window"),
    ({"kind": "grid"}, "image_size"),
    ({"kind": "window", "image_size": (2, 2)}, "image_size"),
    ({"global_positions": (1, 1)}, "global_positions"),
    ({"kind": "bogus"}, "kind"),
    ({"windw": 3}, "windw"),
])
def test_invalid_spec_names_the_field(fields, field_name):
    with pytest.raises(pydantic.ValidationError, match=field_name):
        PatternSpec(**fields)


@pytest.mark.parametrize("seq_len,spec,message", [
    (0, PatternSpec(), "seq_len"),
    (-3, PatternSpec(), "seq_len"),
    (2.5, PatternSpec(), "seq_len"),
    (4, PatternSpec(num_global=5), "num_global=5 exceeds"),
    (10, PatternSpec(global_positions=(10,)), "global_positions must be < seq_len=10"),
    (10, PatternSpec(kind="grid", image_size=(3, 3)), "H\\*W=9"),
    (5000, PatternSpec(kind="official"), "max_len=4096"),
])
def test_invalid_length_gives_clear_error(seq_len, spec, message):
    with pytest.raises(ValueError, match=message):
        pattern_edges(seq_len, spec)
