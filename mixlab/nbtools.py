"""Small helpers the notebooks share: where runs and figures go, the device, provenance
sidecars for figures, checked parameters, training or loading a run, and evaluations that
are cached in the run folder. Notebooks stay thin drivers; anything longer than a few lines
that two notebooks need lives here or in the module it belongs to.

Environment variables read here:

* ``MIXLAB_RUNS``: replaces ``<project>/runs`` as the root of the run folders (:func:`run_dir`);
* ``MIXLAB_FIGURES``: replaces ``<project>/figures`` as the folder of figures and tables
  (:func:`figures_dir`); ``make demo`` points it at ``runs/figures`` so that a demo never
  rewrites the committed figures;
* ``MIXLAB_THREADS``: CPU threads, read by :func:`mixlab.runtime.configure_threads`, which
  :func:`check_params` calls (every notebook calls that first).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_bytes, atomic_write_json
from .runs import git_commit, run_status, train_or_load  # noqa: F401  (the notebooks' API)
from .runtime import pick_device as resolve_device  # noqa: F401  (the notebooks' name)
from .runtime import project_dir


def run_dir(notebook: str, profile: str, *parts: str, root: str | Path | None = None) -> Path:
    """``<project>/runs/<notebook>/<profile>/<parts...>``: where a notebook keeps its runs, so
    runs of different profiles never mix and a second execution reuses finished ones.
    ``$MIXLAB_RUNS`` replaces ``<project>/runs`` (the notebook tests train afresh that way)."""
    base = Path(root or os.environ.get("MIXLAB_RUNS") or project_dir() / "runs")
    return base.joinpath(notebook, profile, *parts)


def figures_dir() -> Path:
    """Where :func:`save_figure` and :func:`save_table` write: ``$MIXLAB_FIGURES`` when set
    (a relative path is taken from the project folder, since notebooks run inside
    ``notebooks/``), else ``<project>/figures``, the committed figures."""
    env = os.environ.get("MIXLAB_FIGURES", "").strip()
    if not env:
        return project_dir() / "figures"
    folder = Path(env).expanduser()
    return folder if folder.is_absolute() else project_dir() / folder


def device_label() -> str:
    """The device a sidecar names: the CUDA device's name, or ``"cpu"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def save_figure(fig, name: str, *, profile: str, extra: dict[str, Any] | None = None,
                folder: str | Path | None = None) -> Path:
    """Save a matplotlib figure as ``<folder>/<name>_<profile>.png`` with a JSON sidecar that
    records the profile, git commit, device and time (which code and profile made it). Both
    files are written atomically (an interrupted save leaves the previous version intact).
    ``folder`` None: :func:`figures_dir` (``$MIXLAB_FIGURES``, else ``<project>/figures``)."""
    folder = Path(folder) if folder else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.png"
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())
    meta = dict(figure=path.name, profile=profile, git_commit=git_commit(),
                device=device_label(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path.with_suffix(".json"), meta, indent=2)
    return path


def show_figure(fig, name: str, *, profile: str, extra: dict[str, Any] | None = None) -> Path:
    """:func:`save_figure`, then close ``fig`` and display the saved PNG: what the notebook
    shows is the file that was written (for notebooks that draw with the Agg backend)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    fig.tight_layout()
    path = save_figure(fig, name, profile=profile, extra=extra)
    plt.close(fig)
    display(Image(filename=str(path)))
    return path


def save_table(rows: dict[str, dict[str, Any]], name: str, *, profile: str,
               extra: dict[str, Any] | None = None, folder: str | Path | None = None) -> Path:
    """Write a results table (method -> metrics) as ``<folder>/<name>_<profile>.json`` with
    the same provenance fields as figures, atomically; ``folder`` as in :func:`save_figure`."""
    folder = Path(folder) if folder else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.json"
    # per-example lists stay in the run folders (evaluate's JSON); a table holds summaries
    rows = {row: {k: v for k, v in r.items() if k != "per_example"} if isinstance(r, dict)
            else r for row, r in rows.items()}
    meta = dict(table=rows, profile=profile, git_commit=git_commit(),
                device=device_label(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path, meta, indent=2, default=float)
    return path


# ----------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class Param:
    """What a notebook parameter must be. ``kind``: str | int | float | bool | strs (a list
    of strings) | floats (a list of numbers) | dict. ``choices`` may be a callable (imported
    lazily). ``low``: smallest allowed number (each element for floats)."""
    kind: str
    help: str
    choices: Any = None
    low: float | None = None
    low_open: bool = False
    optional: bool = False    # None is allowed


def _profiles():
    from .config import PROFILES
    return tuple(PROFILES)


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
    from .margin_paths import DIRECTIONS
    return tuple(DIRECTIONS)


#: every parameter a notebook may have, by name (a notebook's ``check_params`` call names its
#: own; a name missing here is an error, so each new parameter gets a type)
PARAMS: dict[str, Param] = {
    "profile": Param("str", "run size (mixlab.config.PROFILES)", choices=_profiles),
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
    "ema_decay": Param("float", "weight averaging: decay of the moving average of the weights "
                       "(the engine setting ema_decay, in [0, 1)), e.g. 0.999", low=0),
    "d_max": Param("float", "MMA's hinge, pixel units; 0: the paper's", low=0),
    "clean_coeff": Param("float", "MMA's clean-loss weight c in [0, 1]; < 0: the paper's 1/3"),
    "image_index": Param("int", "test image index", low=0),
    "target_index": Param("int", "test image index", low=0),
    "direction": Param("str", "path direction", choices=_directions),
    "n_points": Param("int", "points per path", low=2),
    "quiet": Param("bool", "no progress bars (training steps, evaluation batches)"),
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


def _check_bool(name: str, value: Any, spec: Param) -> bool:
    """True / False, also as papermill's ``-p quiet true`` passes it (the text true / false
    in any case, or 1 / 0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"parameter {name}={value!r} must be true or false ({spec.help}); "
                    f"papermill: -p {name} true")


