"""Compiled loops for the block engine on the CPU (``kernels.c``): gathered dot products and the
joint softmax.

The random keys' scores and their gradients are dot products of gathered rows,
``out[e] = q[i] . table[keys[e]]``. ``torch.sparse.sampled_addmm`` computes them on the CPU one
scalar dot per entry, without prefetching the rows it gathers; the compiled loop prefetches
each row a few entries ahead. Measured on this project's CPU for the authors'
pattern at 4,096 tokens (12 heads x 64, 3.0 M entries, one thread, the same runs):
73-95 ms against sampled_addmm's 124-145 ms.

Large calls are split between ``torch.get_num_threads()`` threads of OpenMP, on torch's own
runtime: the library links ``libgomp.so.1``, which is torch's (a PyPI wheel ships its copy under
that name, loaded before this library). Threads of our own competed for the cores with torch's
workers, which spin for a while after each of torch's ops: a gathered dot of the authors'
layer (2 heads, 496 k entries) right after a matmul took 3.2 ms with them and takes 1.7 ms on
torch's threads (one thread: 2.9-3.3 ms). As for torch's own operators, a child forked after
the parent ran them on several threads must run on one (``torch.set_num_threads(1)``, as
torch's DataLoader workers do): libgomp's threads do not survive a fork.

The softmax over a query's band, global keys and random keys together (:func:`joint_softmax_`)
runs in place, row by row, on the random keys' packed scores; in torch it needs them in a
rectangular layout as wide as the longest row (93 for the authors' 61 keys per query on
average) and a temporary and a pass over memory per step. Measured for the authors' pattern at
4,096 tokens (12 heads, 2 threads): 6-8 ms against 38-45 ms, and the block engine's
attention (scores and softmax) 43-47 ms against 70-122 ms.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/diffuser-graph`` (``~/.cache`` by default), keyed by the source, the flags and
the CPU, and loaded with :mod:`ctypes`. Without a compiler, or with ``DIFFUSER_GRAPH_NATIVE=0``
in the environment, :func:`gathered_dot` returns ``None`` and the caller uses sampled_addmm, and
:func:`available` is false, so the softmax takes torch's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC")
PARALLEL = ("-fopenmp",)  # a compiler without OpenMP builds the loops without it, on one thread
SWITCH = "DIFFUSER_GRAPH_NATIVE"  # "0" turns the compiled loops off
ENTRIES_PER_THREAD = 1 << 15  # below this many entries per thread, one thread does all
ROWS_PER_THREAD = 1 << 10  # the joint softmax's rows (of a few hundred values each) likewise
TYPES = {torch.float32: "float", torch.float64: "double"}
_P, _I = ctypes.c_void_p, ctypes.c_int64
ARGUMENTS = {  # each kernel's C arguments (it exists once per type: gathered_dot_float, ...)
    "gathered_dot": [_P] * 5 + [_I, _I, ctypes.c_int, ctypes.c_int],
    "joint_softmax": [_P, _P, _I, _P, _P, _I, _P, _P, _I, _I, ctypes.c_int],
    "joint_softmax_backward": [_P, _P, _P, _I, _P, _P, _P, _I, _P, _P, _P, _P, _I, ctypes.c_int],
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffuser-graph"


def _cpu() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """The shared library in the cache, compiled first if it is not there yet."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                     _cpu().encode()])).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as build:  # concurrent builds each
        built = Path(build) / path.name                              # rename a whole file
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip()[-500:] or
                                             f"exit status {done.returncode}")
        os.replace(built, path)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled loops (built and cached on first use), or ``None`` where they cannot be."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc")
    if compiler is None:
        warnings.warn("no C compiler (cc or $CC) found: the block engine's random keys use "
                      "torch.sparse.sampled_addmm and its softmax torch's rectangular path, "
                      "which are slower on the CPU", stacklevel=2)
        return None
    for flags in (FLAGS + PARALLEL, FLAGS):
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
            break
        except (OSError, subprocess.SubprocessError) as err:
            error = err
    else:
        warnings.warn(f"building {SOURCE.name} with {compiler} failed ({error}); the block "
                      "engine's random keys use torch.sparse.sampled_addmm and its softmax "
                      "torch's rectangular path", stacklevel=2)
        return None
    for name, arguments in ARGUMENTS.items():
        for type_name in TYPES.values():
            function = getattr(lib, f"{name}_{type_name}")
            function.argtypes = arguments
            function.restype = None
    return lib


