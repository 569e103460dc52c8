"""Every notebook runs end to end with papermill in the smoke profile, on real data, training
afresh (runs go to a temporary MIXLAB_RUNS, figures to a temporary MIXLAB_FIGURES: a test
never rewrites the committed figures), and its final cell of checks passes; a notebook that
runs more than once (``mixlab.notebooks.JOBS``: MMA on CIFAR-10 and on MNIST) runs as each of
its jobs. Its parameters are checked by ``mixlab.nbtools.check_params`` before anything runs:
a wrong profile or a parameter of the wrong type stops the notebook at once. nbval checks the
quickstart notebook the way `pytest --nbval-lax` users would. That each .ipynb matches its
jupytext script is tests/test_notebook_pairs.py's business."""
import ast
import functools
import os
import subprocess
import sys

import nbformat
import pytest

from mixlab import nbtools
from mixlab.config import PROFILES
from mixlab.notebooks import JOBS, run_notebook

from .conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: (job name, notebook, parameters): each execution `python -m mixlab.notebooks` makes
RUNS = [(name, path, params) for path in NOTEBOOKS
        for name, params in JOBS.get(path.stem, {path.stem: {}}).items()]


def _require_real_data(data_root):
    if not (data_root / "cifar10").exists() or not (data_root / "MNIST").exists():
        pytest.fail(f"real data missing in {data_root}: run `make data` (unpacks ../shared/data) "
                    f"or `python -m mixlab download cifar10 && python -m mixlab download mnist`")


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


@pytest.mark.notebook
@pytest.mark.parametrize("name, path, params", RUNS, ids=[name for name, *_ in RUNS])
def test_notebook_runs_in_smoke_profile(name, path, params, tmp_path, monkeypatch, data_root):
    _require_real_data(data_root)
    monkeypatch.setenv("MIXLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MIXLAB_DATA", str(data_root))
    monkeypatch.setenv("MIXLAB_FIGURES", str(tmp_path / "figures"))  # not the committed ones
    out = run_notebook(path, profile="smoke", out_dir=tmp_path, name=name, parameters=params)
    assert out.name == f"{name}.ipynb"
    nb = nbformat.read(out, as_version=4)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "all checks passed" in _stdout(last), f"{name}: the checks cell did not finish"


