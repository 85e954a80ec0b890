"""retain_freed_memory: freed tensors stay in the process (glibc), and training turns it on."""
import platform
import subprocess
import sys

import pytest

# Frees 8 tensors of 8 MiB and prints how many MiB the resident set lost (glibc trims its heap
# top past twice the largest block it has seen freed, so by default all 64 MiB go back).
RELEASED = """
import sys, torch
from diffuser_graph.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
kept = [torch.ones(2**21) for _ in range(8)]
before = resident_mib()
del kept
print(round(before - resident_mib()))
"""


def released_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", RELEASED, mode], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_freed_tensors_stay_in_the_process():
    assert released_mib("default") >= 48  # glibc unmaps or trims them
    assert released_mib("retain") <= 8


def test_training_retains_memory_unless_told_not_to(monkeypatch):
    from diffuser_graph import train

    calls = []
    monkeypatch.setattr(train, "retain_freed_memory", lambda: calls.append(1))
    train.Runtime.start(train.TrainSettings(device="cpu"))
    train.Runtime.start(train.TrainSettings(device="cpu", retain_memory=False))
    assert calls == [1]
