"""The training engine: one ``train(**settings) -> (model, history)`` for every method.

The loop exists once. A method (``mixlab.methods``) turns a batch into a loss; this file owns
the data on the device, the optimiser and schedule, bf16 autocast and channels_last on CUDA,
evaluation on the validation split during training and the epochs. One optimiser step is
:func:`train_step`, which the benchmark (``mixlab.bench``) times as it is. Settings are
defined, merged and checked in ``mixlab.config``; the run directory (``run_dir``: config,
provenance, checkpoints that make a resumed run equal an uninterrupted one, metrics as JSON
lines, the kill-safe resume rules) is ``mixlab.runs``, which also loads runs back
(``load_run``, ``train_or_load``). Weight averaging (``ema_decay``) keeps an exponential
moving average of the weights beside them (``mixlab.ema``, docs/baselines.md). Under torchrun
the same ``train`` runs on every process, each on its share of every global batch
(``mixlab.distributed``, docs/distributed.md).

>>> model, history = train(dataset="cifar10", method="pgd_at", profile="short", run_dir="runs/at")
>>> model, history = train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")
>>> model, history = train(method="pgd_at", ema_decay=0.999, profile="short", run_dir="runs/ema")
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from . import distributed
from .attacks import pgd, pgd_step_size, predict
from .config import TRAIN_DEFAULTS, attack_spec, resolve_config  # noqa: F401 (re-exported)
from .data import Batch, DeviceLoader, TensorDataset
from .ema import WeightAverage
from .extras import require
from .fileio import RunLock, atomic_write_json
from .methods import Method, get_method
from .models import (CustomModel, build_model, check_model_output, custom_model_name,
                     registered_models)
from .runs import (best_metric, checkpoint_state, check_run_dir, nonfinite_entries,
                   open_run_dir, provenance, save_epoch, save_nonfinite, set_rng_state,
                   unwrap_model)
from .runtime import check_cpu_profile, pick_device


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or weights; the last finite state is ``nonfinite.pt``."""


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


# ----------------------------------------------------------------------------- evaluation
def quick_eval(model, x, y, cfg, batch_size: int = 500, *,
               group: distributed.Group | None = None) -> dict[str, float]:
    """Clean and PGD-``eval_steps`` accuracy on the validation split, fp32 throughout (these
    numbers select the best checkpoint; reported numbers come from ``mixlab.evaluate``). The
    attack's step is :func:`mixlab.attacks.pgd_step_size`, as in ``mixlab.evaluate``.

    The split is taken in chunks of ``batch_size`` images; each chunk's random start comes
    from a generator seeded by (``seed``, chunk start) (``mixlab.distributed.chunk_seed``),
    forked from training's: the numbers do not depend on what ran before, and training's
    random stream does not depend on when it was evaluated. Under torchrun (``group``) each
    process attacks whole chunks and the counts are summed: the same numbers as one process."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.long, device=x.device)   # clean, robust
    for i in distributed.my_chunks(len(x), batch_size, group):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        correct[0] += (predict(model, xb, batch_size) == yb).sum()
        if cfg["eval_steps"]:
            with distributed.seeded(distributed.chunk_seed(cfg["seed"], i), x.device):
                x_adv = pgd(model, xb, yb, eps=cfg["eps"],
                            step_size=pgd_step_size(cfg["eps"], cfg["eval_steps"]),
                            steps=cfg["eval_steps"], norm=cfg["norm"], bf16=False)
            correct[1] += (predict(model, x_adv, batch_size) == yb).sum()
    clean, robust = distributed.all_sum(correct, group).tolist()
    out = {"val_clean": clean / max(1, len(x))}
    if cfg["eval_steps"]:
        out["val_robust"] = robust / max(1, len(x))
    return out


def evaluate_extra(method: Method, model, x, y, cfg, batch_size: int = 500, *,
                   group: distributed.Group | None = None) -> dict[str, float]:
    """``method.evaluate_extra`` on the validation split, chunk by chunk as
    :func:`quick_eval` (each chunk seeded by (``seed``, chunk start), whole chunks per process
    under torchrun); the size-weighted mean of the chunks' values."""
    sums: dict[str, float] = {}
    for i in distributed.my_chunks(len(x), batch_size, group):
        size = len(x[i:i + batch_size])
        with distributed.seeded(distributed.chunk_seed(cfg["seed"], i), x.device):
            extra = method.evaluate_extra(model, x[i:i + batch_size], y[i:i + batch_size])
        for key, value in extra.items():
            sums[key] = sums.get(key, 0.0) + value * size
    return {key: total / max(1, len(x))
            for key, total in distributed.sum_dicts(sums, group).items()}


# ----------------------------------------------------------------------------- data
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


