"""The notebooks run top to bottom (small settings) and are stored without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    resources = {"metadata": {"path": str(cwd)}}  # the kernel's working directory
    NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    return nb


def test_the_four_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "privacy_utility", "memorization", "plan"}


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


def _audit_file(path, label: str, arm: str, single: float) -> str:
    """A memorization.json of a control group at chance and single-device canaries at `single` bits."""
    from fleet.audits import memorization as mz

    chance = 10.0 - np.log2(np.random.default_rng(len(label)).integers(1, 1025, 8))
    canaries = [
        {"group": g, "devices": g, "repeats": 16, "prob": None, "insertions": 16 * g, "log_perplexity": 30.0,
         "exposure": float(e), "saturated": False, "exposure_extrapolated": float(e),
         "exposure_extrapolated_hi": None, "extracted": False, "extracted_top_b": False, "generic_hits": 0}
        for g, values in ((0, chance), (1, single + chance / 10))
        for e in values
    ]  # fmt: skip
    result = {"label": label, "arm": arm, "recall@1": 0.2, "references": 1023, "max_exposure": 10.0,
              "canaries": canaries, "groups": mz.group_table(canaries)}  # fmt: skip
    path.parent.mkdir()
    path.write_text(json.dumps(result))
    return str(path)


def test_memorization_notebook_plots_given_files_and_asserts_their_outcome(tmp_path):
    nb = nbformat.read(next(p for p in NOTEBOOKS if p.stem == "memorization"), as_version=4)
    (param,) = [c for c in nb.cells if c.source.startswith("MEMORIZATION_JSON = []")]
    paths = [_audit_file(tmp_path / "0" / "memorization.json", "no DP", "no DP", 9.0)]
    paths.append(_audit_file(tmp_path / "1" / "memorization.json", "dp_fedavg z=1", "DP", 0.5))
    param.source = f"MEMORIZATION_JSON = {paths!r}"
    execute(nb, tmp_path)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert "DP does not" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)

    # A DP run whose single-device canaries stand out must make the notebook fail, not plot.
    bad = tmp_path / "bad"
    bad.mkdir()
    paths[1] = _audit_file(bad / "1" / "memorization.json", "dp_fedavg z=1", "DP", 9.0)
    param.source = f"MEMORIZATION_JSON = {paths!r}"
    with pytest.raises(Exception, match="DP: single-phone canaries not below no DP"):
        execute(nb, bad)
