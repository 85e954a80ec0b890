"""What the benchmark scripts share: timing, peak memory and one case per fresh subprocess.

On the CPU the peak is the kernel's peak-RSS mark (VmHWM) over the case's inputs; on CUDA it is
``torch.cuda.max_memory_allocated`` above what was allocated when the case started.

The RSS peak is what the operating system charges, but it also holds what glibc's ``malloc``
kept or fragmented: one layer's runs here gave SDPA 170-267 MiB. :func:`allocated_peak` counts
the tensors in use instead (the most alive at once over one step, from the profiler's record of
every allocation and free), the same quantity as the CUDA peak and the same in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from diffuser_graph import PatternSpec
from diffuser_graph.allocator import retain_freed_memory

# The patterns the benchmarks time, by name.
PATTERNS = {
    "window32+2g+3r": PatternSpec(window=32, num_global=2, num_random=3),
    "official": PatternSpec(kind="official"),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak mark to the memory in use now; return that amount in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS:") * 1024


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM:") * 1024


def allocated_peak(step: Callable[[], object], device: torch.device) -> int:
    """The most bytes of tensors alive at once during one ``step``, above those alive before
    it."""
    if device.type == "cuda":
        start = reset_peak_memory(device)
        step()
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # in time order (a stable sort: an allocation and a free at the same microsecond keep
    # their recorded order)
    changes = sorted(((event.start_us(), event.nbytes())
                      for event in prof.profiler.kineto_results.events()
                      if event.name() == "[memory]"), key=lambda change: change[0])
    alive = peak = 0
    for _, change in changes:  # frees are negative
        alive += change
        peak = max(peak, alive)
    return peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, repeats: int,
              budget_s: float) -> tuple[float, int]:
    """Median seconds of ``step`` after one warm-up, and how many repeats the budget allowed."""
    step()
    synchronize(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 1 or time.perf_counter() < deadline):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def matmul_gflops(threads: int, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 matmul throughput: the machine's practical peak for the ratios."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        size *= 4
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    seconds, _ = time_step(lambda: a @ b, device, repeats, budget_s=float("inf"))
    return 2.0 * size**3 / seconds / 1e9


def machine(device: torch.device) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} CPUs")
    return f"{where}, torch {torch.__version__}"


def add_case_options(parser: argparse.ArgumentParser, timeout: float = 900.0) -> None:
    """The options every suite shares: a time limit per case, the output folder, and the
    internal ``--case JSON`` by which :func:`run_in_subprocess` runs one case in a fresh process
    (see :func:`ran_one_case`)."""
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per case")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--case", help=argparse.SUPPRESS)


def ran_one_case(args: argparse.Namespace, run_case: Callable[[dict], dict],
                 retain_memory: bool = True) -> bool:
    """If ``--case`` was given, run that one case and print its result as JSON (the line
    :func:`run_in_subprocess` reads); whether it was. With ``retain_memory`` (suites whose
    cases do not set the allocator themselves) every case, baselines included, runs with the C
    allocator set as ``train`` sets it by default (:func:`retain_freed_memory`): freed memory is
    reused rather than mapped and page-faulted in again on every step."""
    if args.case:
        if retain_memory:
            retain_freed_memory()
        print(json.dumps(run_case(json.loads(args.case))))
    return bool(args.case)


def run_in_rounds(script: str, cases: list[dict], rounds: int, timeout: float,
                  progress: Callable[[int], object] = lambda done: None) -> list[dict]:
    """Each case ``rounds`` times, one fresh process each, the cases taking turns (round 1 of
    every case, then round 2, ...) so that a slow spell of a shared machine falls on all of
    them rather than on one case's repeats. Per case: the median of each time over its rounds,
    the largest peak memory, and every round's result under ``"rounds"`` (one round: the result
    as it is). A case that fails in any round is reported with that round's error."""
    results: list[list[dict]] = [[] for _ in cases]
    for _ in range(rounds):
        for index, case in enumerate(cases):
            results[index].append(run_in_subprocess(script, case, timeout))
            progress(1)
    merged = []
    for runs in results:
        failed = [run for run in runs if "error" in run]
        if rounds == 1 or failed:
            merged.append(failed[0] if failed else runs[0])
            continue
        row = {**runs[0], "rounds": runs}
        for key in runs[0]:
            if key.endswith("_s") and key != "budget_s":
                row[key] = statistics.median(run[key] for run in runs)
        for key in ("peak_memory_bytes", "peak_allocated_bytes"):
            if key in runs[0]:
                row[key] = max(run[key] for run in runs)
        merged.append(row)
    return merged


def run_in_subprocess(script: str, case: dict, timeout: float) -> dict:
    """Run ``script --case JSON`` in a fresh interpreter; its last stdout line is the result."""
    command = [sys.executable, script, "--case", json.dumps(case)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        reason = "out of memory" if done.returncode in (-9, 137) else done.stderr.strip()[-300:]
        return {**case, "error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])
