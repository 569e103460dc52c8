"""Optional dependencies: a feature whose extra is missing raises one error naming the extra,
and what ``pip install mixlab`` installs runs without any extra."""
import subprocess
import sys

import pytest
import torch

from mixlab.extras import EXTRAS, MissingExtraError, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "papermill", None)  # import papermill fails
    with pytest.raises(MissingExtraError, match=r"pip install 'mixlab\[notebooks\]'") as err:
        require("papermill", feature="running the notebooks")
    assert "running the notebooks needs the papermill package" in str(err.value)
    assert isinstance(err.value, ImportError)


def test_the_extras_of_pyproject():
    """Every extra that require() names is declared in pyproject.toml, and "all" holds them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = declared["project"]["optional-dependencies"]
    named = {extra for extra, _ in EXTRAS.values()}
    assert named <= set(extras)
    for extra, package in EXTRAS.values():
        assert any(req.startswith(package) for req in extras[extra]), (extra, package)
    assert extras["all"] == [f"mixlab[{','.join(sorted(named))}]"]
    core = " ".join(declared["project"]["dependencies"])
    assert not any(package in core for _, package in EXTRAS.values())


def test_autoattack_without_its_extra(monkeypatch):
    from mixlab.evaluate import evaluate

    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(MissingExtraError, match=r"mixlab\[eval\]"):
        evaluate(model, x, y, attacks=("clean", "aa"), eps=8 / 255)


def test_explorer_widget_without_its_extra(monkeypatch):
    from mixlab.explorer import MarginExplorer

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(MissingExtraError, match=r"margin explorer.*mixlab\[notebooks\]"):
        MarginExplorer({"m": model}, torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long),
                       [str(k) for k in range(10)], eps=8 / 255)


def test_notebook_runner_without_its_extra(monkeypatch, tmp_path):
    from mixlab import notebooks

    monkeypatch.setitem(sys.modules, "papermill", None)
    with pytest.raises(MissingExtraError, match=r"mixlab\[notebooks\]"):
        notebooks.run_notebook(tmp_path / "a.ipynb", profile="smoke", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_core_imports_without_extras():
    """Training, attacks, evaluation without AutoAttack, the data and the CLI import with
    every extra blocked (what `pip install mixlab` gives)."""
    blocked = sorted(name for name in EXTRAS if "." not in name)  # top-level packages
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import mixlab.train, mixlab.runs, mixlab.attacks, mixlab.evaluate, mixlab.data\n"
            "import mixlab.cli, mixlab.margins, mixlab.paths, mixlab.margin_paths\n"
            "import mixlab.margin_figure, mixlab.explorer, mixlab.bench\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
