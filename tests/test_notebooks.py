"""Every notebook runs end to end with papermill in the smoke profile, on real data, training
afresh (runs go to a temporary MIXLAB_RUNS), and its final cell of checks passes. Its
parameters are checked by ``mixlab.nbtools.check_params`` before anything runs: a wrong
profile or a parameter of the wrong type stops the notebook at once. nbval checks the
quickstart notebook the way `pytest --nbval-lax` users would."""
import ast
import os
import subprocess
import sys

import nbformat
import pytest

from mixlab import nbtools
from mixlab.notebooks import notebook_paths, run_notebook

from .conftest import REPO

NOTEBOOKS = notebook_paths()


def _require_real_data(data_root):
    if not (data_root / "cifar10").exists() or not (data_root / "MNIST").exists():
        pytest.fail(f"real data missing in {data_root}: run `make data` (unpacks ../shared/data) "
                    f"or `python -m mixlab download cifar10 && python -m mixlab download mnist`")


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(path, tmp_path, monkeypatch, data_root):
    _require_real_data(data_root)
    monkeypatch.setenv("MIXLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MIXLAB_DATA", str(data_root))
    out = run_notebook(path, profile="smoke", out_dir=tmp_path)
    nb = nbformat.read(out, as_version=4)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "all checks passed" in _stdout(last), f"{path.name}: the checks cell did not finish"


@pytest.mark.notebook
@pytest.mark.parametrize("parameters, message", [
    ({"profile": "tiny"}, "profile='tiny': 'tiny' is not one of ['smoke', 'short', 'paper']"),
    ({"epochs": "abc"}, "parameter epochs='abc' must be a whole number"),
], ids=["profile", "epochs"])
def test_bad_parameters_stop_the_notebook_at_once(parameters, message, tmp_path, monkeypatch):
    """`-p profile tiny` or `-p epochs abc` fail in the first cell after the parameters, with
    the parameter, the value and what is allowed, before any training."""
    import papermill as pm

    monkeypatch.setenv("MIXLAB_RUNS", str(tmp_path / "runs"))
    params = {"profile": "smoke", **parameters}
    path = REPO / "notebooks" / "quickstart.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook(path, profile=params.pop("profile"), out_dir=tmp_path, parameters=params)
    assert message in str(err.value)
    assert not (tmp_path / "runs").exists(), "the notebook trained before checking its parameters"


def _parameter_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def _check_params_keywords(source: str) -> set[str] | None:
    """Keywords of the ``nbtools.check_params(...)`` call in a cell (IPython magics dropped)."""
    code = "\n".join(line for line in source.splitlines() if not line.startswith("%"))
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "check_params":
            return {k.arg for k in node.keywords}
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_structure(path):
    """One `parameters` cell with the smoke profile as default; the next code cell checks every
    parameter through nbtools.check_params; no outputs committed."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(code_cells)
              if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one `parameters` cell"
    params_cell = code_cells[tagged[0]]
    assert 'profile = "smoke"' in params_cell.source, f"{path.name}: default profile smoke"
    checked = _check_params_keywords(code_cells[tagged[0] + 1].source)
    assert checked is not None, \
        f"{path.name}: the first code cell after the parameters must call nbtools.check_params"
    assert checked == _parameter_names(params_cell.source), \
        f"{path.name}: check_params must check exactly the parameters of the parameters cell"
    for cell in code_cells:
        assert not cell.outputs and cell.execution_count is None, \
            f"{path.name}: outputs must be stripped"


def test_check_params_normalises_and_rejects():
    p = nbtools.check_params(profile="short", seed=3.0, methods="pgd_at, gairat", alphas="0.2,1",
                             eps=None, epochs=None, lams=[-1, 0])
    assert p == dict(profile="short", seed=3, methods=["pgd_at", "gairat"], alphas=[0.2, 1.0],
                     eps=None, epochs=None, lams=[-1.0, 0.0])
    assert isinstance(p["seed"], int)
    bad = [(dict(profile="tiny"), ValueError, "not one of ['smoke', 'short', 'paper']"),
           (dict(profile=None), TypeError, "profile=None"),
           (dict(epochs="abc"), TypeError, "epochs='abc' must be a whole number"),
           (dict(epochs=2.5), TypeError, "whole number"),
           (dict(epochs=0), ValueError, ">= 1"),
           (dict(seed=True), TypeError, "whole number"),
           (dict(eps="8/255"), TypeError, "must be a number"),
           (dict(eps=0), ValueError, "> 0"),
           (dict(alphas=[0.2, -1]), ValueError, "> 0"),
           (dict(methods=["pgd_at", "madry"]), ValueError, "'madry' is not one of"),
           (dict(variants=[]), TypeError, "non-empty list"),
           (dict(device="gpu"), ValueError, "auto, cpu, cuda"),
           (dict(run_dirs=["a"]), TypeError, "must be a dict"),
           (dict(unknown=1), TypeError, "unknown notebook parameter 'unknown'")]
    for params, error, message in bad:
        with pytest.raises(error) as err:
            nbtools.check_params(**params)
        assert message in str(err.value), (params, str(err.value))


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


def test_evaluate_checkpoints_rows_files_and_report(tmp_path):
    """Both checkpoints of a run evaluated on the same images, labelled with their epoch, each
    written to the run folder; the table carries every row's masking report."""
    import torch

    from mixlab.train import train_or_load

    run = train_or_load(run_dir=tmp_path / "run", method="erm", dataset="synthetic",
                        model="tiny", epochs=3, batch_size=64, train_subset=256, val_size=64,
                        eval_steps=0, device="cpu", quiet=True)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    rows = nbtools.evaluate_checkpoints("erm", run, x, y, attacks=("clean", "fgsm"), eps=8 / 255)
    best, last = rows
    assert best == f"erm (best, ep {run.epoch})" and last == "erm (last, ep 3)"
    assert all(r["n"] == 16 for r in rows.values())
    assert (run.path / "test_best.json").exists() and (run.path / "test_last.json").exists()
    text = nbtools.table_report({**rows, "paper": {"clean": 0.9}})
    assert text.count("masking report") == 2 and "| paper |" in text
