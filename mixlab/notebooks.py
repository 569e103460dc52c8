"""Run every notebook (or some) with papermill: ``python -m mixlab.notebooks --profile smoke``.

Executed copies go to ``runs/notebooks/<profile>/`` (ignored by git); figures go to
``figures/`` from inside the notebooks, or to ``$MIXLAB_FIGURES`` when set (see
``mixlab.nbtools.figures_dir``). The working directory is ``notebooks/``, as in JupyterLab, so
relative paths behave the same everywhere. CPU threads: ``$MIXLAB_THREADS``, else 1 on a
machine without CUDA (``mixlab.runtime.configure_threads``), here and in every notebook.

Run it inside a mixlab checkout. A notebook name that does not exist (``--only nosuch``), or
no ``notebooks/`` folder above the current directory, is one error line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .cli import literal_value
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


def run_notebook(path: Path, *, profile: str, out_dir: Path, parameters: dict | None = None,
                 log_output: bool = False) -> Path:
    """Execute one notebook with papermill; raises papermill's error if a cell fails."""
    import papermill as pm
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    pm.execute_notebook(str(path), str(out), parameters={"profile": profile, **(parameters or {})},
                        cwd=str(path.parent), kernel_name="python3", progress_bar=False,
                        log_output=log_output)
    return out


def parse_param(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, VALUE), the value read as JSON where it parses (numbers, lists,
    true/false), else kept as the string: ``variants=["base","both"]``, ``n_eval=500``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, literal_value(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixlab.notebooks", description=__doc__)
    p.add_argument("--profile", default="smoke", choices=["smoke", "short", "paper"])
    p.add_argument("--only", nargs="*", help="notebook names without .ipynb")
    p.add_argument("--device", default=None, help="passed as the `device` parameter")
    p.add_argument("--param", "-p", type=parse_param, action="append", default=[],
                   metavar="KEY=VALUE", help="a notebook parameter (JSON value, else a string); "
                   "repeatable; a notebook without that parameter ignores it, as papermill does")
    args = p.parse_args(argv)
    try:
        paths = notebook_paths(args.only)
    except NotebookError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    configure_threads()  # this process's threads; each notebook sets its own in check_params
    out_dir = project_dir() / "runs" / "notebooks" / args.profile
    params = {"device": args.device} if args.device else {}
    params.update(args.param)
    failed = []
    for path in paths:
        t0 = time.perf_counter()
        try:
            run_notebook(path, profile=args.profile, out_dir=out_dir, parameters=params)
            print(f"ok    {path.name:28s} {time.perf_counter() - t0:7.1f} s")
        except Exception as err:  # report every notebook, then fail
            failed.append(path.name)
            print(f"FAIL  {path.name:28s} {time.perf_counter() - t0:7.1f} s  "
                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}")
    print(f"executed copies in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
