"""Config-driven training: AdamW, warmup + cosine, checkpoints, exact resume, DDP.

``train(config)`` runs one :class:`RunConfig` into ``config.out_dir``:

- ``config.yaml`` (the fully resolved config), ``metrics.jsonl`` (one JSON record per log or
  evaluation), ``curves.png``, ``last.pt`` and ``best.pt`` (by validation accuracy, or loss for
  language models; written atomically at every evaluation) and ``results.json`` (val/test
  metrics of the best checkpoint next to an input-blind baseline: the majority-class rate, or
  unigram bits per character).
- The task's ``head`` picks the model: sequence classification, two-tower matching or a causal
  language model (scored per token, with bits per character).
- Batches follow a fixed order derived from ``seed`` (a fresh permutation per epoch), and
  checkpoints hold the optimizer, scheduler and RNG states, so ``resume=True`` continues exactly
  where ``last.pt`` stopped: the weights after resuming equal those of an uninterrupted run.
- Under ``torchrun`` (``WORLD_SIZE > 1``) it trains with DistributedDataParallel on the gloo
  backend: each global batch is split evenly across processes, so the result matches
  single-process training with the same global batch; rank 0 writes every file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from .config import ConfigError, atomic_write_text, dump_config
from .model import (IGNORE_INDEX, DiffuserConfig, DiffuserForCausalLM, DiffuserForMatching,
                    DiffuserForSequenceClassification)
from .tasks import Split, TaskConfig, TaskData, collate, load_task

MODELS = {"classification": DiffuserForSequenceClassification, "matching": DiffuserForMatching,
          "lm": DiffuserForCausalLM}


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=32, ge=1)  # global examples per micro-batch
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * this
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    max_steps: int = Field(default=1000, ge=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0: no clipping
    eval_every: int = Field(default=200, ge=1)
    log_every: int = Field(default=20, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    threads: Optional[int] = Field(default=None, ge=1)  # torch intra-op threads per process


class RunConfig(BaseModel):
    """Everything one training run needs; what ``configs/*.yaml`` files hold."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(default=0, ge=0)
    out_dir: str = "runs/run"
    task: TaskConfig
    model: DiffuserConfig = DiffuserConfig()
    train: TrainSettings = TrainSettings()


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another run."""


# --- distributed ----------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# --- pieces -----------------------------------------------------------------------------------

def build_model(config: DiffuserConfig, data: TaskData) -> torch.nn.Module:
    try:
        return MODELS[data.head](config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def lr_lambda(settings: TrainSettings):
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        span = max(1, settings.max_steps - settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine
    return factor


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms or embeddings' padding)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)


class BatchOrder:
    """Micro-batch ``k`` of an endless stream: epoch ``k // per_epoch`` shuffled by its own seed."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if size < batch_size:
            raise ConfigError(f"train.batch_size ({batch_size}) is larger than the training "
                              f"set ({size} examples)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size  # the last incomplete batch is dropped
        self._epoch, self._order = -1, None

    def indices(self, k: int) -> np.ndarray:
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).numpy()
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct predictions, predictions scored): one per example, or one per real token."""
    counted = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & counted).sum()), int(counted.sum())


def summary(total_loss: float, correct: int, count: int, head: str) -> dict:
    """Mean loss and accuracy per scored prediction; bits per character for language models."""
    metrics = {"loss": total_loss / count, "accuracy": correct / count}
    if head == "lm":
        metrics["bits_per_char"] = metrics["loss"] / math.log(2)
    return metrics


def score(metrics: dict, head: str) -> float:
    """Higher is better: validation accuracy, or minus the loss for language models."""
    return -metrics["loss"] if head == "lm" else metrics["accuracy"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, batch_size: int,
             head: str = "classification") -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, in order), per
    example or, for language models, per predicted token (with bits per character)."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(split), batch_size):
        batch = collate(split, range(start, min(start + batch_size, len(split))))
        loss, logits = model(**batch)
        right, seen = scored(logits, batch["labels"])
        total_loss, correct, count = total_loss + float(loss) * seen, correct + right, count + seen
    model.train(was_training)
    return {**summary(total_loss, correct, count, head), "n": len(split)}


def save_checkpoint(path: Path, **state) -> None:
    """Write atomically: a crash leaves the previous checkpoint intact."""
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {err}") from None
    if not isinstance(state, dict) or not {"model", "model_config", "step"} <= set(state):
        raise CheckpointError(f"checkpoint {path} lacks model weights, model_config or step")
    return state


def model_from_checkpoint(state: dict, data: TaskData) -> torch.nn.Module:
    config = DiffuserConfig.model_validate(json.loads(state["model_config"]))
    if (config.vocab_size, config.num_labels) != (data.vocab_size, data.num_labels):
        raise CheckpointError(
            f"checkpoint was trained for vocab_size={config.vocab_size}, "
            f"num_labels={config.num_labels}; this task has {data.vocab_size}, {data.num_labels}")
    model = build_model(config, data)
    model.load_state_dict(state["model"])
    return model


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict]):
    """Figure of training/validation loss and accuracy against step (``metrics.jsonl``)."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig = Figure(figsize=(11, 4))
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"),
                              ("cross-entropy", "accuracy")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        ax.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label="val")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(key.capitalize())
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """``fig.savefig`` through a temporary file, so a reader never sees half a PNG."""
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(temporary, dpi=100)
    os.replace(temporary, path)


# --- the loop ---------------------------------------------------------------------------------

def _prepare(config: RunConfig) -> tuple[TaskData, DiffuserConfig]:
    data = load_task(config.task, config.seed)
    try:
        model_config = config.model.resolved(data.vocab_size, data.num_labels)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    pattern = model_config.pattern
    if pattern.kind == "grid" and tuple(pattern.image_size) != tuple(data.image_size or ()):
        raise ConfigError(f"model.pattern.image_size is {pattern.image_size} but the task's "
                          f"sequences are {data.image_size or 'not images'}")
    longest = max(split.max_length() for _, split in data.splits())
    if longest > model_config.max_positions:
        raise ConfigError(f"the data has sequences of {longest} tokens but model.max_positions "
                          f"is {model_config.max_positions}")
    return data, model_config


def train(config: RunConfig, *, resume: bool = False, stop_after: Optional[int] = None,
          progress: bool = True) -> dict:
    """Train ``config``; returns the final metrics. ``stop_after``: stop (with a checkpoint)
    after that many optimizer steps, as a preemption would; ``resume`` continues from
    ``last.pt`` in ``config.out_dir``."""
    rank, world = _distributed()
    settings = config.train
    if settings.batch_size % world:
        raise ConfigError(f"train.batch_size ({settings.batch_size}) must be divisible by the "
                          f"number of processes ({world})")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(config.out_dir)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.jsonl"
    if not resume and last_path.exists():
        raise ConfigError(f"{out} already holds a run (last.pt); pass --resume to continue it "
                          f"or choose another out_dir")

    torch.manual_seed(config.seed)
    data, model_config = _prepare(config)
    model = build_model(model_config, data)
    optimizer = make_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    start_step, best_score = 0, -math.inf
    if resume:
        state = load_checkpoint(last_path)
        saved = RunConfig.model_validate(json.loads(state["run_config"]))
        if saved.model_dump(exclude={"train": {"max_steps"}}) != config.model_dump(
                exclude={"train": {"max_steps"}}):
            raise ConfigError(f"the config differs from the one {out} was started with (only "
                              f"train.max_steps may change on resume); see {out / 'config.yaml'}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step = int(state["step"])
        best_score = float(state.get("best_score", state.get("best_accuracy")))  # older runs
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(config.model_copy(
            update={"model": model_config})))
        if resume:  # records after the checkpoint belong to the lost part of the run
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= start_step]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    order = BatchOrder(len(data.train), settings.batch_size, config.seed)
    model.train()

    def checkpoint(step: int, path: Path) -> None:
        save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), rng=torch.get_rng_state(), step=step,
                        best_score=best_score, model_config=model_config.model_dump_json(),
                        run_config=config.model_dump_json())

    end = min(settings.max_steps, stop_after) if stop_after else settings.max_steps
    bar = tqdm(range(start_step + 1, end + 1), desc="train", disable=not progress or rank != 0,
               initial=start_step, total=end)
    window_loss, window_correct, window_seen = 0.0, 0, 0
    for step in bar:
        for micro in range(settings.grad_accum):
            indices = order.indices((step - 1) * settings.grad_accum + micro)
            batch = collate(data.train, indices[rank::world])
            sync = world == 1 or micro == settings.grad_accum - 1
            with nullcontext() if sync else net.no_sync():
                loss, logits = net(**batch)
                (loss / settings.grad_accum).backward()
            right, seen = scored(logits, batch["labels"])
            window_loss += float(loss) * seen
            window_correct, window_seen = window_correct + right, window_seen + seen
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if rank == 0 and (step % settings.log_every == 0 or step == end):
            record = {"step": step, "split": "train",
                      **summary(window_loss, window_correct, window_seen, data.head),
                      "lr": scheduler.get_last_lr()[0]}
            _append_metrics(metrics_path, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
            window_loss, window_correct, window_seen = 0.0, 0, 0
        if step % settings.eval_every == 0 or step == end:
            if rank == 0:
                val = evaluate(model, data.val, settings.eval_batch_size, data.head)
                _append_metrics(metrics_path, {"step": step, "split": "val", **val})
                if score(val, data.head) > best_score:
                    best_score = score(val, data.head)
                    checkpoint(step, best_path)
                checkpoint(step, last_path)
                save_figure(plot_curves(read_metrics(metrics_path)), out / "curves.png")
            _barrier(world)
    bar.close()
    if end < settings.max_steps:
        return {"stopped_at": end}
    return finish(config, data, rank, world)


def finish(config: RunConfig, data: TaskData, rank: int = 0, world: int = 1) -> dict:
    """Evaluate the best checkpoint on val and test; write and print ``results.json``."""
    results: dict = {}
    if rank == 0:
        out = Path(config.out_dir)
        state = load_checkpoint(out / "best.pt")
        model = model_from_checkpoint(state, data)
        results = {"best_step": int(state["step"]), **split_results(model, data, config)}
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        print(results_table(results))
    _barrier(world)
    return results


def split_results(model: torch.nn.Module, data: TaskData, config: RunConfig) -> dict:
    """Val and test metrics of ``model`` next to the input-blind baseline, and the data source."""
    results = {split: {**evaluate(model, getattr(data, split), config.train.eval_batch_size,
                                  data.head), **data.baseline(split)}
               for split in ("val", "test")}
    return {**results, "data": data.source} if data.source else results


def results_table(results: dict) -> str:
    lm = "bits_per_char" in results["test"]
    columns = (("bits_per_char", "bits per char"), ("unigram_bits_per_char", "unigram bits per "
                                                    "char"), ("accuracy", "next-byte accuracy")
               ) if lm else (("accuracy", "accuracy"), ("majority_rate", "majority-class rate"))
    lines = [f"best checkpoint: step {results['best_step']}",
             "| split | examples | " + " | ".join(name for _, name in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for split in ("val", "test"):
        r = results[split]
        lines.append(f"| {split} | {r['n']} | " + " | ".join(f"{r[key]:.4f}" for key, _ in columns)
                     + " |")
    return "\n".join(lines)


def evaluate_checkpoint(config: RunConfig, checkpoint: str | Path,
                        out: Optional[str | Path] = None) -> dict:
    """Test (and val) metrics of a checkpoint on ``config``'s task; writes ``eval.json``."""
    state = load_checkpoint(checkpoint)
    data = load_task(config.task, config.seed)
    model = model_from_checkpoint(state, data)
    results = {"checkpoint": str(checkpoint), "step": int(state["step"]),
               **split_results(model, data, config)}
    target = Path(out) if out else Path(checkpoint).with_name("eval.json")
    atomic_write_text(target, json.dumps(results, indent=1))
    return results
