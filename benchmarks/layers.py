"""One attention layer with its own projections, timed the way each library's users call it.

    python benchmarks/layers.py --preset peers      # Diffuser vs HF BigBird, Longformer, PyG, SDPA
    python benchmarks/layers.py --preset official   # the authors' layer: 768 hidden, 12 heads, 4096

Every layer maps hidden states ``(n, hidden)`` to ``(n, hidden)`` through q/k/v and output
projections; forward and forward+backward (gradients of the input and of every weight) are timed
in a fresh subprocess per case, with its peak memory above what one warm-up forward left
(see ``measure.py``). The peers need the ``bench`` extra (``pip install -e '.[bench]'``); a peer
that is not installed is reported as such.
Each row states the keys a query attends to on average and the hops one layer covers, so that
patterns and work can be compared, not only seconds. Writes ``layers.json`` and ``layers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DGLBACKEND", "pytorch")

import torch  # noqa: E402

from diffuser_graph import (  # noqa: E402
    DiffuserAttention,
    Diffusion,
    PackedBatch,
    PatternSpec,
    build_graph,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    PATTERNS,
    add_case_options,
    allocated_peak,
    machine,
    peak_memory,
    ran_one_case,
    reset_peak_memory,
    run_in_rounds,
    time_step,
)

PRESETS = {  # the settings of the speed issues' tables
    "peers": dict(hidden=256, heads=4, lengths=[2048, 4096, 8192, 16384], pattern="window32+2g+3r",
                  impls=["diffuser", "diffuser_causal", "sparse", "bigbird", "longformer",
                         "transformerconv", "sdpa"],
                  block_size=32),
    "official": dict(hidden=768, heads=12, lengths=[4096], pattern="official",
                     impls=["diffuser", "diffuser_recompute", "diffuser_recompute_hops",
                            "diffuser_dgl", "sdpa", "bigbird"],
                     block_size=64),
}
BIGBIRD_RANDOM_BLOCKS = 3  # HF BigBird's default
# diffuser_recompute (--recompute-heads h): h heads computed at a time, their attention
# recomputed in backward (their hops' inputs kept); diffuser_recompute_hops: the hops recomputed
# too. On the authors' layer, tensor memory in use at the peak with 1 / 2 heads at a time:
# 122 / 133 MiB (SDPA 136); 1 head took 0.95-1.09x the time of 2 (in one process, in turns).
RECOMPUTE_HEADS = 2
LONGFORMER_GLOBALS = 2


def layer_pattern(case: dict) -> PatternSpec:
    """The case's pattern; ``diffuser_causal`` keeps only its edges to earlier tokens."""
    spec = PATTERNS[case["pattern"]]
    if case["impl"] == "diffuser_causal":
        return PatternSpec(**{**spec.model_dump(), "causal": True})
    return spec


def diffuser_layer(case: dict, device: torch.device):
    """Diffuser (K hops, ``auto`` or a named engine, recomputing a few heads at a time in backward,
    or on the causal pattern), one-hop sparse, or dense SDPA (``full``)."""
    spec = layer_pattern(case)
    impl = case["impl"]
    heads_at_a_time = case.get("recompute_heads", RECOMPUTE_HEADS)
    attention = {"sparse": "sparse", "sdpa": "full"}.get(impl, "diffuser")
    engine = "dgl" if impl == "diffuser_dgl" else "auto"
    layer = DiffuserAttention(case["hidden"], case["heads"], attention=attention,
                              diffusion=Diffusion(alpha=0.1, hops=case["hops"]), pattern=spec,
                              recompute_heads=heads_at_a_time * impl.startswith(
                                  "diffuser_recompute"),
                              recompute_hops=impl == "diffuser_recompute_hops")
    batch = PackedBatch.from_lengths([case["n"]], spec, engine=engine, device=device)
    if attention != "full":
        batch.plan  # noqa: B018 -- planned once per batch, as the encoder does
    edges = build_graph(case["n"], spec).num_edges()
    keys = case["n"] if attention == "full" else edges / case["n"]
    engine_name = batch.engine_name + (f", recompute {heads_at_a_time} head"
                                       + "s" * (heads_at_a_time > 1)
                                       + " and hops" * (impl == "diffuser_recompute_hops")
                                       if impl.startswith("diffuser_recompute") else "") + (
        ", causal" if spec.causal else "")
    info = {"engine": "sdpa (4-D)" if attention == "full" else engine_name,
            "keys_per_query": keys, "hops_per_layer": 1 if attention != "diffuser" else
            case["hops"]}
    return layer.to(device), (lambda x: layer(batch, x)), info


