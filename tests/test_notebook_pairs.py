"""Every notebook is a jupytext pair: ``notebooks/<name>.py`` (a percent script, the file people
edit and review) and ``notebooks/<name>.ipynb`` (what papermill and JupyterLab run). The pair
must say the same thing, cell for cell (type, source, tags), the ``.ipynb`` must carry no
outputs or execution counts, and re-syncing the pair with jupytext must change neither file
(so an edit on one side shows up as a diff of both, and nothing else ever does). The checker
is tested on deliberately broken copies: it must report each kind of drift."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

jupytext = pytest.importorskip(
    "jupytext", reason="jupytext reads the notebook pairs: pip install -e '.[notebooks]'")
from jupytext.cli import jupytext as jupytext_cli  # noqa: E402

from mixlab.notebooks import KEEP_CELL_METADATA, KEEP_NOTEBOOK_METADATA, strip_notebook  # noqa: E402

from .conftest import REPO  # noqa: E402

FOLDER = REPO / "notebooks"
NAMES = sorted(p.stem for p in FOLDER.glob("*.ipynb"))


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source.rstrip("\n"), list(c.get("metadata", {}).get("tags", [])))
            for c in nb.cells]


def pair_problems(py: Path, ipynb: Path) -> list[str]:
    """What is wrong with the pair ``py`` / ``ipynb``, one line per problem (and how to fix
    it); [] when the two hold the same cells (type, source, tags, in order) and the .ipynb
    has no outputs, no execution counts, a python3 kernelspec (papermill runs it without
    ``-k``) and no metadata an editor or a run adds."""
    missing = [str(p.name) for p in (py, ipynb) if not p.exists()]
    if missing:
        return [f"{', '.join(missing)} missing: every notebook is a .py/.ipynb pair"]
    problems = []
    text, book = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    a, b = _cells(text), _cells(book)
    if len(a) != len(b):
        problems.append(f"{py.name} has {len(a)} cells, {ipynb.name} {len(b)}")
    for i, (left, right) in enumerate(zip(a, b)):
        for what, x, y in zip(("type", "source", "tags"), left, right):
            if x != y:
                problems.append(f"cell {i}: {what} differs between {py.name} and {ipynb.name}")
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"{ipynb.name} cell {i} has outputs (commit it without them)")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(f"{ipynb.name} cell {i} has an execution count")
    if book.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append(f"{ipynb.name} has no python3 kernelspec")
    extra = sorted(set(book.metadata) - set(KEEP_NOTEBOOK_METADATA))
    extra += sorted({k for c in book.cells for k in c.get("metadata", {})}
                    - set(KEEP_CELL_METADATA))
    if extra:
        problems.append(f"{ipynb.name} carries editor or run metadata {extra}")
    if problems:
        problems.append("fix: .venv/bin/jupytext --sync notebooks/<name>.py, then "
                        ".venv/bin/python -m mixlab.notebooks --strip")
    return problems


def _copy_pair(name: str, folder: Path) -> tuple[Path, Path]:
    shutil.copy2(FOLDER / "jupytext.toml", folder / "jupytext.toml")
    for suffix in (".py", ".ipynb"):
        shutil.copy2(FOLDER / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder / f"{name}.py", folder / f"{name}.ipynb"


def test_every_notebook_has_a_script_and_every_script_a_notebook():
    scripts = sorted(p.stem for p in FOLDER.glob("*.py"))
    assert scripts == NAMES
    config = (FOLDER / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config


@pytest.mark.parametrize("name", NAMES)
def test_pair_is_in_sync_and_without_outputs(name):
    assert pair_problems(FOLDER / f"{name}.py", FOLDER / f"{name}.ipynb") == []


@pytest.mark.parametrize("name", NAMES)
def test_resyncing_changes_nothing(name, tmp_path):
    """`jupytext --sync` on a copy of the pair leaves both files byte for byte as committed:
    no new cell ids, no metadata, no reformatting."""
    py, ipynb = _copy_pair(name, tmp_path)
    before = py.read_bytes(), ipynb.read_bytes()
    jupytext_cli(["--sync", "--quiet", str(py)])
    assert (py.read_bytes(), ipynb.read_bytes()) == before


def test_the_parameters_cell_is_tagged_in_the_script():
    for name in NAMES:
        text = (FOLDER / f"{name}.py").read_text()
        assert text.count('# %% tags=["parameters"]') == 1, name


def _edit_script(py: Path, old: str, new: str) -> None:
    text = py.read_text()
    assert old in text
    py.write_text(text.replace(old, new, 1))


def test_checker_reports_a_desynced_copy(tmp_path):
    """Each kind of drift is reported: a changed line, a removed cell, a lost tag, a cell
    turned into markdown, outputs and execution counts in the .ipynb."""
    py, ipynb = _copy_pair("quickstart", tmp_path)
    assert pair_problems(py, ipynb) == []

    _edit_script(py, 'seed = 0 ', 'seed = 1 ')
    assert any("source differs" in p for p in pair_problems(py, ipynb))

    py, ipynb = _copy_pair("quickstart", tmp_path)
    _edit_script(py, '# %% tags=["parameters"]', "# %%")
    assert any("tags differ" in p for p in pair_problems(py, ipynb))

    py, ipynb = _copy_pair("quickstart", tmp_path)
    _edit_script(py, "# %% [markdown]\n# ## Checks", "# %%\n# ## Checks")
    assert any("type differs" in p for p in pair_problems(py, ipynb))

    py, ipynb = _copy_pair("quickstart", tmp_path)
    nb = json.loads(ipynb.read_text())
    del nb["cells"][3]
    ipynb.write_text(json.dumps(nb))
    assert any("cells" in p and "has" in p for p in pair_problems(py, ipynb))

    py, ipynb = _copy_pair("quickstart", tmp_path)
    nb = nbformat.read(ipynb, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    code.execution_count = 3
    nbformat.write(nb, ipynb)
    problems = pair_problems(py, ipynb)
    assert any("has outputs" in p for p in problems)
    assert any("execution count" in p for p in problems)

    py, ipynb = _copy_pair("quickstart", tmp_path)
    nb = nbformat.read(ipynb, as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11"}  # JupyterLab adds it
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2030-01-01"}
    nbformat.write(nb, ipynb)
    assert any("'language_info', 'execution'" in p for p in pair_problems(py, ipynb))

    py.unlink()
    assert "missing" in pair_problems(py, ipynb)[0]


def test_strip_brings_a_run_notebook_back_to_the_committed_bytes(tmp_path):
    """What a JupyterLab session leaves in the .ipynb (outputs, counts, timings, language
    info) is removed by `python -m mixlab.notebooks --strip`; ids and sources stay."""
    py, ipynb = _copy_pair("quickstart", tmp_path)
    committed = ipynb.read_bytes()
    assert strip_notebook(ipynb) is False and ipynb.read_bytes() == committed
    nb = nbformat.read(ipynb, as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x\n")]
            cell.execution_count = 1
            cell.metadata["execution"] = {"iopub.status.idle": "2030-01-01"}
    nbformat.write(nb, ipynb)
    assert pair_problems(py, ipynb)
    assert strip_notebook(ipynb) is True
    assert ipynb.read_bytes() == committed and pair_problems(py, ipynb) == []


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_stripped(name, tmp_path):
    _, ipynb = _copy_pair(name, tmp_path)
    assert strip_notebook(ipynb) is False


def test_resync_after_an_edit_changes_only_the_edited_cell(tmp_path):
    """An edit of the script, synced, changes that cell of the .ipynb and nothing else: the
    other cells keep their ids (a review sees one changed cell)."""
    py, ipynb = _copy_pair("quickstart", tmp_path)
    before = nbformat.read(ipynb, as_version=4)
    _edit_script(py, 'seed = 0 ', 'seed = 1 ')
    jupytext_cli(["--sync", "--quiet", str(py)])
    after = nbformat.read(ipynb, as_version=4)
    assert pair_problems(py, ipynb) == []
    assert [c.id for c in after.cells] == [c.id for c in before.cells]
    changed = [i for i, (x, y) in enumerate(zip(before.cells, after.cells)) if x.source != y.source]
    assert len(changed) == 1 and "seed = 1" in after.cells[changed[0]].source
