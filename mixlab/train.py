"""The training engine: one ``train(**settings) -> (model, history)`` for every method.

The loop exists once. A method (``mixlab.methods``) turns a batch into a loss; this file owns
the data on the device, the optimiser and schedule, bf16 autocast and channels_last on CUDA,
evaluation on the validation split during training, checkpoints (last and best, with optimiser,
method state and RNG states, so a resumed run equals an uninterrupted one), metrics as JSON
lines and a provenance record. Settings are defined, merged and checked in ``mixlab.config``.

The run directory (``run_dir``) is written by one training at a time (a lock), every file in it
is replaced atomically, and after a kill at any instant the run resumes with no completed epoch
lost or repeated:

* ``config.json``: exactly the resolved settings (``python -m mixlab train ... --dry-run``);
* ``last.pt``: the state after the last completed epoch, history included; the source of truth;
* ``best.pt``: the completed epoch with the best ``Method.best_metric`` on the validation split
  (no ``best.pt`` without a validation split: the test set never selects a model);
* ``metrics.jsonl``: one line per completed epoch, rewritten from ``last.pt``'s history;
* ``method/epoch_XXX.npz``: per-epoch arrays of the method (GAIRAT's κ, mixup's λ, ...);
* ``nonfinite.pt``: written only when the loss turns NaN/inf: the state at the last check where
  the loss was still finite (at most ``check_every`` steps before the first non-finite loss).

A directory that holds a run with other settings is never resumed or relabelled (the difference
is shown; ``overwrite=True`` replaces it), and a finished run is never replaced without
``overwrite=True``: training it again rewrites none of its files. The temporary files of a
writer killed mid-write (``.last.pt.*.tmp``) are removed by the next training that takes the lock.

>>> model, history = train(dataset="cifar10", method="pgd_at", profile="short", run_dir="runs/at")
>>> model, history = train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")
"""
from __future__ import annotations

import dataclasses
import json
import math
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
from .attacks import pgd
from .config import (PROFILES, RUN_ONLY_KEYS, SETTINGS, TRAIN_DEFAULTS,  # noqa: F401
                     attack_spec, check_device_name, config_difference, resolve_config)
from .fileio import (RunLock, atomic_savez, atomic_torch_save, atomic_write_bytes,
                     atomic_write_json, safe_torch_load)
from .methods import get_method
from .models import (CUSTOM_PREFIX, CustomModel, build_model, check_model_output,
                     custom_model_name, registered_models)
from .runtime import check_cpu_profile

#: the files a training writes in its run directory (``overwrite=True`` removes them)
RUN_FILES = ("config.json", "provenance.json", "metrics.jsonl", "last.pt", "best.pt",
             "nonfinite.pt")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or weights; the last finite state is ``nonfinite.pt``."""


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that does not fit the request, with what to do."""


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when present, else CPU; asking for CUDA without one is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; "
                           "use device='cpu' or 'auto'")
    return device


