"""Speed and memory of attention implementations, as ratios to baselines measured in the same run.

    python benchmarks/attention.py                     # the full suite (make bench)
    python benchmarks/attention.py --lengths 512 1024  # a quick look
    python benchmarks/attention.py --lengths 16384 65536 131072 --impls block --patterns \
        window32+2g+3r                                # long sequences: the block engine alone

Each case runs in a fresh subprocess, so its peak memory (max RSS growth over the inputs, or
CUDA memory allocated above the inputs with ``--device cuda``) is its own. Times are medians of
repeats after a warm-up, forward and forward+backward. Counted FLOPs: ``2 E H D`` for the scores
plus ``2 E H D`` per hop; achieved GFLOP/s are compared with a dense fp32 matmul measured in the
same run (the machine's practical peak). Writes ``results.json``, ``results.md`` and
``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("DGLBACKEND", "pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffuser_graph import Diffusion, PackedBatch, build_graph, diffusion_attention  # noqa: E402
from diffuser_graph.engines.block import supports  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    PATTERNS,
    add_case_options,
    machine,
    matmul_gflops,
    peak_memory,
    ran_one_case,
    reset_peak_memory,
    run_in_subprocess,
    time_step,
)

IMPLEMENTATIONS = ("dense_sdpa", "dense_masked", "sparse_one_hop", "dgl", "gather", "block")
ENGINES = ("dgl", "gather", "block")  # diffuser_graph engines, timed through diffusion_attention
DENSE_MASKED_MAX = 8192  # its (H, N, N) matrices and their gradients outgrow 24 GiB beyond this


# --- implementations: each maps (case) -> a function of (q, k, v) ------------------------------

def dense_masked_attention(mask, q, k, v, alpha, hops):
    """Masked dense softmax over the same pattern, then dense diffusion: the naive way."""
    scores = torch.einsum("vhd,uhd->hvu", q, k) / math.sqrt(q.shape[-1])
    attn = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    values = v.transpose(0, 1)  # (H, N, D)
    z = values
    for _ in range(hops):
        z = (1 - alpha) * (attn @ z) + alpha * values
    return z.transpose(0, 1)


def make_function(case: dict):
    impl, hops, alpha = case["impl"], case["hops"], 0.1
    if impl == "dense_sdpa":  # 4-D (B, H, N, D), as its users call it: the fused kernel runs
        return lambda q, k, v: F.scaled_dot_product_attention(
            *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))).squeeze(0).transpose(0, 1), 0
    spec, device = PATTERNS[case["pattern"]], torch.device(case["device"])
    g = build_graph(case["n"], spec)
    edges = g.num_edges()
    if impl in ENGINES or impl == "sparse_one_hop":
        engine = "dgl" if impl == "sparse_one_hop" else impl
        diffusion = Diffusion.one_hop() if impl == "sparse_one_hop" else Diffusion(
            alpha=alpha, hops=hops)
        batch = PackedBatch.from_lengths([case["n"]], spec, engine=engine, device=device)
        batch.plan  # noqa: B018 -- planned once, as a model does per batch
        return lambda q, k, v: diffusion_attention(batch, q, k, v, diffusion), edges
    src, dst = g.edges()
    if impl == "dense_masked":
        mask = torch.zeros(case["n"], case["n"], dtype=torch.bool)
        mask[dst, src] = True
        mask = mask.to(device)
        return lambda q, k, v: dense_masked_attention(mask, q, k, v, alpha, hops), edges
    raise ValueError(f"unknown implementation {impl!r}")


def sdpa_kernel(heads: int, dim: int, device: torch.device) -> str:
    """The aten kernel that ``scaled_dot_product_attention`` runs for the suite's 4-D inputs."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(1, heads, 256, dim, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, q, q)
    names = {event.key for event in prof.key_averages()}
    return next((name for name in sorted(names) if name.startswith("aten::_scaled_dot_product")),
                "aten::scaled_dot_product_attention")


def counted_flops(case: dict, edges: int) -> float:
    heads, dim = case["heads"], case["dim"]
    if case["impl"] == "dense_sdpa":
        return 4.0 * case["n"] ** 2 * heads * dim  # scores + one weighted sum over all pairs
    hops = 1 if case["impl"] == "sparse_one_hop" else case["hops"]
    return 2.0 * edges * heads * dim * (1 + hops)


