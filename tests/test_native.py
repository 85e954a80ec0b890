"""The compiled gathered-dot loop against torch's sampled_addmm path and a dense reference."""
import shutil
import warnings

import pytest
import torch

from diffuser_graph import PatternSpec
from diffuser_graph.engines import native
from diffuser_graph.engines.block import block_layout
from diffuser_graph.engines.gathered import GatherIndex

HAS_COMPILER = shutil.which("cc") is not None


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library() that builds again, into an empty cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def gather(heads=3, n=70):
    layout = block_layout(n, PatternSpec(window=4, num_global=2, num_random=5, seed=3))
    return GatherIndex.build(layout.random_keys, layout.random_mask, heads, layout.padded)


def dense_dots(g, q, table):
    """q[row[e]] . table[key[e]] one entry at a time."""
    return torch.stack([q[r] @ table[k] for r, k in zip(g.row.tolist(), g.key.tolist(),
                                                         strict=True)])


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_the_loop_builds_where_a_compiler_is_found(fresh_library, tmp_path):
    assert native.library() is not None
    assert len(list((tmp_path / "diffuser-graph").glob("kernels-*.so"))) == 1


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [8, 16, 64, 128])  # the loop's constant sizes and another
def test_it_equals_a_dense_reference_and_accumulates(fresh_library, monkeypatch, dtype,
                                                     threads, dim):
    monkeypatch.setattr(native, "ENTRIES_PER_THREAD", 16)  # split even a small problem
    torch.set_num_threads(threads)
    try:
        g = gather()
        rows, tables = g.shape[0] * g.shape[1], g.shape[0] * g.shape[2]
        q, table = torch.randn(rows, dim, dtype=dtype), torch.randn(tables, dim, dtype=dtype)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        got = native.gathered_dot(q, table, g.bounds, g.key)
        torch.testing.assert_close(got, dense_dots(g, q, table), rtol=tol, atol=tol)
        start = torch.randn_like(got)
        total = native.gathered_dot(q, table, g.bounds, g.key, add_to=start.clone())
        torch.testing.assert_close(total, start + got, rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(1)


def _dots_in_child(q, table, bounds, keys, expected):
    torch.set_num_threads(1)  # as torch's DataLoader workers do: OpenMP is not fork-safe
    got = native.gathered_dot(q, table, bounds, keys)
    raise SystemExit(0 if torch.allclose(got, expected, rtol=1e-12, atol=1e-12) else 1)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_a_forked_child_on_one_thread_finishes_and_agrees(monkeypatch):
    """The loops run on torch's OpenMP threads; a child forked after the parent used them has
    none of them and, like torch's own operators, must run on one thread (torch's DataLoader
    workers do): then it finishes and agrees."""
    import multiprocessing

    monkeypatch.setattr(native, "ENTRIES_PER_THREAD", 16)
    torch.set_num_threads(2)
    try:
        g = gather()
        q = torch.randn(g.shape[0] * g.shape[1], 16, dtype=torch.float64)
        table = torch.randn(g.shape[0] * g.shape[2], 16, dtype=torch.float64)
        expected = native.gathered_dot(q, table, g.bounds, g.key)  # the parent's threads
        torch.testing.assert_close(expected, dense_dots(g, q, table), rtol=1e-12, atol=1e-12)
        child = multiprocessing.get_context("fork").Process(
            target=_dots_in_child, args=(q, table, g.bounds, g.key, expected))
        child.start()
        child.join(timeout=60)
        if child.exitcode is None:  # waiting for threads it does not have
            child.kill()
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(1)


def test_the_gather_index_gives_the_same_products_with_and_without_it(monkeypatch):
    g = gather()
    q = torch.randn(g.shape[0] * g.shape[1], 8, dtype=torch.float64)
    table = torch.randn(g.shape[0] * g.shape[2], 8, dtype=torch.float64)
    compiled = g.gather_dot(q, table)
    monkeypatch.setenv(native.SWITCH, "0")
    native.library.cache_clear()
    try:
        assert native.gathered_dot(q, table, g.bounds, g.key) is None
        torch.testing.assert_close(g.gather_dot(q, table), compiled, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(compiled, dense_dots(g, q, table), rtol=1e-12, atol=1e-12)
    finally:
        native.library.cache_clear()


@pytest.mark.parametrize("compiler,cache", [("/nonexistent/cc", None), ("false", None),
                                            (shutil.which("cc") or "cc", "unwritable")])
def test_a_failing_build_warns_and_falls_back(fresh_library, monkeypatch, tmp_path, compiler,
                                              cache):
    monkeypatch.setenv("CC", compiler)
    if cache:  # a file where the cache folder should be: the build cannot write there
        (tmp_path / "diffuser-graph").write_text("")
    with pytest.warns(UserWarning, match="sampled_addmm"):
        assert native.library() is None
    g = gather()
    q = torch.randn(g.shape[0] * g.shape[1], 8, dtype=torch.float64)
    table = torch.randn(g.shape[0] * g.shape[2], 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every product
        torch.testing.assert_close(g.gather_dot(q, table), dense_dots(g, q, table))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_a_compiler_without_openmp_builds_the_loops_for_one_thread(fresh_library, monkeypatch,
                                                                    tmp_path):
    monkeypatch.setattr(native, "PARALLEL", ("-fno-such-flag",))  # what such a compiler refuses
    monkeypatch.setattr(native, "ENTRIES_PER_THREAD", 16)
    torch.set_num_threads(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: the loops are there
            assert native.library() is not None
        assert len(list((tmp_path / "diffuser-graph").glob("kernels-*.so"))) == 1
        g = gather()
        q = torch.randn(g.shape[0] * g.shape[1], 16, dtype=torch.float64)
        table = torch.randn(g.shape[0] * g.shape[2], 16, dtype=torch.float64)
        torch.testing.assert_close(native.gathered_dot(q, table, g.bounds, g.key),
                                   dense_dots(g, q, table), rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(1)


def test_no_compiler_on_the_path_warns(fresh_library, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native.library() is None


def test_other_dtypes_and_devices_are_left_to_torch():
    g = gather()
    q = torch.randn(g.shape[0] * g.shape[1], 8, dtype=torch.bfloat16)
    table = torch.randn(g.shape[0] * g.shape[2], 8, dtype=torch.bfloat16)
    assert native.gathered_dot(q, table, g.bounds, g.key) is None
