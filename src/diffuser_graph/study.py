"""Studies: a grid of training runs over base configs x overrides x seeds, and its aggregate.

A study file (``configs/studies/*.yaml``) names base configs, a grid of dotted overrides (every
combination is run), the seeds, and settings every run shares. Each run is an ordinary run folder
``OUT/<config>/<point>/seed<N>`` trained by ``diffuser-graph train`` in its own process, ``jobs``
at a time with the CPU threads divided between them. The study resumes: a run with
``results.json`` is done and skipped, one with ``last.pt`` continues (``--resume``), the rest
start. The aggregate (``summary.csv``: one row per run; ``summary.md``: mean ± sample std over
seeds with each seed's value and steps/s; plots of the metric against every numeric grid key
with error bars, and a bar chart per config) is rewritten from the run folders after every run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from .checks import Int, UserPath
from .config import ConfigError, load_config
from .io import atomic_save_figure, atomic_write_text


class StudyConfig(BaseModel):
    """What a study file holds."""

    model_config = ConfigDict(extra="forbid")
    out_dir: UserPath
    configs: list[UserPath] = Field(min_length=1)
    seeds: list[Int] = Field(default=[0, 1, 2], min_length=1)
    grid: dict[str, list[Any]] = {}
    overrides: dict[str, Any] = {}  # set in every run, e.g. train.max_steps: 500
    metric: str = "auto"  # a key of results["test"]; auto: bits_per_* for LMs, else accuracy

    @field_validator("grid", "overrides")
    @classmethod
    def _dotted_keys(cls, value: dict) -> dict:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
                raise ValueError(f"{key!r} must be a dotted key such as model.hops")
            if key in ("seed", "out_dir"):
                raise ValueError(f"{key!r} is set by the study (seeds, out_dir)")
        return value

    @field_validator("grid")
    @classmethod
    def _values_listed(cls, value: dict) -> dict:
        for key, values in value.items():
            if not values:
                raise ValueError(f"grid key {key!r} needs at least one value")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and >= 0, got {value}")
        return value


@dataclass(frozen=True)
class Run:
    """One run of the grid: a base config, a grid point (dotted key -> value) and a seed."""

    config: Path
    point: tuple[tuple[str, Any], ...]
    seed: int
    out_dir: Path
    overrides: tuple[str, ...] = field(repr=False)

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.point) or "(base)"


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def expand(study: StudyConfig) -> list[Run]:
    """Every run of the study: configs x grid points x seeds, in that order."""
    keys = list(study.grid)
    shared = [f"{key}={json.dumps(value)}" for key, value in study.overrides.items()]
    runs = []
    for config in study.configs:
        for values in itertools.product(*(study.grid[key] for key in keys)):
            point = tuple(zip(keys, values, strict=True))
            name = "__".join(f"{key.split('.')[-1]}-{_slug(value)}" for key, value in point)
            for seed in study.seeds:
                out = Path(study.out_dir) / Path(config).stem / (name or "base") / f"seed{seed}"
                overrides = (*shared, *(f"{key}={json.dumps(value)}" for key, value in point),
                             f"seed={seed}", f"out_dir={out}")
                runs.append(Run(Path(config), point, seed, out, overrides))
    return runs


def check_runs(runs: Sequence[Run]) -> None:
    """Validate every run's config before any training; name the run at fault."""
    from .train import RunConfig

    for run in runs:
        try:
            load_config(run.config, RunConfig, run.overrides)
        except ConfigError as err:
            raise ConfigError(f"study run {run.config} [{run.label}] seed {run.seed}: {err}"
                              ) from err


def status(run: Run) -> str:
    """``done`` (results.json), ``resume`` (last.pt) or ``new``."""
    if (run.out_dir / "results.json").exists():
        return "done"
    return "resume" if (run.out_dir / "last.pt").exists() else "new"


def train_command(run: Run, threads: int) -> list[str]:
    command = [sys.executable, "-m", "diffuser_graph.cli", "train", str(run.config),
               *run.overrides, f"train.threads={threads}", "--quiet"]
    return command + (["--resume"] if status(run) == "resume" else [])


_RUNNING: set[subprocess.Popen] = set()  # the runs' processes, for passing on a stop request
_RUNNING_LOCK = threading.Lock()


