"""Runs on disk: the run directory, its checkpoints and provenance, and loading a run back.

``mixlab.train.train(run_dir=...)`` writes a run directory through this module; ``load_run``
reads it back as a :class:`Run`; ``train_or_load`` does whichever of the two is needed.

The run directory (``run_dir``) is written by one training at a time (a lock), every file in it
is replaced atomically, and after a kill at any instant the run resumes with no completed epoch
lost or repeated:

* ``config.json``: exactly the resolved settings (``python -m mixlab train ... --dry-run``);
* ``provenance.json``: code version, library versions, device and data (:func:`provenance`);
* ``last.pt``: the state after the last completed epoch, history included; the source of truth;
  with weight averaging on (``ema_decay``), the averaged weights too, under ``ema``;
* ``best.pt``: the completed epoch with the best validation score (:func:`best_metric`: the
  method's ``Method.best_metric``, of the averaged model when weight averaging is on); no
  ``best.pt`` without a validation split: the test set never selects a model;
* ``metrics.jsonl``: one line per completed epoch, rewritten from ``last.pt``'s history;
* ``method/epoch_XXX.npz``: per-epoch arrays of the method (GAIRAT's κ, mixup's λ, ...);
* ``nonfinite.pt``: written only when the loss turns NaN/inf: the state at the last check where
  the loss was still finite.

A directory that holds a run with other settings is never resumed or relabelled (the difference
is shown; ``overwrite=True`` replaces it), and a finished run is never replaced without
``overwrite=True``: training it again rewrites none of its files. The temporary files of a
writer killed mid-write (``.last.pt.*.tmp``) are removed by the next training that takes the lock.

Checkpoints hold tensors and plain containers only and are read with ``weights_only=True``: a
crafted file cannot run code.

>>> run = load_run("runs/at", which="best", device="cuda")     # run.model, run.config, ...
>>> run = load_run("runs/at-ema", weights="ema")               # the averaged weights
>>> run = train_or_load(run_dir="runs/at", method="pgd_at", profile="short")
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from .attacks import unwrap
from .config import config_difference, resolve_config
from .distributed import outside_share
from .fileio import atomic_savez, atomic_torch_save, atomic_write_bytes, safe_torch_load
from .methods import get_method
from .models import CUSTOM_PREFIX, CustomModel, build_model, custom_model_name
from .runtime import pick_device

#: the files a training writes in its run directory (``overwrite=True`` removes them)
RUN_FILES = ("config.json", "provenance.json", "metrics.jsonl", "last.pt", "best.pt",
             "nonfinite.pt")


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that does not fit the request, with what to do."""