def lr_at(cfg: dict[str, Any], progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of training."""
    kind = cfg["schedule"]
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "onecycle":  # linear up to the peak, linear down to zero (fast-AT)
        w = cfg["warmup"]
        return progress / w if progress < w else max(0.0, (1 - progress) / (1 - w))
    if kind == "piecewise":
        factor = 1.0
        for milestone, f in zip(cfg["milestones"], cfg["lr_factors"]):
            if progress >= milestone:
                factor = f
        return factor
    raise ValueError(f"unknown schedule {kind!r}; choose piecewise, onecycle, cosine, constant")


# ----------------------------------------------------------------------------- provenance
def provenance(cfg: dict[str, Any], device: torch.device, train_ds) -> dict[str, Any]:
    """Where a result came from: code version, library versions, device, data."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent, timeout=5).stdout)
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    from . import __version__
    return dict(
        git_commit=commit or "unknown", git_dirty=dirty, mixlab=__version__,
        torch=torch.__version__, torchvision=torchvision.__version__,
        python=platform.python_version(), host=platform.node(),
        device=str(device), device_name=(torch.cuda.get_device_name(device)
                                         if device.type == "cuda" else platform.processor()),
        dataset=train_ds.name, data_source=train_ds.source,
        data_fingerprint=train_ds.fingerprint(), profile=cfg.get("profile"),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state_dict we save (unwrap torch.compile)."""
    return getattr(model, "_orig_mod", model)


def checkpoint_state(*, model, optimizer, method, cfg, epoch, step, history,
                     generator) -> dict[str, Any]:
    """Everything needed to continue exactly: weights, optimiser, method state, RNG states.
    Tensors and plain containers only, so it loads with ``weights_only=True``."""
    base = _base_model(model)
    return dict(
        model=_clone(base.state_dict()), arch=base.arch,
        num_classes=base.num_classes, in_channels=base.in_channels,
        optimizer=_clone(optimizer.state_dict()), method=_clone(method.state_dict()),
        config=cfg, epoch=epoch,
        step=step, history=history, rng=_rng_state(), generator=generator.get_state())


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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _accuracy(model, x, y, batch_size: int) -> float:
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).float().argmax(1) == y[i:i + batch_size]).sum()
    return correct.item() / max(1, len(x))


def quick_eval(model, x, y, cfg, batch_size: int = 500) -> dict[str, float]:
    """Clean and PGD-``eval_steps`` accuracy on the validation split, fp32 throughout (these
    numbers select the best checkpoint; reported numbers come from ``mixlab.evaluate``)."""
    model.eval()
    out = {"val_clean": _accuracy(model, x, y, batch_size)}
    if cfg["eval_steps"]:
        step_size = max(cfg["step_size"], 2.5 * cfg["eps"] / cfg["eval_steps"])
        x_adv = torch.cat([
            pgd(model, x[i:i + batch_size], y[i:i + batch_size], eps=cfg["eps"],
                step_size=step_size, steps=cfg["eval_steps"], norm=cfg["norm"], bf16=False)
            for i in range(0, len(x), batch_size)])
        out["val_robust"] = _accuracy(model, x_adv, y, batch_size)
    return out


# ----------------------------------------------------------------------------- the loop
def prepare_data(cfg: dict[str, Any], device: torch.device, data: Any = None):
    """(train split, validation split or None) as TensorDatasets on ``device``. The validation
    split is held out of the training set (seeded by ``seed``); the test set is never read.

    data: data passed to ``train(dataset=...)`` itself (tensors, a torch Dataset, ...; see
    ``mixlab.data.as_tensor_datasets``), read instead of ``cfg["dataset"]``."""
    if data is not None:
        train_ds = data_mod.as_tensor_datasets(data)[0]
    else:
        train_ds = data_mod.load_dataset(cfg["dataset"], "train", root=cfg["data_root"],
                                         download=cfg["download"])
    val_ds = None
    if cfg["val_size"]:
        if cfg["val_size"] >= len(train_ds):
            raise ValueError(f"val_size={cfg['val_size']} leaves no training data: "
                             f"{cfg['dataset']} has {len(train_ds)} training examples")
        train_ds, val_ds = data_mod.train_val_split(train_ds, cfg["val_size"], seed=cfg["seed"])
        if cfg["eval_subset"]:
            val_ds = val_ds.subset(min(cfg["eval_subset"], len(val_ds)), seed=0)
    if cfg["train_subset"]:
        if cfg["train_subset"] > len(train_ds):
            raise ValueError(f"train_subset={cfg['train_subset']} is larger than the "
                             f"{len(train_ds)} training examples left after the validation split")
        train_ds = train_ds.subset(cfg["train_subset"], seed=cfg["seed"])
    for ds in (train_ds, val_ds):
        if ds is not None:
            _check_labels(ds)
    return train_ds.to(device), (val_ds.to(device) if val_ds is not None else None)


def _check_labels(ds) -> None:
    """Labels must be int64 class indices in [0, num_classes): anything else would train on
    garbage (one host sync, at load time)."""
    if ds.y.dtype != torch.int64:
        raise ValueError(f"{ds.name} labels have dtype {ds.y.dtype}; class indices (int64) "
                         f"are needed")
    lo, hi = int(ds.y.min()), int(ds.y.max())
    if lo < 0 or hi >= ds.num_classes:
        raise ValueError(f"{ds.name} ({ds.split}) has labels in [{lo}, {hi}] but "
                         f"{ds.num_classes} classes: labels must lie in [0, {ds.num_classes - 1}]")


def _data_info(cfg: dict[str, Any], train_ds) -> dict[str, Any]:
    """What building a model and its loader need from the data: per-channel ``mean``/``std``
    (for the model's Normalize layer) and ``image_size`` (random crops are for 32x32 data).
    Built-in and registered datasets give their table (``mixlab.data.dataset_info``); the
    statistics missing there, and those of data passed to ``train``, are measured on (up to
    10,000 examples of) the training split."""
    info = ({} if data_mod.is_custom_dataset(cfg["dataset"])
            else data_mod.dataset_info(cfg["dataset"]))
    if info.get("mean") is None or info.get("std") is None:
        x = train_ds.x[:10_000].float().div_(255).transpose(0, 1).reshape(train_ds.x.shape[1], -1)
        info["mean"] = tuple(x.mean(1).tolist())
        info["std"] = tuple(x.std(1).clamp_min(1e-3).tolist())  # constant images: no 1/0
    height, width = train_ds.x.shape[-2:]
    info["image_size"] = height if height == width else (height, width)
    return info


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); delete the run directory or "
                              f"pass overwrite=True") from err


def _check_run_dir(run_dir: Path) -> None:
    """A run directory is a folder (or does not exist yet): refused before anything is read."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a folder; pass a folder "
                         f"for the run's config, metrics and checkpoints")


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


def train(*, method_hp: dict[str, Any] | None = None, **settings: Any):
    """Train a model with one method; returns ``(model, history)``.

    Keywords are the engine settings (``mixlab.config.SETTINGS``); the method's own
    hyperparameters go in ``method_hp`` (its ``defaults`` table), e.g.
    ``train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")``. The training threat
    model (``eps``, ``step_size``, ``steps``, ``norm``) reaches the method as one
    ``AttackSpec``. ``history`` is a list of per-epoch dicts (train loss/accuracy, validation
    accuracies ``val_clean``/``val_robust``, seconds, images per second). With ``run_dir``
    set, the run directory is written as the module docstring describes.

    Your own model and data: ``model`` may be an ``nn.Module`` mapping (B, C, H, W) pixels in
    [0, 1] to (B, num_classes) logits (recorded as ``"custom:<ClassName>"``; pass the same
    module again to resume); ``dataset`` may be ``(x, y)`` tensors, ``((x, y), (x_test,
    y_test))``, a torch ``Dataset`` of (image, label) pairs or an image-folder path
    ``<path>/{train,test}/<class>/*.png|jpg`` (recorded as ``"custom:<description>"`` or the
    path; ``eps`` must then be given). Names registered with
    ``mixlab.models.register_model`` / ``mixlab.data.register_dataset`` work like built-ins.
    """
    module, data = None, None
    if isinstance(settings.get("model"), torch.nn.Module):
        module = settings["model"]
        settings["model"] = custom_model_name(module)
    if settings.get("dataset") is not None and not isinstance(settings["dataset"], str):
        if not isinstance(settings["dataset"], os.PathLike):
            data = settings["dataset"]
        settings["dataset"] = data_mod.custom_dataset_name(settings["dataset"])
    cfg = resolve_config(method_hp=method_hp, **settings)
    if cfg["run_dir"] is not None:
        _check_run_dir(Path(cfg["run_dir"]))
    if cfg["tensorboard"]:
        _require_tensorboard()
    device = pick_device(cfg["device"])
    use_bf16 = device.type == "cuda" if cfg["bf16"] is None else cfg["bf16"]
    use_cl = device.type == "cuda" if cfg["channels_last"] is None else cfg["channels_last"]
    torch.manual_seed(cfg["seed"])
    if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True

    train_ds, val_ds = (prepare_data(cfg, device) if data is None
                        else prepare_data(cfg, device, data))
    info = _data_info(cfg, train_ds)
    in_channels = train_ds.x.shape[1]
    if module is not None:
        model = CustomModel(module, num_classes=train_ds.num_classes,
                            in_channels=in_channels).to(device)
    else:
        model = build_model(cfg["model"], train_ds.num_classes, in_channels,
                            mean=info.get("mean"), std=info.get("std")).to(device)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    method = get_method(cfg["method"])(num_train=len(train_ds), num_classes=train_ds.num_classes,
                                       epochs=cfg["epochs"], attack=attack_spec(cfg),
                                       **cfg["method_hp"])
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"],
                                     weight_decay=cfg["weight_decay"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    loader = data_mod.DeviceLoader(train_ds, cfg["batch_size"], shuffle=True,
                                   augment=cfg["augment"] and info["image_size"] == 32,
                                   drop_last=True, generator=generator, channels_last=use_cl)
    if len(loader) == 0:
        raise ValueError(f"batch_size={cfg['batch_size']} is larger than the training set "
                         f"({len(train_ds)} examples)")
    # short/paper on a CPU: refused with the estimated time, before anything is written
    check_cpu_profile(cfg, device, train_size=len(train_ds))
    if module is not None or cfg["model"] in registered_models():  # not a built-in: check it
        check_model_output(model, train_ds.x[:cfg["batch_size"]].float() / 255,
                           train_ds.num_classes, name=f"model {cfg['model']!r}")
    if cfg["run_dir"] is None:
        return _fit(cfg, device, model, optimizer, method, loader, generator, train_ds, val_ds,
                    use_bf16, run_dir=None, ckpt=None)
    run_dir = Path(cfg["run_dir"])
    with RunLock(run_dir):
        _remove_stale_temp_files(run_dir)
        ckpt = _prepare_run_dir(run_dir, cfg)
        if ckpt is not None:
            check_compatible(ckpt, arch=cfg["model"], num_classes=train_ds.num_classes,
                             in_channels=in_channels, where=str(run_dir / "last.pt"))
            _sync_run_files(run_dir, ckpt, method.best_metric)
        last_epoch = cfg["epochs"] if cfg["stop_after"] is None else cfg["stop_after"]
        if ckpt is None or ckpt["epoch"] + 1 < last_epoch:  # a finished run keeps its records
            atomic_write_json(run_dir / "config.json", cfg)
            atomic_write_json(run_dir / "provenance.json", provenance(cfg, device, train_ds))
        return _fit(cfg, device, model, optimizer, method, loader, generator, train_ds, val_ds,
                    use_bf16, run_dir=run_dir, ckpt=ckpt)


def _fit(cfg, device, model, optimizer, method, loader, generator, train_ds, val_ds, use_bf16,
         *, run_dir: Path | None, ckpt: dict[str, Any] | None):
    """The epochs of ``train`` (settings checked, run directory prepared and locked)."""
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if ckpt is not None:
        _base_model(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        method.load_state_dict(ckpt["method"])
        _set_rng_state(ckpt["rng"])
        generator.set_state(ckpt["generator"])
        start_epoch, step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]
    if run_dir:
        (run_dir / "method").mkdir(parents=True, exist_ok=True)
    total_steps = cfg["epochs"] * len(loader)
    fwd_model = torch.compile(model) if cfg["compile"] else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                else torch.autocast(device.type, enabled=False))
    metric = method.best_metric
    best_score = max((h[metric] for h in history if h.get(metric) is not None), default=-math.inf)
    last_epoch = cfg["epochs"] if cfg["stop_after"] is None else cfg["stop_after"]
    bar = _progress(cfg, total=last_epoch * len(loader), initial=start_epoch * len(loader))
    board = _tensorboard_writer(run_dir, cfg)
    shown: dict[str, Any] = {}  # the bar's postfix: the epoch, then the last epoch's numbers
    state = dict(model=model, optimizer=optimizer, method=method, cfg=cfg, generator=generator)

    for epoch in range(start_epoch, last_epoch):
        model.train()
        if bar is not None:
            shown["epoch"] = f"{epoch + 1}/{cfg['epochs']}"
            bar.set_postfix(shown, refresh=False)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, scored = 0, 0
        snapshot = checkpoint_state(epoch=epoch - 1, step=step, history=list(history), **state)
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = cfg["lr"] * lr_at(cfg, step / total_steps)
            with autocast:
                loss, logits = method.loss(fwd_model, batch.x, batch.y, batch.idx, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)  # a step count only: no host sync
            loss_sum += loss.detach().float() * len(batch.y)
            seen += len(batch.y)
            if logits is not None:
                correct += (logits.detach().argmax(1) == batch.y).sum()
                scored += len(batch.y)
            if step % cfg["check_every"] == 0:
                if not torch.isfinite(loss_sum):
                    _stop_nonfinite(run_dir, snapshot, cfg, epoch, step)
                snapshot = checkpoint_state(epoch=epoch - 1, step=step, history=list(history),
                                            **state)
        bad = nonfinite_entries(_base_model(model).state_dict())
        if not torch.isfinite(loss_sum) or bad:
            _stop_nonfinite(run_dir, snapshot, cfg, epoch, step, bad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = dict(
            epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"],
            train_loss=loss_sum.item() / seen,
            train_acc=(correct.item() / scored) if scored else None,
            seconds=seconds, img_per_s=seen / seconds)
        if val_ds is not None and ((epoch + 1) % cfg["eval_every"] == 0
                                   or epoch + 1 == cfg["epochs"]):
            x_val = val_ds.x.float() / 255
            record.update(quick_eval(model, x_val, val_ds.y, cfg))
            extra = method.evaluate_extra(model, x_val, val_ds.y)
            record.update({f"val_{k}": v for k, v in extra.items()})
        arrays = method.epoch_end(epoch)
        history.append(record)
        if run_dir:
            # order matters for a kill at any instant: arrays, then last.pt (the commit point),
            # then best.pt and metrics.jsonl, which a resume rebuilds from last.pt
            if arrays:
                atomic_savez(run_dir / "method" / f"epoch_{epoch + 1:03d}.npz", **arrays)
            ckpt_state = checkpoint_state(epoch=epoch, step=step, history=history, **state)
            atomic_torch_save(ckpt_state, run_dir / "last.pt")
            score = record.get(metric)
            if score is not None and score > best_score:
                best_score = score
                atomic_torch_save(ckpt_state, run_dir / "best.pt")
            _write_metrics(run_dir, history)
        if board is not None:
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    board.add_scalar(key, value, epoch + 1)
            board.flush()
        if bar is not None:
            shown.update({k: round(v, 3) for k, v in record.items()
                          if isinstance(v, float) and k != "seconds"})
            bar.set_postfix(shown)
    if bar is not None:
        bar.close()
    if board is not None:
        board.close()
    model.eval()
    return model, history


def _progress(cfg: dict[str, Any], *, total: int, initial: int = 0):
    """One bar over the run's optimiser steps (the epoch in its postfix), or None when
    ``quiet``. A resumed run starts the bar at the steps already done. The loop only counts
    steps into it, so the bar never waits for the device."""
    if cfg["quiet"]:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                desc=f"{cfg['method']} {cfg['model']} {cfg['dataset']}")


def _require_tensorboard() -> None:
    """tensorboard=True needs the tensorboard package: one clear error before any file is
    written."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"tensorboard=True needs the tensorboard package ({err}); install "
                           f"it with `pip install mixlab[tensorboard]` (or pip install "
                           f"tensorboard), or leave tensorboard off") from err


def _tensorboard_writer(run_dir: Path | None, cfg: dict[str, Any]):
    """A SummaryWriter on ``<run_dir>/tensorboard/`` when ``tensorboard`` is on, else None.
    Each completed epoch's record (train_loss, train_acc, val_*, lr, img_per_s, ...) becomes
    scalars at step = epoch; view them with ``tensorboard --logdir <run_dir>/tensorboard``."""
    if not cfg["tensorboard"] or run_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _stop_nonfinite(run_dir, snapshot, cfg, epoch, step, bad_entries=()):
    where = ""
    if run_dir:
        atomic_torch_save(snapshot, run_dir / "nonfinite.pt")
        where = (f"; the last state with a finite loss (after step {snapshot['step']}) is in "
                 f"{run_dir / 'nonfinite.pt'}; last.pt and best.pt keep the last finite epoch")
    what = (f"the weights/buffers {list(bad_entries)[:5]} became NaN/inf" if bad_entries
            else "the training loss became NaN/inf")
    raise NonFiniteLossError(
        f"{what} in epoch {epoch + 1} (by step {step}){where}. Lower the learning rate "
        f"(lr={cfg['lr']}) or check the method's settings")


# ----------------------------------------------------------------------------- runs
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
             num_classes: int | None = None, model: torch.nn.Module | None = None) -> Run:
    """Load a run directory (or a checkpoint file): model, config and history.

    which: "best" (the epoch selected on the validation split) or "last". A run without a
    validation split has no "best" (the test set never selects a model): ask for "last".
    Checkpoints with non-finite weights are refused. num_classes, if given, must match.
    model: for a run trained on a module of your own (``train(model=module)``, recorded as
    ``"custom:<ClassName>"``), a new module of the same class to load the weights into; the
    returned ``Run.model.net`` is that module. A run of a model or dataset registered by name
    (``register_model`` / ``register_dataset``) needs the same registration in this process."""
    if which not in ("best", "last"):
        raise ValueError(f"which={which!r} must be 'best' or 'last'")
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
            metric = get_method(cfg["method"]).best_metric
            if which == "best" and metric == "val_robust" and not cfg.get("eval_steps"):
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
    bad = nonfinite_entries(ckpt["model"])
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
        model.load_state_dict(ckpt["model"])
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
               epoch=ckpt["epoch"] + 1)


def train_or_load(*, run_dir: str | Path, which: str = "best",
                  method_hp: dict[str, Any] | None = None, **settings: Any) -> Run:
    """Train (or finish training) the run in ``run_dir`` unless it is complete; load it.

    Notebooks call this so a second execution reuses finished runs. A directory holding a run
    with other settings is refused with the difference (``overwrite=True`` replaces it)."""
    run_dir = Path(run_dir)
    wanted = resolve_config(run_dir=str(run_dir), method_hp=method_hp, **settings)
    _check_run_dir(run_dir)
    done = False
    if (run_dir / "last.pt").exists() and not wanted["overwrite"]:
        ckpt = load_checkpoint(run_dir / "last.pt")
        diff = config_difference(ckpt["config"], wanted)
        if diff:
            raise CheckpointError(
                f"{run_dir} holds a run with other settings:\n  " + "\n  ".join(diff) +
                "\nPass another run_dir, or overwrite=True to replace that run")
        done = ckpt["epoch"] + 1 >= wanted["epochs"]
    if not done:
        train(run_dir=str(run_dir), method_hp=method_hp, **settings)
    return load_run(run_dir, which=which, device=pick_device(wanted["device"]))