def bigbird_layer(case: dict, device: torch.device):
    """HF BigBird block-sparse attention (``BigBirdAttention`` with its own output projection)."""
    from transformers import BigBirdConfig, BigBirdModel
    from transformers.models.big_bird.modeling_big_bird import BigBirdAttention

    block, n = case["block_size"], case["n"]
    config = BigBirdConfig(hidden_size=case["hidden"], num_attention_heads=case["heads"],
                           attention_type="block_sparse", block_size=block,
                           num_random_blocks=BIGBIRD_RANDOM_BLOCKS, max_position_embeddings=n,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    layer = BigBirdAttention(config, seed=0).to(device)
    masks = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, n, device=device), block)
    blocked, band, from_mask, to_mask = masks
    blocks = n // block  # first and last query blocks see everything; the rest 3 + 2 + r blocks
    keys = (2 * n + (blocks - 2) * (5 + BIGBIRD_RANDOM_BLOCKS) * block) / blocks

    def forward(x):
        return layer(x[None], band_mask=band, from_mask=from_mask, to_mask=to_mask,
                     from_blocked_mask=blocked, to_blocked_mask=blocked)[0][0]

    return layer, forward, {"engine": f"block {block}, {BIGBIRD_RANDOM_BLOCKS} random blocks",
                            "keys_per_query": keys, "hops_per_layer": 1}


