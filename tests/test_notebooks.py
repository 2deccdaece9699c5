"""Every notebook in notebooks/ runs top to bottom at its small settings, draws its figures headless, and is
committed with the outputs of a fuller run so that it reads without running."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"ablation.ipynb", "faces.ipynb", "monitoring.ipynb", "quickstart.ipynb", "real_photos.ipynb"}
MAX_BYTES = 1_500_000
FIGURE_TYPES = {"image/png", "image/jpeg"}


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def figures(notebook):
    return [output for output in outputs(notebook) if FIGURE_TYPES & set(output.get("data", {}))]


def test_the_documented_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("FAME_NOTEBOOK_QUICK", "1")  # the notebooks' tiny settings
    # One thread per kernel: on a small shared CPU two OpenMP threads wait on each other for most of each step.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [output for output in outputs(notebook) if output.output_type == "error"]
    assert not errors
    assert figures(notebook), f"{path.name} drew no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_its_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{path.name} has cells that were not run"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "not run top to bottom"
    assert not [output for output in outputs(notebook) if output.output_type == "error"]
    assert figures(notebook)
    assert path.stat().st_size < MAX_BYTES