@pytest.mark.notebook
@pytest.mark.parametrize("parameters, message", [
    ({"profile": "tiny"}, f"profile='tiny': 'tiny' is not one of {list(PROFILES)}"),
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_check_params_rebinds_every_parameter_in_order(path):
    """`a, b = nbtools.check_params(a=a, b=b).values()`: every parameter is rebound to its
    checked value (papermill's `-p quiet true` arrives as the text 'true', a dict as JSON
    text), each to its own name (the targets in the order of the keywords)."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    i = next(i for i, c in enumerate(code_cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(line for line in code_cells[i + 1].source.splitlines()
                       if not line.startswith("%"))
    assign = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)
                  and "check_params" in ast.unparse(n.value))
    assert isinstance(assign.value, ast.Call) and assign.value.func.attr == "values"
    call = assign.value.func.value
    targets = [t.id for t in assign.targets[0].elts]
    assert targets == [k.arg for k in call.keywords], path.name
    assert all(ast.unparse(k.value) == k.arg for k in call.keywords), path.name


def test_check_params_normalises_and_rejects():
    p = nbtools.check_params(profile="short", seed=3.0, methods="pgd_at, gairat", alphas="0.2,1",
                             eps=None, epochs=None, lams=[-1, 0])
    assert p == dict(profile="short", seed=3, methods=["pgd_at", "gairat"], alphas=[0.2, 1.0],
                     eps=None, epochs=None, lams=[-1.0, 0.0])
    assert isinstance(p["seed"], int)
    bad = [(dict(profile="tiny"), ValueError, f"not one of {list(PROFILES)}"),
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
    env = {**os.environ, "MIXLAB_RUNS": str(tmp_path / "runs"), "MIXLAB_DATA": str(data_root),
           "MIXLAB_FIGURES": str(tmp_path / "figures")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
         str(REPO / "notebooks" / "quickstart.ipynb")],
        capture_output=True, text=True, env=env, cwd=REPO / "notebooks", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def _tiny_run(run_dir, epochs=3):
    return nbtools.train_or_load(run_dir=run_dir, method="erm", dataset="synthetic",
                                 model="tiny", epochs=epochs, batch_size=64, train_subset=256,
                                 val_size=64, eval_steps=0, device="cpu", quiet=True)


def test_evaluate_checkpoints_rows_files_and_report(tmp_path):
    """Both checkpoints of a run evaluated on the same images, labelled with their epoch, each
    written to the run folder; the table carries every row's masking report."""
    import torch

    run = _tiny_run(tmp_path / "run")
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    rows = nbtools.evaluate_checkpoints("erm", run, x, y, attacks=("clean", "fgsm"), eps=8 / 255)
    best, last = rows
    assert best == f"erm (best, ep {run.epoch})" and last == "erm (last, ep 3)"
    assert all(r["n"] == 16 for r in rows.values())
    assert (run.path / "test_best.json").exists() and (run.path / "test_last.json").exists()
    text = nbtools.table_report({**rows, "paper": {"clean": 0.9}})
    assert text.count("masking report") == 2 and "| paper |" in text


def test_seed_table_mean_spread_and_every_seed(tmp_path):
    """Each name's selected checkpoint per seed, on the same images: the mean, the spread
    (largest minus smallest) and the values in seed order equal the per-seed evaluations;
    the Markdown shows mean ± half the spread and each value. A table that averaged one seed
    twice, or swapped names between seeds, fails the value comparison."""
    import torch

    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    runs = {s: {"erm": nbtools.train_or_load(
                run_dir=tmp_path / f"s{s}", method="erm", dataset="synthetic", model="tiny",
                epochs=2, batch_size=64, train_subset=256, val_size=64, eval_steps=0,
                device="cpu", quiet=True, seed=s)} for s in (0, 1)}
    kw = dict(attacks=("clean", "fgsm"), eps=8 / 255)
    table = nbtools.seed_table(runs, x, y, progress=False, columns=("clean", "fgsm"), **kw)
    direct = [nbtools.evaluate_checkpoint("erm", runs[s]["erm"], x, y, progress=False, **kw)
              for s in (0, 1)]
    row = table["erm"]
    assert row["seeds"] == [0, 1] and row["n"] == 24
    for c in ("clean", "fgsm"):
        values = [r[c] for r in direct]
        assert row[f"{c}_values"] == values
        assert row[c] == pytest.approx(sum(values) / 2)
        assert row[f"{c}_spread"] == pytest.approx(max(values) - min(values))
    assert "per_example" not in row["per_seed"][0] and "warnings" in row["per_seed"][1]
    one = nbtools.seed_table({0: runs[0]}, x, y, progress=False, columns=("clean",), **kw)
    assert one["erm"]["clean"] == direct[0]["clean"] and one["erm"]["clean_spread"] == 0
    text = nbtools.format_seed_table(table, columns=("clean", "fgsm"))
    c0, c1 = (100 * v for v in row["clean_values"])
    assert f"({c0:.1f}, {c1:.1f})" in text and f"± {50 * abs(c0 - c1) / 100:.1f}" in text


def test_seed_table_and_seed_list_refuse_bad_input(tmp_path):
    run = _tiny_run(tmp_path / "run", epochs=1)
    import torch

    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="same names"):
        nbtools.seed_table({0: {"erm": run}, 1: {"mixup": run}}, x, y, attacks=["clean"])
    with pytest.raises(ValueError, match="at least one seed"):
        nbtools.seed_table({}, x, y)
    assert nbtools.seed_list(3, 2) == [3, 4] and nbtools.seed_list(0, 1) == [0]
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_seeds"):
            nbtools.seed_list(0, bad)


def test_train_or_load_says_whether_it_trains(tmp_path, capsys):
    _tiny_run(tmp_path / "run", epochs=1)
    assert capsys.readouterr().out.startswith(f"training {tmp_path / 'run'}\n")
    _tiny_run(tmp_path / "run", epochs=1)
    assert capsys.readouterr().out == f"loading finished run {tmp_path / 'run'}\n"


def _lines(capsys, start):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(start)]


