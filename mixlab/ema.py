"""Weight averaging: an exponential moving average (EMA) of a model's parameters and buffers.

Averaging the weights along the training trajectory is the single largest gain in Rebuffi et
al., "Fixing Data Augmentation to Improve Adversarial Robustness", 2021 (arXiv 2103.01946),
and it is what lets mixing augmentations (CutMix) help adversarial training there; Gowal et
al., "Uncovering the Limits of Adversarial Training against Norm-Bounded Adversarial
Examples", 2020 (arXiv 2010.03593) average the same way. After every optimiser step t
(0-based), every averaged tensor a moves toward the model's tensor w:

    a ← d_t·a + (1 − d_t)·w,   d_t = min(decay, (1 + t) / (10 + t))

The warm-up (d_0 = 0.1, d_10 = 0.55, d_100 ≈ 0.92, then ``decay``) is TensorFlow's
``ExponentialMovingAverage(num_updates=t)``: early on the average follows the model closely
instead of remembering its random initialisation for ~1/(1 − decay) steps. ``warmup=False``
uses d_t = decay throughout.

What is averaged: every floating-point parameter *and* buffer (BatchNorm's running mean and
variance follow the same EMA, so the averaged model's statistics match its averaged weights,
as in the papers' code). Integer buffers (BatchNorm's ``num_batches_tracked``) are copied.

On the device, in place, with ``torch._foreach_*`` ops (a few fused kernels per step instead
of one per tensor); d_t is computed on the host from a Python step counter, so an update
never waits for the device (no host sync). The averaged model is a deep copy of the model,
kept in eval mode with gradients off.

The training engine keeps one when ``train(ema_decay=...)`` is set (``ema_warmup`` is
``warmup``): it updates it after every optimiser step, validates it (``ema_val_*``), selects
``best.pt`` by it and saves it beside the raw weights; ``mixlab.load_run(run_dir,
weights="ema")`` loads it back (docs/baselines.md).

>>> ema = WeightAverage(model, decay=0.999)
>>> for x, y in loader:
...     loss.backward(); opt.step()
...     ema.update(model)
>>> evaluate(ema.averaged_model(), x_test, y_test)
>>> torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

__all__ = ["WeightAverage", "ema_decay"]


def ema_decay(decay: float, step: int, *, warmup: bool = True) -> float:
    """The decay d_t of update ``step`` (0-based): min(decay, (1 + t)/(10 + t)) with warm-up,
    else ``decay``."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors (parameters and persistent buffers) by name, in its fixed
    order, each tensor once (a tied weight is averaged once)."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


class WeightAverage:
    """EMA of a model's parameters and buffers (see the module docstring).

    Args:
        model: the model being trained; a deep copy of it starts the average.
        decay: the EMA decay (0 <= decay < 1), e.g. 0.999 (Rebuffi et al. at batch 512) or
            0.9999 for longer schedules; the average spans about 1/(1 − decay) steps.
        warmup: use d_t = min(decay, (1 + t)/(10 + t)) (default) rather than decay throughout.

    Attributes: ``decay``, ``warmup``, ``num_updates`` (updates so far, a Python int).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, *, warmup: bool = True):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (
                math.isfinite(decay) and 0 <= decay < 1):
            raise ValueError(f"decay={decay!r} must be a number in [0, 1) (e.g. 0.999: the "
                             f"average spans about 1/(1 - decay) steps)")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup={warmup!r} must be true or false")
        self.decay, self.warmup, self.num_updates = float(decay), warmup, 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self._split(self.module)  # checks the tensors now rather than at the first update

    def _split(self, model: torch.nn.Module):
        """(names, floating tensors, integer tensors) of ``model`` in the fixed order."""
        named = _named_tensors(model)
        floats = [t for _, t in named if t.is_floating_point()]
        others = [t for _, t in named if not t.is_floating_point()]
        return [n for n, _ in named], floats, others

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step toward ``model``'s current parameters and buffers (call after each
        optimiser step). ``model`` must be the model this average was made from (same tensor
        names and shapes, same devices); no host sync."""
        names, avg_f, avg_i = self._split(self.module)
        src_names, src_f, src_i = self._split(model)
        if src_names != names:
            raise ValueError("update(model): the model's parameters and buffers differ from "
                             "those this average was made from; pass the same model")
        d = ema_decay(self.decay, self.num_updates, warmup=self.warmup)
        if avg_f:
            # a ← d·a + (1 − d)·w, in place; the model's tensors are read, never written
            torch._foreach_mul_(avg_f, d)
            torch._foreach_add_(avg_f, [w.detach() for w in src_f], alpha=1 - d)
        if avg_i:
            torch._foreach_copy_(avg_i, src_i)
        self.num_updates += 1

    def averaged_model(self) -> torch.nn.Module:
        """The averaged model (the copy this object updates, in eval mode): evaluate it, save
        it; train the original. It changes with every later ``update``: deep-copy it to keep a
        snapshot."""
        return self.module.eval()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the average: decay, warmup, the update count
        (which sets the warm-up's position) and the averaged model's state dict."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the averaged tensors are copied onto this
        average's devices)."""
        missing = {"decay", "warmup", "num_updates", "model"} - set(state)
        if missing:
            raise ValueError(f"not a WeightAverage state: missing {sorted(missing)}")
        self.module.load_state_dict(state["model"])
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (f"WeightAverage(decay={self.decay}, warmup={self.warmup}, "
                f"num_updates={self.num_updates})")