# ----------------------------------------------------------------------------- provenance
def _git(*args: str, folder: str | Path | None = None) -> str | None:
    """``git <args>`` in ``folder`` (default: mixlab's own source folder); its output, or None
    where git or a checkout is missing."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=folder or Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(folder: str | Path | None = None, *, short: bool = True) -> str:
    """The commit checked out in ``folder`` (default: the checkout mixlab's code runs from),
    abbreviated with ``short``, or ``"unknown"`` outside a git checkout."""
    return _git("rev-parse", *(["--short"] if short else []), "HEAD", folder=folder) or "unknown"


def provenance(cfg: dict[str, Any], device: torch.device, train_ds) -> dict[str, Any]:
    """Where a result came from: code version, library versions, device, data."""
    import torchvision

    from . import __version__
    return dict(
        git_commit=git_commit(short=False), git_dirty=bool(_git("status", "--porcelain")),
        mixlab=__version__, torch=torch.__version__, torchvision=torchvision.__version__,
        python=platform.python_version(), host=platform.node(),
        device=str(device), device_name=(torch.cuda.get_device_name(device)
                                         if device.type == "cuda" else platform.processor()),
        dataset=train_ds.name, data_source=train_ds.source,
        data_fingerprint=train_ds.fingerprint(), profile=cfg.get("profile"),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


# ----------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """torch's global RNG states (CPU, and every CUDA device when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state_dict a checkpoint holds: the wrappers of a step under torchrun
    (DistributedDataParallel, ``mixlab.distributed.outside_share``) and ``torch.compile``'s
    removed."""
    model = unwrap(model)
    if isinstance(model, outside_share):
        model = model.module
    return getattr(model, "_orig_mod", model)


def checkpoint_state(*, model, optimizer, method, cfg, epoch, step, history,
                     generator, ema=None) -> dict[str, Any]:
    """Everything needed to continue exactly: weights, optimiser, method state, RNG states,
    and the weight average (``ema``: a :class:`mixlab.ema.WeightAverage`, or None when weight
    averaging is off). Tensors and plain containers only, so it loads with
    ``weights_only=True``."""
    base = unwrap_model(model)
    return dict(
        model=_clone(base.state_dict()), arch=base.arch,
        num_classes=base.num_classes, in_channels=base.in_channels,
        optimizer=_clone(optimizer.state_dict()), method=_clone(method.state_dict()),
        config=cfg, epoch=epoch,
        step=step, history=history, rng=rng_state(), generator=generator.get_state(),
        ema=_clone(ema.state_dict()) if ema is not None else None)


def best_metric(cfg: dict[str, Any]) -> str:
    """The history key that selects ``best.pt`` for the resolved settings ``cfg``: the method's
    ``Method.best_metric`` (e.g. ``val_robust``), and with weight averaging on (``ema_decay``)
    the same score of the averaged model (``ema_val_robust``): that is the model one
    evaluates and exports, so it is the one selected (docs/baselines.md)."""
    metric = get_method(cfg["method"]).best_metric
    return f"ema_{metric}" if cfg.get("ema_decay") is not None else metric


def _clone(tree: Any) -> Any:
    """A copy of nested dicts/lists whose tensors are detached clones (no host sync): the
    state stays as it is now while training goes on."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write a checkpoint atomically (see ``checkpoint_state`` for the keywords)."""
    atomic_torch_save(checkpoint_state(**state), path)


def load_checkpoint(path: str | Path, *, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (a crafted file cannot run code), with one
    clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one with `python -m mixlab "
                              f"train --run-dir <dir>` or pass the run directory")
    try:
        ckpt = safe_torch_load(path, map_location=map_location)
    except Exception as err:  # torch raises several types for a corrupt or unsafe file
        raise CheckpointError(
            f"checkpoint {path} cannot be read safely ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); it is corrupt, not a mixlab "
            f"checkpoint, or holds objects other than tensors (mixlab never unpickles those): "
            f"retrain it") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{path} is not a mixlab checkpoint (no model/arch entries)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], *, arch: str, num_classes: int,
                     in_channels: int, where: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another architecture or class count, saying what to do."""
    if ckpt["arch"] != arch:
        raise CheckpointError(f"{where} holds a {ckpt['arch']!r} model but {arch!r} was asked "
                              f"for; pass model={ckpt['arch']!r} or use another run_dir")
    if ckpt["num_classes"] != num_classes:
        raise CheckpointError(
            f"{where} was trained for {ckpt['num_classes']} classes but the data has "
            f"{num_classes}; use a checkpoint trained on this dataset or another run_dir")
    if ckpt["in_channels"] != in_channels:
        raise CheckpointError(f"{where} expects {ckpt['in_channels']} input channels, the "
                              f"data has {in_channels}")


def nonfinite_entries(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point weights and buffers (BatchNorm statistics included) that
    hold NaN or inf. One host sync."""
    names = [k for k, v in state_dict.items() if torch.is_floating_point(v)]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[k]).all() for k in names]).cpu()
    return [k for k, ok in zip(names, finite.tolist()) if not ok]


