"""``python -m mixlab.bench``: how fast each training method runs, against a ceiling and a
reference.

One run, one device, one table. Each row trains for a few steps and reports training throughput in
images per second, where one image is one training example *including its attack* (a PGD-10 step
on a batch of 512 counts 512 images, not 5,632 forward passes). Warm-up steps are excluded and the
device is synchronised before and after the timed window (``torch.cuda.synchronize``), so the
figure is wall-clock time of real work, not of queued kernels.

Rows:

* ``ceiling``: ``erm``'s step (forward, cross-entropy, backward, SGD) on one fixed on-device
  batch, with the same arch, batch, precision and memory format as the methods: the speed of
  light for one pass.
* ``reference``: PGD-10 adversarial training the way research code does it (the official GAIRAT
  code, Zhang et al. 2021, arXiv 2010.01736; ``mixlab.bench_reference``): a torchvision
  ``DataLoader`` with CPU transforms over PIL images, fp32, no channels_last, no compile, and a
  per-example Python loop counting kappa on the host. The anchor users come from.
* every method in ``mixlab.methods.METHODS`` (``erm``, ``mixup``, ``pgd_at``, and whatever else is
  registered when the bench runs), with its own defaults and the PGD-10 inner loop, through the
  engine's own step, ``mixlab.train.train_step`` (the method's loss under bf16 autocast, backward,
  SGD), channels_last and a ``DeviceLoader`` over a device-resident dataset.
* ``data_path``: ``pgd_at`` on one fixed on-device batch against ``pgd_at`` through the real
  ``DeviceLoader``; the difference is what the data path costs.

Then ratios from the same run (method / ceiling, pgd_at / reference, method / pgd_at; see
``mixlab.bench_report``), evaluation throughput (PGD-20 and AutoAttack through
``mixlab.evaluate.evaluate``) and peak GPU memory per row.

Scaling (``--nproc N``): every method row runs again through torch's elastic launcher (what
torchrun runs), once on one process and once on N, one device each, with ``batch_size``
examples per device (global batch N·batch_size) and the engine's multi-process step
(``mixlab.distributed``); the result's ``scaling`` gives images per second in all and per
device, and the scaling efficiency, (N-process img/s) / (N × one-process img/s), wall-clock. The bench prints measurements and
ratios only; the speeds mixlab is built to reach on a GPU are in docs/benchmark.md. The JSON goes
to ``results/bench-<device>-<date>.json`` with the settings, versions, device and git commit.

On a CPU the absolute speeds are not claims (speed figures come from a GPU run only), but the
ratios are meaningful; the output says "CPU" wherever it could be mistaken for a GPU result.

>>> python -m mixlab.bench                                    # GPU: PreActResNet-18, every method
>>> python -m mixlab.bench --arch wrn-32-10 --compile
>>> python -m mixlab.bench --quick                            # CPU, tiny sizes, < 60 s
>>> python -m mixlab.bench --methods pgd_at,gairat --profiler-rows gairat   # top ops of gairat's steps
>>> python -m mixlab.bench --methods pgd_at --nproc 8         # scaling over 8 GPUs
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import itertools
import os
import platform
import re
import socket
import sys
import time
import traceback
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import data as data_mod
from . import distributed
from .attacks import predict
from .bench_reference import reference_loader, reference_step
from .bench_report import format_bench_table, jsonable, ratios, write_result
from .config import TRAIN_DEFAULTS, attack_spec, resolve_config
from .evaluate import evaluate
from .methods import METHODS, Method, get_method
from .models import build_model
from .runs import load_run, provenance
from .runtime import pick_device
from .train import train_step

#: batch per arch on a GPU: large enough to fill an H100
GPU_BATCH = {"preactresnet18": 512, "wrn-28-4": 512, "wrn-32-10": 256}
#: rows that are not methods; every registered method is a row too
SPECIAL_ROWS = ("ceiling", "reference", "data_path")

BENCH_DEFAULTS: dict[str, Any] = dict(
    arch="preactresnet18",  # build_model name (GPU reference speeds: preactresnet18, wrn-32-10)
    methods=None,           # rows to run, e.g. ["ceiling", "pgd_at"]; None: every row, and eval
    dataset="auto",         # auto (real CIFAR-10 if present, else synthetic) | cifar10 | synthetic
    train_n=None,           # training examples on the device; None: the whole split (synthetic:
                            # 50,000, CIFAR-10's size)
    batch_size=None,        # examples per step; None: GPU_BATCH[arch] on a GPU, 32 on a CPU
    ref_batch_size=None,    # the reference's batch; None: 128 (research code's) on a GPU,
                            # batch_size on a CPU
    warmup=None,            # untimed steps per row (compile, cudnn autotune, allocator);
                            # None: 5 on a GPU, 1 on a CPU
    steps=None,             # timed steps per window; None: 30 on a GPU, 3 on a CPU
    repeats=1,              # timed windows per row, back to back; the fastest is reported (as
                            # timeit does: slower windows are other processes' noise, not ours)
    clock=None,             # wall | process: what a window's seconds are; None: wall on a GPU,
                            # process (this process's CPU time) on a CPU, so that other jobs on
                            # a shared machine stay out of the figure
    threads=None,           # torch CPU threads during the run; None: 1 on a CPU (with process
                            # time it counts exactly the work; several threads on a busy
                            # machine spin and waste 10x), torch's own setting on a GPU
    pgd_steps=10,           # inner PGD steps of every adversarial row (the methods' attack.steps)
    epochs=100,             # `epochs` the methods are built with; steps run in the last epoch,
                            # where every schedule (GAIRAT's reweighting, FAT's tau) is on
    lr=0.01,                # SGD learning rate: small so a short run never diverges (speed
                            # does not depend on it)
    bf16=None,              # bf16 autocast, mixlab rows; None: on for CUDA, off for CPU (as train)
    channels_last=None,     # channels_last, mixlab rows; None: on for CUDA, off for CPU (as train)
    compile=False,          # torch.compile the model of the mixlab rows (never the reference)
    ref_workers=None,       # the reference's DataLoader workers; None: 2 (as GAIRAT's code) on a
                            # GPU, 0 on a CPU
    eval_n=None,            # test images for PGD-20 throughput; None: 1000 GPU, 64 CPU
    aa_n=None,              # test images for AutoAttack standard; 0 skips; None: 1000 GPU, 8 CPU
    eval_batch_size=None,   # batch of the evaluation attacks; None: 500 GPU, 64 CPU
    checkpoint=None,        # a trained run (dir or .pt) to evaluate; None: the untrained model
    profiler_rows=(),       # rows whose steps run under torch.profiler (top ops printed)
    profiler_steps=3,       # steps under the profiler, after the timed windows
    device="auto",          # auto | cpu | cuda | cuda:N
    seed=0,                 # seeds data, models and attacks
    quick=False,            # tiny sizes (QUICK): runs on a CPU in well under a minute
    nproc=None,             # processes of the scaling rows (one device each; see the module
                            # docstring); None: no scaling rows
)

#: --quick: a tiny model and a few small steps, for the test suite and CPU smoke runs. AutoAttack
#: is skipped: its cost depends on how many images survive APGD-CE, and on a CPU one survivor
#: costs about a minute (~7,000 forward passes); ``--quick --aa-n 4`` runs it anyway.
QUICK: dict[str, Any] = dict(arch="tiny", train_n=512, batch_size=32, ref_batch_size=32, warmup=1,
                             steps=2, repeats=2, eval_n=64, aa_n=0, eval_batch_size=64,
                             ref_workers=0)

#: a window's seconds: wall-clock, or the CPU time of this process (all its threads; not that
#: of DataLoader worker processes, so the CPU default is 0 workers)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}

#: how to read the numbers; written into every result file
NOTES = [
    "img_per_s: training examples per second including their attack (one PGD-10 step on a "
    "batch of B counts B images), fastest timed window, warm-up excluded, device synchronised",
    "method rows run the last epoch (epoch = epochs - 1) so every schedule is switched on",
    "passes: the model's passes per step (PassCounter: train / attack / probe forwards, "
    "backwards) and forward_equivalents = 3 train + 2 attack + 1 probe; "
    "ratios.predicted_vs_pgd_at is what that count alone predicts for vs_pgd_at",
    "ceiling and data_path's synthetic side use one fixed on-device batch; methods go through "
    "the DeviceLoader with random crop + flip on the device",
    "peak_mem_mib: torch.cuda.max_memory_allocated during the row, including the resident "
    "dataset and model; null on a CPU",
    "eval without --checkpoint attacks the untrained model with its own predictions as labels: "
    "AutoAttack's figure is then optimistic (few images survive to its costlier attacks)",
    "on a CPU only the ratios mean something; speed claims come from a GPU run; with "
    "clock = process, a window's seconds are this process's CPU time (other jobs on a shared "
    "machine stay out; evaluation figures are wall-clock, timed by mixlab.evaluate)",
]


# ----------------------------------------------------------------------------- settings
def resolve_settings(**overrides: Any) -> dict[str, Any]:
    """BENCH_DEFAULTS < QUICK (if quick) < keywords; then the device-dependent defaults."""
    unknown = set(overrides) - set(BENCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown bench setting(s) {sorted(unknown)}; "
                         f"known: {sorted(BENCH_DEFAULTS)}")
    cfg = dict(BENCH_DEFAULTS)
    if overrides.get("quick"):
        cfg.update(QUICK)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    gpu = pick_device(cfg["device"]).type == "cuda"
    fill = dict(batch_size=GPU_BATCH.get(cfg["arch"], 256) if gpu else 32,
                warmup=5 if gpu else 1, steps=30 if gpu else 3,
                ref_workers=2 if gpu else 0, eval_n=1000 if gpu else 64,
                aa_n=1000 if gpu else 8, eval_batch_size=500 if gpu else 64,
                bf16=gpu, channels_last=gpu, clock="wall" if gpu else "process",
                threads=torch.get_num_threads() if gpu else 1)
    for key, value in fill.items():
        if cfg[key] is None:
            cfg[key] = value
    if cfg["ref_batch_size"] is None:
        cfg["ref_batch_size"] = 128 if gpu else cfg["batch_size"]
    if cfg["nproc"] is not None:
        if isinstance(cfg["nproc"], bool) or not isinstance(cfg["nproc"], int) \
                or cfg["nproc"] < 2:
            raise ValueError(f"nproc={cfg['nproc']!r} must be a whole number >= 2 (processes "
                             f"of the scaling rows), or None for none")
        if gpu and cfg["nproc"] > torch.cuda.device_count():
            raise ValueError(f"nproc={cfg['nproc']} but this machine shows "
                             f"{torch.cuda.device_count()} GPU(s): one process per GPU")
    if cfg["clock"] not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {cfg['clock']!r}")
    if cfg["dataset"] not in ("auto", "cifar10", "synthetic"):
        raise ValueError(f"dataset must be auto, cifar10 or synthetic, got {cfg['dataset']!r}")
    cfg["profiler_rows"] = list(cfg["profiler_rows"])
    for row in cfg["profiler_rows"]:
        if row not in ("ceiling", "reference") and row not in METHODS:
            raise ValueError(f"cannot profile {row!r}: choose ceiling, reference or a method "
                             f"({sorted(METHODS)}); data_path runs pgd_at")
    if cfg["methods"] is not None:
        cfg["methods"] = list(cfg["methods"])
        bad = [r for r in cfg["methods"]
               if r not in SPECIAL_ROWS and r not in METHODS and r != "eval"]
        if bad:
            raise ValueError(f"unknown row(s) {bad}; choose from {_all_rows() + ['eval']}")
    return cfg


def _all_rows() -> list[str]:
    """Every row in table order: ceiling, reference, erm, mixup, pgd_at, the other methods
    (alphabetical), data_path."""
    first = [m for m in ("erm", "mixup", "pgd_at") if m in METHODS]
    rest = sorted(m for m in METHODS if m not in first)
    return ["ceiling", "reference", *first, *rest, "data_path"]


def device_slug(device: torch.device) -> str:
    """'cpu', or the GPU's name as a file-name slug ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[Any], Any], batches: Iterator[Any], *, warmup: int, steps: int,
            device: torch.device, images: Callable[[Any], int], repeats: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time ``repeats`` windows of ``steps`` calls of ``step(next(batches))`` after ``warmup``
    untimed ones; report the fastest window.

    The device is synchronised before the clock starts and before it stops, so queued GPU work
    is counted where it runs. ``images(batch)`` counts the training examples in a batch (read
    from shapes: no host sync). Returns img_per_s and ms_per_step (fastest window),
    window_img_per_s (every window, to show the noise), images, and the last step's return
    value under ``"last"`` (read it only after timing: reading forces a sync). ``clock``: a
    function returning seconds (wall-clock by default).
    """
    out = None
    for _ in range(warmup):
        out = step(next(batches))
    windows = []
    for _ in range(max(1, repeats)):
        _sync(device)
        n = 0
        t0 = clock()
        for _ in range(steps):
            batch = next(batches)
            n += images(batch)
            out = step(batch)
        _sync(device)
        windows.append((n / max(clock() - t0, 1e-9), n))
    best, n = max(windows)
    return dict(img_per_s=best, ms_per_step=1000 * n / best / steps,
                window_img_per_s=[w for w, _ in windows], images=n, steps=steps,
                warmup=warmup, repeats=len(windows), last=out)


def profile_steps(step: Callable[[Any], Any], batches: Iterator[Any], *, steps: int,
                  device: torch.device, top: int = 15) -> tuple[str, list[dict[str, Any]]]:
    """Run ``steps`` steps under ``torch.profiler``; return the printed table of the ``top`` ops
    by self time on the device (CPU time on a CPU) and the same as a list of dicts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(next(batches))
        _sync(device)
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if cuda:  # torch < 2.4 calls the device column "cuda"
        key = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
               else "self_cuda_time_total")
    table = events.table(sort_by=key, row_limit=top)
    ranked = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    ops = [dict(name=e.key, calls=e.count, self_ms=getattr(e, key, 0.0) / 1000 / steps,
                cpu_ms=e.self_cpu_time_total / 1000 / steps) for e in ranked]
    return table, ops


