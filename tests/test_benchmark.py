"""The benchmark suite runs end to end, and its baselines compute the same function."""
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