def param_type(name: str) -> str:
    """The type of parameter ``name`` as a notebook's parameters cell states it for
    ``papermill --help-notebook`` (``# type: list[str] ...``): str, int, float, bool,
    list[str], list[float] or dict, with ``|None`` when None is allowed."""
    spec = PARAMS[name]
    kind = {"strs": "list[str]", "floats": "list[float]"}.get(spec.kind, spec.kind)
    return kind + ("|None" if spec.optional else "")


def _literal(name: str, text: str, what: str, example: str) -> Any:
    """A list or dict written on the command line: JSON (``["a","b"]``), else a Python
    literal (``['a', 'b']``); anything else is a TypeError that shows how to write it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise TypeError(f"parameter {name}={text!r} looks like a {what} but does not parse; "
                        f"write it as JSON, e.g. -p {name} '{example}'") from None


def _text_list(name: str, text: str) -> list:
    """A list parameter given as text (papermill's ``-p`` passes lists as strings): a JSON or
    Python list (``'["base","both"]'``) or comma-separated names (``base,both``)."""
    stripped = text.strip()
    if stripped.startswith("["):
        value = _literal(name, stripped, "list", '["a","b"]')
        if not isinstance(value, list):
            raise TypeError(f"parameter {name}={text!r} must be a list")
        return value
    return [v.strip() for v in stripped.split(",") if v.strip()]


def _listing(values: list) -> str:
    return ", ".join(repr(v) for v in values)


def check_param(name: str, value: Any) -> Any:
    """Check one notebook parameter against :data:`PARAMS`; returns it normalised (ints for
    int parameters, floats for float ones, lists for list ones, dicts for dict ones).

    List parameters are read the same way in every notebook, whether they come from the
    parameters cell, ``python -m mixlab.notebooks -p`` or papermill's ``-p`` (which passes
    them as strings): a list, comma-separated names (``-p variants base,both``) or a JSON /
    Python list (``-p variants '["base","both"]'``). A dict parameter may be given as JSON
    text (``-p datasets '{"approx": "moons"}'``). Raises ValueError / TypeError naming the
    parameter, the value, every bad entry and what is allowed."""
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
    elif kind == "bool":
        value = _check_bool(name, value, spec)
    elif kind in ("strs", "floats"):
        if isinstance(value, str):
            value = _text_list(name, value)
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"parameter {name}={value!r} must be a non-empty list "
                            f"({spec.help}); papermill: -p {name} a,b or -p {name} "
                            f"'[\"a\",\"b\"]'")
        value = list(value)
        if kind == "strs":
            bad = [v for v in value if not isinstance(v, str)]
            if bad:
                raise TypeError(f"parameter {name}={value!r} must be a list of strings; not "
                                f"strings: {_listing(bad)} ({spec.help})")
        else:
            numbers, bad = [], []
            for v in value:
                if isinstance(v, str):
                    try:
                        v = float(v)
                    except ValueError:
                        bad.append(v)
                        continue
                numbers.append(v)
            if bad:
                raise TypeError(f"parameter {name}={value!r} must be a list of numbers; not "
                                f"numbers: {_listing(bad)} ({spec.help})")
            value = [_check_number(name, v, spec, False) for v in numbers]
    elif kind == "dict":
        if isinstance(value, str) and value.strip().startswith("{"):
            value = _literal(name, value.strip(), "dict", '{"key": "value"}')
        if not isinstance(value, dict):
            raise TypeError(f"parameter {name}={value!r} must be a dict ({spec.help})")
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices is not None:
        bad = [v for v in (value if kind == "strs" else [value]) if v not in choices]
        if bad:
            verb = "is not one of" if len(bad) == 1 else "are not among"
            raise ValueError(f"parameter {name}={value!r}: {_listing(bad)} {verb} "
                             f"{list(choices)} ({spec.help})")
    if name == "device" and not (value in ("auto", "cpu", "cuda") or (
            value.startswith("cuda:") and value[5:].isdigit())):
        raise ValueError(f"parameter device={value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def check_params(**params: Any) -> dict[str, Any]:
    """Check a notebook's parameters (its papermill ``parameters`` cell) in one call, before
    anything runs: ``profile`` must be a name in :data:`mixlab.config.PROFILES`, every other
    parameter the type :data:`PARAMS` gives it (``-p epochs abc`` is an error, not ignored). Returns the
    values normalised (see :func:`check_param`), in the order given. Then sets the CPU threads
    (:func:`mixlab.runtime.configure_threads`: ``$MIXLAB_THREADS``, else 1 without CUDA), so
    every notebook does before anything heavy runs.

    >>> p = check_params(profile=profile, seed=seed, methods=methods)
    >>> methods = p["methods"]          # "pgd_at,gairat" from the command line is a list now
    """
    from .runtime import configure_threads
    checked = {name: check_param(name, value) for name, value in params.items()}
    configure_threads()
    return checked


# ----------------------------------------------------------------------------- training
def open_run(path: str | Path, **kwargs: Any):
    """:func:`mixlab.runs.load_run` with one printed line first (``loading run <path>``),
    as :func:`train_or_load` prints, so a notebook's output shows where every run came from."""
    from . import runs

    print(f"loading run {path}", flush=True)
    return runs.load_run(path, **kwargs)