class PassCounter:
    """Counts a model's passes while active: the cost model behind each method's ratio.

    One *pass* is the model applied to one batch. mixlab's attacks run the model in eval mode
    and take gradients w.r.t. the input only; training runs it in train mode and
    backpropagates into the weights. So, per batch:

    * ``train``: forwards in train mode with autograd on (each later gets a full backward,
      about 2 forwards' work: gradients for the input of every layer and for its weights);
    * ``attack``: forwards in eval mode with autograd on (each gets an input-only backward,
      about 1 forward's work);
    * ``probe``: forwards without autograd (AN-PGD's bisection, FAT's early-stop check);
    * ``backward``: backward passes that reached the model's output (train + attack when
      every graph is differentiated).

    ``forward_equivalents`` = 3·train + 2·attack + probe: the step's work in forwards, a
    device-independent prediction of the time ratio between two methods on the same arch.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.counts = dict(train=0, attack=0, probe=0, backward=0)
        self._handle = None

    def _hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or not output.requires_grad:
            self.counts["probe"] += 1
            return
        self.counts["train" if module.training else "attack"] += 1

        def on_backward(grad):
            self.counts["backward"] += 1
        output.register_hook(on_backward)

    def __enter__(self) -> "PassCounter":
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def summary(self, steps: int = 1) -> dict[str, float]:
        """Passes per step, and the step's forward-equivalents."""
        per = {k: v / steps for k, v in self.counts.items()}
        per["forward_equivalents"] = 3 * per["train"] + 2 * per["attack"] + per["probe"]
        return per


