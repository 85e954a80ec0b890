"""Config-driven training: AdamW, warmup + cosine, checkpoints, exact resume, any device, DDP.

``train(config)`` runs one :class:`RunConfig` into ``config.out_dir``:

- ``config.yaml`` (the fully resolved config), ``metrics.jsonl`` (one JSON record per log or
  evaluation), ``curves.png``, ``last.pt`` and ``best.pt`` (by validation accuracy, or loss for
  language models; written atomically at every evaluation) and ``results.json`` (val/test
  metrics of the best checkpoint next to an input-blind baseline: the majority-class rate, or
  unigram bits per character).
- The task's ``head`` picks the model: sequence classification, two-tower matching or a causal
  language model (scored per token, with bits per character).
- ``train.device`` (``auto``: CUDA when present) and ``train.precision`` (``fp32`` or ``bf16``
  autocast) choose where and how it computes; checkpoints load on any device.
- Batches follow a fixed order derived from ``seed`` (a fresh permutation per epoch), and
  checkpoints hold the optimizer, scheduler and RNG states, so ``resume=True`` continues exactly
  where ``last.pt`` stopped: the weights after resuming equal those of an uninterrupted run.
- Under ``torchrun`` (``WORLD_SIZE > 1``) it trains with DistributedDataParallel (NCCL on CUDA,
  gloo on the CPU): each global batch is split evenly across processes, so the result matches
  single-process training with the same global batch; rank 0 writes every file.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from .allocator import retain_freed_memory
from .attention import DiffuserAttention
from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .checks import Float, Int, UserPath
from .config import ConfigError, dump_config
from .io import atomic_save_figure, atomic_write_text, check_output_path
from .model import (
    ARCHITECTURE,
    DiffuserConfig,
    DiffuserForCausalLM,
    DiffuserForMaskedLM,
    DiffuserForMatching,
    DiffuserForSequenceClassification,
    PretrainedModel,
    load_pretrained,
)
from .tasks import IGNORE_INDEX, AnySplit, TaskConfig, TaskData, collate, load_task
from .visualize import plot_curves, plot_hop_weights

MODELS: dict[str, type[PretrainedModel]] = {
    "classification": DiffuserForSequenceClassification, "matching": DiffuserForMatching,
    "lm": DiffuserForCausalLM, "mlm": DiffuserForMaskedLM}
TOKEN_HEADS = ("lm", "mlm")  # scored per token, in bits per character or token


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: Int = Field(default=32, ge=1)  # global examples per micro-batch
    grad_accum: Int = Field(default=1, ge=1)  # micro-batches per optimizer step
    lr: Float = Field(default=1e-3, gt=0)
    min_lr_ratio: Float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * this
    weight_decay: Float = Field(default=0.01, ge=0)
    warmup_steps: Int = Field(default=100, ge=0)
    max_steps: Int = Field(default=1000, ge=1)
    grad_clip: Float = Field(default=1.0, ge=0)  # 0: no clipping
    eval_every: Int = Field(default=200, ge=1)
    log_every: Int = Field(default=20, ge=1)
    eval_batch_size: Int = Field(default=64, ge=1)
    threads: Int | None = Field(default=None, ge=1)  # torch intra-op threads per process
    # keep freed memory for reuse (glibc malloc; see diffuser_graph.allocator): faster steps,
    # resident memory stays at its peak
    retain_memory: bool = True
    device: str = "auto"  # auto (CUDA when present), cpu, cuda or cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls to bfloat16

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class RunConfig(BaseModel):
    """Everything one training run needs; what ``configs/*.yaml`` files hold."""

    model_config = ConfigDict(extra="forbid")
    seed: Int = Field(default=0, ge=0)
    out_dir: UserPath = "runs/run"
    task: TaskConfig
    model: DiffuserConfig = DiffuserConfig()
    train: TrainSettings = TrainSettings()


# --- where and how it runs ---------------------------------------------------------------------

def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``train.device`` as a torch device; ``auto`` is this process's GPU when there is one."""
    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else (
            torch.device("cpu"))
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is {setting!r} but torch finds no CUDA device; "
                              f"use 'cpu' or 'auto'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is {setting!r} but there are only "
                              f"{torch.cuda.device_count()} CUDA devices")
    return device


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bfloat16 autocast for ``precision="bf16"`` (CPU or CUDA); nothing for ``fp32``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Runtime:
    """This process: its rank among ``world`` processes, its device and precision."""

    rank: int
    world: int
    device: torch.device
    precision: str

    @classmethod
    def start(cls, settings: TrainSettings) -> Runtime:
        """Set threads and the allocator, pick the device, and join the process group under
        torchrun."""
        if settings.retain_memory:
            retain_freed_memory()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(settings.device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise ConfigError(f"train.precision is bf16 but {device} does not support it")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank() if world > 1 else 0, world, device, settings.precision)

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# --- pieces -----------------------------------------------------------------------------------

def build_model(config: DiffuserConfig, data: TaskData) -> PretrainedModel:
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
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def indices(self, k: int) -> np.ndarray:
        epoch, position = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).numpy()
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct predictions, predictions scored): one per example, or one per real token."""
    counted = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & counted).sum()), int(counted.sum())


class Meter:
    """Running loss and accuracy over scored predictions (examples, or tokens for an LM)."""

    def __init__(self) -> None:
        self.loss, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        right, seen = scored(logits, labels)
        self.loss, self.correct, self.seen = (self.loss + float(loss) * seen,
                                              self.correct + right, self.seen + seen)

    def summary(self, data: TaskData) -> dict[str, float]:
        """Mean loss and accuracy; for language models also bits per character (or token)."""
        metrics = {"loss": self.loss / self.seen, "accuracy": self.correct / self.seen}
        if data.head in TOKEN_HEADS:
            metrics[f"bits_per_{data.unit}"] = metrics["loss"] / math.log(2)
        return metrics


def score(metrics: dict, head: str) -> float:
    """Higher is better: validation accuracy, or minus the loss for language models."""
    return -metrics["loss"] if head in TOKEN_HEADS else metrics["accuracy"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: AnySplit, batch_size: int, data: TaskData,
             precision: str = "fp32") -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` of ``data`` (eval mode, in
    order, on the model's device), per example or, for language models, per predicted token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    meter = Meter()
    for start in range(0, len(split), batch_size):
        batch = to_device(collate(split, range(start, min(start + batch_size, len(split)))),
                          device)
        with autocast(device, precision):
            loss, logits = model(**batch)
        meter.add(loss, logits, batch["labels"])
    model.train(was_training)
    return {**meter.summary(data), "n": len(split)}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # written only in part when the process died
            raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
    return records


class RunFolder:
    """The files of one run: resolved config, metrics, curves, checkpoints and results."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir)
        self.last, self.best = self.path / "last.pt", self.path / "best.pt"
        self.metrics, self.results = self.path / "metrics.jsonl", self.path / "results.json"
        self.lock_file = self.path / ".lock"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process: ``.lock`` names its process id. A lock left by a
        process that no longer runs is taken over, with a warning; a live one is refused."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"out_dir {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                handle = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.lock_file)
                if holder is not None and _running(holder):
                    raise ConfigError(f"{self.path} is in use by another run (process {holder}); "
                                      f"wait for it to end, or choose another out_dir") from None
                print(f"warning: taking over {self.lock_file} from process {holder}, which no "
                      f"longer runs", file=sys.stderr)
                self.lock_file.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as written:
                written.write(f"{os.getpid()}\n")
            break
        try:
            yield
        finally:
            if _lock_holder(self.lock_file) == os.getpid():
                self.lock_file.unlink(missing_ok=True)

    def start(self, config: RunConfig, model_config: DiffuserConfig, kept_until: int) -> None:
        """Write the resolved config and keep only the metrics up to step ``kept_until`` (the
        checkpoint resumed from; 0 for a fresh run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml",
                          dump_config(config.model_copy(update={"model": model_config})))
        kept = [r for r in read_metrics(self.metrics) if r["step"] <= kept_until]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        atomic_save_figure(self.path / "curves.png", plot_curves(
            read_metrics(self.metrics)), dpi=100)


def _lock_holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True


# --- the loop ---------------------------------------------------------------------------------

def prepare(config: RunConfig) -> tuple[TaskData, DiffuserConfig]:
    """The task's data and the model config resolved and checked against it."""
    data = load_task(config.task, config.seed)
    try:
        model_config = with_initial_model(config.model).resolved(data.vocab_size,
                                                                 data.num_labels, data.pad_id)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    pattern = model_config.pattern
    if pattern.kind == "grid" and tuple(pattern.image_size or ()) != tuple(data.image_size or ()):
        raise ConfigError(f"model.pattern.image_size is {pattern.image_size} but the task's "
                          f"sequences are {data.image_size or 'not images'}")
    longest = max(split.max_length() for _, split in data.splits())
    if longest > model_config.max_positions:
        raise ConfigError(f"the data has sequences of {longest} tokens but model.max_positions "
                          f"is {model_config.max_positions}")
    return data, model_config


RESUMABLE = ("train.max_steps", "train.threads", "train.device", "train.eval_batch_size",
             "train.retain_memory", "out_dir")  # how and where a run computes, not what it computes


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (e.g. ``model.hops``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for k in sorted(set(a) | set(b), key=str)
                for key in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(top level)"]


def with_initial_model(model: DiffuserConfig) -> DiffuserConfig:
    """With ``init_from``, the saved model's config under the fields the YAML sets explicitly;
    those that the pretrained weights fix (sizes, vocabulary, norms) may not contradict it."""
    if model.init_from is None:
        return model
    try:
        saved = load_pretrained(model.init_from).config
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init_from: {err}") from None
    explicit = model.model_dump(exclude_unset=True)
    clashes = [f"{key} ({explicit[key]!r}; the weights have {getattr(saved, key)!r})"
               for key in ARCHITECTURE if key in explicit and explicit[key] != getattr(saved, key)]
    if clashes:
        raise ConfigError(f"model.init_from {model.init_from} fixes {', '.join(clashes)}; leave "
                          f"these out of the model section")
    saved_fields = saved.model_dump(exclude={"num_labels"})
    return DiffuserConfig.model_validate({**saved_fields, **explicit})


def _checkpoint(path: Path, model: PretrainedModel, optimizer: torch.optim.Optimizer,
                scheduler: Any, step: int, best_score: float, meter: Meter,
                config: RunConfig) -> None:
    rng: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_checkpoint(path, model, step, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), best_score=best_score,
                    meter=[meter.loss, meter.correct, meter.seen],
                    run_config=config.model_dump_json(), **rng)


def _restore(folder: RunFolder, config: RunConfig, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, float, Meter]:
    """Load ``last.pt`` into the model, optimizer, scheduler and RNGs; (step, best score, the
    running training metrics since the last log)."""
    state = load_checkpoint(folder.last)
    best = state.get("best_score", state.get("best_accuracy", -math.inf))  # older runs: accuracy
    if best > -math.inf and not folder.best.is_file():  # an evaluation has written best.pt
        raise ConfigError(f"{folder.best} is missing, so the resumed run could not keep its "
                          f"best checkpoint; put it back, or start a new run in another out_dir")
    saved = RunConfig.model_validate_json(state["run_config"]).model_dump(mode="json")
    changed = [key for key in differences(saved, config.model_dump(mode="json"))
               if key not in RESUMABLE]
    if changed:
        raise ConfigError(f"the config differs from the one {folder.path} was started with in "
                          f"{', '.join(changed)} (on resume only {', '.join(RESUMABLE)} may "
                          f"change); see {folder.path / 'config.yaml'}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    meter = Meter()
    if "meter" in state:
        meter.loss, meter.correct, meter.seen = state["meter"]
    return int(state["step"]), float(best), meter


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask the loop to stop after the
    current step, with a checkpoint; a second signal acts as usual. ``forward`` is called with
    the signal's number when one arrives (a study passes it on to its runs)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, forward: Callable[[int], None] | None = None) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._forward = forward

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name
        signal.signal(number, self._previous[number])
        if self._forward is not None:
            self._forward(number)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def agreed(self, run: Runtime) -> bool:
        """Whether any process was asked to stop (every process must stop at the same step)."""
        if run.world == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(config: RunConfig, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train ``config``; returns the final metrics, or ``{"stopped_at": step}`` when it stops
    early with ``last.pt`` saved: at step ``stop_after`` (as a preemption would), or on SIGINT /
    SIGTERM (then also ``"signal"``). ``resume`` continues exactly from ``last.pt`` in
    ``config.out_dir``. The run folder is locked while this process writes to it."""
    run = Runtime.start(config.train)
    folder = RunFolder(config.out_dir)
    with folder.lock() if run.rank == 0 else nullcontext():
        return _train(config, run, folder, resume, stop_after, progress)


def _train(config: RunConfig, run: Runtime, folder: RunFolder, resume: bool,
           stop_after: int | None, progress: bool) -> dict:
    # -- checks before any work
    settings = config.train
    if settings.batch_size % run.world:
        raise ConfigError(f"train.batch_size ({settings.batch_size}) must be divisible by the "
                          f"number of processes ({run.world})")
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after must be a step >= 1, got {stop_after}")
    if not resume and folder.last.exists():
        raise ConfigError(f"{folder.path} already holds a run (last.pt); pass --resume to "
                          f"continue it or choose another out_dir")

    # -- data, model, optimizer: seeded, so every process builds the same
    torch.manual_seed(config.seed)
    data, model_config = prepare(config)
    model = build_model(model_config, data)
    if model_config.init_from and not resume:
        taken = model.initialise_from(model_config.init_from)
        if run.rank == 0:
            print(f"starting from the {taken}", file=sys.stderr)
    model = model.to(run.device)
    optimizer = make_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    start_step, best_score, meter = 0, -math.inf, Meter()
    if resume:
        start_step, best_score, meter = _restore(folder, config, model, optimizer, scheduler)
    end = min(settings.max_steps, stop_after or settings.max_steps)
    if stop_after is not None and stop_after <= start_step:
        raise ConfigError(f"{folder.path} is already at step {start_step}; --stop-after "
                          f"{stop_after} would train nothing")
    if run.rank == 0:
        folder.start(config, model_config, kept_until=start_step)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    ) if run.world > 1 else model
    order = BatchOrder(len(data.train), settings.batch_size, config.seed)
    model.train()

    # -- the loop: accumulate micro-batches, step, log, evaluate, checkpoint; stop when asked
    bar = tqdm(range(start_step + 1, end + 1), desc="train", initial=start_step, total=end,
               disable=not progress or run.rank != 0)
    train_seconds, timed_steps = 0.0, 0  # optimisation steps only, evaluation excluded
    with StopRequests() as stop:
        for step in bar:
            started = time.perf_counter()
            for micro in range(settings.grad_accum):
                draw = (step - 1) * settings.grad_accum + micro
                indices = order.indices(draw)
                batch = to_device(collate(data.train, indices[run.rank::run.world], draw),
                                  run.device)
                last_micro = micro == settings.grad_accum - 1
                with nullcontext() if run.world == 1 or last_micro else net.no_sync():
                    with run.autocast():
                        loss, logits = net(**batch)
                    (loss / settings.grad_accum).backward()
                meter.add(loss, logits, batch["labels"])
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - started
            timed_steps += 1

            finished = step == settings.max_steps
            if run.rank == 0 and (step % settings.log_every == 0 or finished):
                record = {"step": step, "split": "train", **meter.summary(data),
                          "lr": scheduler.get_last_lr()[0]}
                folder.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
                meter = Meter()
            stopping = step == end or stop.agreed(run)
            if step % settings.eval_every == 0 or finished:
                if run.rank == 0:
                    val = evaluate(model, data.val, settings.eval_batch_size, data,
                                   run.precision)
                    folder.log({"step": step, "split": "val", **val})
                    if score(val, data.head) > best_score:
                        best_score = score(val, data.head)
                        _checkpoint(folder.best, model, optimizer, scheduler, step, best_score,
                                    meter, config)
                    _checkpoint(folder.last, model, optimizer, scheduler, step, best_score,
                                meter, config)
                    folder.plot()
                run.barrier()
            elif stopping and run.rank == 0:  # between evaluations: last.pt only, nothing logged
                _checkpoint(folder.last, model, optimizer, scheduler, step, best_score, meter,
                            config)
            if stopping and not finished:
                bar.close()
                run.barrier()
                stopped: dict = {"stopped_at": step}
                return {**stopped, "signal": stop.received} if stop.received else stopped
    bar.close()
    speed = {"train_steps_per_s": timed_steps / train_seconds if train_seconds else None,
             "timed_steps": timed_steps}
    return finish(config, data, run, speed)


def finish(config: RunConfig, data: TaskData, run: Runtime, speed: dict | None = None) -> dict:
    """Evaluate the best checkpoint on val and test; write and print ``results.json`` (with
    ``speed``: optimisation steps per second over the steps this process ran, if given)."""
    results: dict = {}
    if run.rank == 0:
        folder = RunFolder(config.out_dir)
        state = load_checkpoint(folder.best)
        model = model_from_checkpoint(state, MODELS[data.head], run.device)
        results = {"best_step": int(state["step"]), **split_results(model, data, config)}
        if speed is not None:
            results["speed"] = speed
        _write_hop_weights(folder, model)
        atomic_write_text(folder.results, json.dumps(results, indent=1))
        print(results_table(results))
    run.barrier()
    return results


def _write_hop_weights(folder: RunFolder, model: torch.nn.Module) -> None:
    """For the learned kernel: ``hop_weights.json`` (per layer, per head) and its plot."""
    layers = [module for module in model.modules() if isinstance(module, DiffuserAttention)]
    weights = [w.detach().cpu().double().numpy() for w in (layer.hop_weights() for layer in layers)
               if w is not None]
    if not weights:
        return
    start = list(layers[0].diffusion.coefficients)
    atomic_write_text(folder.path / "hop_weights.json", json.dumps(
        {"start": start, "layers": [w.tolist() for w in weights]}, indent=1))
    atomic_save_figure(folder.path / "hop_weights.png", plot_hop_weights(weights, start), dpi=100)


def split_results(model: torch.nn.Module, data: TaskData, config: RunConfig) -> dict:
    """Val and test metrics of ``model`` next to the input-blind baseline, and the data source."""
    results = {split: {**evaluate(model, getattr(data, split), config.train.eval_batch_size,
                                  data, config.train.precision), **data.baseline(split)}
               for split in ("val", "test")}
    return {**results, "data": data.source} if data.source else results


def results_table(results: dict) -> str:
    unit = next((u for u in ("char", "token") if f"bits_per_{u}" in results["test"]), None)
    columns = ((f"bits_per_{unit}", f"bits per {unit}"),
               (f"unigram_bits_per_{unit}", f"unigram bits per {unit}"),
               ("accuracy", "token accuracy")
               ) if unit else (("accuracy", "accuracy"), ("majority_rate", "majority-class rate"))
    lines = [f"best checkpoint: step {results['best_step']}",
             "| split | examples | " + " | ".join(name for _, name in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for split in ("val", "test"):
        r = results[split]
        lines.append(f"| {split} | {r['n']} | " + " | ".join(f"{r[key]:.4f}" for key, _ in columns)
                     + " |")
    return "\n".join(lines)


def model_for_task(state: dict, data: TaskData, device: torch.device | None = None,
                   engine: str | None = None) -> PretrainedModel:
    """The checkpoint's model, refused unless it was trained for this task's head and sizes."""
    model = model_from_checkpoint(state, MODELS[data.head], device, engine=engine)
    config = model.config
    if (config.vocab_size, config.num_labels) != (data.vocab_size, data.num_labels):
        raise CheckpointError(
            f"checkpoint was trained for vocab_size={config.vocab_size}, "
            f"num_labels={config.num_labels}; this task has {data.vocab_size}, {data.num_labels}")
    return model


# Settings that do not change what an evaluated model computes: how attention is computed and
# the dropouts (off in evaluation). Any other difference between a config and a checkpoint is
# an error, not something to ignore.
EVALUATION_INDEPENDENT = ("engine", "dropout", "attn_dropout", "hop_dropout")


def evaluate_checkpoint(config: RunConfig, checkpoint: str | Path,
                        out: str | Path | None = None) -> dict:
    """Test (and val) metrics of a checkpoint on ``config``'s task; writes ``eval.json`` (or
    ``out``). The config's ``model`` section must describe the checkpoint's model; its engine
    is used to compute."""
    target = check_output_path(out or Path(checkpoint).with_name("eval.json"),
                               inputs=(checkpoint,))
    state = load_checkpoint(checkpoint)
    data = load_task(config.task, config.seed)
    saved = json.loads(state["model_config"])
    wanted = config.model.resolved(data.vocab_size, data.num_labels, data.pad_id).model_dump(
        mode="json")
    changed = [key for key in differences(saved, wanted)
               if key not in EVALUATION_INDEPENDENT and (
                   config.model.init_from is None  # else the rest came from the initial model
                   or key.split(".")[0] in config.model.model_fields_set)]
    if changed:
        raise CheckpointError(
            "the config's model section differs from the checkpoint's in "
            + ", ".join(f"{key} (config {_lookup(wanted, key)!r}, checkpoint "
                        f"{_lookup(saved, key)!r})" for key in changed)
            + "; evaluate with the config the model was trained with (config.yaml in its run "
              "folder)")
    model = model_for_task(state, data, resolve_device(config.train.device),
                           engine=config.model.engine)
    results = {"checkpoint": str(checkpoint), "step": int(state["step"]),
               **split_results(model, data, config)}
    atomic_write_text(target, json.dumps(results, indent=1))
    return results


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
