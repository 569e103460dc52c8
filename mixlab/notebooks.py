"""Run every notebook (or some) with papermill: ``python -m mixlab.notebooks --profile smoke``.

Executed copies go to ``runs/notebooks/<profile>/`` (ignored by git); figures go to
``figures/`` from inside the notebooks. The working directory is ``notebooks/``, as in
JupyterLab, so relative paths behave the same everywhere.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .cli import literal_value
from .nbtools import project_dir


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The repository's notebooks, sorted; ``only`` filters by stem (e.g. "amp_cifar10")."""
    paths = sorted((project_dir() / "notebooks").glob("*.ipynb"))
    if only:
        missing = set(only) - {p.stem for p in paths}
        if missing:
            raise ValueError(f"no notebook(s) {sorted(missing)}; have {[p.stem for p in paths]}")
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
    out_dir = project_dir() / "runs" / "notebooks" / args.profile
    params = {"device": args.device} if args.device else {}
    params.update(args.param)
    failed = []
    for path in notebook_paths(args.only):
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
