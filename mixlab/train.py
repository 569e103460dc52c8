"""The training engine: one ``train(**config) -> (model, history)`` for every method.

The loop exists once. A method (``mixlab.methods``) turns a batch into a loss; this file owns
the data on the device, the optimiser and schedule, bf16 autocast and channels_last on CUDA,
evaluation during training, checkpoints (last and best, with optimiser, method state and RNG
states, so a resumed run equals an uninterrupted one), metrics as JSON lines and a provenance
record. Settings resolve in this order, later wins:

    TRAIN_DEFAULTS < PROFILES[profile] < method.profiles[profile] < keyword arguments

>>> model, history = train(dataset="cifar10", method="pgd_at", profile="short", run_dir="runs/at")
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from .attacks import check_eps, pgd
from .methods import get_method
from .models import build_model

TRAIN_DEFAULTS: dict[str, Any] = dict(
    dataset="cifar10",        # cifar10 | cifar100 | svhn | mnist | synthetic
    model="preactresnet18",   # any name mixlab.models.build_model knows
    method="pgd_at",          # any name in mixlab.methods.METHODS
    epochs=30,                # passes over the training set
    batch_size=128,           # examples per step
    optimizer="sgd",          # sgd | adam
    lr=0.1,                   # peak learning rate
    momentum=0.9,             # SGD momentum
    nesterov=False,           # SGD Nesterov momentum
    weight_decay=5e-4,        # L2 penalty on all weights
    schedule="piecewise",     # piecewise | onecycle | cosine | constant (per step)
    milestones=(0.5, 0.75),   # piecewise: fractions of training where lr drops ...
    lr_factors=(0.1, 0.01),   # ... to these multiples of the peak lr
    warmup=0.0,               # onecycle: fraction of training spent rising to the peak
    augment=True,             # random crop (4-pixel zero padding) + horizontal flip, on device
    train_subset=None,        # use only this many training examples (seeded), None: all
    val_size=0,               # hold out this many training examples as the evaluation split
    test_subset=1000,         # evaluate during training on this many test examples
    eval_every=1,             # evaluate every n epochs (and always after the last one)
    eval_steps=10,            # PGD steps of the in-training robust evaluation (0: clean only)
    norm="Linf",              # threat model of attacks in training and evaluation
    eps=None,                 # radius, pixel units; None: the dataset's standard (8/255 CIFAR)
    alpha=None,               # PGD step, pixel units; None: eps / 4
    steps=None,               # PGD steps in training; None: the method's default
    seed=0,                   # seeds the model init, the data order and the attacks
    device="auto",            # auto | cpu | cuda | cuda:N
    bf16=None,                # bf16 autocast; None: on for CUDA, off for CPU
    channels_last=None,       # channels_last memory format; None: on for CUDA
    compile=False,            # torch.compile the model
    data_root=None,           # dataset root; None: mixlab.data.data_root()
    download=False,           # let torchvision download a missing dataset
    run_dir=None,             # where config, metrics, checkpoints go; None: nothing saved
    resume=True,              # continue from run_dir/last.pt when it exists
    stop_after=None,          # stop (checkpointed) after this many epochs in total, to split a
                              # long run across calls; the schedule still spans all epochs
    check_every=50,           # check the loss is finite every n steps (one host sync each)
    quiet=False,              # no progress bar
    profile=None,             # smoke | short | paper (see PROFILES)
)

PROFILES: dict[str, dict[str, Any]] = {
    # CPU, seconds to a minute: a tiny CNN on a data subset, a few PGD steps
    "smoke": dict(model="tiny", epochs=2, batch_size=64, train_subset=1024, test_subset=256,
                  steps=3, eval_steps=5, schedule="onecycle", warmup=0.3, lr=0.05,
                  device="cpu"),
    # GPU, minutes: PreActResNet-18, one-cycle schedule (the fast-AT recipe)
    "short": dict(model="preactresnet18", epochs=15, batch_size=512, schedule="onecycle",
                  warmup=0.4, lr=0.2, weight_decay=5e-4, test_subset=1000),
    # the papers' schedules (methods refine this in their own `profiles`)
    "paper": dict(model="preactresnet18", epochs=110, batch_size=128, lr=0.1,
                  schedule="piecewise", milestones=(100 / 110, 105 / 110),
                  lr_factors=(0.1, 0.01), weight_decay=5e-4, test_subset=None),
}

ENGINE_KEYS = set(TRAIN_DEFAULTS)
#: settings that say how a run is executed, not what it computes
RUN_ONLY_KEYS = {"run_dir", "resume", "stop_after", "quiet", "device", "data_root",
                 "download", "check_every", "compile"}
ATTACK_KEYS = ("eps", "alpha", "steps", "norm")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the state before it is saved as ``nonfinite.pt``."""


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the requested model, data or method."""


# ----------------------------------------------------------------------------- config
def resolve_config(**overrides: Any) -> dict[str, Any]:
    """Merge defaults, the profile, the method's profile and the caller's keywords; fill in
    the dataset's threat model; validate. Returns a plain JSON-able dict."""
    profile = overrides.get("profile")
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    method_name = overrides.get("method", TRAIN_DEFAULTS["method"])
    method_cls = get_method(method_name)
    cfg = dict(TRAIN_DEFAULTS)
    if profile:
        cfg.update(PROFILES[profile])
        cfg.update(method_cls.profiles.get(profile, {}))
    cfg.update(overrides)
    cfg["method"] = method_name
    if cfg["dataset"] not in data_mod.DATASETS:
        raise ValueError(f"unknown dataset {cfg['dataset']!r}; choose one of {data_mod.DATASETS}")
    info = data_mod.dataset_info(cfg["dataset"])
    if cfg["eps"] is None:
        cfg["eps"] = info["eps"][cfg["norm"]]
    check_eps(cfg["eps"], cfg["norm"])
    if cfg["alpha"] is None:
        cfg["alpha"] = cfg["eps"] / 4
    # method hyperparameters: anything that is not an engine key; the attack settings are
    # shared with methods that take them
    method_hp = {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}
    for key in ATTACK_KEYS:
        if key in method_cls.defaults and cfg.get(key) is not None:
            method_hp[key] = cfg[key]
    unknown = set(method_hp) - set(method_cls.defaults)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {sorted(unknown)} for method {method_name!r}; engine settings "
            f"are {sorted(ENGINE_KEYS)}, the method's are {sorted(method_cls.defaults)}")
    cfg = {k: v for k, v in cfg.items() if k in ENGINE_KEYS}
    cfg["method_hp"] = {**method_cls.defaults, **method_hp}
    cfg["milestones"], cfg["lr_factors"] = list(cfg["milestones"]), list(cfg["lr_factors"])
    if cfg["stop_after"] is not None and cfg["stop_after"] < 1:
        raise ValueError("stop_after must be >= 1 epoch")
    return cfg


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when present, else CPU; asking for CUDA without one is an error."""
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


def save_checkpoint(path: Path, *, model, optimizer, method, cfg, epoch, step, history,
                    generator) -> None:
    """Everything needed to continue exactly: weights, optimiser, method state, RNG states."""
    base = _base_model(model)
    torch.save(dict(
        model=base.state_dict(), arch=base.arch, num_classes=base.num_classes,
        in_channels=base.in_channels, optimizer=optimizer.state_dict(),
        method=method.state_dict(), config=cfg, epoch=epoch, step=step, history=history,
        rng=_rng_state(), generator=generator.get_state()), path)


def load_checkpoint(path: str | Path, *, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint, with one clear error for a missing or unreadable file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one with `python -m mixlab "
                              f"train --run-dir <dir>` or pass the run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a corrupt file
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.__class__.__name__}: "
                              f"{err}); it is corrupt or not a mixlab checkpoint: retrain it") from err
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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _accuracy(model, x, y, batch_size: int) -> float:
    correct = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum()
    return correct.item() / max(1, len(x))


def quick_eval(model, x, y, cfg, batch_size: int = 500) -> dict[str, float]:
    """Clean and PGD-``eval_steps`` accuracy on the evaluation split (fp32 forward for the
    final predictions, bf16 inside the attack on CUDA)."""
    model.eval()
    out = {"test_clean": _accuracy(model, x, y, batch_size)}
    if cfg["eval_steps"]:
        x_adv = torch.cat([
            pgd(model, x[i:i + batch_size], y[i:i + batch_size], eps=cfg["eps"],
                alpha=max(cfg["alpha"], 2.5 * cfg["eps"] / cfg["eval_steps"]),
                steps=cfg["eval_steps"], norm=cfg["norm"])
            for i in range(0, len(x), batch_size)])
        out["test_robust"] = _accuracy(model, x_adv, y, batch_size)
    return out


# ----------------------------------------------------------------------------- the loop
def prepare_data(cfg: dict[str, Any], device: torch.device):
    """(train split, evaluation split) as TensorDatasets on ``device``."""
    train_ds = data_mod.load_dataset(cfg["dataset"], "train", root=cfg["data_root"],
                                     download=cfg["download"])
    if cfg["val_size"]:
        train_ds, eval_ds = data_mod.train_val_split(train_ds, cfg["val_size"], seed=cfg["seed"])
    else:
        eval_ds = data_mod.load_dataset(cfg["dataset"], "test", root=cfg["data_root"],
                                        download=cfg["download"])
    if cfg["train_subset"]:
        train_ds = train_ds.subset(cfg["train_subset"], seed=cfg["seed"])
    if cfg["test_subset"]:
        eval_ds = eval_ds.subset(cfg["test_subset"], seed=0)
    return train_ds.to(device), eval_ds.to(device)


def train(**config: Any):
    """Train a model with one method; returns ``(model, history)``.

    Keywords are the settings in ``TRAIN_DEFAULTS`` plus the method's hyperparameters (its
    ``defaults`` table), e.g. ``train(method="mixup", alpha=0.2, profile="smoke")``.
    ``history`` is a list of per-epoch dicts (train loss/accuracy, evaluation accuracies,
    seconds, images per second). With ``run_dir`` set, the run directory holds
    ``config.json``, ``provenance.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt`` and
    ``method/epoch_XXX.npz``, and an existing ``last.pt`` is resumed (``resume=True``).
    """
    cfg = resolve_config(**config)
    device = pick_device(cfg["device"])
    use_bf16 = device.type == "cuda" if cfg["bf16"] is None else cfg["bf16"]
    use_cl = device.type == "cuda" if cfg["channels_last"] is None else cfg["channels_last"]
    torch.manual_seed(cfg["seed"])
    if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True

    train_ds, eval_ds = prepare_data(cfg, device)
    info = data_mod.dataset_info(cfg["dataset"])
    in_channels = train_ds.x.shape[1]
    model = build_model(cfg["model"], train_ds.num_classes, in_channels,
                        mean=info.get("mean"), std=info.get("std")).to(device)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    method = get_method(cfg["method"])(num_train=len(train_ds), num_classes=train_ds.num_classes,
                                       epochs=cfg["epochs"], **cfg["method_hp"])
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    elif cfg["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"],
                                     weight_decay=cfg["weight_decay"])
    else:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; choose sgd or adam")

    generator = torch.Generator().manual_seed(cfg["seed"])
    loader = data_mod.DeviceLoader(train_ds, cfg["batch_size"], shuffle=True,
                                   augment=cfg["augment"] and info["image_size"] == 32,
                                   drop_last=True, generator=generator, channels_last=use_cl)
    if len(loader) == 0:
        raise ValueError(f"batch_size={cfg['batch_size']} is larger than the training set "
                         f"({len(train_ds)} examples)")
    total_steps = cfg["epochs"] * len(loader)

    run_dir = Path(cfg["run_dir"]) if cfg["run_dir"] else None
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if run_dir:
        (run_dir / "method").mkdir(parents=True, exist_ok=True)
        if cfg["resume"] and (run_dir / "last.pt").exists():
            ckpt = load_checkpoint(run_dir / "last.pt")
            check_compatible(ckpt, arch=cfg["model"], num_classes=train_ds.num_classes,
                             in_channels=in_channels, where=str(run_dir / "last.pt"))
            _base_model(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            method.load_state_dict(ckpt["method"])
            _set_rng_state(ckpt["rng"])
            generator.set_state(ckpt["generator"])
            start_epoch, step, history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]
        else:
            for stale in ("metrics.jsonl",):
                (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        (run_dir / "provenance.json").write_text(
            json.dumps(provenance(cfg, device, train_ds), indent=2))

    fwd_model = torch.compile(model) if cfg["compile"] else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                else torch.autocast(device.type, enabled=False))
    best_score = max((h.get(method.best_metric, -1.0) for h in history), default=-1.0)
    last_epoch = cfg["epochs"] if cfg["stop_after"] is None else min(cfg["epochs"],
                                                                     cfg["stop_after"])
    progress = _progress(range(start_epoch, last_epoch), cfg)

    for epoch in progress:
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, scored = 0, 0
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = cfg["lr"] * lr_at(cfg, step / total_steps)
            with autocast:
                loss, logits = method.loss(fwd_model, batch.x, batch.y, batch.idx, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach().float() * len(batch.y)
            seen += len(batch.y)
            if logits is not None:
                correct += (logits.detach().argmax(1) == batch.y).sum()
                scored += len(batch.y)
            if step % cfg["check_every"] == 0 and not torch.isfinite(loss_sum):
                _stop_nonfinite(run_dir, model, optimizer, method, cfg, epoch, step, history,
                                generator)
        if not torch.isfinite(loss_sum):
            _stop_nonfinite(run_dir, model, optimizer, method, cfg, epoch, step, history,
                            generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = dict(
            epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"],
            train_loss=loss_sum.item() / seen,
            train_acc=(correct.item() / scored) if scored else None,
            seconds=seconds, img_per_s=seen / seconds)
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]:
            record.update(quick_eval(model, eval_ds.x.float() / 255, eval_ds.y, cfg))
            record.update(method.evaluate_extra(model, eval_ds.x.float() / 255, eval_ds.y))
        arrays = method.epoch_end(epoch)
        history.append(record)
        if run_dir:
            if arrays:
                np.savez_compressed(run_dir / "method" / f"epoch_{epoch + 1:03d}.npz", **arrays)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(run_dir / "last.pt", model=model, optimizer=optimizer,
                            method=method, cfg=cfg, epoch=epoch, step=step, history=history,
                            generator=generator)
            score = record.get(method.best_metric)
            if score is not None and score > best_score:
                best_score = score
                save_checkpoint(run_dir / "best.pt", model=model, optimizer=optimizer,
                                method=method, cfg=cfg, epoch=epoch, step=step,
                                history=history, generator=generator)
        if hasattr(progress, "set_postfix"):
            progress.set_postfix({k: round(v, 3) for k, v in record.items()
                                  if isinstance(v, float)})
    model.eval()
    return model, history


def _progress(epochs: range, cfg: dict[str, Any]):
    if cfg["quiet"]:
        return epochs
    from tqdm.auto import tqdm
    return tqdm(epochs, desc=f"{cfg['method']} {cfg['model']} {cfg['dataset']}", unit="epoch")


def _stop_nonfinite(run_dir, model, optimizer, method, cfg, epoch, step, history, generator):
    where = ""
    if run_dir:
        save_checkpoint(run_dir / "nonfinite.pt", model=model, optimizer=optimizer,
                        method=method, cfg=cfg, epoch=epoch, step=step, history=history,
                        generator=generator)
        where = f"; the state is saved in {run_dir / 'nonfinite.pt'}"
    raise NonFiniteLossError(
        f"the training loss became NaN/inf in epoch {epoch + 1} (step {step}){where}. "
        f"Lower the learning rate (lr={cfg['lr']}) or check the method's settings")


# ----------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    """A saved run: the model (eval mode, on ``device``), its config and history."""
    model: torch.nn.Module
    config: dict[str, Any]
    history: list[dict[str, Any]]
    path: Path
    method_state: dict[str, Any]

    def method_arrays(self) -> list[dict[str, np.ndarray]]:
        """The per-epoch arrays the method logged (e.g. GAIRAT's kappa), oldest first."""
        files = sorted((self.path / "method").glob("epoch_*.npz"))
        return [dict(np.load(f)) for f in files]


def load_run(path: str | Path, *, which: str = "best", device: str | torch.device = "cpu",
             num_classes: int | None = None) -> Run:
    """Load a run directory (or a checkpoint file): model, config and history.

    which: "best" or "last" checkpoint. num_classes, if given, must match the checkpoint
    (a clear error otherwise)."""
    path = Path(path)
    ckpt_path = path if path.is_file() else path / f"{which}.pt"
    if path.is_dir() and not ckpt_path.exists():
        ckpt_path = path / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    if num_classes is not None and num_classes != ckpt["num_classes"]:
        raise CheckpointError(f"{ckpt_path} was trained for {ckpt['num_classes']} classes, "
                              f"not {num_classes}")
    info = data_mod.dataset_info(cfg["dataset"])
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"],
                        mean=info.get("mean"), std=info.get("std"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_path} does not fit a {ckpt['arch']} model: {err}") from err
    model.to(device).eval()
    run_dir = ckpt_path.parent
    history = ckpt["history"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return Run(model=model, config=cfg, history=history, path=run_dir,
               method_state=ckpt.get("method", {}))


def train_or_load(*, run_dir: str | Path, **config: Any) -> Run:
    """Train (or finish training) the run in ``run_dir`` unless it is complete; load it.

    Notebooks call this so a second execution reuses finished runs."""
    run_dir = Path(run_dir)
    done = False
    if (run_dir / "last.pt").exists():
        ckpt = load_checkpoint(run_dir / "last.pt")
        wanted = resolve_config(run_dir=str(run_dir), **config)
        changed = sorted(k for k in wanted if k not in RUN_ONLY_KEYS
                         and wanted[k] != ckpt["config"].get(k))
        if changed:
            raise CheckpointError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); pass "
                f"another run_dir or delete {run_dir} to retrain")
        done = ckpt["epoch"] + 1 >= wanted["epochs"]
    if not done:
        train(run_dir=str(run_dir), **config)
    return load_run(run_dir, device=pick_device(config.get("device", "auto")))