def count_passes(step: Callable[[Any], Any], batches: Iterator[Any], model: torch.nn.Module,
                 steps: int = 2) -> dict[str, float]:
    """Passes per step of ``step`` (which must call ``model`` itself, not a compiled wrapper)
    over ``steps`` steps; see PassCounter."""
    with PassCounter(model) as counter:
        for _ in range(steps):
            step(next(batches))
    return counter.summary(steps)


def _peak_memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, MiB; None on a CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- the rows
def _cycle(loader) -> Iterator[Any]:
    """Batches forever: each pass is a new epoch (a new order and new augmentations)."""
    while True:
        yield from loader


def _fixed_batch(ds: data_mod.TensorDataset, batch_size: int, channels_last: bool):
    """One batch of the dataset already on the device, served forever: no data path at all."""
    idx = torch.arange(batch_size, device=ds.device)
    x = ds.x[idx].float().div_(255)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return itertools.repeat(data_mod.Batch(x=x, y=ds.y[idx], idx=idx))


def method_step(method: Method, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                epoch: int, bf16: bool) -> Callable[[Any], torch.Tensor]:
    """``batch -> loss``: the engine's step, ``mixlab.train.train_step``, exactly as training
    takes it."""
    def step(batch):
        return train_step(method, model, optimizer, batch, epoch=epoch, bf16=bf16)[0]
    return step


