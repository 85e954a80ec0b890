"""Training throughput: optimisation steps per second of the small configs, for each attention.

    python benchmarks/training.py    # multihop, lm, pathfinder, image x diffuser, sparse, full

Each case builds one config's data, model and optimizer in a fresh subprocess, exactly as
``diffuser-graph train`` does (same seed, same batches in the same order), takes warm-up steps,
then times ``--steps`` optimisation steps (forward, backward, AdamW; evaluation excluded). Rows
state the engine ``auto`` chose for the config's pattern and each attention's steps/s relative
to one-hop sparse attention on the same config in the same run. Writes ``training.json`` and
``training.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import add_case_options, machine, ran_one_case, run_in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["multihop-small", "lm-small", "pathfinder-small", "image-small"]
ATTENTIONS = ["diffuser", "sparse", "full"]


def run_case(case: dict) -> dict:
    from diffuser_graph.config import load_config
    from diffuser_graph.engines import choose_engine
    from diffuser_graph.tasks import collate
    from diffuser_graph.train import (
        BatchOrder,
        RunConfig,
        Runtime,
        build_model,
        make_optimizer,
        prepare,
    )

    overrides = [f"model.attention={case['attention']}", f"train.threads={case['threads']}",
                 "train.device=cpu"]
    config = load_config(ROOT / "configs" / f"{case['config']}.yaml", RunConfig, overrides)
    Runtime.start(config.train)  # threads and allocator as train sets them
    torch.manual_seed(config.seed)
    data, model_config = prepare(config)
    model = build_model(model_config, data)
    optimizer = make_optimizer(model, config.train)
    order = BatchOrder(len(data.train), config.train.batch_size, config.seed)
    model.train()

    def step(draw: int) -> dict[str, torch.Tensor]:
        batch = collate(data.train, order.indices(draw), draw)
        loss, _ = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    batch = {}
    for draw in range(case["warmup"]):
        batch = step(draw)
    start = time.perf_counter()
    for draw in range(case["warmup"], case["warmup"] + case["steps"]):
        step(draw)
    seconds = time.perf_counter() - start
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    engine = ("sdpa" if case["attention"] == "full" else
              choose_engine(model_config.engine, model_config.pattern, lengths,
                            torch.device("cpu")))
    return {**case, "steps_per_s": case["steps"] / seconds, "engine": engine,
            "hops": model_config.hops if case["attention"] == "diffuser" else 1}


def add_ratios(rows: list[dict]) -> None:
    """Each row's steps/s relative to one-hop sparse attention on the same config."""
    sparse = {r["config"]: r["steps_per_s"] for r in rows
              if r["attention"] == "sparse" and "error" not in r}
    for row in rows:
        if "error" not in row and row["config"] in sparse:
            row["vs_sparse"] = row["steps_per_s"] / sparse[row["config"]]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Training steps per second ({meta['machine']})", "",
             f"{meta['threads']} thread(s), {meta['steps']} timed steps after {meta['warmup']} "
             "warm-up steps, each case in a fresh process; evaluation excluded. `× sparse` is "
             "the ratio to one-hop sparse attention on the same config in this run.", "",
             "| config | attention | engine | hops | steps/s | × sparse |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['attention']} | {r['error'][-120:]} | — | — | — |")
            continue
        ratio = f"{r['vs_sparse']:.2f}" if "vs_sparse" in r else "—"
        lines.append(f"| {r['config']} | {r['attention']} | {r['engine']} | {r['hops']} | "
                     f"{r['steps_per_s']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS,
                        help="config names under configs/ (without .yaml)")
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=ATTENTIONS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    add_case_options(parser)
    args = parser.parse_args(argv)
    if ran_one_case(args, run_case, retain_memory=False):  # Runtime.start sets it per config
        return 0
    for name in args.configs:
        if not (ROOT / "configs" / f"{name}.yaml").is_file():
            parser.error(f"--configs: no configs/{name}.yaml")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1 and --warmup >= 0")

    from tqdm import tqdm

    cases = [dict(config=name, attention=attention, steps=args.steps, warmup=args.warmup,
                  threads=args.threads) for name in args.configs for attention in args.attentions]
    rows = [run_in_subprocess(__file__, case, args.timeout) for case in tqdm(cases, desc="train")]
    add_ratios(rows)
    meta = {"machine": machine(torch.device("cpu")), "threads": args.threads,
            "steps": args.steps, "warmup": args.warmup}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "training.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
