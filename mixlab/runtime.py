"""How mixlab uses the machine it runs on: CPU threads, and what a run will cost on a CPU.

**Threads.** :func:`configure_threads` sets PyTorch's intra-op thread count on purpose instead
of taking whatever torch picks. On a machine without CUDA the default is **one** thread: the
small models of this kit gain little from more, and lose badly when the cores are shared with
another job (AutoAttack on 16 images took 122.6 s with 2 threads next to another job, 4.4 s
with 1). Precedence: an explicit value, else the environment variable ``MIXLAB_THREADS``,
else 1 on a CPU-only machine, else torch's own default (CUDA machines, where the CPU only
feeds the GPU). The command line calls it for every command (``python -m mixlab --threads 4
...``); notebooks call it through ``mixlab.nbtools``.

>>> configure_threads()          # 1 on a laptop without CUDA
1
>>> configure_threads(4)         # ask for 4
4

**Cost of a run on a CPU.** :func:`estimate_cpu_seconds` predicts a run's training time from
the work of its method, counted as in ``mixlab.bench`` (``PassCounter``): forward-equivalents
per training example (a training forward + backward is 3, an attack forward + input-gradient
is 2, a forward without gradients is 1), times examples, times epochs, divided by a measured
CPU rate (:data:`CPU_FORWARD_RATE`). ``train()`` uses it to refuse the GPU-sized ``short`` and
``paper`` profiles on a CPU unless ``allow_slow_cpu=True`` (command line ``--allow-slow-cpu``).

**Device and checkout.** :func:`pick_device` turns a ``device`` setting into a torch.device;
:func:`project_dir` finds the mixlab checkout a notebook or command runs in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: the environment variable read by :func:`configure_threads` when no value is given
THREADS_ENV = "MIXLAB_THREADS"

#: why the thread count in force was chosen, as :func:`configure_threads` last set it
_threads_reason: str | None = None

#: forward-equivalent images per second on one CPU thread, fp32, batch 32, per architecture.
#: Source: ``results/bench-cpu-2026-11-23-wrn-10-2.json`` measured wrn-10-2 training (erm, 3
#: forward-equivalents per image) at 292.7 img/s on one thread, i.e. ~880 forward-equivalents
#: per second; the same erm step timed the same way (process time, best of 3, one thread) ran
#: wrn-10-2 at 274 img/s and PreActResNet-18 at 32 img/s, so PreActResNet-18 gets ~880 x 32/274
#: ~ 100. An architecture not listed is costed as PreActResNet-18 (the profiles' model).
CPU_FORWARD_RATE: dict[str, float] = {"preactresnet18": 100.0, "wrn-10-2": 880.0}

#: profiles sized for a GPU: train() refuses them on a CPU unless allow_slow_cpu=True
GPU_PROFILES = ("short", "paper")


def _parse_threads(value: Any, source: str) -> int:
    """A thread count: a whole number >= 1 (a string of digits from the environment too)."""
    what = f"{source} {value!r}" if source != "threads" else f"threads={value!r}"
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+").isdigit():
            raise ValueError(f"{what} is not a thread count: give a whole number >= 1, "
                             f"e.g. 1 or 4")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is not a thread count: give a whole number >= 1, e.g. 1 or 4")
    if value < 1:
        raise ValueError(f"{what} must be >= 1 (CPU threads for PyTorch's operations)")
    return value


def configure_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op CPU thread count and return the count now in force.

    threads: an explicit count (a whole number >= 1). When None, ``$MIXLAB_THREADS`` is used
    if set, else 1 on a machine without CUDA, else torch's default is left as it is (a CUDA
    machine). Raises ValueError naming the bad value. :func:`threads_reason` says which rule
    chose the count.
    """
    global _threads_reason
    if threads is not None:
        count, reason = _parse_threads(threads, "threads"), "explicit"
    elif os.environ.get(THREADS_ENV, "").strip():
        count, reason = _parse_threads(os.environ[THREADS_ENV], THREADS_ENV), THREADS_ENV
    elif not torch.cuda.is_available():
        count, reason = 1, "default for CPU"
    else:
        _threads_reason = "torch default (CUDA machine)"
        return torch.get_num_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    _threads_reason = reason
    return torch.get_num_threads()


def threads_reason() -> str:
    """Why the current thread count was chosen: 'explicit', 'MIXLAB_THREADS', 'default for
    CPU', 'torch default (CUDA machine)', or 'torch default' when configure_threads was not
    called in this process."""
    return _threads_reason or "torch default"