def longformer_layer(case: dict, device: torch.device):
    """HF Longformer self-attention (``LongformerAttention``), window 2·w + 1 and global tokens."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerAttention

    window, n, g = 2 * PATTERNS[case["pattern"]].window, case["n"], LONGFORMER_GLOBALS
    config = LongformerConfig(hidden_size=case["hidden"], num_attention_heads=case["heads"],
                              attention_window=[window], hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    layer = LongformerAttention(config, layer_id=0).to(device)
    mask = torch.zeros(1, n, device=device)
    mask[0, :g] = 10000.0  # the model's encoding: > 0 global, < 0 padding, 0 local
    is_masked, is_global = mask < 0, mask > 0
    keys = ((n - g) * (window + 1 + g) + g * n) / n

    def forward(x):
        return layer(x[None], attention_mask=mask, is_index_masked=is_masked,
                     is_index_global_attn=is_global, is_global_attn=True)[0][0]

    return layer, forward, {"engine": f"window {window}, {g} global", "keys_per_query": keys,
                            "hops_per_layer": 1}


def transformerconv_layer(case: dict, device: torch.device):
    """PyG ``TransformerConv`` on the same pattern graph (one hop, its root weight included)."""
    from torch_geometric.nn import TransformerConv

    heads = case["heads"]
    layer = TransformerConv(case["hidden"], case["hidden"] // heads, heads=heads).to(device)
    src, dst = build_graph(case["n"], PATTERNS[case["pattern"]]).edges()
    edge_index = torch.stack([src, dst]).to(device)  # messages flow from keys to queries
    return layer, (lambda x: layer(x, edge_index)), {
        "engine": "PyG message passing", "keys_per_query": src.numel() / case["n"],
        "hops_per_layer": 1}


LAYERS = {"diffuser": diffuser_layer, "diffuser_dgl": diffuser_layer,
          "diffuser_causal": diffuser_layer,
          "diffuser_recompute": diffuser_layer, "diffuser_recompute_hops": diffuser_layer,
          "sparse": diffuser_layer,
          "sdpa": diffuser_layer, "bigbird": bigbird_layer, "longformer": longformer_layer,
          "transformerconv": transformerconv_layer}
PEERS = {"bigbird": "transformers", "longformer": "transformers",
         "transformerconv": "torch_geometric"}


def run_case(case: dict) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    layer, forward, info = LAYERS[case["impl"]](case, device)
    x = torch.randn(case["n"], case["hidden"], device=device, requires_grad=True)
    with torch.no_grad():  # what a layer builds once per length (a pattern's layout) is not a step
        forward(x)
    baseline = reset_peak_memory(device)

    def forward_only():
        with torch.no_grad():
            forward(x)

    def forward_backward():
        forward(x).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    result = {**case, **info}
    for name, step in (("forward", forward_only), ("forward_backward", forward_backward)):
        result[f"{name}_s"], result[f"{name}_repeats"] = time_step(
            step, device, case["repeats"], case["budget_s"])
    result["peak_memory_bytes"] = max(0, peak_memory(device) - baseline)
    result["peak_allocated_bytes"] = allocated_peak(forward_backward, device)
    return result


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def add_ratios(rows: list[dict]) -> None:
    """Each row's time and memory relative to dense SDPA and to each peer at the same n."""
    done = [r for r in rows if "error" not in r]
    for row in done:
        for other in done:  # the causal pattern against the same layer on the full pattern
            if row["impl"] == "diffuser_causal" and other["impl"] == "diffuser" and (
                    other["n"] == row["n"]):
                row["time_vs_noncausal"] = row["forward_backward_s"] / other["forward_backward_s"]
        for other in done:
            if other["n"] == row["n"] and other["impl"] in ("sdpa", "bigbird", "longformer"):
                row[f"time_vs_{other['impl']}"] = (row["forward_backward_s"]
                                                   / other["forward_backward_s"])
                row[f"memory_vs_{other['impl']}"] = (row["peak_memory_bytes"]
                                                     / max(2**20, other["peak_memory_bytes"]))
                row[f"allocated_vs_{other['impl']}"] = (
                    row["peak_allocated_bytes"] / max(2**20, other["peak_allocated_bytes"]))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# One attention layer with its projections ({meta['machine']})", "",
             f"Device {meta['device']}, {meta['threads']} threads, hidden {meta['hidden']} = "
             f"{meta['heads']} heads × {meta['hidden'] // meta['heads']}, fp32, pattern "
             f"`{meta['pattern']}`, K = {meta['hops']} for Diffuser. Times are medians"
             + (f" over {meta['rounds']} rounds of every case taken in turns (peaks: the "
                "largest)" if meta.get("rounds", 1) > 1 else "") + ", "
             "forward+backward includes the gradients of the input and every weight; ratios are "
             "against the same run's rows at the same n. Peak MiB: the process's resident peak "
             "above its warm state; allocated MiB: the most tensor memory alive at once in one "
             "forward+backward (see `measure.py`).", "",
             "| n | layer | engine / kernel | keys per query | hops | fwd (s) | fwd+bwd (s) | "
             "× SDPA | × BigBird | × Longformer | peak MiB | mem × SDPA | allocated MiB | "
             "alloc × SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "—"

    for r in rows:
        head = f"| {r['n']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][-120:]} |" + " — |" * 12)
            continue
        lines.append(
            f"{head} {r['engine']} | {r['keys_per_query']:.0f} | {r['hops_per_layer']} | "
            f"{r['forward_s']:.4f} | {r['forward_backward_s']:.4f} | {ratio(r, 'time_vs_sdpa')} | "
            f"{ratio(r, 'time_vs_bigbird')} | {ratio(r, 'time_vs_longformer')} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {ratio(r, 'memory_vs_sdpa')} | "
            f"{r['peak_allocated_bytes'] / 2**20:.0f} | {ratio(r, 'allocated_vs_sdpa')} |")
    causal = [f"{r['time_vs_noncausal']:.2f}× at {r['n']}" for r in rows
              if "time_vs_noncausal" in r]
    if causal:
        lines += ["", "Diffuser on the causal pattern (edges to earlier tokens only), forward+"
                  "backward time against the same layer on the full pattern: "
                  + ", ".join(causal) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="peers")
    parser.add_argument("--lengths", type=int, nargs="+", help="override the preset's lengths")
    parser.add_argument("--impls", nargs="+", choices=list(LAYERS),
                        help="override the preset's layers")
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute-heads", type=int, default=RECOMPUTE_HEADS,
                        help="heads computed (and their attention recomputed) at a time by "
                             "diffuser_recompute and diffuser_recompute_hops")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of repeats per case")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, the cases taking turns; report "
                             "the median time and the largest peak (this machine's speed "
                             "drifts by 10-20%% between runs)")
    add_case_options(parser)
    args = parser.parse_args(argv)
    if ran_one_case(args, run_case):
        return 0

    from tqdm import tqdm

    preset = PRESETS[args.preset]
    on_cuda = torch.device(args.device).type == "cuda"
    rows, todo = [], []
    for n in args.lengths or preset["lengths"]:
        for impl in args.impls or preset["impls"]:
            case = dict(impl=impl, n=n, hidden=preset["hidden"], heads=preset["heads"],
                        pattern=preset["pattern"], block_size=preset["block_size"],
                        hops=args.hops, device=args.device, threads=args.threads,
                        repeats=args.repeats, budget_s=args.budget,
                        recompute_heads=args.recompute_heads)
            if impl in PEERS and not installed(PEERS[impl]):
                rows.append({**case, "error": f"{PEERS[impl]} is not installed (bench extra)"})
            elif impl == "diffuser_dgl" and on_cuda:
                continue  # DGL's PyPI wheel has no CUDA kernels
            else:
                todo.append(case)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.recompute_heads < 1:
        parser.error(f"--recompute-heads must be at least 1, got {args.recompute_heads}")
    with tqdm(total=len(todo) * args.rounds, desc="layers") as bar:
        rows += run_in_rounds(__file__, todo, args.rounds, args.timeout, bar.update)
    rows.sort(key=lambda r: (r["n"], list(LAYERS).index(r["impl"])))
    add_ratios(rows)
    meta = {"machine": machine(torch.device(args.device)), "device": args.device,
            "threads": args.threads, "hidden": preset["hidden"], "heads": preset["heads"],
            "pattern": preset["pattern"], "hops": args.hops, "preset": args.preset,
            "rounds": args.rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layers-{args.preset}" + ("-cuda" if on_cuda else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