def run_case(case: dict) -> dict:
    """Time one case in this process (meant to be a fresh one) and measure its peak memory."""
    torch.manual_seed(0)
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    fn, edges = make_function(case)
    q, k, v = (torch.randn(case["n"], case["heads"], case["dim"], device=device,
                           requires_grad=True) for _ in range(3))
    baseline = reset_peak_memory(device)  # setup (e.g. building the pattern) does not count

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        fn(q, k, v).sum().backward()
        q.grad = k.grad = v.grad = None

    result = {**case, "edges": edges, "flops": counted_flops(case, edges)}
    for name, step in (("forward", forward), ("forward_backward", forward_backward)):
        result[f"{name}_s"], result[f"{name}_repeats"] = time_step(
            step, device, case["repeats"], case["budget_s"])
    result["peak_memory_bytes"] = max(0, peak_memory(device) - baseline)
    return result


# --- the suite ---------------------------------------------------------------------------------

def cases(lengths, patterns, hops_list, heads, dim, threads, repeats, budget_s, device="cpu",
          impls=IMPLEMENTATIONS):
    yield from (case for case in _all_cases(lengths, patterns, hops_list, heads, dim, threads,
                                            repeats, budget_s, device) if case["impl"] in impls)


def _all_cases(lengths, patterns, hops_list, heads, dim, threads, repeats, budget_s, device):
    on_cuda = torch.device(device).type == "cuda"
    for n in lengths:
        base = dict(n=n, heads=heads, dim=dim, threads=threads, repeats=repeats,
                    budget_s=budget_s, device=device)
        yield {**base, "impl": "dense_sdpa", "pattern": None, "hops": 0}
        for pattern in patterns:
            spec = PATTERNS[pattern]
            if spec.kind == "official" and n > spec.max_len:
                continue
            if not on_cuda:  # one hop runs on the DGL engine, which has no CUDA kernels here
                yield {**base, "impl": "sparse_one_hop", "pattern": pattern, "hops": 1}
            for hops in hops_list:  # K = 1 is sparse_one_hop above
                for impl in ("block", "dgl", "gather", "dense_masked"):
                    if (impl == "dense_masked" and n > DENSE_MASKED_MAX) or (
                            impl == "block" and not supports(spec)) or (
                            impl == "dgl" and on_cuda):
                        continue
                    yield {**base, "impl": impl, "pattern": pattern, "hops": hops}


