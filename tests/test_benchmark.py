"""The benchmark suite runs end to end, and its baselines compute the same function."""
import argparse
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffuser_graph import PatternSpec, build_graph, diffusion_attention

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
spec = importlib.util.spec_from_file_location("attention_benchmark", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_baselines_compute_diffused_attention():
    g = build_graph(80, PatternSpec(window=4, num_global=1, num_random=2))
    src, dst = g.edges()
    q, k, v = (torch.randn(80, 2, 8, dtype=torch.float64) for _ in range(3))
    expected = diffusion_attention(g, q, k, v, alpha=0.1, hops=4)
    mask = torch.zeros(80, 80, dtype=torch.bool)
    mask[dst, src] = True
    torch.testing.assert_close(bench.dense_masked_attention(mask, q, k, v, 0.1, 4), expected,
                               rtol=0, atol=1e-10)


@pytest.mark.slow
def test_suite_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--lengths", "128", "256", "--repeats", "1", "--budget", "0.1",
                       "--threads", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["rows"] if "error" not in r]
    assert {r["impl"] for r in rows} == set(bench.IMPLEMENTATIONS)
    assert all(r["forward_backward_s"] > 0 and r["peak_memory_bytes"] >= 0 for r in rows)
    assert all("speedup_vs_sdpa" in r and r["fraction_of_matmul"] > 0 for r in rows)
    assert results["meta"]["matmul_gflops"] > 0
    assert results["meta"]["sdpa_kernel"] == "aten::_scaled_dot_product_flash_attention"
    table = (out / "results.md").read_text()
    assert "| 256 | block | window32+2g+3r | 5 |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_suite_runs_the_chosen_implementations_and_states_their_scaling(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--lengths", "64", "256", "--impls", "block", "--patterns",
                       "window32+2g+3r", "--repeats", "1", "--budget", "0.1", "--threads", "1",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["impl"], r["n"]) for r in rows] == [("block", 64), ("block", 256)]
    ratio = rows[1]["forward_backward_s"] / rows[0]["forward_backward_s"]
    assert (f"- block (window32+2g+3r, K = 5) from n = 64: 4x tokens: {ratio:.2f}x time"
            in (out / "results.md").read_text())