def _kernel(name: str, *tensors: torch.Tensor | None) -> Any:
    """The compiled ``name`` for the tensors' dtype, or ``None`` where it does not apply: no
    library, a tensor off the CPU, or of another (or no supported) dtype."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if not all(available(t) and t.dtype == dtype for t in present):
        return None
    return getattr(library(), f"{name}_{TYPES[dtype]}")


def available(x: torch.Tensor) -> bool:
    """Whether the compiled loops take tensors like ``x`` (CPU, float32 or float64, built)."""
    return x.device.type == "cpu" and x.dtype in TYPES and library() is not None


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(work: int, per_thread: int) -> int:
    return max(1, min(torch.get_num_threads(), work // per_thread))


def gathered_dot(q: torch.Tensor, table: torch.Tensor, bounds: torch.Tensor, keys: torch.Tensor,
                 add_to: torch.Tensor | None = None) -> torch.Tensor | None:
    """``out[e] = q[i] . table[keys[e]]`` for the entries ``bounds[i] <= e < bounds[i + 1]`` of
    each query ``i``, added to ``add_to`` in place when given.

    Args:
        q: ``(rows, D)``; table: ``(M, D)``; float32 or float64, on the CPU.
        bounds: ``(rows + 1,)`` int64, where each query's entries start, then their count E.
        keys: ``(E,)`` int64 rows of ``table``, each below M (not checked here).
        add_to: ``(E,)`` contiguous, of ``q``'s dtype, or ``None``.

    Returns:
        ``(E,)`` (``add_to`` itself when given), or ``None`` where the compiled loop does not
        apply (no compiler, another device or dtype): the caller computes it another way.
    """
    function = _kernel("gathered_dot", q, table, add_to)
    if function is None or (add_to is not None and not add_to.is_contiguous()):
        return None
    q, table = q.contiguous(), table.contiguous()
    rows, dim = q.shape
    entries = keys.numel()
    out = add_to if add_to is not None else q.new_empty(entries)
    function(q.data_ptr(), table.data_ptr(), bounds.data_ptr(), keys.data_ptr(), out.data_ptr(),
             rows, dim, int(add_to is not None), _threads(entries, ENTRIES_PER_THREAD))
    return out


def joint_softmax_(band: torch.Tensor, band_bias: torch.Tensor | None, globals_: torch.Tensor,
                   global_bias: torch.Tensor | None, random: torch.Tensor,
                   bounds: torch.Tensor) -> bool:
    """In place, the softmax of each row over its band, global-key and random-key scores
    together (each part's bias added first; ``-inf`` masks a score out).

    Args:
        band: ``(..., Wb)``, ``rows`` rows; globals_: ``(..., G)``, as many; random: ``(E,)``,
            row ``r``'s scores at ``bounds[r]:bounds[r + 1]``; float32 or float64, contiguous,
            on the CPU (``G`` and ``E`` may be 0).
        band_bias, global_bias: ``(m, Wb)`` and ``(m, G)`` (row ``r`` adds row ``r % m``, so
            one bias serves every stacked sequence), or ``None``.
        bounds: ``(rows + 1,)`` int64.

    Returns:
        Whether it ran; ``False`` where the compiled loop does not apply (the caller computes
        the softmax another way).

    Measured for the authors' pattern at 4,096 tokens (12 heads x 64, 2 threads): 6-8 ms
    against torch's 38-45 ms (its rectangular copy, the softmax and the packing back).
    """
    parts = (band, band_bias, globals_, global_bias, random)
    function = _kernel("joint_softmax", *parts)
    if function is None or not all(t is None or t.is_contiguous() for t in parts):
        return False
    rows, band_width = bounds.numel() - 1, band.shape[-1]  # the band may be empty
    biases = [bias for bias in (band_bias, global_bias) if bias is not None]
    bias_rows = math.prod(biases[0].shape[:-1]) if biases else 1
    function(band.data_ptr(), _address(band_bias), band_width, globals_.data_ptr(),
             _address(global_bias), globals_.shape[-1], random.data_ptr(), bounds.data_ptr(),
             bias_rows, rows, _threads(rows, ROWS_PER_THREAD))
    return True


def joint_softmax_backward(probabilities: tuple[torch.Tensor, ...],
                           grads: tuple[torch.Tensor, ...],
                           bounds: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The gradients of :func:`joint_softmax_`'s scores, ``p * (g - sum over the row of p * g)``
    per part, from its outputs ``(band, globals, random)`` and their gradients (laid out
    alike); ``None`` where the compiled loop does not apply."""
    grads = tuple(g.contiguous() for g in grads)
    function = _kernel("joint_softmax_backward", *probabilities, *grads)
    if not all(p.is_contiguous() for p in probabilities):
        return None
    if function is None:
        return None
    outputs = tuple(torch.empty_like(g) for g in grads)
    (band, globals_, random), (band_grad, global_grad, random_grad) = probabilities, grads
    rows = bounds.numel() - 1
    function(band.data_ptr(), band_grad.data_ptr(), outputs[0].data_ptr(), band.shape[-1],
             globals_.data_ptr(), global_grad.data_ptr(), outputs[1].data_ptr(),
             globals_.shape[-1], random.data_ptr(), random_grad.data_ptr(), outputs[2].data_ptr(),
             bounds.data_ptr(), rows, _threads(rows, ROWS_PER_THREAD))
    return outputs