def add_ratios(rows: list[dict], peak_gflops: float) -> None:
    """Speed-up over dense SDPA at the same n, and throughput as a fraction of the matmul peak."""
    sdpa = {r["n"]: r for r in rows if r["impl"] == "dense_sdpa" and "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        row["gflops"] = row["flops"] / row["forward_backward_s"] / 1e9 * 3  # fwd+bwd ~ 3x fwd
        row["fraction_of_matmul"] = row["gflops"] / peak_gflops
        if row["n"] in sdpa:
            dense = sdpa[row["n"]]
            row["speedup_vs_sdpa"] = dense["forward_backward_s"] / row["forward_backward_s"]
            row["memory_vs_sdpa"] = (row["peak_memory_bytes"]
                                     / max(2**20, sdpa[row["n"]]["peak_memory_bytes"]))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Attention benchmark ({meta['machine']})",
        "",
        f"{meta['threads']} threads, H = {meta['heads']}, D = {meta['dim']}, fp32. Dense matmul "
        f"in this run: {meta['matmul_gflops']:.1f} GFLOP/s. Dense SDPA is called on 4-D "
        f"(B, H, N, D) tensors, as its users call it, and ran `{meta['sdpa_kernel']}`. Speed-up "
        "and memory are relative to dense SDPA at the same n (forward+backward); GFLOP/s counts "
        "2·E·H·D per score and per hop, with forward+backward taken as 3× the forward FLOPs.",
        "",
        "| n | implementation | pattern | K | fwd (s) | fwd+bwd (s) | × vs SDPA | peak MiB | "
        "mem vs SDPA | GFLOP/s | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['n']} | {r['impl']} | {r['pattern'] or '(full)'} | {r['hops']} |"
        if "error" in r:
            lines.append(f"{head} — | — | — | — | — | — | {r['error']} |")
            continue
        lines.append(
            f"{head} {r['forward_s']:.4f} | {r['forward_backward_s']:.4f} | "
            f"{ratio(r, 'speedup_vs_sdpa')} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {ratio(r, 'memory_vs_sdpa')} | "
            f"{r['gflops']:.2f} | {100 * r['fraction_of_matmul']:.1f} |")
    return "\n".join(lines + scaling(rows)) + "\n"


def ratio(row: dict, key: str) -> str:
    """A ratio to dense SDPA, or a dash where SDPA did not run at that n."""
    return f"{row[key]:.2f}" if key in row else "—"


def scaling(rows: list[dict]) -> list[str]:
    """How each implementation's forward+backward time grows from its shortest n, per pattern
    and K: linear cost keeps time / tokens flat."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            runs.setdefault((r["impl"], r["pattern"], r["hops"]), []).append(r)
    lines = []
    for (impl, pattern, hops), found in runs.items():
        if len(found) > 1:
            first = min(found, key=lambda r: r["n"])
            steps = ", ".join(f"{r['n'] / first['n']:g}x tokens: "
                              f"{r['forward_backward_s'] / first['forward_backward_s']:.2f}x time"
                              for r in sorted(found, key=lambda r: r["n"]) if r is not first)
            lines.append(f"- {impl} ({pattern or 'full'}, K = {hops}) from n = {first['n']}: "
                         f"{steps}")
    return ["", "Scaling (forward+backward time against the shortest n):", "", *lines] \
        if lines else []


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    time_ax, memory_ax = fig.subplots(1, 2)
    series: dict = {}
    for r in rows:
        if "error" not in r:
            label = (r["impl"] if r["pattern"] is None
                     else f"{r['impl']} {r['pattern']} K={r['hops']}")
            series.setdefault(label, []).append(r)
    for label, points in series.items():
        points.sort(key=lambda r: r["n"])
        ns = [r["n"] for r in points]
        time_ax.plot(ns, [r["forward_backward_s"] for r in points], marker="o", label=label)
        memory_ax.plot(ns, [max(r["peak_memory_bytes"], 1) / 2**20 for r in points], marker="o",
                       label=label)
    for ax, ylabel, title in ((time_ax, "forward+backward time (s)", "Time"),
                              (memory_ax, "peak memory growth (MiB)", "Memory")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} vs length (log-log)")
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile(n: int, heads: int, dim: int, threads: int, rows: int = 12) -> str:
    """torch.profiler tables (self CPU time) of one forward+backward of each engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sections = [f"# Where the time goes: n = {n}, H = {heads}, D = {dim}, K = 5, "
                f"{threads} threads, forward+backward", ""]
    for impl in ("block", "dgl"):
        case = dict(impl=impl, n=n, heads=heads, dim=dim, threads=threads, pattern="window32+2g+3r",
                    hops=5, device="cpu")
        torch.set_num_threads(threads)
        fn, _ = make_function(case)
        q, k, v = (torch.randn(n, heads, dim, requires_grad=True) for _ in range(3))
        fn(q, k, v).sum().backward()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(q, k, v).sum().backward()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        sections += [f"## {impl}", "", "```", table, "```", ""]
    return "\n".join(sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--hops", type=int, nargs="+", default=[5])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the DGL engine and "
                        "one-hop DGL cases run on the CPU only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of repeats per case")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=list(IMPLEMENTATIONS),
                        help="implementations to run (default: all; e.g. --impls block for "
                             "lengths where the baselines would take minutes)")
    add_case_options(parser, timeout=600.0)
    parser.add_argument("--profile", type=int, metavar="N", default=None,
                        help="only profile the block and DGL engines (K=5) at length N and write "
                             "profile.md")
    args = parser.parse_args(argv)
    if ran_one_case(args, run_case):
        return 0
    if args.profile:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        text = profile(args.profile, args.heads, args.dim, args.threads)
        (Path(args.out) / "profile.md").write_text(text)
        print(text)
        return 0

    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    peak = matmul_gflops(args.threads, device)
    todo = list(cases(args.lengths, args.patterns, args.hops, args.heads, args.dim, args.threads,
                      args.repeats, args.budget, args.device, args.impls))
    rows = [run_in_subprocess(__file__, case, args.timeout)
            for case in tqdm(todo, desc="benchmark")]
    add_ratios(rows, peak)
    meta = {"machine": machine(device), "device": args.device,
            "threads": args.threads, "heads": args.heads, "dim": args.dim,
            "matmul_gflops": peak, "sdpa_kernel": sdpa_kernel(args.heads, args.dim, device)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(rows, meta))
    plot(rows, out / "results.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