def test_evaluations_are_cached_by_checkpoint_images_and_settings(tmp_path, capsys,
                                                                   monkeypatch):
    """A second evaluation with the same checkpoint, images and settings loads the cached
    JSON and attacks nothing; any change of setting, images or checkpoint evaluates again;
    a cache file that does not parse or was tampered with is ignored, never trusted."""
    import torch

    import torch

    import mixlab.evaluate

    run = _tiny_run(tmp_path / "run")
    capsys.readouterr()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    kw = dict(attacks=("clean", "fgsm"), eps=8 / 255)
    first = nbtools.evaluate_checkpoints("erm", run, x, y, **kw)
    n_checkpoints = len({id(r) for r in first.values()})  # 1 when best is the last epoch
    assert len(_lines(capsys, "evaluating erm")) == n_checkpoints
    cached = sorted((run.path / "evaluations").glob("*.json"))
    assert len(cached) == n_checkpoints

    real_evaluate = mixlab.evaluate.evaluate
    calls = []

    @functools.wraps(real_evaluate)
    def counting_evaluate(*args, **kwargs):
        calls.append(kwargs)
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(mixlab.evaluate, "evaluate", counting_evaluate)

    # the same key, written differently (eps as an int fraction, clean named or not)
    again = nbtools.evaluate_checkpoints("erm", run, x.clone(), y.clone(), attacks=["fgsm"],
                                         eps=8 / 255, batch_size=500)
    assert calls == [] and len(_lines(capsys, "loaded cached evaluation erm")) == n_checkpoints
    assert {k: {m: v for m, v in r.items() if m != "seconds" and m != "img_per_s"}
            for k, r in again.items()} == \
        {k: {m: v for m, v in r.items() if m != "seconds" and m != "img_per_s"}
         for k, r in first.items()}
    assert "cache_key" not in next(iter(again.values()))

    # any change of the key evaluates again
    changes = [dict(kw, eps=4 / 255), dict(kw, norm="L2", eps=0.5), dict(kw, seed=1),
               dict(kw, batch_size=8), dict(attacks=("clean", "pgd10"), eps=8 / 255)]
    for changed in changes:
        nbtools.evaluate_checkpoints("erm", run, x, y, **changed)
        assert len(_lines(capsys, "evaluating erm")) == n_checkpoints, changed
    nbtools.evaluate_checkpoints("erm", run, x[:8], y[:8], **kw)   # other images
    assert len(_lines(capsys, "evaluating erm")) == n_checkpoints
    x2 = x.clone()
    x2[0, 0, 0, 0] = 1 - x2[0, 0, 0, 0]                               # one pixel changed
    nbtools.evaluate_checkpoints("erm", run, x2, y, **kw)
    assert len(_lines(capsys, "evaluating erm")) == n_checkpoints
    calls.clear()

    # a cache file that does not parse, or carries another key, is ignored and rewritten
    for bad in ("{not json", '{"robust": 1.0, "n": 16}'):
        for path in cached:
            path.write_text(bad)
        rows = nbtools.evaluate_checkpoints("erm", run, x, y, **kw)
        out = capsys.readouterr().out
        assert out.count("ignoring") == n_checkpoints and out.count("evaluating erm") == \
            n_checkpoints, out
        assert rows.keys() == first.keys()
    assert len(calls) == 2 * n_checkpoints
    nbtools.evaluate_checkpoints("erm", run, x, y, **kw)               # the rewritten cache
    assert len(_lines(capsys, "loaded cached evaluation")) == n_checkpoints

    # another checkpoint (the same file name, other bytes) evaluates again
    state = torch.load(run.path / "best.pt", weights_only=True)
    torch.save(state, run.path / "best.pt")  # same content, new bytes
    key = nbtools.evaluation_key(run, x, y, **kw)
    assert key["checkpoint"]["file"] == "best.pt"
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.01)
    state["model"] = {k: v.clone() for k, v in run.model.state_dict().items()}
    torch.save(state, run.path / "best.pt")
    assert nbtools.evaluation_key(run, x, y, **kw)["checkpoint"] != key["checkpoint"]

    with pytest.raises(TypeError, match="no setting"):
        nbtools.evaluate_checkpoints("erm", run, x, y, epsilon=0.1)
    with pytest.raises(TypeError, match="chooses run_dir"):
        nbtools.evaluate_checkpoints("erm", run, x, y, run_dir=tmp_path)


@pytest.mark.parametrize("value", ["base,both", " base , both ", '["base","both"]',
                                   "['base', 'both']", ["base", "both"], ("base", "both")])
def test_list_parameters_parse_the_same_way(value):
    assert nbtools.check_params(variants=value) == {"variants": ["base", "both"]}


