"""Set-up: the Makefile finds a supported Python by itself and notices a .venv of another one."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIND = REPO / "scripts" / "find-python"


def stub(folder: Path, name: str, version: str) -> Path:
    """A fake interpreter that answers any question with its version."""
    path = folder / name
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def find(path_dirs, python=None):
    env = {"PATH": os.pathsep.join(str(d) for d in path_dirs)}
    if python is not None:
        env["PYTHON"] = str(python)
    return subprocess.run(["/bin/sh", str(FIND)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("versions,chosen", [
    ({"python3.12": "3.12"}, "python3.12"),
    ({"python3.11": "3.11"}, "python3.11"),
    ({"python3.10": "3.10", "python3.12": "3.12", "python3.11": "3.11"}, "python3.12"),
    ({"python3": "3.11", "python3.13": "3.13"}, "python3"),
])
def test_the_first_supported_interpreter_is_chosen(tmp_path, versions, chosen):
    for name, version in versions.items():
        stub(tmp_path, name, version)
    done = find([tmp_path])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / chosen)


def test_only_3_13_is_refused_with_the_reason(tmp_path):
    stub(tmp_path, "python3.13", "3.13")
    stub(tmp_path, "python3", "3.13")
    done = find([tmp_path])
    assert done.returncode == 1 and done.stdout == ""
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith("error: no Python 3.10-3.12 on PATH (found python3=3.13 "
                              "python3.13=3.13)")
    assert "torch <= 2.2.1, whose wheels stop at Python 3.12" in message
    assert "PYTHON=/path/to/python3.12" in message


def test_no_interpreter_at_all(tmp_path):
    done = find([tmp_path])
    assert done.returncode == 1
    assert done.stderr.startswith("error: no Python 3.10-3.12 on PATH: DGL 2.1.0")


def test_an_explicit_python_is_used_or_refused(tmp_path):
    stub(tmp_path, "python3.12", "3.12")
    elsewhere = tmp_path / "elsewhere"  # not on PATH
    elsewhere.mkdir()
    good = stub(elsewhere, "python", "3.10")
    done = find([tmp_path], python=good)
    assert done.returncode == 0 and done.stdout.strip() == str(good)
    old = stub(tmp_path, "python3.9", "3.9")
    done = find([tmp_path], python=old)
    assert done.returncode == 1
    assert f"PYTHON={old} is Python 3.9; this project needs Python 3.10-3.12" in done.stderr
    done = find([tmp_path], python=tmp_path / "missing")
    assert "is not a runnable Python" in done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_a_venv_of_another_python_is_rebuilt(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    stub(stubs, "python3.12", "3.12")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub(venv / "bin", "python", "3.11")
    (venv / "marker").write_text("made with 3.11")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    done = subprocess.run(["make", "-s", "-C", str(REPO), f"VENV={venv}", "venv"],
                          capture_output=True, text=True, env=env)
    assert (f"rebuilding {venv}: it was made with Python 3.11, the Python found is 3.12"
            in done.stdout)
    assert not (venv / "marker").exists()  # the stale environment is gone