# ----------------------------------------------------------------------------- device, checkout
def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The torch.device a ``device`` setting names: 'auto' is CUDA when present, else the CPU;
    'cpu', 'cuda' and 'cuda:N' as torch reads them. A bad name, or CUDA asked for where torch
    sees none, is one clear error."""
    from .config import check_device_name  # config sits above this module

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; "
                           "use device='cpu' or 'auto'")
    return device


def project_dir(start: str | Path | None = None) -> Path:
    """The mixlab checkout around ``start`` (default: the current folder): the nearest folder
    at or above it holding ``pyproject.toml`` and ``notebooks/``, else ``start`` itself
    (resolved). Notebooks run in ``notebooks/``, so this is how they find ``runs/``,
    ``figures/`` and ``data/``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "notebooks").is_dir():
            return folder
    return here


# ----------------------------------------------------------------------------- CPU cost
def forward_equivalents(cfg: dict[str, Any]) -> float:
    """A resolved config's work per training example in forward-equivalents (``mixlab.bench``'s
    PassCounter: 3 per training pass, 2 per attack pass, 1 per probe), for its training attack
    of ``steps`` PGD iterations. The counts are those the bench measured at 10 steps: erm and
    mixup 3; pgd_at, amp, fat, gair_fat, gairat 3 + 2 x 10 = 23; mma 2 x 3 + 2 x 10 + 11 = 37
    (one probe at the PGD point and ``search_steps`` = 10 bisection probes)."""
    method, steps = cfg["method"], cfg["steps"]
    if method in ("erm", "mixup"):
        return 3.0
    if method == "mma":  # two training passes, an attack, 1 + search_steps probes
        return 6.0 + 2.0 * steps + 1 + cfg["method_hp"]["search_steps"]
    return 3.0 + 2.0 * steps  # one training pass on the output of a PGD attack


def estimate_cpu_seconds(cfg: dict[str, Any], train_size: int | None = None) -> float:
    """Predicted training time in seconds, on one CPU thread, of a resolved config: training
    (method forward-equivalents x examples x epochs) plus the in-training evaluation (a clean
    pass and a PGD-``eval_steps`` attack on the validation split each evaluated epoch), divided
    by :data:`CPU_FORWARD_RATE`. A rough figure: it is there to tell minutes from days.

    train_size: the training examples per epoch when known (train() passes its training
    split); else the dataset's training set less the validation split (or ``train_subset``)."""
    if train_size is not None:
        train_n = train_size
    else:
        from . import data as data_mod
        info = ({} if data_mod.is_custom_dataset(cfg["dataset"])  # no table entry to read
                else data_mod.dataset_info(cfg["dataset"]))
        train_n = info.get("train_size") or 50_000
        train_n = max(0, train_n - cfg["val_size"])
        if cfg["train_subset"]:
            train_n = min(train_n, cfg["train_subset"])
    epochs = cfg["epochs"] if cfg.get("stop_after") is None else cfg["stop_after"]
    work = forward_equivalents(cfg) * train_n * epochs
    if cfg["val_size"]:
        val_n = min(cfg["val_size"], cfg["eval_subset"] or cfg["val_size"])
        evals = -(-epochs // cfg["eval_every"])
        work += (2 + 2 * cfg["eval_steps"]) * val_n * evals
    rate = CPU_FORWARD_RATE.get(cfg["model"], CPU_FORWARD_RATE["preactresnet18"])
    return work / rate


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def check_cpu_profile(cfg: dict[str, Any], device: torch.device,
                      train_size: int | None = None) -> None:
    """Refuse a GPU-sized profile (``short``, ``paper``) on a CPU unless ``allow_slow_cpu``:
    one ValueError with the estimated time (see :func:`estimate_cpu_seconds`) and the flag
    that goes ahead anyway."""
    if device.type != "cpu" or cfg.get("profile") not in GPU_PROFILES or cfg.get("allow_slow_cpu"):
        return
    seconds = estimate_cpu_seconds(cfg, train_size)
    measured = cfg["model"] in CPU_FORWARD_RATE
    rate = CPU_FORWARD_RATE["preactresnet18" if not measured else cfg["model"]]
    basis = "" if measured else f" measured for preactresnet18, {cfg['model']} is likely slower"
    raise ValueError(
        f"profile={cfg['profile']!r} is sized for a GPU: {cfg['method']} on {cfg['model']} for "
        f"{cfg['epochs']} epochs would take about {_duration(seconds)} on this CPU (one thread; "
        f"{forward_equivalents(cfg):.0f} forward-equivalents per "
        f"example at ~{rate:.0f} per second{basis}; see mixlab.runtime). Use profile='smoke' "
        f"to try things on a CPU, or pass allow_slow_cpu=True (command line --allow-slow-cpu) "
        f"to start it anyway")