def test_list_parameter_errors_name_every_bad_entry():
    assert nbtools.check_param("methods", '["pgd_at","gairat"]') == ["pgd_at", "gairat"]
    assert nbtools.check_param("alphas", "[0.2, 1]") == [0.2, 1.0]
    assert nbtools.check_param("lams", "-1, 0.5") == [-1.0, 0.5]
    assert nbtools.check_param("datasets", '{"approx": "moons"}') == {"approx": "moons"}
    bad = [("methods", '["pgd_at","madry","sgd"]', ValueError, "'madry', 'sgd' are not among"),
           ("methods", "pgd_at,madry", ValueError, "'madry' is not one of"),
           ("methods", '["pgd_at",', TypeError, "does not parse"),
           ("methods", "[1, 2]", TypeError, "not strings: 1, 2"),
           ("methods", '{"a": 1}', ValueError, "is not one of"),
           ("variants", "[]", TypeError, "non-empty list"),
           ("alphas", "0.2,abc", TypeError, "not numbers: 'abc'"),
           ("datasets", "{'approx': ", TypeError, "does not parse")]
    for name, value, error, message in bad:
        with pytest.raises(error) as err:
            nbtools.check_param(name, value)
        assert message in str(err.value) and name in str(err.value), (value, str(err.value))


def _check_params_call(source: str):
    code = "\n".join(line for line in source.splitlines() if not line.startswith("%"))
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "check_params":
            return compile(ast.Expression(node), "<check_params>", "eval")
    raise AssertionError("no check_params call")


@pytest.mark.parametrize("notebook, args, expected", [
    ("amp_cifar10", ["-p", "variants", "base,both"], {"variants": ["base", "both"]}),
    ("amp_cifar10", ["-p", "variants", '["base","both"]'], {"variants": ["base", "both"]}),
    ("gairat_cifar10", ["-p", "methods", '["pgd_at","gairat"]'],
     {"methods": ["pgd_at", "gairat"]}),
    ("gairat_cifar10", ["-p", "methods", "pgd_at,gairat,fat"],
     {"methods": ["pgd_at", "gairat", "fat"]}),
    ("mixup_theory", ["-p", "alphas", "[0.5, 2]"], {"alphas": [0.5, 2.0]}),
    ("margin_explorer", ["-p", "methods", '["erm"]', "-p", "run_dirs", "{}"],
     {"methods": ["erm"], "run_dirs": {}}),
], ids=["variants-commas", "variants-json", "methods-json", "methods-commas", "alphas",
        "explorer"])