# ----------------------------------------------------------------------------- the step
def train_step(method: Method, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batch: Batch, *, epoch: int, bf16: bool, ema: WeightAverage | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimiser step: the method's loss on ``batch`` (under bf16 autocast when ``bf16``),
    backward, the optimiser's step, then (``ema``) the weight average's update toward the
    weights just stepped. Returns the detached loss and the method's logits (or None). No
    host sync: the caller decides when to read either.

    ``train`` runs it for every batch; ``mixlab.bench`` times exactly this function."""
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, logits = method.loss(model, batch.x, batch.y, batch.idx, epoch=epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if ema is not None:  # after the step: average the weights this step produced
        ema.update(unwrap_model(model))
    return loss.detach(), (logits.detach() if logits is not None else None)


@dataclasses.dataclass
class LoopState:
    """What the epochs of one training share, and how far they got.

    ``model`` is the module trained and saved; ``fwd_model`` what the step calls (the model,
    or ``torch.compile(model)``; under torchrun inside DistributedDataParallel); ``ema`` the
    average of ``model``'s weights (``ema_decay``), or None; ``group`` this process's place
    among torchrun's (None in one process). ``epoch`` is the next epoch to run (0-based),
    ``step`` the optimiser steps taken so far, ``history`` one record per completed epoch."""
    cfg: dict[str, Any]
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Method
    loader: DeviceLoader
    generator: torch.Generator
    val_ds: TensorDataset | None
    bf16: bool
    run_dir: Path | None = None
    fwd_model: torch.nn.Module | None = None
    ema: WeightAverage | None = None
    group: distributed.Group | None = None
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.fwd_model is None:
            fwd = torch.compile(self.model) if self.cfg["compile"] else self.model
            self.fwd_model = distributed.wrap(fwd, self.group)

    def checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The state after ``epoch`` (0-based; -1: before the first) with ``history``: what
        ``last.pt`` and ``best.pt`` hold (:func:`mixlab.runs.checkpoint_state`). On CUDA the
        index of the device whose generator the run draws from goes with the RNG states, so
        a run resumed on another device (another process count) continues its stream."""
        ckpt = checkpoint_state(model=self.model, optimizer=self.optimizer, method=self.method,
                                cfg=self.cfg, epoch=epoch, step=self.step, history=history,
                                generator=self.generator, ema=self.ema)
        if self.device.type == "cuda":
            ckpt["rng"]["cuda_device"] = _cuda_index(self.device)
        return ckpt

    def snapshot(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        """:meth:`checkpoint` with the method's per-example state merged across processes
        first (a collective under torchrun: every process calls it); None on the processes
        that write nothing."""
        distributed.merge_example_state(self.method, self.loader, self.group)
        return self.checkpoint(epoch, history) if distributed.is_main(self.group) else None

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser, method state, RNG states, the weight
        average, and the epoch after the saved one."""
        unwrap_model(self.model).load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("ema") is None:  # the settings match, so only a foreign file lacks it
                raise ValueError("the checkpoint holds no weight average but this run averages "
                                 "(ema_decay); resume it with the settings it was trained with")
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        set_rng_state(ckpt["rng"])
        source = ckpt["rng"].get("cuda_device")   # the device whose stream the run drew from
        if self.device.type == "cuda" and source is not None \
                and source < len(ckpt["rng"]["cuda"]):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][source], self.device)
        self.generator.set_state(ckpt["generator"])
        self.epoch, self.step, self.history = ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]


# ----------------------------------------------------------------------------- train
def train(*, method_hp: dict[str, Any] | None = None, **settings: Any):
    """Train a model with one method; returns ``(model, history)``.

    Keywords are the engine settings (``mixlab.config.SETTINGS``); the method's own
    hyperparameters go in ``method_hp`` (its ``defaults`` table), e.g.
    ``train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")``. The training threat
    model (``eps``, ``step_size``, ``steps``, ``norm``) reaches the method as one
    ``AttackSpec``. ``history`` is a list of per-epoch dicts (train loss/accuracy, validation
    accuracies ``val_clean``/``val_robust``, seconds, images per second). With ``run_dir``
    set, the run directory is written as ``mixlab.runs`` describes.

    Weight averaging (``ema_decay``, e.g. 0.999; ``ema_warmup``): after every optimiser step a
    :class:`mixlab.ema.WeightAverage` moves toward the weights (parameters and BatchNorm
    statistics). Each evaluated epoch validates both models: the raw one as ``val_*``, the
    average as ``ema_val_*`` (``ema_val_clean``, ``ema_val_robust``, the method's extras).
    ``best.pt`` is then chosen by the *average's* score (``ema_`` + the method's
    ``best_metric``), since the average is the model one evaluates and exports; both weights
    are saved in ``best.pt`` and ``last.pt``, so a resumed run continues the average exactly.
    ``train`` returns the raw model; ``load_run(run_dir, weights="ema")`` gives the average.

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
    group = distributed.setup(cfg["device"])   # None without torchrun
    distributed.check_same_settings(cfg, group)
    distributed.check_batch_split(cfg["batch_size"], group)
    if cfg["run_dir"] is not None:
        check_run_dir(Path(cfg["run_dir"]))
    if cfg["tensorboard"]:
        _require_tensorboard()
    device = group.device if group is not None else pick_device(cfg["device"])
    use_bf16 = device.type == "cuda" if cfg["bf16"] is None else cfg["bf16"]
    use_cl = device.type == "cuda" if cfg["channels_last"] is None else cfg["channels_last"]
    torch.manual_seed(cfg["seed"])
    if device.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True

    # under torchrun the training split stays on the CPU until each process keeps its shard
    data_device = device if group is None else torch.device("cpu")
    train_ds, val_ds = (prepare_data(cfg, data_device) if data is None
                        else prepare_data(cfg, data_device, data))
    if val_ds is not None:
        val_ds = val_ds.to(device)
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
    model = distributed.convert_sync_bn(model, group, cfg["sync_bn"])
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
    augment = cfg["augment"] and info["image_size"] == 32
    if group is None:
        loader = DeviceLoader(train_ds, cfg["batch_size"], shuffle=True, augment=augment,
                              drop_last=True, generator=generator, channels_last=use_cl)
    else:   # the same global batches; this process keeps its shard and trains on its slice
        loader = distributed.ShardedLoader(train_ds, cfg["batch_size"], group=group,
                                           shuffle=True, augment=augment, generator=generator,
                                           channels_last=use_cl)
    if len(loader) == 0:
        raise ValueError(f"batch_size={cfg['batch_size']} is larger than the training set "
                         f"({len(train_ds)} examples)")
    # short/paper on a CPU: refused with the estimated time, before anything is written
    check_cpu_profile(cfg, device, train_size=len(train_ds))
    if module is not None or cfg["model"] in registered_models():  # not a built-in: check it
        check_model_output(model, train_ds.x[:cfg["batch_size"]].to(device).float() / 255,
                           train_ds.num_classes, name=f"model {cfg['model']!r}")
    # weight averaging: the average starts at the initial weights (a resume replaces it)
    ema = (WeightAverage(model, cfg["ema_decay"], warmup=cfg["ema_warmup"])
           if cfg["ema_decay"] is not None else None)
    state = LoopState(cfg=cfg, device=device, model=model, optimizer=optimizer, method=method,
                      loader=loader, generator=generator, val_ds=val_ds, bf16=use_bf16,
                      ema=ema, group=group)
    if cfg["run_dir"] is None:
        return _fit(state)
    run_dir = Path(cfg["run_dir"])
    processes = distributed.facts(group) if group is not None else None  # every process
    with contextlib.ExitStack() as held:
        def open_dir():   # rank 0 alone holds the lock and reads and writes the run directory
            held.enter_context(RunLock(run_dir))
            ckpt = open_run_dir(run_dir, cfg, num_classes=train_ds.num_classes,
                                in_channels=in_channels, best_metric=best_metric(cfg))
            last_epoch = cfg["epochs"] if cfg["stop_after"] is None else cfg["stop_after"]
            if ckpt is None or ckpt["epoch"] + 1 < last_epoch:  # a finished run keeps its records
                atomic_write_json(run_dir / "config.json", cfg)
                record = provenance(cfg, device, train_ds)
                if processes is not None:
                    record["distributed"] = processes
                atomic_write_json(run_dir / "provenance.json", record)
            return ckpt

        ckpt = distributed.on_main(open_dir, group)   # the checkpoint reaches every process
        if ckpt is not None:
            state.resume(ckpt)
        state.run_dir = run_dir if distributed.is_main(group) else None
        return _fit(state)


def _fit(state: LoopState):
    """The epochs of ``train`` (settings checked, run directory prepared and locked, a
    checkpoint, if any, loaded into ``state``)."""
    cfg, device, model, optimizer = state.cfg, state.device, state.model, state.optimizer
    method, loader, run_dir, group = state.method, state.loader, state.run_dir, state.group
    processes = 1 if group is None else group.world
    total_steps = cfg["epochs"] * len(loader)
    metric = best_metric(cfg)  # the average's score when weight averaging is on
    best_score = max((h[metric] for h in state.history if h.get(metric) is not None),
                     default=-math.inf)
    last_epoch = cfg["epochs"] if cfg["stop_after"] is None else cfg["stop_after"]
    bar = (_progress(cfg, total=last_epoch * len(loader), initial=state.epoch * len(loader))
           if distributed.is_main(group) else None)
    board = _tensorboard_writer(run_dir, cfg)
    shown: dict[str, Any] = {}  # the bar's postfix: the epoch, then the last epoch's numbers

    for epoch in range(state.epoch, last_epoch):
        model.train()
        state.fwd_model.train()
        if bar is not None:
            shown["epoch"] = f"{epoch + 1}/{cfg['epochs']}"
            bar.set_postfix(shown, refresh=False)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, scored = 0, 0
        snapshot = state.snapshot(epoch - 1, list(state.history))
        for batch in loader:
            for params in optimizer.param_groups:
                params["lr"] = cfg["lr"] * lr_at(cfg, state.step / total_steps)
            # under torchrun: this process's slice of the global batch (mixlab.distributed)
            with distributed.step_context(group, batch_size=cfg["batch_size"],
                                          seed=cfg["seed"], step=state.step):
                loss, logits = train_step(method, state.fwd_model, optimizer, batch,
                                          epoch=epoch, bf16=state.bf16, ema=state.ema)
            state.step += 1
            if bar is not None:
                bar.update(1)  # a step count only: no host sync
            loss_sum += loss.float() * len(batch.y)
            seen += len(batch.y)
            if logits is not None:
                correct += (logits.argmax(1) == batch.y).sum()
                scored += len(batch.y)
            if state.step % cfg["check_every"] == 0:
                if not torch.isfinite(distributed.all_sum(loss_sum, group)):
                    _stop_nonfinite(run_dir, snapshot, cfg, epoch, state.step)
                snapshot = state.snapshot(epoch - 1, list(state.history))
        # every process: the per-example state whole, rank 0's BatchNorm statistics
        distributed.merge_example_state(method, loader, group)
        distributed.broadcast_buffers(model, group)
        if state.ema is not None:
            distributed.broadcast_buffers(state.ema.averaged_model(), group)
        loss_sum = distributed.all_sum(loss_sum, group)   # the global batches' sums
        correct = distributed.all_sum(correct, group)
        bad = nonfinite_entries(unwrap_model(model).state_dict())
        if not torch.isfinite(loss_sum) or bad:
            _stop_nonfinite(run_dir, snapshot, cfg, epoch, state.step, bad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        seen, scored = seen * processes, scored * processes   # the global batches
        record: dict[str, Any] = dict(
            epoch=epoch + 1, step=state.step, lr=optimizer.param_groups[0]["lr"],
            train_loss=loss_sum.item() / seen,
            train_acc=(correct.item() / scored) if scored else None,
            seconds=seconds, img_per_s=seen / seconds)
        if state.val_ds is not None and ((epoch + 1) % cfg["eval_every"] == 0
                                         or epoch + 1 == cfg["epochs"]):
            x_val = state.val_ds.x.float() / 255
            record.update(quick_eval(model, x_val, state.val_ds.y, cfg, group=group))
            extra = evaluate_extra(method, model, x_val, state.val_ds.y, cfg, group=group)
            record.update({f"val_{k}": v for k, v in extra.items()})
            if state.ema is not None:  # the average, validated the same way: ema_val_*
                averaged = state.ema.averaged_model()
                scores = quick_eval(averaged, x_val, state.val_ds.y, cfg, group=group)
                record.update({f"ema_{k}": v for k, v in scores.items()})
                extra = evaluate_extra(method, averaged, x_val, state.val_ds.y, cfg, group=group)
                record.update({f"ema_val_{k}": v for k, v in extra.items()})
        arrays = method.epoch_end(epoch)
        state.history.append(record)
        state.epoch = epoch + 1
        if run_dir:
            score = record.get(metric)
            best = score is not None and score > best_score
            if best:
                best_score = score
            save_epoch(run_dir, state.checkpoint(epoch, state.history), arrays=arrays, best=best)
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
    distributed.barrier(group)   # under torchrun: return once rank 0 has written the run
    model.eval()
    return model, state.history


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


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
    require("tensorboard", feature="train(tensorboard=True)")
    require("torch.utils.tensorboard", feature="train(tensorboard=True)")


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
        path = save_nonfinite(run_dir, snapshot)
        where = (f"; the last state with a finite loss (after step {snapshot['step']}) is in "
                 f"{path}; last.pt and best.pt keep the last finite epoch")
    what = (f"the weights/buffers {list(bad_entries)[:5]} became NaN/inf" if bad_entries
            else "the training loss became NaN/inf")
    raise NonFiniteLossError(
        f"{what} in epoch {epoch + 1} (by step {step}){where}. Lower the learning rate "
        f"(lr={cfg['lr']}) or check the method's settings")
