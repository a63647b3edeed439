"""The notebooks in notebooks/: each is committed without outputs, and each runs from a fresh clone.

Every notebook is executed with nbclient in a ``python3`` kernel whose working directory is ``notebooks/`` (as
Jupyter starts it), under the tiny budget the notebooks read from ``EMU_NOTEBOOK_QUICK=1`` (a few training steps,
a few queries) and with their runs and data in a temporary folder (``EMU_NOTEBOOK_RUNS``), so that a test run
writes nothing into the repository. A cell that raises fails the test. The notebooks share that folder and run in
order, as a reader runs them: 04 then loads the checkpoint 01 trained (run alone, it trains its own the same way).
"""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01-quickstart", "02-components", "03-data", "04-evaluation", "05-ablation"]
CELL_TIMEOUT = 600  # seconds per cell: generous for a busy 2-core machine (the whole quick run takes about 1.5 min)


def test_the_notebooks_are_the_documented_five():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4 and notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        assert cell.metadata == {}, f"cell {index} has metadata {dict(cell.metadata)}: strip it"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has outputs: strip them"
            assert cell.execution_count is None, f"cell {index} has an execution count: strip it"


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


WATCHED = [NOTEBOOKS, ROOT / "lightning_logs", ROOT / "runs" / "notebooks", ROOT / "runs/data/shapesworld-quick"]
"""Where a notebook that ignored EMU_NOTEBOOK_RUNS (or wrote relative to its working directory) would write."""


def _snapshot() -> dict[str, set[str] | None]:
    return {str(path): _tree(path) if path.is_dir() else None for path in WATCHED}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs folder the notebooks share (the repository's runs/ plays this part outside the tests)."""
    return tmp_path_factory.mktemp("notebooks") / "runs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, runs, monkeypatch):
    monkeypatch.setenv("EMU_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("EMU_NOTEBOOK_RUNS", str(runs))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot()
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    assert _snapshot() == before, "the notebook wrote into the repository"
    assert runs.is_dir(), "the notebook did not use EMU_NOTEBOOK_RUNS"
