"""Run every notebook (or some) with papermill: ``python -m mixlab.notebooks --profile smoke``.

Executed copies go to ``runs/notebooks/<profile>/`` (ignored by git); figures go to
``figures/`` from inside the notebooks, or to ``$MIXLAB_FIGURES`` when set (see
``mixlab.nbtools.figures_dir``). The working directory is ``notebooks/``, as in JupyterLab, so
relative paths behave the same everywhere. CPU threads: ``$MIXLAB_THREADS``, else 1 on a
machine without CUDA (``mixlab.runtime.configure_threads``), here and in every notebook.

A notebook runs once per entry of :data:`JOBS` (once, with its defaults, when it has none):
``notebooks/mma.ipynb`` runs for CIFAR-10 and for MNIST, as ``mma_cifar10.ipynb`` and
``mma_mnist.ipynb``. ``--only`` takes notebook names (``mma``: both) or job names
(``mma_mnist``: that one); ``-p`` overrides a job's parameters (:func:`with_parameters`:
``--only mma -p dataset=mnist`` runs ``mma_mnist`` alone).

Run it inside a mixlab checkout. A name that does not exist (``--only nosuch``), or no
``notebooks/`` folder above the current directory, is one error line and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from .cli import literal_value
from .extras import require
from .nbtools import project_dir
from .runtime import configure_threads


class NotebookError(ValueError):
    """No notebooks where they were looked for, or a name that is not among them."""


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The repository's notebooks, sorted; ``only`` filters by stem (e.g. "amp_cifar10").
    Raises :class:`NotebookError` when there is no ``notebooks/`` folder with notebooks (run
    outside a checkout) or a name in ``only`` is not one of them."""
    folder = project_dir() / "notebooks"
    paths = sorted(folder.glob("*.ipynb"))
    if not paths:
        raise NotebookError(f"no notebooks in {folder}: {Path.cwd()} is not inside a mixlab "
                            f"checkout; cd into the checkout first")
    if only:
        names = [p.stem for p in paths]
        missing = [name for name in dict.fromkeys(only) if name not in names]
        if missing:
            raise NotebookError(f"no notebook named {', '.join(map(repr, missing))}; "
                                f"choose from {', '.join(names)}")
        paths = [p for p in paths if p.stem in only]
    return paths


