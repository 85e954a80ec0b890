"""Command line: ``diffuser-graph train | eval | study | examples | sample | convert | export |
spectral | pattern``.

Every failure is one line on stderr that starts with ``error:`` and names the file, line, key or
argument at fault, with exit status 2; ``--debug`` shows the traceback instead. Dotted overrides
(``model.hops=3``) may come before or after the flags.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from .config import ConfigError, apply_overrides, load_config, load_yaml, validate_config

TRAIN_EXAMPLES = """examples:
  diffuser-graph train configs/listops-small.yaml
  diffuser-graph train configs/listops-small.yaml model.attention=sparse out_dir=runs/sparse
  diffuser-graph train configs/listops-small.yaml model.hops=3 train.lr=3e-4
  diffuser-graph train configs/listops-small.yaml --resume          # continue runs/listops-small
  torchrun --nproc_per_node=2 -m diffuser_graph.cli train configs/listops-small.yaml
"""

STUDY_EXAMPLES = """examples:
  diffuser-graph study configs/studies/attention.yaml --jobs 2
  diffuser-graph study configs/studies/hops.yaml seeds=[0] --dry-run
  diffuser-graph study configs/studies/attention.yaml out_dir=runs/studies/mine   # a second copy

Run it again after an interruption: finished runs are kept, interrupted ones resume.
"""

EVAL_EXAMPLES = """examples:
  diffuser-graph eval configs/listops-small.yaml --checkpoint runs/listops-small/best.pt
"""

SPECTRAL_EXAMPLES = """examples:
  diffuser-graph spectral configs/spectral.yaml
  diffuser-graph spectral configs/spectral.yaml seq_lens=[512,1024] out_dir=runs/quick
  diffuser-graph spectral configs/spectral.yaml variants.window.window=16 seed=3
"""

EXAMPLES_EXAMPLES = """examples:
  diffuser-graph examples configs/pathfinder-small.yaml --out pathfinder.png
  diffuser-graph examples configs/image-small.yaml --split test --count 32 --out digits.png
  diffuser-graph examples configs/text-small.yaml --count 3
"""

SAMPLE_EXAMPLES = """examples:
  diffuser-graph sample --checkpoint runs/lm-small/best.pt --prompt "The " --tokens 300
  diffuser-graph sample --checkpoint runs/lm-small/best.pt --prompt "def " --temperature 0
"""

CONVERT_EXAMPLES = """examples:
  diffuser-graph convert path/to/roberta-base runs/roberta-diffuser max_positions=4098
  diffuser-graph convert path/to/bert-imdb runs/bert-diffuser pattern.window=64 hops=3
  diffuser-graph convert path/to/roberta-base runs/roberta-full attention=full
"""

PATTERN_EXAMPLES = """examples:
  diffuser-graph pattern --length 4096 kind=official --out official.png
  diffuser-graph pattern --length 2048 window=32 num_global=2 num_random=3 --out p.png --hops 3
  diffuser-graph pattern --length 1024 kind=grid image_size=[32,32] window=2 --json
  diffuser-graph pattern --config my_pattern.yaml num_random=8 --length 512
