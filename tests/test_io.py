"""Atomic writes: whole files or none, readable like any other file."""
import os
import stat

import pytest
import torch
from matplotlib.figure import Figure

from diffuser_graph.io import atomic_save, atomic_save_figure, atomic_write, atomic_write_text


def test_text_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["out.txt"]


def test_files_get_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE(
        plain.stat().st_mode)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write_text(path, "old")

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_tensors_and_figures(tmp_path):
    atomic_save(tmp_path / "t.pt", {"x": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.arange(3))
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    atomic_save_figure(tmp_path / "f.png", fig)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["f.png", "t.pt"]