# ----------------------------------------------------------------------------- the bench
def _datasets(cfg: dict[str, Any]):
    """(train split, test split) of the bench, on the CPU."""
    name = cfg["dataset"]
    if name == "auto":
        real = data_mod.find_dataset("cifar10", "train") is not None
        name = "cifar10" if real else "synthetic"
    if name == "cifar10":
        train_ds = data_mod.load_dataset("cifar10", "train")
        test_ds = data_mod.load_dataset("cifar10", "test")
        if cfg["train_n"]:
            train_ds = train_ds.subset(cfg["train_n"], seed=cfg["seed"])
    else:
        n_test = max(cfg["eval_n"], cfg["aa_n"], cfg["eval_batch_size"], 1)
        train_ds = data_mod.synthetic_dataset(cfg["train_n"] or 50_000, seed=cfg["seed"])
        test_ds = data_mod.synthetic_dataset(n_test, seed=cfg["seed"], split="test")
    return train_ds, test_ds


def _new_model(cfg: dict[str, Any], train_ds, device: torch.device) -> torch.nn.Module:
    info = data_mod.dataset_info(train_ds.name)
    return build_model(cfg["arch"], train_ds.num_classes, train_ds.x.shape[1],
                       mean=info["mean"], std=info["std"]).to(device)


def _new_method(name: str, cfg: dict[str, Any], train_ds):
    """The method as the engine builds it: hyperparameters from ``resolve_config`` (the
    method's defaults; the threat model, with ``steps`` = the bench's PGD steps, as an
    AttackSpec). Returns (method, hyperparameters)."""
    cls = get_method(name)
    run = resolve_config(method=name, dataset=train_ds.name, epochs=cfg["epochs"],
                         steps=cfg["pgd_steps"])
    hp = run["method_hp"]
    method = cls(num_train=len(train_ds), num_classes=train_ds.num_classes,
                 epochs=cfg["epochs"], attack=attack_spec(run), **hp)
    return method, hp