"""


def _pattern_fields(config: str | None, fields: Sequence[str]) -> dict:
    """PatternSpec fields from an optional YAML file (the spec, or a ``pattern:`` section)."""
    data: dict = {}
    if config is not None:
        data = load_yaml(config, "pattern config")
        if isinstance(data, dict) and isinstance(data.get("pattern"), dict):
            data = data["pattern"]
    if not isinstance(data, dict):
        raise ConfigError(f"pattern config {config} must hold a mapping of PatternSpec fields")
    return apply_overrides(data, fields)


def _check_figure_path(out: str | None) -> None:
    """Refuse an unusable ``--out`` before any work: a folder, no suffix, no writable folder."""
    if out is None:
        return
    from .io import check_output_path

    if not check_output_path(out).suffix:
        raise ConfigError(f"--out {out}: give a file name with a format suffix, e.g. .png")


def _train(args: argparse.Namespace) -> int:
    from .train import RunConfig, train

    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError(f"--stop-after must be a step >= 1, got {args.stop_after}")
    config = load_config(args.config, RunConfig, args.overrides)
    result = train(config, resume=args.resume, stop_after=args.stop_after,
                   progress=not args.quiet)
    if "stopped_at" in result:
        why = f"on {result['signal']}" if result.get("signal") else "as asked (--stop-after)"
        overrides = "".join(f" {item}" for item in args.overrides)
        print(f"stopped {why} at step {result['stopped_at']} with last.pt saved in "
              f"{config.out_dir}; continue with: diffuser-graph train {args.config}{overrides} "
              f"--resume")
    else:
        print(f"run folder: {config.out_dir}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study import StudyConfig, StudyStopped, expand, run_study, status

    study = load_config(args.config, StudyConfig, args.overrides)
    if args.dry_run:
        for run in expand(study):
            print(f"{status(run):6s} {run.out_dir}  ({run.config} {run.label}, seed {run.seed})")
        return 0
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    try:
        run_study(study, jobs=args.jobs, threads=args.threads, progress=not args.quiet)
    except StudyStopped as stopped:
        print(f"{stopped}; summary so far: {Path(study.out_dir) / 'summary.md'}")
        return 0
    print(f"summary: {Path(study.out_dir) / 'summary.md'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .train import RunConfig, evaluate_checkpoint

    config = load_config(args.config, RunConfig, args.overrides)
    results = evaluate_checkpoint(config, args.checkpoint, args.out)
    print(json.dumps(results, indent=1))
    return 0


def _examples(args: argparse.Namespace) -> int:
    from .tasks import Split, load_task
    from .train import RunConfig

    if args.count < 1 or args.chars < 1:
        raise ConfigError(f"--count and --chars must be at least 1, got {args.count}, "
                          f"{args.chars}")
    _check_figure_path(args.out)
    config = load_config(args.config, RunConfig, args.overrides)
    data = load_task(config.task, config.seed)
    split = {"train": data.train, "val": data.val, "test": data.test}[args.split]
    chosen = range(min(args.count, len(split)))
    if data.image_size is not None:
        if args.out is None:
            raise ConfigError(f"task {config.task.name!r} holds images: pass --out PNG")
        from .io import atomic_save_figure
        from .visualize import plot_image_examples

        images = [np.asarray(split.sequences[i]).reshape(data.image_size) for i in chosen]
        fig = plot_image_examples(images, [split.describe(i) for i in chosen],
                                  f"{config.task.name}: {args.split} examples (pixel = token id)")
        atomic_save_figure(args.out, fig, dpi=100)
        print(f"wrote {len(images)} {args.split} examples to {args.out}")
        return 0
    show = data.decode or (lambda ids: " ".join(str(int(i)) for i in ids))
    for i in chosen:
        print(f"--- {args.split} example {i}: {split.describe(i)}, "
              f"{len(split.sequences[i])} tokens")
        print(show(split.sequences[i])[:args.chars])
        if isinstance(split, Split) and split.pairs is not None:
            print(f"--- paired with ({len(split.pairs[i])} tokens)")
            print(show(split.pairs[i])[:args.chars])
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from .model import DiffuserForCausalLM
    from .tasks.vocab import decode_bytes, encode_bytes

    if args.tokens < 1 or not math.isfinite(args.temperature) or args.temperature < 0 or (
            args.top_k is not None and args.top_k < 1):
        raise ConfigError("--tokens and --top-k must be at least 1, --temperature a number >= 0")
    try:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint), DiffuserForCausalLM)
    except CheckpointError as err:
        raise ConfigError(f"{args.checkpoint}: {err} (sample needs an lm task's checkpoint)"
                          ) from None
    config = model.config
    prompt = torch.from_numpy(encode_bytes(args.prompt))[None, :]
    if prompt.shape[1] == 0:
        raise ConfigError("--prompt must not be empty")
    room = config.max_positions - prompt.shape[1]
    if room < 1:
        raise ConfigError(f"the prompt has {prompt.shape[1]} bytes; the model takes at most "
                          f"{config.max_positions}")
    ids = model.generate(prompt, min(args.tokens, room), temperature=args.temperature,
                         top_k=args.top_k, generator=torch.Generator().manual_seed(args.seed))
    print(decode_bytes(ids[0].tolist()))
    return 0


def _new_model_folder(out: str, source: str) -> Path:
    """``out`` as a folder to write a model into: new (or empty), and not ``source``."""
    folder = Path(out).expanduser()
    if folder.resolve() == Path(source).expanduser().resolve():
        raise ConfigError(f"{folder} is the source; write the model elsewhere")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder} already exists and is not an empty folder; choose a new one")
    return folder


def _convert(args: argparse.Namespace) -> int:
    from .hf import from_hf

    out = _new_model_folder(args.out, args.source)
    model = from_hf(args.source, **apply_overrides({}, args.overrides))
    model.save_pretrained(out)
    config = model.config
    print(f"wrote a {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters; {config.attention} attention on the {config.pattern.kind} pattern, "
          f"{config.kernel} alpha={config.alpha} K={config.hops}; {config.max_tokens} positions) "
          f"to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, model_from_checkpoint

    out = _new_model_folder(args.out, args.checkpoint)
    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state)
    model.save_pretrained(out)
    print(f"wrote the {type(model).__name__} of {args.checkpoint} (step {state['step']}) to "
          f"{out}; load it with diffuser_graph.model.load_pretrained or use it as "
          f"model.init_from")
    return 0


def _spectral(args: argparse.Namespace) -> int:
    from .spectral_sweep import SpectralConfig, run_spectral

    config = load_config(args.config, SpectralConfig, args.overrides)
    out = Path(args.out or config.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the spectral command writes a folder")
    out = run_spectral(config, out, progress=not args.quiet)
    print((out / "results.md").read_text())
    print(f"wrote results.json, results.csv, results.md and PNG plots to {out}")
    return 0


def _pattern(args: argparse.Namespace) -> int:
    from .graph import build_graph
    from .patterns import PatternSpec
    from .reach import reach_stats, ua_conditions
    from .spectral import spectral_stats

    if args.length < 2 or args.hops < 1:
        raise ConfigError(f"--length must be at least 2 and --hops at least 1, got "
                          f"{args.length}, {args.hops}")
    _check_figure_path(args.out)
    spec = validate_config(_pattern_fields(args.config, args.fields), PatternSpec, "pattern")
    g = build_graph(args.length, spec)
    query = args.length // 2 if args.query is None else args.query
    if not 0 <= query < args.length:
        raise ConfigError(f"--query must be in [0, {args.length}), got {query}")
    stats = spectral_stats(g, seed=spec.seed).as_dict()
    reach = reach_stats(g, max_hops=args.hops, seed=spec.seed).as_dict()
    conditions = {name: {"holds": c.holds, "reason": c.reason}
                  for name, c in ua_conditions(g, max_hops=args.hops, seed=spec.seed).items()}
    report = {"pattern": spec.model_dump(mode="json"), "length": args.length,
              "directed_edges": g.num_edges(), "spectral": stats, "reach": reach,
              "ua_conditions": conditions}
    if args.out:
        from .io import atomic_save_figure
        from .visualize import plot_pattern

        atomic_save_figure(args.out, plot_pattern(g, spec, query, args.hops))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print(f"pattern {spec.model_dump(exclude_defaults=True)} on {args.length} tokens: "
          f"{g.num_edges()} directed edges ({g.num_edges() / args.length:.1f} keys per query)")
    for name in ("mean_degree", "lambda_2", "lambda_min", "one_sided_gap", "two_sided_gap",
                 "ramanujan_bound", "sweep_conductance"):
        print(f"  {name:>18}: {stats[name]:.6g}")
    print(f"  {'diameter':>18}: between {reach['diameter_lower']:g} and "
          f"{reach['diameter_upper']:g}")
    print("  K-hop coverage    : " + ", ".join(f"K={k}: {v:.3f}"
                                                for k, v in reach["coverage"].items()))
    for name, c in conditions.items():
        print(f"  {name:>18}: {c['holds']} ({c['reason']})")
    if args.out:
        print(f"wrote {args.out}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-")


def build_parser() -> argparse.ArgumentParser:
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true",
                       help="show the full traceback of an error instead of one line")
    parser = Parser(
        parents=[debug],
        prog="diffuser-graph",
        description="Diffuser (multi-hop attention diffusion) on DGL: training, evaluation, "
                    "pattern and spectral tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  diffuser-graph train configs/listops-small.yaml\n"
               "  diffuser-graph spectral configs/spectral.yaml\n"
               "  diffuser-graph pattern --length 4096 kind=official --out official.png\n\n"
               "run 'diffuser-graph COMMAND --help' for a command's options and examples")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_command(name: str, help: str, description: str, epilog: str, handler,
                       config_help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(
            name, help=help, description=description, epilog=epilog, parents=[debug],
            usage=f"diffuser-graph {name} CONFIG [key.path=value ...] [options]",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("config", help=config_help + "; then any dotted overrides "
                                                          "(key.path=value), before or after the "
                                                          "options")
        command.set_defaults(handler=handler, takes_overrides=True)
        return command

    train = config_command(
        "train", "train a model from a YAML config",
        "Train from a YAML config (see configs/); writes config.yaml, metrics.jsonl, "
        "curves.png, best.pt, last.pt and results.json into out_dir.",
        TRAIN_EXAMPLES, _train, "YAML config, e.g. configs/listops-small.yaml")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in out_dir from its last.pt, exactly")
    train.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                       help="stop with a checkpoint after this many steps (resume later)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    study = config_command(
        "study", "run a grid of training runs over configs x overrides x seeds",
        "Train every run of a study file (configs/studies/) in its own run folder, JOBS at a "
        "time, skipping finished runs and resuming interrupted ones; write summary.md, "
        "summary.csv and plots (mean ± std over seeds) into the study's out_dir. Overrides "
        "set the study file's fields (seeds=[0,1], out_dir=...).",
        STUDY_EXAMPLES, _study, "YAML study file, e.g. configs/studies/attention.yaml")
    study.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    study.add_argument("--threads", type=int, default=None,
                       help="CPU threads per run (default: the CPUs divided by --jobs)")
    study.add_argument("--dry-run", action="store_true",
                       help="list the runs and whether each is done, to resume or new")
    study.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = config_command(
        "eval", "evaluate a checkpoint on a config's task",
        "Print and write (eval.json beside the checkpoint) val and test metrics.",
        EVAL_EXAMPLES, _eval, "the YAML config the model was trained with")
    evaluate.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a run")
    evaluate.add_argument("--out", default=None, help="where to write the JSON results")

    spectral = config_command(
        "spectral", "spectral expansion statistics of patterns across lengths",
        "Sweep sequence lengths and pattern variants; write results.json, results.csv, "
        "results.md and PNG plots.", SPECTRAL_EXAMPLES, _spectral,
        "YAML config, e.g. configs/spectral.yaml")
    spectral.add_argument("--out", default=None, help="output folder (default: out_dir)")
    spectral.add_argument("--quiet", action="store_true", help="no progress bar")

    examples = config_command(
        "examples", "show a task's examples (images as a PNG, text printed)",
        "Generate or read a config's task and show examples of one split: image tasks "
        "(image, pathfinder) as a PNG grid titled by label, the others as decoded text.",
        EXAMPLES_EXAMPLES, _examples, "YAML config, e.g. configs/pathfinder-small.yaml")
    examples.add_argument("--split", choices=("train", "val", "test"), default="train")
    examples.add_argument("--count", type=int, default=16, help="how many (default 16)")
    examples.add_argument("--out", default=None, help="PNG to write (image tasks)")
    examples.add_argument("--chars", type=int, default=400,
                          help="characters of each text example to print (default 400)")

    sample = commands.add_parser(
        "sample", parents=[debug], help="continue a prompt with a trained language model",
        description="Sample bytes from a language-model checkpoint (an lm task's best.pt or "
                    "last.pt) after a prompt; stops at the model's max_positions.",
        epilog=SAMPLE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_argument("--checkpoint", required=True, help="best.pt or last.pt of an lm run")
    sample.add_argument("--prompt", required=True, help="text to continue")
    sample.add_argument("--tokens", type=int, default=200, help="bytes to add (default 200)")
    sample.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 is greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sample.set_defaults(handler=_sample)

    convert = commands.add_parser(
        "convert", parents=[debug], help="make a Diffuser model of a RoBERTa/BERT checkpoint",
        usage="diffuser-graph convert SOURCE OUT [field=value ...] [options]",
        description="Copy a local Hugging Face RoBERTa or BERT checkpoint (a base model, a "
                    "sequence classifier or a masked LM) into a Diffuser model folder; "
                    "field=value pairs set DiffuserConfig fields (default: the authors' "
                    "attention, official pattern, PPR alpha 0.1, K = 5). Needs the hf extra.",
        epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", help="a folder that save_pretrained wrote")
    convert.add_argument("out", help="a new folder for the Diffuser model")
    convert.set_defaults(handler=_convert, takes_overrides=True)

    export = commands.add_parser(
        "export", parents=[debug], help="write a training checkpoint as a model folder",
        description="Write the model of a checkpoint (best.pt or last.pt of a run) as a folder "
                    "(config.json + model.safetensors) that load_pretrained reads and "
                    "model.init_from starts training from.",
        epilog="examples:\n  diffuser-graph export runs/mlm-roberta/best.pt runs/mlm-roberta-model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("checkpoint", help="best.pt or last.pt of a run")
    export.add_argument("out", help="a new folder for the model")
    export.set_defaults(handler=_export)

    pattern = commands.add_parser(
        "pattern", parents=[debug], help="statistics (and a picture) of one pattern at one length",
        description="Build one pattern (PatternSpec fields as key=value) and print its edge "
                    "count, spectral statistics, K-hop coverage and UA conditions.",
        epilog=PATTERN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pattern.add_argument("fields", nargs="*", metavar="field=value",
                         help="PatternSpec fields, e.g. window=32 num_random=3")
    pattern.add_argument("--config", default=None,
                         help="YAML file with PatternSpec fields (or a 'pattern:' section)")
    pattern.add_argument("--length", type=int, required=True, help="sequence length")
    pattern.add_argument("--hops", type=int, default=5,
                         help="K for coverage, the receptive field and the bounded-reach "
                              "condition (default 5)")
    pattern.add_argument("--out", default=None,
                         help="write a PNG: adjacency, keys per query, K-hop receptive field")
    pattern.add_argument("--query", type=int, default=None,
                         help="query token of the receptive field (default: the middle one)")
    pattern.add_argument("--json", action="store_true", help="print the report as JSON")
    pattern.set_defaults(handler=_pattern)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; dotted overrides may stand anywhere after CONFIG."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [token for token in rest if _is_override(token)]
    unknown = [token for token in rest if not _is_override(token)]
    if unknown or (overrides and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    return args


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: several problems are joined by ';'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else ""
    if isinstance(err, (ValueError, OSError)):  # what users cause: bad configs, files, inputs
        return text or type(err).__name__
    return f"{type(err).__name__}: {text} (unexpected: run again with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
    except SystemExit as done:  # --help, or a usage error already printed on one line
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