def test_papermill_list_parameters_reach_check_params(notebook, args, expected, tmp_path):
    """What papermill's command line injects (`-p` passes lists as strings) gives the
    notebook's check_params call the lists above: the parameters cell, papermill's injected
    cell and the check_params call run, nothing else (no training)."""
    out = tmp_path / f"{notebook}.ipynb"
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "papermill") if (REPO / ".venv").exists() else
         "papermill", str(REPO / "notebooks" / f"{notebook}.ipynb"), str(out), "--prepare-only",
         *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    injected = [i for i, c in enumerate(cells)
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected, "papermill injected no parameters"
    namespace = {"nbtools": nbtools}
    exec(cells[injected[0] - 1].source, namespace)  # the notebook's own parameters cell
    exec(cells[injected[0]].source, namespace)      # papermill's
    checked = eval(_check_params_call(cells[injected[0] + 1].source), namespace)
    assert {k: checked[k] for k in expected} == expected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameters_cell_states_each_type_for_papermill_help(path):
    """`papermill --help-notebook` shows every parameter with its type (the `# type: ...`
    comment of the parameters cell, the type mixlab.nbtools.PARAMS checks) and a meaning."""
    from papermill.inspection import inspect_notebook

    params = inspect_notebook(str(path))
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert set(params) == _parameter_names(cell.source), "papermill could not read them all"
    for name, info in params.items():
        assert info["inferred_type_name"] == nbtools.param_type(name), (path.name, name)
        assert info["help"], f"{path.name}: parameter {name} needs a meaning after its type"


def test_figures_go_to_mixlab_figures(tmp_path, monkeypatch):
    """$MIXLAB_FIGURES (absolute, or relative to the project) replaces figures/."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.delenv("MIXLAB_FIGURES", raising=False)
    assert nbtools.figures_dir() == nbtools.project_dir() / "figures"
    monkeypatch.setenv("MIXLAB_FIGURES", "runs/figures")
    assert nbtools.figures_dir() == nbtools.project_dir() / "runs" / "figures"
    monkeypatch.setenv("MIXLAB_FIGURES", str(tmp_path / "figs"))
    fig = plt.figure()
    path = nbtools.save_figure(fig, "t", profile="smoke")
    plt.close(fig)
    table = nbtools.save_table({"a": {"clean": 0.5, "per_example": {}}}, "t", profile="smoke")
    assert path == tmp_path / "figs" / "t_smoke.png" and path.with_suffix(".json").exists()
    assert table == tmp_path / "figs" / "t_smoke.json"


def test_notebooks_command_errors_exit_2(tmp_path, monkeypatch, capsys):
    """An unknown notebook name, or a run outside a checkout, is one error line, exit 2."""
    from mixlab.notebooks import main

    monkeypatch.chdir(REPO)
    assert main(["--only", "nosuch", "quickstart"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no notebook named 'nosuch'" in err and "quickstart" in err
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not inside a mixlab checkout" in err
    result = subprocess.run([sys.executable, "-m", "mixlab.notebooks", "--only", "nosuch"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_demo_target_writes_only_ignored_files():
    """`make demo` sends figures and tables to the ignored runs/figures, with one thread
    unless MIXLAB_THREADS is set (checked on the Makefile: running the demo takes minutes)."""
    text = (REPO / "Makefile").read_text()
    assert "demo: export MIXLAB_FIGURES = $(DEMO_FIGURES)" in text
    assert "DEMO_FIGURES ?= $(CURDIR)/runs/figures" in text
    assert "demo: export MIXLAB_THREADS ?= 1" in text
    result = subprocess.run(["git", "check-ignore", "-q", "runs/figures/x.png"], cwd=REPO)
    assert result.returncode == 0, "runs/figures must be ignored by git"


def test_cached_arrays_reuse_and_distrust(tmp_path, capsys):
    """nbtools.cached: an equal key loads the file (arrays and plain values back), another
    key or a broken file computes again."""
    import numpy as np

    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3), "eps": 0.5, "norm": "Linf", "step_size": None}

    first = nbtools.cached(tmp_path, "probe", {"eps": 0.5}, compute)
    again = nbtools.cached(tmp_path, "probe", {"eps": 0.5}, compute)
    assert len(calls) == 1 and "loaded cached probe" in capsys.readouterr().out
    assert np.array_equal(again["a"], first["a"]) and again["eps"] == 0.5
    assert again["norm"] == "Linf" and again["step_size"] is None
    nbtools.cached(tmp_path, "probe", {"eps": 0.25}, compute)
    assert len(calls) == 2
    for path in tmp_path.glob("probe-*.npz"):
        path.write_bytes(b"not an npz")
    nbtools.cached(tmp_path, "probe", {"eps": 0.5}, compute)
    assert len(calls) == 3 and "ignoring unreadable cache" in capsys.readouterr().out


# ----------------------------------------------------------------------------- profiles, quiet
def test_every_profile_of_the_engine_passes_the_parameter_checks():
    """The notebooks accept exactly the profiles mixlab.config.PROFILES defines (a new one,
    such as cpu, needs no change here) and nothing else."""
    for profile in PROFILES:
        assert nbtools.check_params(profile=profile) == {"profile": profile}
    with pytest.raises(ValueError, match="'huge' is not one of"):
        nbtools.check_params(profile="huge")


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True),
                                             ("False", False), (" TRUE ", True), ("0", False),
                                             (1, True), (0, False)])
def test_quiet_parameter_reads_true_and_false(value, expected):
    assert nbtools.check_param("quiet", value) is expected
    assert nbtools.param_type("quiet") == "bool"


@pytest.mark.parametrize("value", ["yes please", 2, 0.5, None, []])
def test_quiet_parameter_rejects_anything_else(value):
    with pytest.raises(TypeError, match="quiet"):
        nbtools.check_param("quiet", value)


def _code(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _markdown(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_are_thin(path):
    """A notebook reads its per-profile settings from mixlab.notebook_settings (its own
    entry) and defines none itself; it passes its `quiet` parameter to training instead of
    a hard-coded value; it defines no model; its text points at docs/, not elsewhere."""
    from mixlab.notebook_settings import NOTEBOOK_SETTINGS

    code = _code(path)
    assert f'notebook_settings("{path.stem}", profile)' in code and path.stem in NOTEBOOK_SETTINGS
    for profile in PROFILES:  # a per-profile table or branch belongs in notebook_settings
        assert f'"{profile}":' not in code and f'"{profile}" if' not in code, profile
    assert 'profile == "' not in code and 'profile != "' not in code
    assert "quiet=True" not in code and "quiet=quiet" in code
    tree = ast.parse("\n".join(line for line in code.splitlines()
                               if not line.lstrip().startswith("%")))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)], "a class in a notebook"
    text = _markdown(path)
    assert "papers.md" not in text and "shared/" not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_training_call_gets_the_quiet_parameter(path):
    """Every train_or_load call passes quiet=quiet, directly or through the config dicts it
    unpacks (MMA's), so `-p quiet true` silences every progress bar."""
    tree = ast.parse("\n".join(line for line in _code(path).splitlines()
                               if not line.lstrip().startswith("%")))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", getattr(n.func, "id", None)) == "train_or_load"]
    assert calls, f"{path.name} trains nothing"
    quiet_dicts = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   for t in n.targets if isinstance(t, ast.Name)
                   and "quiet=quiet" in ast.unparse(n.value)}
    for call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        unpacked = {v for k, v in keywords.items() if k is None}
        assert keywords.get("quiet") == "quiet" or unpacked & (quiet_dicts | {"config"}), \
            f"{path.name}: {ast.unparse(call)[:80]} does not pass quiet=quiet"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_evaluation_call_follows_the_quiet_parameter(path):
    """Every evaluation (nbtools' tables, seed tables, robust-accuracy curves) passes
    progress=not quiet, so `-p quiet true` also hides the evaluation's progress bars."""
    tree = ast.parse("\n".join(line for line in _code(path).splitlines()
                               if not line.lstrip().startswith("%")))
    evaluations = ("evaluate_runs", "evaluate_checkpoints", "evaluate_checkpoint", "seed_table",
                   "robust_accuracy_curve")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", None)) in evaluations]
    for call in calls:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("progress") == "not quiet", \
            f"{path.name}: {ast.unparse(call)[:80]} does not pass progress=not quiet"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_evaluation_check_names_the_flags_it_tolerates(path):
    """Every checks.evaluation call in a notebook passes allow_warnings: a call without it
    fails on a flag the profile's settings tolerate (a cpu model's CW-20 gap) in one check
    and lets it pass in the next, so the verdict would depend on which check ran first."""
    tree = ast.parse("\n".join(line for line in _code(path).splitlines()
                               if not line.lstrip().startswith("%")))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "evaluation"
             and getattr(n.func.value, "id", None) == "checks"]
    for call in calls:
        assert "allow_warnings" in {k.arg for k in call.keywords}, \
            f"{path.name}: {ast.unparse(call)[:90]} does not pass allow_warnings"