class _Bench:
    """State shared by the rows of one run: data, one model (reset to the same weights before
    every row), settings. Each ``row_<kind>`` returns that row's record."""

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        self.cfg, self.device = cfg, device
        self.train_ds, self.test_ds = self._load_data()
        self.info = data_mod.dataset_info(self.train_ds.name)
        self.model = self._new_model()
        if cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        # one set of initial weights for every row; in-place load keeps a compiled wrapper valid
        self.init_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.fwd_model = torch.compile(self.model) if cfg["compile"] else self.model
        self.epoch = cfg["epochs"] - 1
        self.loader = data_mod.DeviceLoader(
            self.train_ds, cfg["batch_size"], shuffle=True, augment=True, drop_last=True,
            generator=torch.Generator().manual_seed(cfg["seed"]),
            channels_last=cfg["channels_last"])

    def _load_data(self):
        train_ds, test_ds = _datasets(self.cfg)
        # the training split lives on the device (the engine's data path); the test split is
        # sliced and moved by the evaluation
        return train_ds.to(self.device), test_ds

    def _new_model(self) -> torch.nn.Module:
        return _new_model(self.cfg, self.train_ds, self.device)

    def _sgd(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.cfg["lr"],
                               momentum=TRAIN_DEFAULTS["momentum"],
                               weight_decay=TRAIN_DEFAULTS["weight_decay"])

    def _fresh(self) -> torch.optim.Optimizer:
        """Reset the shared model to its initial weights and mode; a new optimizer."""
        self.model.load_state_dict(self.init_state)
        self.model.train()
        return self._sgd(self.model)

    def _run(self, name: str, step, batches, images=lambda b: len(b.y)) -> dict[str, Any]:
        """Time one row, then (if asked) profile it; peak memory covers warm-up and timing."""
        _peak_memory_reset(self.device)
        rec = measure(step, batches, warmup=self.cfg["warmup"], steps=self.cfg["steps"],
                      device=self.device, images=images, repeats=self.cfg["repeats"],
                      clock=CLOCKS[self.cfg["clock"]])
        rec["peak_mem_mib"] = _peak_memory_mib(self.device)
        last = rec.pop("last")
        rec["final_loss"] = float(last.float()) if last is not None else None
        rec["finite"] = rec["final_loss"] is None or bool(np.isfinite(rec["final_loss"]))
        if name in self.cfg["profiler_rows"]:
            table, ops = profile_steps(step, batches, steps=self.cfg["profiler_steps"],
                                       device=self.device)
            print(f"\n== torch.profiler: {name}, {self.cfg['profiler_steps']} steps ==\n{table}")
            rec["profile_top_ops"] = ops
        return rec

    # --- rows -----------------------------------------------------------------------------
    def _step(self, method: Method, optimizer: torch.optim.Optimizer, *, eager: bool = False):
        """The engine's step of ``method`` on the shared model (compiled if asked, unless
        ``eager``: hooks and a compiled graph do not mix)."""
        model = self.model if eager else self.fwd_model
        return method_step(method, model, optimizer, epoch=self.epoch, bf16=self.cfg["bf16"])

    def row_ceiling(self) -> dict[str, Any]:
        erm, _ = self._method("erm")
        optimizer = self._fresh()
        batches = _fixed_batch(self.train_ds, self.cfg["batch_size"], self.cfg["channels_last"])
        rec = self._run("ceiling", self._step(erm, optimizer), batches)
        rec["passes"] = count_passes(self._step(erm, optimizer, eager=True), batches, self.model)
        return dict(kind="ceiling", batch_size=self.cfg["batch_size"], bf16=self.cfg["bf16"],
                    channels_last=self.cfg["channels_last"], compile=self.cfg["compile"], **rec)

    def row_reference(self) -> dict[str, Any]:
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"])
        model = self._new_model()  # fp32, contiguous, never compiled
        model.load_state_dict(self.init_state)
        model.train()
        # the reference's data lives on the host, as a torchvision dataset's does
        loader = reference_loader(self.train_ds, cfg["ref_batch_size"], cfg["ref_workers"],
                                  cfg["seed"])
        eps = self.info["eps"]["Linf"]
        step = reference_step(model, self._sgd(model), self.device, eps=eps, step_size=eps / 4,
                              steps=cfg["pgd_steps"])
        rec = self._run("reference", step, _cycle(loader), images=lambda b: len(b[1]))
        del model
        return dict(kind="reference", batch_size=cfg["ref_batch_size"], bf16=False,
                    channels_last=False, compile=False, workers=cfg["ref_workers"],
                    pgd_steps=cfg["pgd_steps"], **rec)

    def _method(self, name: str):
        return _new_method(name, self.cfg, self.train_ds)

    def row_method(self, name: str) -> dict[str, Any]:
        torch.manual_seed(self.cfg["seed"])
        method, hp = self._method(name)
        optimizer = self._fresh()
        rec = self._run(name, self._step(method, optimizer), _cycle(self.loader))
        # after timing, on the eager model
        rec["passes"] = count_passes(self._step(method, optimizer, eager=True),
                                     _cycle(self.loader), self.model)
        return dict(kind="method", batch_size=self.cfg["batch_size"], epoch=self.epoch,
                    hp=jsonable(hp), **rec)

    def row_data_path(self) -> dict[str, Any]:
        """pgd_at through the DeviceLoader against pgd_at on one fixed on-device batch, the
        windows interleaved (loader, synthetic, loader, ...) so that drifts in the machine's
        speed hit both alike; plus the loader alone (making batches, no training)."""
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        method, _ = self._method("pgd_at")
        step = self._step(method, self._fresh())
        sources = {"loader": _cycle(self.loader),
                   "synthetic": _fixed_batch(self.train_ds, cfg["batch_size"],
                                             cfg["channels_last"])}
        windows: dict[str, list[float]] = {kind: [] for kind in sources}
        _peak_memory_reset(self.device)
        for r in range(max(1, cfg["repeats"])):
            for kind, batches in sources.items():
                rec = measure(step, batches, warmup=cfg["warmup"] if r == 0 else 0,
                              steps=cfg["steps"], device=self.device, images=lambda b: len(b.y),
                              clock=CLOCKS[cfg["clock"]])
                windows[kind].append(rec["img_per_s"])
        peak = _peak_memory_mib(self.device)
        alone = measure(lambda b: None, _cycle(self.loader), warmup=1, steps=cfg["steps"],
                        device=self.device, images=lambda b: len(b.y),
                        clock=CLOCKS[cfg["clock"]])
        best = {kind: max(w) for kind, w in windows.items()}
        return dict(kind="data_path", batch_size=cfg["batch_size"], steps=cfg["steps"],
                    repeats=max(1, cfg["repeats"]), img_per_s=best["loader"],
                    ms_per_step=1000 * cfg["batch_size"] / best["loader"],
                    synthetic_img_per_s=best["synthetic"],
                    overhead=1 - best["loader"] / best["synthetic"],
                    loader_only_img_per_s=alone["img_per_s"],
                    # the loader's own time as a share of a training step's: the overhead
                    # read directly, free of the noise in the difference of two speeds
                    loader_share=best["loader"] / alone["img_per_s"],
                    window_img_per_s=windows,
                    peak_mem_mib=peak)

    # --- evaluation -----------------------------------------------------------------------
    def evaluation(self) -> dict[str, Any]:
        """PGD-20 and AutoAttack standard throughput through ``mixlab.evaluate.evaluate``.

        With no checkpoint the untrained bench model is attacked, with its own clean
        predictions as labels so that every image must be attacked; an untrained model breaks
        fast, so AutoAttack's figure is then an optimistic bound (fewer survivors reach the
        later, costlier attacks than on a robust model)."""
        cfg, device = self.cfg, self.device
        if cfg["checkpoint"]:
            model = load_run(cfg["checkpoint"], device=device).model
            model_note = f"trained run {cfg['checkpoint']}"
        else:
            self.model.load_state_dict(self.init_state)
            model = self.model
            model_note = "untrained bench model, labels = its own predictions (optimistic for AA)"
        model.eval()
        n = max(cfg["eval_n"], cfg["aa_n"])
        if n == 0:
            return dict(skipped="eval_n = aa_n = 0")
        x = self.test_ds.x[:n].to(device).float().div_(255)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.test_ds.y[:n].to(device) if cfg["checkpoint"] else predict(model, x)
        eps = self.info["eps"]["Linf"]
        out: dict[str, Any] = dict(model=model_note, eps=eps, norm="Linf",
                                   batch_size=cfg["eval_batch_size"])
        # warm-up on one batch (cudnn autotune, allocator) so the figure is steady state
        warm = min(n, cfg["eval_batch_size"])
        evaluate(model, x[:warm], y[:warm], attacks=("pgd20",), eps=eps,
                 batch_size=cfg["eval_batch_size"])
        for attack, count in (("pgd20", cfg["eval_n"]), ("aa", cfg["aa_n"])):
            if not count:
                why = "quick run: AutoAttack skipped (see QUICK)" if cfg["quick"] else "n = 0"
                out[attack] = dict(skipped=why)
                continue
            _peak_memory_reset(device)
            _sync(device)
            res = evaluate(model, x[:count], y[:count], attacks=(attack,), eps=eps,
                           batch_size=cfg["eval_batch_size"], seed=cfg["seed"])
            out[attack] = dict(n=count, img_per_s=res["img_per_s"][attack],
                               seconds=res["seconds"][attack], accuracy=res[attack],
                               peak_mem_mib=_peak_memory_mib(device))
        model.train()
        return out


