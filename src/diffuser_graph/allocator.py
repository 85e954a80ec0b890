"""The C allocator of this process: keep freed memory for the next tensor instead of unmapping it.

glibc's ``malloc`` gives every block above its mmap threshold (128 KiB at first, adapting up to
32 MiB) a mapping of its own and hands it back to the kernel on ``free``, and it trims the top of
its heap whenever 128 KiB or more lies free there. A training step allocates and frees the same
large tensors every step, so each of them is page-faulted in again, page by page, every step.
:func:`retain_freed_memory` fixes the threshold at its maximum and stops the trimming, so freed
blocks stay in the process and are reused: the resident set stays at its peak, as it does with
PyTorch's CUDA caching allocator or with jemalloc/tcmalloc (which PyTorch's CPU performance
guide suggests preloading).

Measured on this project's 2-core CPU (one thread, forward + backward of a K = 5 block-engine
attention layer of pathfinder-small's shapes, run alternately): median 96-156 ms with it,
146-226 ms without; see the README's training section for steps/s. Blocks above 32 MiB keep
their own mappings. Serving them from the heap as well (``M_MMAP_MAX`` 0) was measured and left
out: K = 5 attention at 65,536 tokens (4 x 64 heads, 2 threads, one process) took 1.4 s per
forward + backward with no page fault, against 2.0 s and 459,000 page faults with glibc's
defaults, but the heap fragmented and grew step after step: a 131,072-token layer (hidden 256)
was resident at 4.3, 5.4 and 5.9 GiB after its first three steps, where with glibc's defaults its
peak is 3.2 GiB.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on a 64-bit machine
TOP_PAD = 64 * 2**20  # grow the heap in steps of at least this much
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free heap top


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (see the module docstring), once per
    process. Returns whether it applied: ``False`` where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TOP_PAD, TOP_PAD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
