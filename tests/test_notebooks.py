"""Every notebook runs end to end with papermill in the smoke profile, on real data, training
afresh (runs go to a temporary MIXLAB_RUNS), and its final assertion cell passes. nbval checks
the quickstart notebook the way `pytest --nbval-lax` users would."""
import os
import subprocess
import sys

import pytest

from mixlab.notebooks import notebook_paths, run_notebook

from .conftest import REPO

NOTEBOOKS = notebook_paths()


def _require_real_data(data_root):
    if not (data_root / "cifar10").exists() or not (data_root / "MNIST").exists():
        pytest.fail(f"real data missing in {data_root}: run `make data` (unpacks ../shared/data) "
                    f"or `python -m mixlab download cifar10 && python -m mixlab download mnist`")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(path, tmp_path, monkeypatch, data_root):
    _require_real_data(data_root)
    monkeypatch.setenv("MIXLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MIXLAB_DATA", str(data_root))
    out = run_notebook(path, profile="smoke", out_dir=tmp_path)
    assert out.exists()


def test_notebooks_are_committed_without_outputs():
    import nbformat
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one `parameters` cell"
        assert 'profile = "smoke"' in tagged[0].source, f"{path.name}: default profile smoke"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, \
                    f"{path.name}: outputs must be stripped"


@pytest.mark.notebook
def test_quickstart_under_nbval(tmp_path, data_root):
    _require_real_data(data_root)
    env = {**os.environ, "MIXLAB_RUNS": str(tmp_path / "runs"), "MIXLAB_DATA": str(data_root)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
         str(REPO / "notebooks" / "quickstart.ipynb")],
        capture_output=True, text=True, env=env, cwd=REPO / "notebooks", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