#: notebooks that run more than once: notebook -> {job name: its parameters}. The job name
#: names the executed copy (``<job>.ipynb``).
JOBS: dict[str, dict[str, dict[str, Any]]] = {
    "mma": {"mma_cifar10": {"dataset": "cifar10"}, "mma_mnist": {"dataset": "mnist"}},
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One execution of a notebook: its name (the executed copy's), the notebook and the
    parameters that make it this job."""
    name: str
    path: Path
    parameters: dict[str, Any]


def notebook_jobs(only: list[str] | None = None) -> list[Job]:
    """The executions ``python -m mixlab.notebooks`` runs, in notebook order: one per entry of
    :data:`JOBS`, else one per notebook. ``only`` filters by notebook name (all its jobs) or
    job name. Raises :class:`NotebookError` as :func:`notebook_paths` does, naming every
    choice for a name that is neither."""
    paths = notebook_paths()
    jobs = [Job(name, path, dict(params))
            for path in paths
            for name, params in JOBS.get(path.stem, {path.stem: {}}).items()]
    if only:
        names = list(dict.fromkeys([p.stem for p in paths] + [j.name for j in jobs]))
        missing = [name for name in dict.fromkeys(only) if name not in names]
        if missing:
            raise NotebookError(f"no notebook named {', '.join(map(repr, missing))}; "
                                f"choose from {', '.join(names)}")
        jobs = [j for j in jobs if j.name in only or j.path.stem in only]
    return jobs


def with_parameters(jobs: list[Job], params: dict[str, Any]) -> list[Job]:
    """The jobs as they run with the command line's parameters ``params``, which override a
    job's own: each job's parameters become ``{**job.parameters, **params}``; jobs of a
    notebook that end up with the same parameters run once; a run is named after the job
    (of :data:`JOBS`) whose own parameters it keeps, else after its notebook. So ``--only mma
    -p dataset=mnist`` runs MMA once, as ``mma_mnist``, and ``-p dataset=svhn`` once, as
    ``mma``."""
    runs: dict[tuple[Path, str], Job] = {}
    for job in jobs:
        final = {**job.parameters, **params}
        named = [name for name, own in JOBS.get(job.path.stem, {}).items()
                 if all(final.get(k) == v for k, v in own.items())]
        key = (job.path, repr(sorted(final.items(), key=lambda kv: kv[0])))
        runs.setdefault(key, Job(named[0] if named else job.path.stem, job.path, final))
    return list(runs.values())


def run_notebook(path: Path, *, profile: str, out_dir: Path, parameters: dict | None = None,
                 log_output: bool = False, name: str | None = None) -> Path:
    """Execute one notebook with papermill into ``<out_dir>/<name>.ipynb`` (``name``: the
    notebook's own by default); raises papermill's error if a cell fails."""
    pm = require("papermill", feature="running the notebooks (python -m mixlab.notebooks)")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name or path.stem}.ipynb"
    pm.execute_notebook(str(path), str(out), parameters={"profile": profile, **(parameters or {})},
                        cwd=str(path.parent), kernel_name="python3", progress_bar=False,
                        log_output=log_output)
    return out


#: what a committed notebook keeps of its metadata (the kernel papermill starts, the jupytext
#: pairing) and of each cell's (papermill's "parameters" tag); everything else a run or an
#: editor adds (outputs, execution counts, timings, widget state) is stripped
KEEP_NOTEBOOK_METADATA = ("kernelspec", "jupytext")
KEEP_CELL_METADATA = ("tags",)


def strip_notebook(path: Path) -> bool:
    """Rewrite the notebook at ``path`` as it is committed: no outputs, no execution counts,
    metadata reduced to :data:`KEEP_NOTEBOOK_METADATA` / :data:`KEEP_CELL_METADATA`; cell
    ids and sources untouched, so its jupytext pair stays in step. Returns whether anything
    changed (the file is rewritten, atomically, only then)."""
    import nbformat

    from .fileio import atomic_write_bytes

    text = Path(path).read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    nb.metadata = nbformat.NotebookNode(
        {k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA})
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode(
            {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA})
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    new = nbformat.writes(nb)
    new += "" if new.endswith("\n") else "\n"
    if new == text:
        return False
    atomic_write_bytes(Path(path), new.encode("utf-8"))
    return True


def parse_param(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, VALUE), the value read as JSON where it parses (numbers, lists,
    true/false), else kept as the string: ``variants=["base","both"]``, ``n_eval=500``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, literal_value(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixlab.notebooks", description=__doc__)
    from .config import PROFILES
    p.add_argument("--profile", default="smoke", choices=list(PROFILES))
    p.add_argument("--only", nargs="*", help="notebook names without .ipynb, or job names "
                   "(mma_cifar10, mma_mnist)")
    p.add_argument("--device", default=None, help="passed as the `device` parameter")
    p.add_argument("--param", "-p", type=parse_param, action="append", default=[],
                   metavar="KEY=VALUE", help="a notebook parameter (JSON value, else a string); "
                   "repeatable; a notebook without that parameter ignores it, as papermill does")
    p.add_argument("--strip", action="store_true", help="rewrite notebooks/*.ipynb without "
                   "outputs, execution counts and editor metadata (as they are committed), "
                   "run nothing")
    args = p.parse_args(argv)
    if args.strip:
        try:
            paths = notebook_paths(args.only)
        except NotebookError as err:
            print(f"{p.prog}: error: {err}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"{'stripped' if strip_notebook(path) else 'clean   '} {path.name}")
        return 0
    try:
        jobs = notebook_jobs(args.only)
    except NotebookError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    configure_threads()  # this process's threads; each notebook sets its own in check_params
    out_dir = project_dir() / "runs" / "notebooks" / args.profile
    params = {"device": args.device} if args.device else {}
    params.update(args.param)
    failed = []
    for job in with_parameters(jobs, params):
        t0 = time.perf_counter()
        label = f"{job.name}.ipynb"
        try:
            run_notebook(job.path, profile=args.profile, out_dir=out_dir, name=job.name,
                         parameters=job.parameters)
            ok = True
            print(f"ok    {label:28s} {time.perf_counter() - t0:7.1f} s")
        except Exception as err:  # report every notebook, then fail
            ok = False
            failed.append(label)
            print(f"FAIL  {label:28s} {time.perf_counter() - t0:7.1f} s  "
                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
        record_time(job.name, args.profile, seconds=time.perf_counter() - t0, ok=ok,
                    parameters=job.parameters)
    print(f"executed copies in {out_dir}")
    return 1 if failed else 0


def record_time(job: str, profile: str, *, seconds: float, ok: bool,
                parameters: dict[str, Any]) -> Path:
    """Write one notebook's wall-clock time as ``<figures>/<job>_time_<profile>.json`` (the
    folder of :func:`mixlab.nbtools.figures_dir`), beside the figures it made: seconds,
    whether it passed, its parameters, the commit, the CPU threads and the machine. One file
    per notebook, so runners working at once (two ``python -m mixlab.notebooks`` in parallel)
    never race on a file; written atomically."""
    import os
    import platform

    from .fileio import atomic_write_json
    from .nbtools import device_label, figures_dir
    from .runs import git_commit

    path = figures_dir() / f"{job}_time_{profile}.json"
    record = dict(notebook=job, profile=profile, seconds=round(seconds, 1), ok=ok,
                  parameters=parameters, git_commit=git_commit(),
                  threads=os.environ.get("MIXLAB_THREADS"), cpus=os.cpu_count(),
                  machine=platform.machine(),
                  device=device_label(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record, indent=2, sort_keys=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
