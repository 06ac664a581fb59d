"""The notebooks run top to bottom (small settings) and are stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    resources = {"metadata": {"path": str(cwd)}}  # the kernel's working directory
    NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    return nb


def test_the_three_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "privacy_utility", "memorization"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = execute(nbformat.read(path, as_version=4), tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "every notebook draws plots"


def test_memorization_notebook_plots_given_files(tmp_path):
    paths = []
    for label, scale in (("no DP", 1.0), ("dp_fedavg z=1", 0.1)):
        canaries = [{"insertions": n, "exposure": scale * n, "extracted": scale * n > 8} for n in (1, 16, 64)]
        path = tmp_path / f"{len(paths)}" / "memorization.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"label": label, "max_exposure": 14.0, "canaries": canaries}))
        paths.append(str(path))
    nb = nbformat.read(next(p for p in NOTEBOOKS if p.stem == "memorization"), as_version=4)
    (param,) = [c for c in nb.cells if c.source.startswith("MEMORIZATION_JSON = []")]
    param.source = f"MEMORIZATION_JSON = {paths!r}"
    execute(nb, tmp_path)
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