def test_evaluation_progress_is_not_part_of_the_cache_key(tmp_path, monkeypatch):
    """progress only changes what is printed: a quiet evaluation reuses a loud one's cache."""
    import torch

    import mixlab.evaluate
    from mixlab.runs import load_run
    from mixlab.train import train
    train(run_dir=str(tmp_path / "run"), method="erm", dataset="synthetic", model="tiny",
          epochs=1, batch_size=32, train_subset=64, val_size=32, eval_steps=0, device="cpu",
          quiet=True)
    run = load_run(tmp_path / "run", which="last")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    seen = []
    real = mixlab.evaluate.evaluate
    @functools.wraps(real)  # the same signature, which nbtools reads the settings from
    def recording(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mixlab.evaluate, "evaluate", recording)
    first = nbtools.evaluate_checkpoint("erm", run, x, y, attacks=("clean",), progress=True)
    again = nbtools.evaluate_checkpoint("erm", run, x, y, attacks=("clean",), progress=False)
    assert seen == [True] and again["clean"] == first["clean"]


def test_averaged_weights_are_evaluated_and_cached_as_their_own_model(tmp_path, monkeypatch):
    """A run trained with weight averaging is two models in one checkpoint file: loaded with
    weights="ema", both of its checkpoints are evaluated with the average (not the raw weights
    of the last one), cached under their own key (an evaluation of the raw weights never
    answers for the average, nor the reverse) and written as test_<which>_ema.json."""
    import torch

    import mixlab.evaluate
    from mixlab.runs import load_run

    settings = dict(method="erm", dataset="synthetic", model="tiny", epochs=2, batch_size=32,
                    train_subset=128, val_size=32, eval_steps=0, ema_decay=0.9, device="cpu",
                    quiet=True)
    ema = nbtools.train_or_load(run_dir=tmp_path / "run", weights="ema", **settings)
    raw = load_run(tmp_path / "run", weights="raw")
    assert ema.weights == "ema" and raw.weights == "raw"
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    kw = dict(attacks=("clean", "fgsm"), eps=8 / 255)
    key_raw, key_ema = (nbtools.evaluation_key(r, x, y, **kw) for r in (raw, ema))
    assert key_ema["checkpoint"]["weights"] == "ema" and "weights" not in key_raw["checkpoint"]

    evaluated = []
    real = mixlab.evaluate.evaluate

    @functools.wraps(real)
    def recording(model, *args, **kwargs):
        evaluated.append((kwargs["name"], {k: v.clone() for k, v in model.state_dict().items()}))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(mixlab.evaluate, "evaluate", recording)

    nbtools.evaluate_checkpoints("erm", raw, x, y, progress=False, **kw)
    n_raw = len(evaluated)
    nbtools.evaluate_checkpoints("erm", ema, x, y, progress=False, **kw)
    assert len(evaluated) == 2 * n_raw, "the raw weights' cache answered for the average"
    for name, state in evaluated[n_raw:]:
        which = name.removeprefix("test_").removesuffix("_ema")
        assert name.endswith("_ema") and which in ("best", "last")
        expected = torch.load(tmp_path / "run" / f"{which}.pt", weights_only=True)["ema"]["model"]
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
    for which in ("best", "last"):
        assert (tmp_path / "run" / f"test_{which}.json").exists()
        assert (tmp_path / "run" / f"test_{which}_ema.json").exists()
    nbtools.evaluate_checkpoints("erm", ema, x, y, progress=False, **kw)   # now cached
    assert len(evaluated) == 2 * n_raw