# ----------------------------------------------------------------------------- the run directory
def check_run_dir(run_dir: Path) -> None:
    """A run directory is a folder (or does not exist yet): refused before anything is read."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a folder; pass a folder "
                         f"for the run's config, metrics and checkpoints")


def open_run_dir(run_dir: Path, cfg: dict[str, Any], *, num_classes: int, in_channels: int,
                 best_metric: str) -> dict[str, Any] | None:
    """Make ``run_dir`` ready for a training with the resolved settings ``cfg`` (the caller
    holds its lock, ``mixlab.fileio.RunLock``): remove the temporary files of killed writers,
    apply the overwrite and resume rules, and after a kill make ``metrics.jsonl`` and
    ``best.pt`` agree with ``last.pt``. Creates ``method/``.

    Returns the checkpoint to resume from, or None to start afresh. Refuses, with the
    difference and the fix, a directory holding a run with other settings or another model
    or data shape, and ``resume=False`` on an existing run, unless ``overwrite=True``."""
    _remove_stale_temp_files(run_dir)
    ckpt = _prepare_run_dir(run_dir, cfg)
    if ckpt is not None:
        check_compatible(ckpt, arch=cfg["model"], num_classes=num_classes,
                         in_channels=in_channels, where=str(run_dir / "last.pt"))
        _sync_run_files(run_dir, ckpt, best_metric)
    (run_dir / "method").mkdir(parents=True, exist_ok=True)
    return ckpt


def save_epoch(run_dir: Path, ckpt: dict[str, Any], *, arrays: dict[str, np.ndarray],
               best: bool) -> None:
    """Write one completed epoch (``ckpt``: its :func:`checkpoint_state`, whose history ends
    with the epoch's record; ``arrays``: the method's arrays; ``best``: it is the best so far).

    The order matters for a kill at any instant: the arrays, then ``last.pt`` (the commit
    point), then ``best.pt`` and ``metrics.jsonl``, which a resume rebuilds from ``last.pt``."""
    if arrays:
        atomic_savez(run_dir / "method" / f"epoch_{ckpt['epoch'] + 1:03d}.npz", **arrays)
    atomic_torch_save(ckpt, run_dir / "last.pt")
    if best:
        atomic_torch_save(ckpt, run_dir / "best.pt")
    _write_metrics(run_dir, ckpt["history"])


def save_nonfinite(run_dir: Path, snapshot: dict[str, Any]) -> Path:
    """Keep the last state whose loss was finite as ``nonfinite.pt``; returns its path."""
    path = run_dir / "nonfinite.pt"
    atomic_torch_save(snapshot, path)
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); delete the run directory or "
                              f"pass overwrite=True") from err


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temporary files of writers that were killed before their rename (``.last.pt.*.tmp``,
    see ``mixlab.fileio``). The caller holds the lock, so no live writer owns one."""
    for folder in (run_dir, run_dir / "method"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


def _prepare_run_dir(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Decide what happens to an existing run directory (the caller holds its lock).

    Returns the checkpoint to resume from, or None to start afresh. Refuses, with the
    difference and the fix, a directory holding a run with other settings, a finished run or
    ``resume=False`` on an existing run, unless ``overwrite=True``."""
    has_run = any((run_dir / name).exists() for name in ("config.json", "last.pt"))
    if not has_run:
        return None
    if cfg["overwrite"]:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "method", ignore_errors=True)
        return None
    ckpt = load_checkpoint(run_dir / "last.pt") if (run_dir / "last.pt").exists() else None
    saved = ckpt["config"] if ckpt is not None else _read_json(run_dir / "config.json")
    diff = config_difference(saved, cfg)
    if diff:
        raise CheckpointError(
            f"{run_dir} holds a run with other settings:\n  " + "\n  ".join(diff) +
            "\nPass another run_dir, or overwrite=True (--overwrite) to replace that run")
    if ckpt is None:  # killed before its first epoch completed: nothing to lose
        return None
    done = ckpt["epoch"] + 1
    if not cfg["resume"]:
        raise CheckpointError(
            f"{run_dir} holds a run at epoch {done} of {saved['epochs']}; pass resume=True to "
            f"continue it or overwrite=True (--overwrite) to replace it")
    return ckpt


def _sync_run_files(run_dir: Path, ckpt: dict[str, Any], best_metric: str) -> None:
    """After a kill: make metrics.jsonl and best.pt agree with last.pt (the source of truth)."""
    history = ckpt["history"]
    _write_metrics(run_dir, history, only_if_changed=True)
    scored = [(h[best_metric], -i) for i, h in enumerate(history)
              if h.get(best_metric) is not None]
    if scored:
        best_epoch = -max(scored)[1]  # the earliest of the best, as training keeps it
        best_ok = False
        if (run_dir / "best.pt").exists():
            best_ok = load_checkpoint(run_dir / "best.pt")["epoch"] == best_epoch
        if not best_ok and best_epoch == ckpt["epoch"]:
            atomic_torch_save(ckpt, run_dir / "best.pt")


def _write_metrics(run_dir: Path, history: list[dict[str, Any]], *,
                   only_if_changed: bool = False) -> None:
    data = "".join(json.dumps(record) + "\n" for record in history).encode()
    path = run_dir / "metrics.jsonl"
    if only_if_changed and path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------- loading runs
@dataclasses.dataclass
class Run:
    """A saved run: the model (eval mode, on ``device``), its config and history."""
    model: torch.nn.Module
    config: dict[str, Any]
    history: list[dict[str, Any]]
    path: Path
    method_state: dict[str, Any]
    which: str = "best"
    epoch: int = 0   # 1-based epoch of the loaded checkpoint
    weights: str = "raw"   # "raw": the trained weights; "ema": their average (ema_decay)

    def method_arrays(self) -> list[dict[str, np.ndarray]]:
        """The per-epoch arrays the method logged (e.g. GAIRAT's kappa), oldest first. Read
        with ``allow_pickle=False``: only arrays."""
        files = sorted((self.path / "method").glob("epoch_*.npz"))
        out = []
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                out.append({k: z[k] for k in z.files})
        return out


def load_run(path: str | Path, *, which: str = "best", device: str | torch.device = "cpu",
             num_classes: int | None = None, model: torch.nn.Module | None = None,
             weights: str = "raw") -> Run:
    """Load a run directory (or a checkpoint file): model, config and history.

    which: "best" (the epoch selected on the validation split) or "last". A run without a
    validation split has no "best" (the test set never selects a model): ask for "last".
    With weight averaging on, "best" is the epoch whose *averaged* model scored best
    (:func:`best_metric`), whichever ``weights`` are loaded from it.
    weights: "raw" (the weights the optimiser trained) or "ema" (their exponential moving
    average, for runs trained with ``ema_decay``; the model to evaluate and export for such
    runs). "ema" on a run without an average is refused.
    Checkpoints with non-finite weights are refused. num_classes, if given, must match.
    model: for a run trained on a module of your own (``train(model=module)``, recorded as
    ``"custom:<ClassName>"``), a new module of the same class to load the weights into; the
    returned ``Run.model.net`` is that module. A run of a model or dataset registered by name
    (``register_model`` / ``register_dataset``) needs the same registration in this process."""
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r} must be 'best' or 'last'")
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r} must be 'raw' (the trained weights) or 'ema' "
                         f"(their average, runs trained with ema_decay)")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model={model!r} must be an nn.Module (of the class the run trained)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r} must be a run directory or checkpoint file (str or Path)")
    path = Path(path)
    if path.is_file():
        ckpt_path = path
    elif not path.is_dir():
        raise CheckpointError(f"no run directory or checkpoint at {path}")
    else:
        ckpt_path = path / f"{which}.pt"
        if not ckpt_path.exists() and (path / "last.pt").exists():
            cfg = load_checkpoint(path / "last.pt")["config"]
            if which == "best" and not cfg.get("val_size"):
                raise CheckpointError(
                    f"{path} was trained without a validation split (val_size=0), so no "
                    f"checkpoint was selected; load which='last'")
            metric = best_metric(cfg)
            if which == "best" and metric.endswith("val_robust") and not cfg.get("eval_steps"):
                raise CheckpointError(
                    f"{path} was trained with eval_steps=0, so the robust validation accuracy "
                    f"that selects {cfg['method']}'s best checkpoint was never computed; load "
                    f"which='last', or train with eval_steps >= 1")
            raise CheckpointError(f"{ckpt_path} does not exist (no epoch has a {metric} score "
                                  f"yet); load which='last'")
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    if num_classes is not None and num_classes != ckpt["num_classes"]:
        raise CheckpointError(f"{ckpt_path} was trained for {ckpt['num_classes']} classes, "
                              f"not {num_classes}")
    state = ckpt["model"]
    if weights == "ema":
        if ckpt.get("ema") is None:
            raise CheckpointError(
                f"{ckpt_path} holds no weight average: the run was trained without weight "
                f"averaging (ema_decay={cfg.get('ema_decay')!r}); load weights='raw', or "
                f"train with ema_decay set (e.g. 0.999)")
        state = ckpt["ema"]["model"]
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(f"{ckpt_path} holds non-finite weights or buffers ({bad[:5]}); "
                              f"its numbers would mean nothing: retrain with a lower lr")
    if ckpt["arch"].startswith(CUSTOM_PREFIX):
        if model is None:
            raise CheckpointError(
                f"{ckpt_path} holds a module of your own ({ckpt['arch']!r}) trained with "
                f"train(model=...): mixlab cannot build it; pass a new one of the same class: "
                f"load_run(path, model={ckpt['arch'][len(CUSTOM_PREFIX):]}(...))")
        if custom_model_name(model) != ckpt["arch"]:
            raise CheckpointError(f"{ckpt_path} holds a {ckpt['arch']!r} model but model= is "
                                  f"a {type(model).__name__}; pass the class the run trained")
        model = CustomModel(model, num_classes=ckpt["num_classes"],
                            in_channels=ckpt["in_channels"])
    else:
        if model is not None:
            raise ValueError(f"model= is for runs trained on a module of your own; {ckpt_path} "
                             f"holds a {ckpt['arch']!r} model, which mixlab builds itself")
        # the Normalize statistics come from the state dict; a registered dataset must still
        # be registered in this process (mixlab.data.register_dataset), as at training
        info = ({} if data_mod.is_custom_dataset(cfg["dataset"])
                else data_mod.dataset_info(cfg["dataset"]))
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"],
                            mean=info.get("mean"), std=info.get("std"))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path} does not fit a {ckpt['arch']} model: {err}") from err
    model.to(device).eval()
    run_dir = ckpt_path.parent
    history = ckpt["history"]
    last = run_dir / "last.pt"
    if ckpt_path.name == "best.pt" and last.exists():
        history = load_checkpoint(last)["history"]  # the whole run, not up to the best epoch
    return Run(model=model, config=cfg, history=history, path=run_dir,
               method_state=ckpt.get("method", {}), which=ckpt_path.stem,
               epoch=ckpt["epoch"] + 1, weights=weights)


def run_status(run_dir: str | Path, *, method_hp: dict[str, Any] | None = None,
               **settings: Any) -> str:
    """What :func:`train_or_load` will do with these arguments: ``"load"`` (a finished run
    with the same settings is there), ``"train"`` (nothing there, an unfinished run, or
    ``overwrite=True``) or ``"refuse"`` (a run with other settings, or an unreadable one, is
    there: it will raise and say why). Reads ``last.pt``; trains nothing."""
    wanted = resolve_config(run_dir=str(run_dir), method_hp=method_hp, **settings)
    try:
        return "load" if _is_finished(Path(run_dir), wanted) else "train"
    except Exception:  # other settings, or unreadable: train_or_load raises and says why
        return "refuse"


def _is_finished(run_dir: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds the finished run of the resolved settings ``wanted``; raises
    CheckpointError for a run with other settings (and ValueError for a file)."""
    check_run_dir(run_dir)
    if wanted["overwrite"] or not (run_dir / "last.pt").exists():
        return False
    ckpt = load_checkpoint(run_dir / "last.pt")
    diff = config_difference(ckpt["config"], wanted)
    if diff:
        raise CheckpointError(
            f"{run_dir} holds a run with other settings:\n  " + "\n  ".join(diff) +
            "\nPass another run_dir, or overwrite=True to replace that run")
    return ckpt["epoch"] + 1 >= wanted["epochs"]


def train_or_load(*, run_dir: str | Path, which: str = "best", weights: str = "raw",
                  method_hp: dict[str, Any] | None = None, **settings: Any) -> Run:
    """Train (or finish training) the run in ``run_dir`` unless it is complete; load it
    (``which`` and ``weights`` as in :func:`load_run`).

    Notebooks call this so a second execution reuses finished runs; one printed line says
    which happens (``training <run_dir>``, also when an interrupted run is finished, or
    ``loading finished run <run_dir>``). A directory holding a run with other settings is
    refused with the difference (``overwrite=True`` replaces it).

    Your own model and data work as in ``train``: ``model`` an ``nn.Module`` (the same module
    comes back, trained, as ``Run.model.net``), ``dataset`` tensors, a torch ``Dataset`` or an
    image-folder path."""
    # train sits above this module (it writes its run directory through it): imported here
    from . import data as data_mod
    from .models import custom_model_name
    from .train import train

    run_dir = Path(run_dir)
    named = dict(settings)  # what config.json records for a module or data object
    module = settings.get("model") if isinstance(settings.get("model"), torch.nn.Module) else None
    if module is not None:
        named["model"] = custom_model_name(module)
    if settings.get("dataset") is not None and not isinstance(settings["dataset"], str):
        named["dataset"] = data_mod.custom_dataset_name(settings["dataset"])
    wanted = resolve_config(run_dir=str(run_dir), method_hp=method_hp, **named)
    done = _is_finished(run_dir, wanted)
    print(f"{'loading finished run' if done else 'training'} {run_dir}", flush=True)
    if not done:
        train(run_dir=str(run_dir), method_hp=method_hp, **settings)
    return load_run(run_dir, which=which, device=pick_device(wanted["device"]), model=module,
                    weights=weights)
