"""Small helpers the notebooks share: where runs and figures go, the device, provenance
sidecars for figures. Notebooks stay thin drivers; anything longer than a few lines that two
notebooks need lives here or in the module it belongs to.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_bytes, atomic_write_json


def project_dir(start: str | Path | None = None) -> Path:
    """The mixlab checkout the notebook runs in (the nearest folder above ``start`` holding
    ``pyproject.toml`` and ``notebooks/``), else the current folder."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "notebooks").is_dir():
            return folder
    return here


def resolve_device(device: str = "auto") -> torch.device:
    """'auto': CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_dir(notebook: str, profile: str, *parts: str, root: str | Path | None = None) -> Path:
    """``<project>/runs/<notebook>/<profile>/<parts...>``: where a notebook keeps its runs, so
    runs of different profiles never mix and a second execution reuses finished ones.
    ``$MIXLAB_RUNS`` replaces ``<project>/runs`` (the notebook tests train afresh that way)."""
    base = Path(root or os.environ.get("MIXLAB_RUNS") or project_dir() / "runs")
    return base.joinpath(notebook, profile, *parts)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=project_dir(), timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_figure(fig, name: str, *, profile: str, extra: dict[str, Any] | None = None,
                folder: str | Path | None = None) -> Path:
    """Save a matplotlib figure as ``figures/<name>_<profile>.png`` with a JSON sidecar that
    records the profile, git commit, device and time (which code and profile made it). Both
    files are written atomically (an interrupted save leaves the previous version intact)."""
    folder = Path(folder) if folder else project_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.png"
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())
    meta = dict(figure=path.name, profile=profile, git_commit=git_commit(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path.with_suffix(".json"), meta, indent=2)
    return path


def save_table(rows: dict[str, dict[str, Any]], name: str, *, profile: str,
               extra: dict[str, Any] | None = None, folder: str | Path | None = None) -> Path:
    """Write a results table (method -> metrics) as ``figures/<name>_<profile>.json`` with the
    same provenance fields as figures, atomically."""
    folder = Path(folder) if folder else project_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.json"
    # per-example lists stay in the run folders (evaluate's JSON); a table holds summaries
    rows = {row: {k: v for k, v in r.items() if k != "per_example"} if isinstance(r, dict)
            else r for row, r in rows.items()}
    meta = dict(table=rows, profile=profile, git_commit=git_commit(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path, meta, indent=2, default=float)
    return path


# ----------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class Param:
    """What a notebook parameter must be. ``kind``: str | int | float | strs (a list of
    strings) | floats (a list of numbers) | dict. ``choices`` may be a callable (imported
    lazily). ``low``: smallest allowed number (each element for floats)."""
    kind: str
    help: str
    choices: Any = None
    low: float | None = None
    low_open: bool = False
    optional: bool = False    # None is allowed


def _variants():
    from .methods.amp import VARIANTS
    return tuple(VARIANTS)


def _methods():
    from .methods import METHODS
    return tuple(sorted(METHODS))


def _datasets():
    from .data import DATASETS
    return DATASETS


def _directions():
    from .explorer import DIRECTIONS
    return tuple(DIRECTIONS)


#: every parameter a notebook may have, by name (a notebook's ``check_params`` call names its
#: own; a name missing here is an error, so each new parameter gets a type)
PARAMS: dict[str, Param] = {
    "profile": Param("str", "run size", choices=("smoke", "short", "paper")),
    "device": Param("str", "auto | cpu | cuda | cuda:N"),
    "seed": Param("int", "random seed", low=0),
    "dataset": Param("str", "dataset name", choices=_datasets),
    "datasets": Param("dict", "dataset per role, e.g. {\"approx\": \"moons\"}"),
    "norm": Param("str", "threat model", choices=("Linf", "L2")),
    "eps": Param("float", "radius in pixel units, e.g. 0.0314 for 8/255; None: the "
                 "dataset's standard", low=0, low_open=True, optional=True),
    "epochs": Param("int", "training epochs; None: the profile's", low=1, optional=True),
    "run_dir": Param("str", "run folder; empty: the default under runs/"),
    "run_dirs": Param("dict", "name -> run folder"),
    "variants": Param("strs", "AMP variants (mixlab.methods.amp.VARIANTS)", choices=_variants),
    "methods": Param("strs", "training methods (mixlab.methods.METHODS)", choices=_methods),
    "lams": Param("floats", "λ values of the weight functions"),
    "alphas": Param("floats", "mixup Beta(α, α) parameters", low=0, low_open=True),
    "d_max": Param("float", "MMA's hinge, pixel units; 0: the paper's", low=0),
    "clean_coeff": Param("float", "MMA's clean-loss weight c in [0, 1]; < 0: the paper's 1/3"),
    "image_index": Param("int", "test image index", low=0),
    "target_index": Param("int", "test image index", low=0),
    "direction": Param("str", "path direction", choices=_directions),
    "n_points": Param("int", "points per path", low=2),
}


def _check_number(name: str, value: Any, spec: Param, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a whole number" if integer else "a number"
        raise TypeError(f"parameter {name}={value!r} must be {what} ({spec.help}); "
                        f"papermill: -p {name} <value>")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError(f"parameter {name}={value!r} must be a whole number ({spec.help})")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"parameter {name}={value!r} must be a finite number")
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        raise ValueError(f"parameter {name}={value!r} must be {'>' if spec.low_open else '>='} "
                         f"{spec.low} ({spec.help})")
    return value


def check_param(name: str, value: Any) -> Any:
    """Check one notebook parameter against :data:`PARAMS`; returns it normalised (ints for
    int parameters, floats for float ones, lists for list ones: a comma-separated string
    such as ``-p methods pgd_at,gairat`` becomes a list). Raises ValueError / TypeError
    naming the parameter, the value and what is allowed."""
    if name not in PARAMS:
        raise TypeError(f"unknown notebook parameter {name!r}: give it a type in "
                        f"mixlab.nbtools.PARAMS (known: {sorted(PARAMS)})")
    spec = PARAMS[name]
    if value is None:
        if spec.optional:
            return None
        raise TypeError(f"parameter {name}=None is not allowed ({spec.help})")
    kind = spec.kind
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"parameter {name}={value!r} must be a string ({spec.help})")
    elif kind in ("int", "float"):
        value = _check_number(name, value, spec, kind == "int")
    elif kind in ("strs", "floats"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if kind == "floats":
                try:
                    value = [float(v) for v in value]
                except ValueError:
                    raise TypeError(f"parameter {name}={value!r} must be a list of numbers "
                                    f"({spec.help})") from None
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"parameter {name}={value!r} must be a non-empty list "
                            f"({spec.help})")
        if kind == "strs":
            if not all(isinstance(v, str) for v in value):
                raise TypeError(f"parameter {name}={value!r} must be a list of strings "
                                f"({spec.help})")
            value = list(value)
        else:
            value = [_check_number(name, v, spec, False) for v in value]
    elif kind == "dict":
        if not isinstance(value, dict):
            raise TypeError(f"parameter {name}={value!r} must be a dict ({spec.help})")
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices is not None:
        bad = [v for v in (value if kind == "strs" else [value]) if v not in choices]
        if bad:
            raise ValueError(f"parameter {name}={value!r}: {bad[0]!r} is not one of "
                             f"{list(choices)} ({spec.help})")
    if name == "device" and not (value in ("auto", "cpu", "cuda") or (
            value.startswith("cuda:") and value[5:].isdigit())):
        raise ValueError(f"parameter device={value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def check_params(**params: Any) -> dict[str, Any]:
    """Check a notebook's parameters (its papermill ``parameters`` cell) in one call, before
    anything runs: ``profile`` must be one of smoke / short / paper, every other parameter the
    type :data:`PARAMS` gives it (``-p epochs abc`` is an error, not ignored). Returns the
    values normalised (see :func:`check_param`), in the order given.

    >>> p = check_params(profile=profile, seed=seed, methods=methods)
    >>> methods = p["methods"]          # "pgd_at,gairat" from the command line is a list now
    """
    return {name: check_param(name, value) for name, value in params.items()}


# ----------------------------------------------------------------------------- evaluation
def checkpoint_label(name: str, run) -> str:
    """Row name of a loaded checkpoint: ``"pgd_at (best, ep 2)"``."""
    return f"{name} ({run.which}, ep {run.epoch})"


def evaluate_checkpoints(name: str, run, x: torch.Tensor, y: torch.Tensor,
                         **evaluate_kw: Any) -> dict[str, dict[str, Any]]:
    """The selected (``best``) and the last checkpoint of a finished run, evaluated on the same
    images by one :func:`mixlab.evaluate.evaluate` call each (one in all when the best epoch is
    the last), as rows ``"<name> (best, ep B)"`` and ``"<name> (last, ep L)"``. Each result is
    also written to the run folder as ``test_<which>.json``. ``run`` is the best checkpoint as
    ``train_or_load`` returns it; ``evaluate_kw`` go to ``evaluate`` (eps, norm, attacks, ...)."""
    from .evaluate import evaluate, save_result
    from .train import load_run

    best = run if run.which == "best" else load_run(run.path, which="best", device=x.device)
    last = load_run(run.path, which="last", device=x.device)
    rows = {}
    result = evaluate(best.model, x, y, run_dir=best.path, name="test_best", **evaluate_kw)
    rows[checkpoint_label(name, best)] = result
    if last.epoch != best.epoch:
        result = evaluate(last.model, x, y, run_dir=last.path, name="test_last", **evaluate_kw)
    elif result["saved_to"]:  # the same checkpoint: its result is the last one's too
        save_result(result, last.path / "test_last.json")
    rows[checkpoint_label(name, last)] = result
    return rows


def table_report(rows: dict[str, dict[str, Any]], *, curves: dict[str, Any] | None = None,
                 columns: tuple[str, ...] | None = None) -> str:
    """:func:`mixlab.evaluate.format_table` of ``rows`` and, under it, the masking report
    (:func:`mixlab.evaluate.format_report`) of every evaluated row (rows without a report,
    such as a paper's published numbers, are left out); ``curves``: row -> robust accuracies
    in increasing eps order, checked with that row."""
    from .evaluate import format_report, format_table

    table = format_table(rows) if columns is None else format_table(rows, columns=columns)
    lines = [table, ""]
    for name, r in rows.items():
        if "warnings" in r:
            lines.append(f"{name}: {format_report(r, curve=(curves or {}).get(name))}")
    return "\n".join(lines)


def tolerated_flags(profile: str) -> list[str]:
    """Substrings of the masking flags (:func:`mixlab.evaluate.masking_report`) that a
    notebook's ``checks.evaluation`` lets pass in ``profile``. In smoke (64 test images,
    models trained for seconds on a CPU) the attack-gap flags (CW-20, FGSM or AutoAttack
    far from PGD-20) measure a barely trained model on a handful of images, so they pass;
    in the other profiles none does. An attack above clean accuracy, a robust-accuracy curve
    rising with eps and AutoAttack's own checks never pass."""
    return ["below PGD-20", "stronger than PGD-20"] if profile == "smoke" else []