# ----------------------------------------------------------------------------- jobs
def test_notebook_jobs_run_mma_for_both_datasets(monkeypatch, capsys):
    """`--only mma` runs the MMA notebook twice, as mma_cifar10 and mma_mnist with their
    dataset; `--only mma_mnist` once; `-p dataset=mnist` overrides the jobs' datasets and
    runs MMA once, named after the job it matches (or after the notebook)."""
    import mixlab.notebooks as runner

    calls = []
    monkeypatch.setattr(runner, "run_notebook", lambda path, **kw: calls.append((path.name, kw)))
    monkeypatch.chdir(REPO)

    def ran(*argv):
        calls.clear()
        assert runner.main(list(argv)) == 0
        return [(p, kw["name"], kw["parameters"]) for p, kw in calls]

    assert ran("--only", "mma", "-p", "quiet=true") == [
        ("mma.ipynb", "mma_cifar10", {"dataset": "cifar10", "quiet": True}),
        ("mma.ipynb", "mma_mnist", {"dataset": "mnist", "quiet": True})]
    assert "mma_cifar10.ipynb" in capsys.readouterr().out
    assert [name for _, name, _ in ran("--only", "mma_mnist", "quickstart")] == \
        ["mma_mnist", "quickstart"]
    assert ran("--only", "mma", "--param=dataset=mnist") == \
        [("mma.ipynb", "mma_mnist", {"dataset": "mnist"})]
    assert ran("--only", "mma", "quickstart", "-p", "dataset=svhn") == [
        ("mma.ipynb", "mma", {"dataset": "svhn"}),
        ("quickstart.ipynb", "quickstart", {"dataset": "svhn"})]
    assert {job.name for job in runner.notebook_jobs()} == \
        {p.stem for p in NOTEBOOKS if p.stem not in JOBS} | {n for j in JOBS.values() for n in j}


# ----------------------------------------------------------------------------- helpers
def test_describe_runs_and_train_speed(tmp_path):
    run = _tiny_run(tmp_path / "run", epochs=2)
    speeds = [h["img_per_s"] for h in run.history]
    assert nbtools.train_speed(run) == pytest.approx(sum(speeds) / len(speeds))
    lines = nbtools.describe_runs({"a": run, "b": run}).splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["run", "method", "model"]
    last = run.history[-1]
    assert lines[1].split()[:4] == ["a", "erm", "tiny", "2"]
    assert f"{last['train_loss']:.3f}" in lines[1] and lines[1].endswith(f"epoch {run.epoch}")


