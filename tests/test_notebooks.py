"""Every notebook in notebooks/ runs top to bottom on the tiny offline model, and the committed
copies carry no error outputs."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120  # the slowest cell, UMAP's first numba compilation, takes ~15 s

pytestmark = pytest.mark.slow  # a Jupyter kernel per notebook


def error_outputs(nb: nbformat.NotebookNode) -> list[str]:
    return [o.ename for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"tutorial-walkthrough.ipynb", "tokenization.ipynb", "embedding_extraction.ipynb",
            "dimensionality_reduction.ipynb", "head_importance.ipynb", "logit_lens.ipynb",
            "activation_patching.ipynb", "generation_and_steering.ipynb", "features.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_errors(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert not error_outputs(nb), f"{path.name} was saved with error outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tiny_dir: Path):
    nb = nbformat.read(path, as_version=4)
    # A server's comma list, as `python app.py` reads it: the notebooks take its first (default) model.
    env = {**os.environ, "EXPLORER_MODEL": f"{tiny_dir},gpt2", "EXPLORER_RANDOM_WEIGHTS": "",
           "EXPLORER_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on any error
    assert not error_outputs(nb)