def train_speed(run) -> float:
    """A run's training speed: images per second, averaged over its epochs (NaN when its
    history records none)."""
    speeds = [h["img_per_s"] for h in run.history if h.get("img_per_s") is not None]
    return float(sum(speeds) / len(speeds)) if speeds else math.nan


def describe_runs(runs: dict[str, Any]) -> str:
    """One line per run (a header first): method, model, epochs trained, the last epoch's
    training loss and validation accuracies (clean, PGD), training images per second and
    the selected epoch. The validation split is held out of the training set: these
    numbers, and the choice of each run's best checkpoint, never see the test set."""
    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    lines = [f"{'run':14s} {'method':8s} {'model':15s} {'epochs':>6s} {'loss':>7s} "
             f"{'clean':>6s} {'PGD':>6s} {'img/s':>8s} {'selected':>9s}"]
    for name, run in runs.items():
        last = run.history[-1] if run.history else {}
        lines.append(f"{name:14s} {run.config['method']:8s} {str(run.config['model']):15s} "
                     f"{len(run.history):6d} {num(last.get('train_loss'), '7.3f')} "
                     f"{num(last.get('val_clean'), '6.3f')} {num(last.get('val_robust'), '6.3f')} "
                     f"{num(train_speed(run), '8.0f')} {'epoch ' + str(run.epoch):>9s}")
    return "\n".join(lines)


