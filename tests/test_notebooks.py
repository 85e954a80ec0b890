"""Every notebook runs top to bottom, so none can rot."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_patterns.ipynb", "02_spectral.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit notebooks with outputs stripped"
    os.environ.setdefault("MPLBACKEND", "Agg")
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = sum("image/png" in output.get("data", {})
                 for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)
    assert images >= 4, f"{path.name} drew {images} pictures"