def test_suite_refuses_an_unknown_implementation(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--impls", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err


LAYERS_SCRIPT = SCRIPT.with_name("layers.py")
layers_spec = importlib.util.spec_from_file_location("layers_benchmark", LAYERS_SCRIPT)
layers = importlib.util.module_from_spec(layers_spec)
layers_spec.loader.exec_module(layers)


def layer_case(impl, n=256, pattern="window32+2g+3r"):
    return dict(impl=impl, n=n, hidden=32, heads=2, pattern=pattern, block_size=32, hops=3,
                device="cpu", threads=1, repeats=1, budget_s=0.01)


@pytest.mark.parametrize("impl", ["diffuser", "diffuser_dgl", "diffuser_recompute",
                                  "diffuser_recompute_hops", "diffuser_causal", "sparse", "sdpa",
                                  "bigbird", "longformer", "transformerconv"])
def test_every_layer_maps_hidden_states_and_reports_its_pattern(impl):
    pytest.importorskip(layers.PEERS.get(impl, "torch"))
    case = layer_case(impl)
    layer, forward, info = layers.LAYERS[impl](case, torch.device("cpu"))
    x = torch.randn(case["n"], case["hidden"], requires_grad=True)
    out = forward(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in layer.parameters()
                                          if p.requires_grad)
    expected_hops = 3 if impl.startswith("diffuser") else 1
    assert info["hops_per_layer"] == expected_hops
    edges = build_graph(case["n"], layers.PATTERNS[case["pattern"]]).num_edges()
    if impl in ("diffuser", "diffuser_dgl", "diffuser_recompute", "diffuser_recompute_hops",
                "sparse", "transformerconv"):
        assert info["keys_per_query"] == edges / case["n"]  # the same graph for all of them
    if impl == "diffuser_dgl":
        assert info["engine"] == "dgl"
    if impl == "diffuser_causal":
        assert info["engine"] == "block, causal" and info["keys_per_query"] < edges / case["n"]
        later = x.detach().clone()
        later[-1] += 1.0  # the last token changes: no earlier output may
        torch.testing.assert_close(forward(later)[:-1], out[:-1].detach(), rtol=0, atol=0)


def test_diffuser_layer_on_the_dgl_engine_equals_the_auto_engine():
    case = layer_case("diffuser", pattern="official")
    torch.manual_seed(0)
    _, fast, info = layers.diffuser_layer(case, torch.device("cpu"))
    torch.manual_seed(0)
    _, reference, _ = layers.diffuser_layer({**case, "impl": "diffuser_dgl"}, torch.device("cpu"))
    x = torch.randn(case["n"], case["hidden"])
    assert info["engine"] == "block"
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    chunked = {**case, "recompute_heads": 1}  # the case's two heads in two chunks
    _, recomputed, info = layers.diffuser_layer({**chunked, "impl": "diffuser_recompute"},
                                                torch.device("cpu"))
    assert info["engine"] == "block, recompute 1 head"
    torch.testing.assert_close(recomputed(x), fast(x), rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    _, recomputed, info = layers.diffuser_layer({**chunked, "impl": "diffuser_recompute_hops"},
                                                torch.device("cpu"))
    assert info["engine"] == "block, recompute 1 head and hops"
    torch.testing.assert_close(recomputed(x), fast(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_layer_suite_writes_ratios_and_names_missing_peers(tmp_path, monkeypatch):
    monkeypatch.setattr(layers, "installed", lambda module: module != "torch_geometric")
    assert layers.main(["--lengths", "256", "--repeats", "1", "--budget", "0.1", "--threads",
                        "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "layers-peers.json").read_text())["rows"]
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["transformerconv"]["error"] == "torch_geometric is not installed (bench extra)"
    assert by_impl["sdpa"]["time_vs_sdpa"] == 1.0
    assert by_impl["diffuser"]["time_vs_bigbird"] > 0 and by_impl["diffuser"]["memory_vs_sdpa"] >= 0
    assert by_impl["diffuser"]["allocated_vs_sdpa"] == pytest.approx(
        by_impl["diffuser"]["peak_allocated_bytes"] / by_impl["sdpa"]["peak_allocated_bytes"])
    table = (tmp_path / "layers-peers.md").read_text()
    assert "| 256 | diffuser | block |" in table and "| 256 | longformer |" in table
    causal = by_impl["diffuser_causal"]
    assert causal["time_vs_noncausal"] == pytest.approx(
        causal["forward_backward_s"] / by_impl["diffuser"]["forward_backward_s"])
    assert f"{causal['time_vs_noncausal']:.2f}× at 256" in table


def test_layer_suite_recomputes_the_heads_given_at_a_time(tmp_path):
    assert layers.main(["--lengths", "64", "--impls", "diffuser_recompute", "--repeats", "1",
                        "--budget", "0.1", "--threads", "1", "--recompute-heads", "1",
                        "--out", str(tmp_path)]) == 0
    row, = json.loads((tmp_path / "layers-peers.json").read_text())["rows"]
    assert row["engine"].endswith("recompute 1 head") and row["recompute_heads"] == 1
    with pytest.raises(SystemExit):
        layers.main(["--recompute-heads", "0", "--out", str(tmp_path)])


def test_a_case_runs_with_the_allocator_train_uses(monkeypatch, capsys):
    measure = importlib.import_module("measure")
    calls = []
    monkeypatch.setattr(measure, "retain_freed_memory", lambda: calls.append("allocator"))
    args = argparse.Namespace(case=json.dumps({"n": 1}))
    assert measure.ran_one_case(args, lambda case: calls.append("case") or {**case, "ok": 1})
    assert calls == ["allocator", "case"]
    assert json.loads(capsys.readouterr().out) == {"n": 1, "ok": 1}
    assert measure.ran_one_case(args, lambda case: calls.append("case") or case,
                                retain_memory=False)  # the training suite: as its config says
    assert calls == ["allocator", "case", "case"]


def test_rounds_take_turns_and_report_medians_and_the_largest_peak(monkeypatch):
    measure = importlib.import_module("measure")  # benchmarks/ is on the path: layers loaded it
    calls = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def fake(script, case, timeout):
        calls.append(case["impl"])
        if case["impl"] == "c" and len(calls) > 3:
            return {**case, "error": "out of memory"}
        seconds = next(times[case["impl"]]) if case["impl"] in times else 1.0
        return {**case, "forward_s": seconds / 2, "forward_backward_s": seconds,
                "peak_memory_bytes": int(seconds * 100), "peak_allocated_bytes": int(seconds)}

    monkeypatch.setattr(measure, "run_in_subprocess", fake)
    cases = [{"impl": impl, "budget_s": 9.0} for impl in "abc"]
    a, b, c = measure.run_in_rounds("script", cases, 3, 1.0)
    assert calls == list("abc") * 3  # round by round, not case by case
    assert (a["forward_backward_s"], a["forward_s"], a["peak_memory_bytes"]) == (2.0, 1.0, 300)
    assert (b["forward_backward_s"], b["peak_memory_bytes"]) == (5.0, 600)
    assert (a["peak_allocated_bytes"], b["peak_allocated_bytes"]) == (3, 6)
    assert [r["forward_backward_s"] for r in a["rounds"]] == [3.0, 1.0, 2.0]
    assert a["budget_s"] == 9.0 and c["error"] == "out of memory"
    assert measure.run_in_rounds("script", [{"impl": "d", "budget_s": 9.0}], 1, 1.0)[0].keys() == {
        "impl", "budget_s", "forward_s", "forward_backward_s", "peak_memory_bytes",
        "peak_allocated_bytes"}


def test_allocated_peak_counts_the_tensors_alive_at_once():
    measure = importlib.import_module("measure")
    kept = []

    def step():
        a = torch.ones(2**20)  # 4 MiB, freed at the end of the step
        b = torch.ones(2**21)  # 8 MiB, alive with a: 12 MiB at once
        del a
        kept.append(torch.ones(2**18))  # 1 MiB, alive after the step too
        return b.sum()

    peak = measure.allocated_peak(step, torch.device("cpu"))
    assert 12 * 2**20 <= peak < 12 * 2**20 + 2**16


def test_layer_suite_refuses_no_rounds(capsys):
    with pytest.raises(SystemExit):
        layers.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


TRAINING_SCRIPT = SCRIPT.with_name("training.py")
training_spec = importlib.util.spec_from_file_location("training_benchmark", TRAINING_SCRIPT)
training = importlib.util.module_from_spec(training_spec)
training_spec.loader.exec_module(training)


@pytest.mark.slow
def test_training_suite_times_steps_per_attention_with_ratios(tmp_path):
    out = tmp_path / "bench"
    assert training.main(["--configs", "image-small", "--attentions", "diffuser", "sparse",
                          "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "training.json").read_text())["rows"]
    assert [(r["attention"], r["hops"]) for r in rows] == [("diffuser", 5), ("sparse", 1)]
    assert all(r["steps_per_s"] > 0 and r["engine"] == "block" for r in rows)
    assert rows[1]["vs_sparse"] == 1.0
    assert rows[0]["vs_sparse"] == rows[0]["steps_per_s"] / rows[1]["steps_per_s"]
    assert "| image-small | diffuser | block | 5 |" in (out / "training.md").read_text()


def test_training_suite_refuses_an_unknown_config_and_no_steps(capsys):
    with pytest.raises(SystemExit):
        training.main(["--configs", "no-such-config"])
    assert "no configs/no-such-config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training.main(["--steps", "0"])
    assert "--steps and --threads must be >= 1" in capsys.readouterr().err