def method_budget(method: str, profile: str) -> dict[str, Any]:
    """The engine settings (model, epochs, schedule, ...) that ``method``'s own profile adds
    to :data:`mixlab.config.PROFILES` in ``profile``: passing them to every method of a
    comparison trains all of them on that method's budget. {} when the method has none."""
    from .config import TRAIN_DEFAULTS
    from .methods import get_method

    return {k: v for k, v in get_method(method).profiles.get(profile, {}).items()
            if k in TRAIN_DEFAULTS}


#: engine settings that make a training budget: network, data split, epochs, optimiser and
#: schedule (not the method, its attack or its hyperparameters)
BUDGET_KEYS = ("model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
               "schedule", "milestones", "lr_factors", "warmup", "val_size", "train_subset",
               "eval_subset")


def shared_budget(cfg: dict[str, Any]) -> dict[str, Any]:
    """The :data:`BUDGET_KEYS` of a resolved config (:func:`mixlab.train.resolve_config`):
    keyword arguments that give another method the same budget."""
    return {k: cfg[k] for k in BUDGET_KEYS}


def load_test_images(dataset: str, n: int, device: torch.device | str = "cpu"):
    """The first ``n`` test images of a fixed shuffle (seed 0: every notebook and profile
    evaluates the same ones) on ``device``: ``(data, x, y)`` with x float in [0, 1]."""
    from .data import load_dataset

    test = load_dataset(dataset, "test").subset(n, seed=0).to(device)
    return test, test.x.float() / 255, test.y


def first_present(datasets: list[str]) -> str:
    """The first of ``datasets`` whose training data is on this machine, else the last."""
    from .data import find_dataset

    return next((d for d in datasets if find_dataset(d, "train")), datasets[-1])


# ----------------------------------------------------------------------------- toy problems
def toy_data(name: str, n: int, *, d: int, noise: float, seed: int, n_test: int = 0):
    """The toy data of :mod:`mixlab.theory` by name, seeded and centred by the training
    mean: ``"moons"`` (two dimensions, ``noise``) or ``"gaussian"`` (a separable mixture in
    ``d`` dimensions). Other names are a ValueError."""
    from . import theory

    if name == "moons":
        return theory.make_moons(n, noise=noise, seed=seed, n_test=n_test)
    if name == "gaussian":
        return theory.make_gaussian_mixture(n, d, seed=seed, n_test=n_test)
    raise ValueError(f"toy dataset {name!r} must be 'moons' or 'gaussian'")


def toy_model(kind: str, d: int, *, width: int, seed: int):
    """A toy model of :mod:`mixlab.theory` on ``d`` inputs: ``"logistic"`` (logistic
    regression, θ = 0) or ``"mlp"`` (one tanh hidden layer of ``width`` units, seeded)."""
    from . import theory

    if kind == "logistic":
        return theory.LogisticRegression(d)
    if kind == "mlp":
        return theory.MLP(d, width, 2, act="tanh", seed=seed)
    raise ValueError(f"toy model {kind!r} must be 'logistic' or 'mlp'")


# ----------------------------------------------------------------------------- evaluation
#: bump when the meaning of a cached evaluation changes, so that old cache files are ignored
EVAL_CACHE_FORMAT = 1
#: the folder inside a run directory that holds cached evaluations
EVAL_CACHE_DIR = "evaluations"


def checkpoint_label(name: str, run) -> str:
    """Row name of a loaded checkpoint: ``"pgd_at (best, ep 2)"``."""
    return f"{name} ({run.which}, ep {run.epoch})"


def _weights(run) -> str:
    """Which weights of its checkpoint a loaded run holds: ``"raw"`` or ``"ema"`` (the
    average of a run trained with ``ema_decay``; :func:`mixlab.runs.load_run`)."""
    return getattr(run, "weights", "raw")