def launch(run: Run, threads: int) -> int:
    """Train one run in its own process (its own session: a stop request reaches it through the
    study); its output goes to ``train.log`` in the run folder."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    with open(run.out_dir / "train.log", "ab") as log:
        process = subprocess.Popen(train_command(run, threads), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            return process.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)


def _stop_runs(number: int) -> None:
    """Ask every running run to stop after its current step with a checkpoint (SIGTERM: a run
    still preparing its data has nothing to save and ends at once)."""
    with _RUNNING_LOCK:
        for process in _RUNNING:
            process.send_signal(signal.SIGTERM)


def run_study(study: StudyConfig, jobs: int = 1, threads: int | None = None,
              progress: bool = True,
              launcher: Callable[[Run, int], int] = launch) -> pd.DataFrame:
    """Run what is left of the grid, ``jobs`` runs at a time; returns the summary frame.

    SIGINT or SIGTERM stops the study: running runs stop with a checkpoint, no new run starts,
    and :class:`StudyStopped` says how many are left (run the study again to finish them).
    """
    from .train import StopRequests

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    runs = expand(study)
    check_runs(runs)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    todo = [run for run in runs if status(run) != "done"]
    failed: list[str] = []
    writing = threading.Lock()
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="study", disable=not progress)

    def one(run: Run) -> None:
        if stop.received:
            return
        code = launcher(run, threads)
        if code != 0:
            failed.append(f"{run.out_dir} (exit {code}; see its train.log)")
        with writing:
            write_summary(study, runs)
            if status(run) == "done":
                bar.update()

    with StopRequests(forward=_stop_runs) as stop, ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    bar.close()
    frame = write_summary(study, runs)
    left = sum(status(run) != "done" for run in runs)
    if stop.received:
        raise StudyStopped(f"study stopped on {stop.received} with {left} of {len(runs)} runs "
                           f"left; run the same command again to finish them")
    if left:
        raise RuntimeError(f"{left} of {len(runs)} study runs did not finish"
                           + (": " + "; ".join(failed) if failed else ""))
    return frame


class StudyStopped(RuntimeError):
    """The study was asked to stop; what finished is kept and the rest resumes next time."""


# --- the aggregate ------------------------------------------------------------------------------

def _metric(results: dict, metric: str) -> tuple[str, float]:
    test = results["test"]
    if metric == "auto":
        metric = next((key for key in test if key.startswith("bits_per_")
                       and not key.startswith("unigram")), "accuracy")
    if metric not in test:
        raise ConfigError(f"metric {metric!r} is not in the runs' test results: {sorted(test)}")
    return metric, float(test[metric])


def _cell(value: Any) -> Any:
    """A grid value as a table cell: numbers and strings as they are, a mapping or list (a
    pattern, say) as its JSON text, so runs group by it."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def collect(study: StudyConfig, runs: Sequence[Run]) -> pd.DataFrame:
    """One row per finished run: config, grid values, seed, metric, steps/s, best step."""
    rows = []
    for run in runs:
        path = run.out_dir / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        name, value = _metric(results, study.metric)
        speed = results.get("speed") or {}
        rows.append({"config": run.config.stem,
                     **{key: _cell(value) for key, value in run.point}, "seed": run.seed,
                     "metric": name, "value": value, "val_value": results["val"].get(name),
                     "steps_per_s": speed.get("train_steps_per_s"),
                     "best_step": results["best_step"]})
    return pd.DataFrame(rows)


def aggregate(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof 1; NaN for one seed), count and the seeds' values
    of every config x grid point."""
    groups = ["config", *keys]
    table = frame.groupby(groups, sort=False, dropna=False).agg(
        metric=("metric", "first"), mean=("value", "mean"), std=("value", "std"),
        seeds=("value", "count"), values=("value", list),
        steps_per_s=("steps_per_s", "mean"))
    return table.reset_index()


def _point_label(row: pd.Series, keys: Sequence[str]) -> str:
    return ", ".join(f"{key.split('.')[-1]}={row[key]}" for key in keys) or "(base)"


def summary_markdown(table: pd.DataFrame, keys: Sequence[str], total: int) -> str:
    lines = ["# Study summary", "",
             f"{int(table['seeds'].sum()) if len(table) else 0} of {total} runs finished. "
             "Test metric of the best-validation checkpoint: mean ± sample standard deviation "
             "over seeds, then each seed's value; steps/s is training throughput (evaluation "
             "excluded), averaged over seeds.", ""]
    for config, part in table.groupby("config", sort=False):
        lines += [f"## {config} ({part['metric'].iloc[0]})", "",
                  "| run | mean ± std | seeds | values | steps/s |", "|---|---|---|---|---|"]
        for _, row in part.iterrows():
            spread = "" if math.isnan(row["std"]) else f" ± {row['std']:.4f}"
            values = ", ".join(f"{v:.4f}" for v in row["values"])
            speed = "—" if pd.isna(row["steps_per_s"]) else f"{row['steps_per_s']:.2f}"
            lines.append(f"| {_point_label(row, keys)} | {row['mean']:.4f}{spread} | "
                         f"{row['seeds']} | {values} | {speed} |")
        lines.append("")
    return "\n".join(lines)


def write_summary(study: StudyConfig, runs: Sequence[Run]) -> pd.DataFrame:
    """``summary.csv``, ``summary.md`` and the plots in the study's ``out_dir``."""
    from .visualize import plot_study_bars, plot_study_curve

    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = collect(study, runs)
    keys = list(study.grid)
    atomic_write_text(out / "summary.csv", frame.to_csv(index=False))
    table = aggregate(frame, keys) if len(frame) else pd.DataFrame()
    atomic_write_text(out / "summary.md", summary_markdown(table, keys, len(runs))
                      if len(table) else "# Study summary\n\nNo run has finished yet.\n")
    for config, part in table.groupby("config", sort=False) if len(table) else ():
        atomic_save_figure(out / f"{config}-bars.png", plot_study_bars(
            part, [_point_label(row, keys) for _, row in part.iterrows()], config), dpi=100)
        for key in keys:
            if all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in study.grid[key]) and len(study.grid[key]) > 1:
                others = [k for k in keys if k != key]
                atomic_save_figure(out / f"{config}-{key.split('.')[-1]}.png", plot_study_curve(
                    part, key, others, config), dpi=100)
    return table