def _versions(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    return dict(numpy=np.__version__, pyautoattack=version("pyautoattack"),
                cuda=torch.version.cuda, cudnn=(torch.backends.cudnn.version()
                                                if device.type == "cuda" else None),
                torch_threads=torch.get_num_threads(), machine=platform.machine())


# ----------------------------------------------------------------------------- scaling
def _scaling_worker(cfg: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """One process of the scaling rows, started by torch's elastic launcher (as torchrun
    starts them): each method's engine step on this process's slice of every global batch of
    ``batch_size`` × processes examples, timed on the wall clock. Rank 0 returns the records."""
    torch.set_num_threads(cfg["threads"])
    group = distributed.setup(cfg["device"])   # None on one process: the plain engine
    device = group.device if group is not None else pick_device(cfg["device"])
    world = 1 if group is None else group.world
    torch.manual_seed(cfg["seed"])
    train_ds, _ = _datasets(cfg)
    model = _new_model(cfg, train_ds, device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    fwd = distributed.wrap(torch.compile(model) if cfg["compile"] else model, group)
    batch = cfg["batch_size"] * world
    generator = torch.Generator().manual_seed(cfg["seed"])
    if group is None:
        loader = data_mod.DeviceLoader(train_ds.to(device), batch, augment=True,
                                       generator=generator, channels_last=cfg["channels_last"])
    else:
        loader = distributed.ShardedLoader(train_ds, batch, group=group, augment=True,
                                           generator=generator,
                                           channels_last=cfg["channels_last"])
    records = {}
    for name in names:
        method, _ = _new_method(name, cfg, train_ds)
        model.load_state_dict(init)
        fwd.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"],
                                    momentum=TRAIN_DEFAULTS["momentum"],
                                    weight_decay=TRAIN_DEFAULTS["weight_decay"])
        steps = itertools.count()

        def step(b, method=method, optimizer=optimizer):
            with distributed.step_context(group, batch_size=batch, seed=cfg["seed"],
                                          step=next(steps)):
                return train_step(method, fwd, optimizer, b, epoch=cfg["epochs"] - 1,
                                  bf16=cfg["bf16"])[0]
        rec = measure(step, _cycle(loader), warmup=cfg["warmup"], steps=cfg["steps"],
                      device=device, images=lambda b: len(b.y) * world, repeats=cfg["repeats"])
        rec["finite"] = bool(torch.isfinite(rec.pop("last")))
        records[name] = rec
    distributed.barrier(group)
    return records if distributed.is_main(group) else None


def _launch(cfg: dict[str, Any], names: list[str], nproc: int) -> dict[str, Any]:
    """Rank 0's records of :func:`_scaling_worker` on ``nproc`` processes of this machine,
    started by torch's elastic launcher with a c10d rendezvous on a free local port."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"mixlab-bench-{os.getpid()}-{nproc}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          start_method="spawn")
    return elastic_launch(config, _scaling_worker)(cfg, names)[0]


def scaling(cfg: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The scaling rows: per method of ``names``, images per second on one process and on
    ``cfg["nproc"]`` (one device each, ``batch_size`` per device), per device, and the scaling
    efficiency (N-process img/s) / (N × one-process img/s)."""
    n = cfg["nproc"]
    one, many = _launch(cfg, names, 1), _launch(cfg, names, n)
    out = {}
    for name in names:
        single, multi = one[name]["img_per_s"], many[name]["img_per_s"]
        out[name] = dict(processes=n, batch_per_device=cfg["batch_size"],
                         global_batch=cfg["batch_size"] * n, clock="wall",
                         one_device_img_per_s=single, img_per_s=multi,
                         img_per_s_per_device=multi / n, efficiency=multi / (n * single),
                         window_img_per_s=many[name]["window_img_per_s"],
                         one_device_window_img_per_s=one[name]["window_img_per_s"],
                         finite=one[name]["finite"] and many[name]["finite"])
    return out


def run_bench(**settings: Any) -> dict[str, Any]:
    """Run the benchmark; returns the result record (what ``main`` writes as JSON).

    Keywords are ``BENCH_DEFAULTS`` entries. A row that raises is recorded with its error and
    the run goes on (methods are written in parallel; one broken file must not hide the rest).
    """
    cfg = resolve_settings(**settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        return _run_bench(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: dict[str, Any]) -> dict[str, Any]:
    device = pick_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    bench = _Bench(cfg, device)
    wanted = cfg["methods"]
    rows: dict[str, dict[str, Any]] = {}
    for name in _all_rows():
        if wanted is not None and name not in wanted:
            continue
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            rows[name] = getattr(bench, f"row_{name}")() if name in SPECIAL_ROWS \
                else bench.row_method(name)
        except Exception as err:  # record, go on: see the docstring
            rows[name] = dict(kind="method" if name in METHODS else name,
                              error=f"{type(err).__name__}: {err}",
                              traceback=traceback.format_exc(limit=4))
            print(f"bench: {name} FAILED: {rows[name]['error']}", file=sys.stderr)
    evaluation: dict[str, Any] = {}
    if wanted is None or "eval" in wanted:
        print("bench: eval ...", file=sys.stderr, flush=True)
        try:
            evaluation = bench.evaluation()
        except Exception as err:  # as for rows: keep what was measured
            evaluation = dict(error=f"{type(err).__name__}: {err}",
                              traceback=traceback.format_exc(limit=4))
            print(f"bench: eval FAILED: {evaluation['error']}", file=sys.stderr)
    now = datetime.datetime.now()
    prov = provenance(dict(profile=None), device, bench.train_ds)  # no training profile
    prov["bench_quick"] = bool(cfg["quick"])
    prov.update(_versions(device))
    if device.type != "cuda":  # platform.processor() is often empty on Linux
        cpu = prov["device_name"] or platform.machine()
        prov["device_name"] = f"CPU ({cpu}, threads={torch.get_num_threads()})"
    result = dict(
        kind="mixlab-bench", schema=1, date=now.strftime("%Y-%m-%d"),
        time=now.strftime("%Y-%m-%dT%H:%M:%S"), device=device_slug(device),
        device_name=prov["device_name"],
        label=(f"CPU run ({cfg['clock']} clock): absolute speeds are no claim, ratios are "
               "meaningful"
               if device.type != "cuda" else f"GPU run on {prov['device_name']}"),
        config=jsonable(cfg),
        data=dict(dataset=bench.train_ds.name, source=bench.train_ds.source,
                  synthetic=bench.train_ds.name == "synthetic", train_n=len(bench.train_ds),
                  test_n=len(bench.test_ds)),
        provenance=jsonable(prov), notes=NOTES, rows=rows)
    result["ratios"] = ratios({k: v for k, v in rows.items() if "error" not in v})
    result["eval"] = evaluation
    if cfg["nproc"]:
        names = [n for n, row in rows.items() if n in METHODS and "error" not in row]
        print(f"bench: scaling over {cfg['nproc']} processes ...", file=sys.stderr, flush=True)
        try:
            result["scaling"] = scaling(cfg, names)
        except Exception as err:  # as for rows: keep what was measured
            result["scaling"] = dict(error=f"{type(err).__name__}: {err}",
                                     traceback=traceback.format_exc(limit=4))
            print(f"bench: scaling FAILED: {result['scaling']['error']}", file=sys.stderr)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixlab.bench",
                                description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--arch", help="a build_model name (default preactresnet18; GPU batches are "
                   f"set for {', '.join(GPU_BATCH)})")
    p.add_argument("--methods", type=csv, help="comma-separated rows to run (default: all): "
                   "ceiling, reference, data_path, eval, and any registered method")
    p.add_argument("--quick", action="store_true", help="tiny sizes; runs on a CPU in < 60 s")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ref-batch-size", type=int, help="batch of the reference (default 128 GPU)")
    p.add_argument("--steps", type=int, help="timed steps per window")
    p.add_argument("--repeats", type=int, help="timed windows per row; the fastest counts")
    p.add_argument("--clock", choices=sorted(CLOCKS),
                   help="wall-clock or this process's CPU time (default: wall on a GPU, "
                        "process on a CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per row")
    p.add_argument("--pgd-steps", type=int, help="inner PGD steps (default 10)")
    p.add_argument("--dataset", choices=["auto", "cifar10", "synthetic"])
    p.add_argument("--train-n", type=int, help="training examples on the device")
    p.add_argument("--eval-n", type=int, help="test images for PGD-20 throughput")
    p.add_argument("--aa-n", type=int, help="test images for AutoAttack (0 skips it)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--checkpoint", help="evaluate this trained run instead of the bench model")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--bf16", choices=["on", "off"], help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--channels-last", choices=["on", "off"], help="default: on for CUDA")
    p.add_argument("--ref-workers", type=int, help="DataLoader workers of the reference")
    p.add_argument("--profiler-rows", type=csv, help="rows to run under torch.profiler")
    p.add_argument("--profiler-steps", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on a CPU)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--nproc", type=int, help="also run every method row on 1 and on NPROC "
                   "processes (one device each) and report the scaling efficiency")
    p.add_argument("--out", default="results", help="folder (or .json file) for the result")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line. Exit status 0, or 1 when a row failed (the JSON is written anyway)."""
    args = vars(_parser().parse_args(argv))
    out = args.pop("out")
    for key in ("bf16", "channels_last"):
        if args[key] is not None:
            args[key] = args[key] == "on"
    result = run_bench(**{k: v for k, v in args.items() if v is not None})
    path = write_result(result, out)
    print(format_bench_table(result))
    print(f"wrote {path}")
    failed = [n for n, row in result["rows"].items() if "error" in row]
    if "error" in result.get("scaling", {}):
        failed.append("scaling")
    if failed:
        print(f"bench: rows failed: {', '.join(failed)} (errors in the JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
