"""README.md is exactly true: every shell command and the Python example it shows run as written.

The test reads README's fenced code blocks (```bash and ```python). Each command line (lines
ending in a backslash are joined) runs in a subprocess with bash, in order, in one scratch
copy of the project layout (``pyproject.toml``, a copy of ``notebooks/``, the checkout's
``.venv`` and ``../shared`` linked in), so the runs and figures the commands write land there
and not in the checkout; ``python`` is the virtual environment's, ``$MIXLAB_DATA`` the data
the Makefile prepared, ``$MIXLAB_RUNS`` a temporary folder and one thread per process. The
commands chain the way a reader would type them: ``eval`` reads the run ``train`` wrote.

A command is left out only when it is on ``SKIP`` below, with the reason. Whoever edits a
command in README.md changes what runs here; a command that exits with an error fails its test
(with its output in the message). About two minutes on two CPU cores.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO

README = REPO / "README.md"

#: README commands that are not run here, matched by substring, each with the reason
SKIP = {
    "make demo": "sets up and runs the main notebook (minutes); tests/test_notebooks.py runs "
                 "that notebook and .ci/run runs `make test`",
    "make test": "runs the whole test suite, this file included; .ci/run runs it",
    "jupyter lab": "starts an interactive server; tests/test_browser.py drives JupyterLab",
    "mixlab download": "needs the internet, which the test machines may not have",
    "mixlab.notebooks": "executes every notebook (several minutes on a CPU); "
                        "tests/test_notebooks.py runs each one",
}

#: seconds a single command may take before the test fails
TIMEOUT = 300


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order."""
    return [(m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(text: str) -> list[str]:
    """The command lines of every ```bash block (continuation lines joined), in order."""
    commands = []
    for lang, body in code_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def python_snippets(text: str) -> list[str]:
    return [body for lang, body in code_blocks(text) if lang == "python"]


def skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIP.items() if key in command), None)


TEXT = README.read_text(encoding="utf-8")
COMMANDS = shell_commands(TEXT)
SNIPPETS = python_snippets(TEXT)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, data_root):
    """A scratch project (its folder, the environment) shared by the commands, in order."""
    if not (data_root / "cifar10").exists():
        pytest.fail(f"real data missing in {data_root}: run `make data`")
    base = tmp_path_factory.mktemp("readme")
    project = base / "project"
    project.mkdir()
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    # a copy, not a link: a kernel started in notebooks/ must find this project, not the checkout
    shutil.copytree(REPO / "notebooks", project / "notebooks")
    (project / ".venv").symlink_to(REPO / ".venv")
    if (REPO.parent / "shared").is_dir():
        (base / "shared").symlink_to(REPO.parent / "shared")
    bin_dir = str(Path(sys.executable).parent)  # the virtual environment's python first
    env = dict(os.environ, MIXLAB_DATA=str(data_root), MIXLAB_RUNS=str(base / "runs"),
               OMP_NUM_THREADS="1", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MIXLAB_TRACEBACK", None)
    return project, env


def run(command: str, cwd: Path, env: dict[str, str], timeout: int = TIMEOUT) -> str:
    """Run ``command`` with bash; fail with its output unless it exits with status 0."""
    try:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README command took over {timeout} s: {command}")
    if proc.returncode != 0:
        pytest.fail(f"README command failed (exit {proc.returncode}): {command}\n"
                    f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_readme_has_the_examples():
    """The parser finds what README shows: a guard against a format change hiding everything."""
    assert len(COMMANDS) >= 8 and len(SNIPPETS) == 2
    assert any(c.startswith("python -m mixlab train") for c in COMMANDS)
    run_here = [c for c in COMMANDS if skip_reason(c) is None]
    assert len(run_here) >= 6, run_here


def test_skip_list_is_short_and_current():
    """Every skip entry matches a README command (no stale entries) and states a reason."""
    for key, why in SKIP.items():
        assert any(key in c for c in COMMANDS), f"SKIP entry {key!r} matches no README command"
        assert len(why) > 10


def test_a_failing_command_fails(scratch):
    """The runner does not swallow errors: a command that exits non-zero fails the test."""
    project, env = scratch
    with pytest.raises(pytest.fail.Exception, match="exit 2"):
        run("python -m mixlab eval --checkpoint runs/no-such-run", project, env, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("#")[0].strip()[:70] for c in COMMANDS])
def test_readme_command_runs(command, scratch):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    project, env = scratch
    if "../shared/" in command and not (project.parent / "shared").is_dir():
        pytest.skip("no ../shared beside the checkout: the command reads offline dataset "
                    "copies from there")
    out = run(command, project, env)
    if "--dry-run" in command:
        assert "gairat" in out  # the resolved config
    if "mixlab.bench --quick" in command and not torch.cuda.is_available():
        assert "CPU" in out and "goal" not in out  # measurements and ratios, no verdicts


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_example_runs(index, scratch):
    """The Python example, in the smoke profile, on real CIFAR-10 loaded through mixlab."""
    project, env = scratch
    script = project / f"readme_example_{index}.py"
    script.write_text(SNIPPETS[index], encoding="utf-8")
    run(f"python {script.name}", project, env)
    assert (project / "runs" / "at" / "last.pt").exists()
