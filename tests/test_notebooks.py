"""Every notebook runs top to bottom, so none can rot."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_patterns.ipynb", "02_spectral.ipynb",
                                           "03_training.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit notebooks with outputs stripped"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # a run folder that does not exist: notebook 03 trains its own short run
    monkeypatch.setenv("DIFFUSER_RUN", str(tmp_path / "no-run"))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    images = sum("image/png" in output.get("data", {})
                 for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)
    assert images >= (2 if path.name.startswith("03") else 4), f"{path.name} drew {images}"