def _result_name(run) -> str:
    """The file stem of a checkpoint's evaluation in its run folder: ``test_best``, and
    ``test_best_ema`` for the averaged weights (the ``*_ema.json`` that ``python -m mixlab
    export --weights ema`` reports, as ``python -m mixlab eval --weights ema`` names it)."""
    return f"test_{run.which}" + ("_ema" if _weights(run) == "ema" else "")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tensor(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def evaluation_settings(**evaluate_kw: Any) -> dict[str, Any]:
    """Every setting of :func:`mixlab.evaluate.evaluate` that changes its result, defaults
    filled in and normalised (attack names as evaluate orders them, eps a float), as JSON
    values: the part of an evaluation's cache key that is not the checkpoint or the images.
    An unknown keyword, or ``run_dir`` / ``name`` (chosen by :func:`evaluate_checkpoints`),
    is a TypeError; bad attack names are evaluate's errors."""
    from .evaluate import _check_attack_names, evaluate

    for own in ("run_dir", "name"):
        if own in evaluate_kw:
            raise TypeError(f"evaluate_checkpoints chooses {own} itself (the run folder); "
                            f"do not pass {own}=")
    settings = {k: v.default for k, v in inspect.signature(evaluate).parameters.items()
                if v.kind is v.KEYWORD_ONLY and k not in ("run_dir", "name")}
    unknown = sorted(set(evaluate_kw) - set(settings))
    if unknown:
        raise TypeError(f"evaluate() has no setting(s) {unknown}; known: {sorted(settings)}")
    settings.update(evaluate_kw)
    settings["attacks"] = _check_attack_names(settings["attacks"])
    if settings["aa_attacks"] is not None and not isinstance(settings["aa_attacks"], str):
        settings["aa_attacks"] = list(settings["aa_attacks"])
    if isinstance(settings["eps"], (int, float)) and not isinstance(settings["eps"], bool):
        settings["eps"] = float(settings["eps"])
    return json.loads(json.dumps(settings, default=str))


def checkpoint_fingerprint(run) -> dict[str, Any]:
    """What identifies the checkpoint a loaded run came from: its file name, which (best or
    last), epoch, size and the SHA-256 of its bytes, and ``weights: "ema"`` when the run holds
    the checkpoint's averaged weights (one file holds both: the raw weights and their average
    are two models, never one cache entry)."""
    ckpt = Path(run.path) / f"{run.which}.pt"
    found = {"file": ckpt.name, "which": run.which, "epoch": run.epoch,
             "size": ckpt.stat().st_size, "sha256": _sha256_file(ckpt)}
    if _weights(run) != "raw":  # raw keeps the key it always had: earlier caches stay valid
        found["weights"] = _weights(run)
    return found


def tensor_fingerprint(*tensors: torch.Tensor) -> dict[str, Any]:
    """Shapes, dtypes and SHA-256 of the values of ``tensors``: equal exactly when the
    tensors hold the same values (whichever indices or seed picked them)."""
    return {"shapes": [list(t.shape) for t in tensors], "dtypes": [str(t.dtype) for t in tensors],
            "sha256": [_sha256_tensor(t) for t in tensors]}


def cached(folder: str | Path, name: str, key: dict[str, Any], compute) -> dict[str, Any]:
    """``compute()`` (a dict of numpy arrays and JSON values, e.g.
    :func:`mixlab.paths.interpolation_path`'s), cached as ``<folder>/<name>-<digest>.npz``
    with ``key`` inside: a later call with an equal ``key`` loads the file instead (0-d
    values come back as Python numbers and strings). A file that cannot be read or holds
    another key is ignored with a printed line. Prints ``computing <name> ...`` or
    ``loaded cached <name> ...``."""
    import numpy as np

    from .fileio import atomic_savez

    key = json.loads(json.dumps(key, default=str))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"{name}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["__key__"]))
                values = json.loads(str(z["__values__"]))
                arrays = {k: z[k] for k in z.files if not k.startswith("__")}
        except Exception as err:  # corrupt, truncated, not ours: never trusted
            print(f"ignoring unreadable cache {path} ({err.__class__.__name__}); computing "
                  f"again", flush=True)
        else:
            if stored == key:
                print(f"loaded cached {name} from {path}", flush=True)
                return {**arrays, **values}
            print(f"ignoring cache {path}: made with other settings; computing again",
                  flush=True)
    print(f"computing {name} (cache: {path})", flush=True)
    result = compute()
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    values = {k: v for k, v in result.items() if k not in arrays}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savez(path, __key__=np.array(json.dumps(key)),
                     __values__=np.array(json.dumps(values, default=float)), **arrays)
    except (OSError, TypeError, ValueError) as err:  # read-only folder, values not JSON
        print(f"could not cache {name} in {path} ({err})", flush=True)
    return result


def evaluation_key(run, x: torch.Tensor, y: torch.Tensor, **evaluate_kw: Any) -> dict[str, Any]:
    """The cache key of one checkpoint's evaluation: the checkpoint (file name, epoch, size
    and SHA-256 of its bytes), the images and labels (count, shape, dtype, SHA-256 of their
    values: the exact test images, whatever indices or seed chose them) and every evaluate
    setting (:func:`evaluation_settings`: attacks, eps, norm, batch size, seed, AutoAttack
    version or list). Two evaluations with equal keys give the same result."""
    return {
        "format": EVAL_CACHE_FORMAT,
        "checkpoint": checkpoint_fingerprint(run),
        "data": {"n": len(x), "shape": list(x.shape), "dtype": str(x.dtype),
                 "x_sha256": _sha256_tensor(x), "y_sha256": _sha256_tensor(y)},
        "settings": evaluation_settings(**evaluate_kw),
    }


def _cache_path(run, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(run.path) / EVAL_CACHE_DIR / f"{_result_name(run)}-{digest}.json"


def _load_cached(path: Path, key: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The cached result at ``path`` if it is there, parses and carries exactly ``key``;
    otherwise None, with one printed line saying why a file that is there was not used."""
    from .evaluate import load_result

    if not path.exists():
        return None
    try:
        result = load_result(path)
    except (OSError, ValueError) as err:  # unreadable, or not JSON
        print(f"ignoring unreadable cached evaluation {path} ({err.__class__.__name__}: "
              f"{err}); evaluating again", flush=True)
        return None
    if not isinstance(result, dict) or result.get("cache_key") != key:
        print(f"ignoring cached evaluation {path}: it was made with other settings or is not "
              f"an evaluation; evaluating again", flush=True)
        return None
    per_example = result.get("per_example")
    if (result.get("n") != n or not isinstance(result.get("robust"), (int, float))
            or not isinstance(per_example, dict)
            or any(not isinstance(v, list) or len(v) != n for v in per_example.values())):
        print(f"ignoring incomplete cached evaluation {path}; evaluating again", flush=True)
        return None
    result.pop("cache_key")
    return result


def _save_quietly(result: dict[str, Any], path: Path, what: str) -> None:
    from .evaluate import save_result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_result(result, path)
    except (OSError, ValueError) as err:  # a read-only run folder: the result stays usable
        print(f"could not write {what} {path} ({err})", flush=True)


def evaluate_checkpoint(name: str, run, x: torch.Tensor, y: torch.Tensor, *,
                        also: str | None = None, progress: bool = True,
                        **evaluate_kw: Any) -> dict[str, Any]:
    """One checkpoint's :func:`mixlab.evaluate.evaluate` result, from the cache in its run
    folder when an evaluation with the same key (:func:`evaluation_key`) is there, else
    computed and cached. Prints one line, ``evaluating <row> ...`` or ``loaded cached
    evaluation <row> ...``. The result is also written to ``<run>/test_<which>.json`` (and to
    ``test_<also>.json`` when ``also`` names another checkpoint that is the same one); a run
    loaded with its averaged weights (``weights="ema"``) writes ``test_<which>_ema.json``.
    ``progress``: the evaluation's progress bars (not part of the cache key)."""
    from .evaluate import evaluate

    key = evaluation_key(run, x, y, **evaluate_kw)
    path = _cache_path(run, key)
    label = checkpoint_label(name, run) if also is None else \
        f"{name} ({run.which} = {also}, ep {run.epoch})"
    result = _load_cached(path, key, len(x))
    if result is not None:
        print(f"loaded cached evaluation {label} from {path}", flush=True)
        _save_quietly(result, Path(run.path) / f"{_result_name(run)}.json", "the evaluation")
    else:
        settings = key["settings"]
        print(f"evaluating {label} on {len(x)} images: {', '.join(settings['attacks'])} "
              f"(eps {settings['eps']:.4g}, {settings['norm']})", flush=True)
        result = evaluate(run.model, x, y, run_dir=run.path, name=_result_name(run),
                          progress=progress, **evaluate_kw)
        _save_quietly({**result, "cache_key": key}, path, "the cached evaluation")
    if also is not None and result.get("saved_to"):
        suffix = "_ema" if _weights(run) == "ema" else ""
        _save_quietly(result, Path(run.path) / f"test_{also}{suffix}.json", "the evaluation")
    return result


def evaluate_checkpoints(name: str, run, x: torch.Tensor, y: torch.Tensor, *,
                         progress: bool = True,
                         **evaluate_kw: Any) -> dict[str, dict[str, Any]]:
    """The selected (``best``) and the last checkpoint of a finished run, evaluated on the same
    images by one :func:`mixlab.evaluate.evaluate` call each (one in all when the best epoch is
    the last), as rows ``"<name> (best, ep B)"`` and ``"<name> (last, ep L)"``. ``run`` is the
    best checkpoint as ``train_or_load`` returns it; ``evaluate_kw`` go to ``evaluate`` (eps,
    norm, attacks, aa_attacks, batch_size, seed, ...).

    Each evaluation is cached in the run folder (``evaluations/test_<which>-<key>.json``, the
    result with its key) and reused when the same checkpoint file (same bytes) is evaluated
    on the same images with the same settings; any change of checkpoint, images or setting
    evaluates again, and a cache file that does not parse or does not carry the key is
    ignored (with a printed line), never trusted. One line per checkpoint says which
    happened. Each result is also written as ``test_<which>.json`` in the run folder.
    Both checkpoints are evaluated with the weights ``run`` holds: a run loaded with
    ``weights="ema"`` gives the averaged model of each (files ``test_<which>_ema.json``).
    ``progress=False`` hides the evaluation's progress bars (a notebook's ``quiet``)."""
    from .runs import load_run

    evaluation_settings(**evaluate_kw)  # a bad keyword fails before any checkpoint loads
    weights = _weights(run)
    best = run if run.which == "best" else load_run(run.path, which="best", device=x.device,
                                                    weights=weights)
    last = load_run(run.path, which="last", device=x.device, weights=weights)
    rows = {}
    if last.epoch == best.epoch:  # the same checkpoint: its result is the last one's too
        result = evaluate_checkpoint(name, best, x, y, also="last", progress=progress,
                                     **evaluate_kw)
        rows[checkpoint_label(name, best)] = rows[checkpoint_label(name, last)] = result
        return rows
    for checkpoint in (best, last):
        rows[checkpoint_label(name, checkpoint)] = evaluate_checkpoint(
            name, checkpoint, x, y, progress=progress, **evaluate_kw)
    return rows


def evaluate_runs(runs: dict[str, Any], x: torch.Tensor, y: torch.Tensor, *,
                  progress: bool = True,
                  **evaluate_kw: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`evaluate_checkpoints` of every run, on the same images and settings:
    ``{name: {"<name> (best, ep B)": result, "<name> (last, ep L)": result}}``."""
    evaluation_settings(**evaluate_kw)  # a bad keyword fails before the first run
    return {name: evaluate_checkpoints(name, run, x, y, progress=progress, **evaluate_kw)
            for name, run in runs.items()}


def table_rows(by_run: dict[str, dict[str, dict[str, Any]]],
               *extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of :func:`evaluate_runs`' result in one table, run after run, then the rows
    of each ``extra`` table (e.g. :func:`mixlab.references.reference_rows`). A row name
    given twice is a ValueError (one row would hide the other)."""
    rows: dict[str, dict[str, Any]] = {}
    for table in (*by_run.values(), *extra):
        for name, row in table.items():
            if name in rows:
                raise ValueError(f"table row {name!r} given twice")
            rows[name] = row
    return rows


def aa_used(rows: dict[str, dict[str, Any]]) -> Any:
    """The AutoAttack attacks the evaluated rows ran (``"standard"`` or a list), from the
    first row that records them; None when none does."""
    return next((r["aa_attacks"] for r in rows.values() if "aa_attacks" in r), None)


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


# ----------------------------------------------------------------------------- seed spread
#: the columns of a seed table: accuracies that decide a paper's ordering
SEED_COLUMNS = ("clean", "pgd20", "aa", "robust")


def seed_list(seed: int, n_seeds: int) -> list[int]:
    """The seeds of a notebook's seed table: its own ``seed`` and the ``n_seeds - 1`` after it
    (``seed_list(0, 2) == [0, 1]``). Raises ValueError for ``n_seeds`` below 1."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds={n_seeds!r} must be an int >= 1 (1: the notebook's seed "
                         f"only)")
    return [seed + i for i in range(n_seeds)]


def seed_table(runs_by_seed: dict[int, dict[str, Any]], x: torch.Tensor, y: torch.Tensor, *,
               progress: bool = True, columns: tuple[str, ...] = SEED_COLUMNS,
               **evaluate_kw: Any) -> dict[str, dict[str, Any]]:
    """Mean and spread over training seeds of each run's selected checkpoint.

    ``runs_by_seed``: ``{seed: {name: run}}``, the same names for every seed, each run the
    ``best`` checkpoint ``train_or_load`` returns (or a run opened with other weights). Every
    checkpoint is evaluated by :func:`evaluate_checkpoint` (cached like the main table's, so
    the first seed's rows cost nothing twice) on the same images ``x, y`` with the same
    ``evaluate_kw``. Returns ``{name: row}`` where ``row[c]`` is the mean over seeds of column
    ``c`` (a fraction), ``row[c + "_spread"]`` the largest minus the smallest value (0 for
    one seed), ``row[c + "_values"]`` the value per seed, ``row["seeds"]`` the seeds and
    ``row["per_seed"]`` each seed's result (without per-example lists) for the checks."""
    if not runs_by_seed:
        raise ValueError("seed_table needs at least one seed: {seed: {name: run}}")
    names = list(next(iter(runs_by_seed.values())))
    for seed, runs in runs_by_seed.items():
        if list(runs) != names:
            raise ValueError(f"seed {seed} has runs {list(runs)}, the first seed {names}: "
                             f"give every seed the same names")
    evaluation_settings(**evaluate_kw)  # a bad keyword fails before the first evaluation
    table = {}
    for name in names:
        per_seed = {}
        for seed, runs in runs_by_seed.items():
            result = evaluate_checkpoint(f"{name}, seed {seed}", runs[name], x, y,
                                         progress=progress, **evaluate_kw)
            per_seed[seed] = {k: v for k, v in result.items() if k != "per_example"}
        row: dict[str, Any] = {"seeds": list(per_seed), "n": len(y)}
        for c in columns:
            values = [float(r[c]) for r in per_seed.values()]
            row[c] = sum(values) / len(values)
            row[f"{c}_spread"] = max(values) - min(values)
            row[f"{c}_values"] = values
        row["per_seed"] = per_seed
        table[name] = row
    return table


def format_seed_table(table: dict[str, dict[str, Any]],
                      columns: tuple[str, ...] = SEED_COLUMNS) -> str:
    """A Markdown table of :func:`seed_table`'s rows: each cell ``mean ± half the spread``
    in percent, then the value of every seed in brackets (``17.2 ± 0.6 (17.8, 16.6)``)."""
    from .evaluate import LABELS

    lines = ["| model | seeds | " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        cells = [f"{100 * row[c]:.1f} ± {50 * row[c + '_spread']:.1f} ("
                 + ", ".join(f"{100 * v:.1f}" for v in row[c + "_values"]) + ")"
                 for c in columns]
        seeds = ", ".join(str(s) for s in row["seeds"])
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