def test_evaluate_runs_and_table_rows(tmp_path):
    import torch

    run = _tiny_run(tmp_path / "run")
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    by_run = nbtools.evaluate_runs({"erm": run}, x, y, attacks=("clean", "fgsm"), eps=8 / 255)
    assert list(by_run) == ["erm"] and by_run["erm"].keys() == \
        nbtools.evaluate_checkpoints("erm", run, x, y, attacks=("clean", "fgsm"),
                                     eps=8 / 255).keys()
    paper = {"paper: erm": {"clean": 0.9, "source": "somewhere"}}
    rows = nbtools.table_rows(by_run, paper)
    assert list(rows) == [*by_run["erm"], "paper: erm"] and rows["paper: erm"] is paper["paper: erm"]
    assert nbtools.aa_used({"paper": {"clean": 1.0}}) is None
    assert nbtools.aa_used({"p": {"clean": 1.0}, "r": {"aa_attacks": ["apgd-ce"]}}) == ["apgd-ce"]
    with pytest.raises(ValueError, match="given twice"):
        nbtools.table_rows(by_run, {next(iter(by_run["erm"])): {}})
    with pytest.raises(TypeError, match="no setting"):
        nbtools.evaluate_runs({"erm": run}, x, y, epsilon=0.1)


def test_budgets_come_from_the_method_and_the_resolved_config():
    from mixlab.methods import get_method
    from mixlab.train import resolve_config

    for profile in ("smoke", "short", "paper"):
        budget = nbtools.method_budget("gairat", profile)
        own = get_method("gairat").profiles.get(profile, {})
        assert budget and all(own[k] == v for k, v in budget.items())
        assert "method" not in budget and "begin_epoch" not in budget
    cfg = resolve_config(method="mma", profile="smoke")
    shared = nbtools.shared_budget(cfg)
    assert list(shared) == list(nbtools.BUDGET_KEYS) and shared["model"] == cfg["model"]
    again = resolve_config(method="erm", profile="smoke", **shared)
    assert nbtools.shared_budget(again) == shared  # the budget reaches the baseline whole


def test_load_run_says_what_it_loads(tmp_path, capsys):
    run = _tiny_run(tmp_path / "run", epochs=1)
    capsys.readouterr()
    loaded = nbtools.open_run(run.path, which="last")
    assert capsys.readouterr().out == f"loading run {run.path}\n" and loaded.epoch == 1


def test_toy_helpers_and_first_present(tmp_path, monkeypatch):
    moons = nbtools.toy_data("moons", 20, d=5, noise=0.1, seed=0)
    gauss = nbtools.toy_data("gaussian", 20, d=5, noise=0.1, seed=0)
    assert moons.x.shape == (20, 2) and gauss.x.shape == (20, 5)
    assert nbtools.toy_model("mlp", 5, width=8, seed=0)(gauss.x).shape == (20,)
    assert nbtools.toy_model("logistic", 5, width=8, seed=0)(gauss.x).shape == (20,)
    with pytest.raises(ValueError, match="'moons' or 'gaussian'"):
        nbtools.toy_data("spirals", 20, d=2, noise=0.1, seed=0)
    with pytest.raises(ValueError, match="'logistic' or 'mlp'"):
        nbtools.toy_model("cnn", 2, width=8, seed=0)
    monkeypatch.setenv("MIXLAB_DATA", str(tmp_path))   # no data at all: the last one
    assert nbtools.first_present(["svhn", "cifar10"]) == "cifar10"
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)   # torchvision's MNIST layout
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (tmp_path / "MNIST" / "raw" / f"{split}-{kind}-ubyte").write_bytes(b"")
    assert nbtools.first_present(["svhn", "mnist", "cifar10"]) == "mnist"


def test_notebook_times_are_written_beside_the_figures(tmp_path, monkeypatch):
    """Each notebook's wall time lands in <figures>/<job>_time_<profile>.json, one file per
    notebook (two runners at once never race on one file)."""
    import json

    from mixlab.notebooks import record_time

    monkeypatch.setenv("MIXLAB_FIGURES", str(tmp_path))
    first = record_time("quickstart", "cpu", seconds=61.26, ok=True, parameters={"quiet": True})
    second = record_time("mma_mnist", "cpu", seconds=5.0, ok=False, parameters={})
    assert first == tmp_path / "quickstart_time_cpu.json"
    times = json.loads(first.read_text())
    assert times["seconds"] == 61.3 and times["ok"] is True and times["parameters"]
    assert json.loads(second.read_text())["ok"] is False and "git_commit" in times
