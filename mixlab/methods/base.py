"""The contract every training method follows: one batch in, one scalar loss out.

A method is a small object because some keep per-example state across epochs (MMA's margin
estimate, GAIRAT's logged kappa), indexed by the dataset indices every batch carries. The
training loop (``mixlab.train``) exists once and runs any method; adding a method is adding a
file that subclasses ``Method`` and registers itself with ``@register``.

Under torchrun each process computes the loss on its share of the global batch
(docs/distributed.md): a batch mean is then the mean over the share, and the gradient average
of DistributedDataParallel makes it the global batch's. Per-example state kept as tensors of
length ``num_train`` indexed by ``idx`` is merged across processes by the engine; a statistic
of the whole batch that is not a mean (GAIRAT's weight normaliser) goes through
:func:`batch_sum`.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch

METHODS: dict[str, type["Method"]] = {}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """The engine's training threat model, handed to a method as one argument.

    eps: radius, pixel units. step_size: PGD step, pixel units. steps: PGD iterations.
    norm: "Linf" or "L2". The default is Madry et al.'s CIFAR PGD-10 (8/255, 2/255, Linf),
    used when a method is built directly (tests, the benchmark); ``train`` always passes the
    resolved settings (``mixlab.config``)."""
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "Linf"

    def __post_init__(self):
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"attack norm={self.norm!r} is not one of ['Linf', 'L2']")
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"attack {name}={value!r} must be a finite number > 0 "
                                 f"(pixel units, e.g. 8/255)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"attack steps={self.steps!r} must be a whole number >= 1")


# The engine schedules of the official GAIRAT / FAT scripts (their `lr_schedule`), shared by
# the methods (fat, gairat, gair_fat, ...) so the three compare on one budget.
#: WRN (>= 110 epochs): lr ÷10 at 50%, ÷100 at 75%, ÷200 at 11/12 of training
WRN_SCHEDULE = dict(schedule="piecewise", milestones=[0.5, 0.75, 11 / 12],
                    lr_factors=[0.1, 0.01, 0.005], lr=0.1, batch_size=128, weight_decay=2e-4)
#: ResNet (< 110 epochs): lr ÷10 at 30%, ÷100 at 60% of training
RESNET_SCHEDULE = dict(schedule="piecewise", milestones=[0.3, 0.6], lr_factors=[0.1, 0.01],
                       lr=0.1, batch_size=128, weight_decay=2e-4)
#: the CPU smoke profile's budget, a little above the engine's so a tiny CNN trained this way
#: keeps PGD-20 accuracy above chance on real CIFAR-10 (~20 s per method)
SMOKE_BUDGET = dict(train_subset=2048, epochs=3, lr=0.1)


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to ``train(method=<cls.name>)``."""
    METHODS[cls.name] = cls
    return cls


class Method:
    """Base class. Subclasses set ``name``, ``defaults`` (their hyperparameter table, whose
    names never repeat an engine setting) and implement ``loss``.

    Attributes:
        hp: the resolved hyperparameters (``defaults`` updated by the caller's keywords).
        attack: the engine's training threat model (:class:`AttackSpec`); methods that attack
            read eps, step_size, steps and norm from here and nowhere else.
        num_train: size of the training set (length of per-example state tensors).
    """
    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}
    #: engine settings this method wants per profile, e.g. {"paper": {"epochs": 120}}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the method's own hyperparameters per profile, e.g. {"smoke": {"begin_epoch": 2}}
    hp_profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    #: history key used to pick the best checkpoint on the validation split
    best_metric: ClassVar[str] = "val_robust"
    #: whether ``loss`` runs the training attack (documentation and the dry run)
    uses_attack: ClassVar[bool] = True

    def __init__(self, *, num_train: int, num_classes: int, epochs: int,
                 attack: AttackSpec | None = None, **hp: Any):
        self.hp = self.check_hp({**self.defaults, **hp}, dataset=None,
                                attack=attack or AttackSpec())
        self.attack = attack or AttackSpec()
        self.num_train, self.num_classes, self.epochs = num_train, num_classes, epochs

    @classmethod
    def check_hp(cls, hp: dict[str, Any], *, dataset: str | None,
                 attack: AttackSpec) -> dict[str, Any]:
        """Check (and complete) the hyperparameters; returns them. The base class checks names
        and types against ``defaults`` (a bool stays a bool, a number a finite number, a string
        a string); subclasses add ranges and fill ``None`` defaults that depend on the dataset
        or threat model. Raises ValueError/TypeError naming the value and the fix."""
        unknown = sorted(set(hp) - set(cls.defaults))
        if unknown:
            raise ValueError(f"method {cls.name!r} has no hyperparameter(s) {unknown}; "
                             f"it takes {sorted(cls.defaults)}")
        for key, default in cls.defaults.items():
            value = hp[key]
            where = f"{cls.name}.{key}={value!r}"
            if default is None or value is None:
                continue
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError(f"{where} must be true or false")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{where} must be a number (default {default!r})")
                if not math.isfinite(value):
                    raise ValueError(f"{where} must be finite")
                if isinstance(default, int) and not float(value).is_integer():
                    raise TypeError(f"{where} must be a whole number (default {default!r})")
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise TypeError(f"{where} must be a string (default {default!r})")
        return dict(hp)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             idx: torch.Tensor, *, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (scalar training loss, logits of the trained-on inputs or None).

        x: (B, C, H, W) in [0, 1]; y: (B,) labels; idx: (B,) dataset indices; epoch: 0-based.
        The model is in train mode on entry and must be in train mode on return; attacks
        switch it to eval mode themselves. The logits (if given) feed the training accuracy.
        Under torchrun ``model`` is the DistributedDataParallel wrapper: call it for the
        training passes and give it to ``mixlab.attacks``, which run the module inside it.
        """
        raise NotImplementedError

    def epoch_end(self, epoch: int) -> dict[str, np.ndarray]:
        """Arrays to keep for this epoch (saved as ``method/epoch_XXX.npz``); called once per
        epoch, so copying device tensors to the host here costs one sync per epoch."""
        return {}

    def evaluate_extra(self, model: torch.nn.Module, x: torch.Tensor,
                       y: torch.Tensor) -> dict[str, float]:
        """Extra scalars for the epoch record, each a mean over the examples of ``x``. The
        engine calls it on chunks of the evaluation split (spread over the processes under
        torchrun) and records the size-weighted mean of the chunks' values."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-method state that must survive a checkpoint (e.g. MMA's per-example eps)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ----------------------------------------------------------------------------- shared by methods
#: how :func:`batch_sum` sums over the processes that share a step's batch; set by
#: ``mixlab.distributed`` for the duration of a step under torchrun, None otherwise
_BATCH_SUM: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = \
    contextvars.ContextVar("batch_sum", default=None)


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """``t``, a sum over this process's examples of the step, summed over the whole global
    batch: ``t`` itself in one process; under torchrun, where each process trains on its
    share of the batch, the sum over every process (an all-reduce, queued like a kernel: no
    host sync). For batch statistics that are not means, e.g. GAIRAT's weight normaliser.
    Not differentiable: give it values that need no gradient."""
    reduce = _BATCH_SUM.get()
    return t if reduce is None else reduce(t)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against soft labels ``target`` (B, K) that sum to 1, in fp32: the batch
    mean (``reduction="mean"``), or per example, shape (B,) (``reduction="none"``)."""
    per_example = -(target * torch.log_softmax(logits.float(), dim=1)).sum(1)
    if reduction == "none":
        return per_example
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'none'")
    return per_example.mean()


def sample_lam(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """n draws from Beta(alpha, alpha) on ``device``, float32 (n,); alpha > 0 (the Beta
    concentration). The mixing weights of mixup (Zhang et al. 2018, arXiv 1710.09412) and of
    every method that mixes."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha={alpha!r} must be > 0 (Beta(alpha, alpha)); "
                         f"for no mixing train with method='erm'")
    # Beta(α, α) = G_1 / (G_1 + G_2) with G_i ~ Gamma(α), drawn in log space: at small α the
    # gamma draws underflow to 0 (torch's own Beta then returns exactly 0.5 for about a quarter
    # of the draws at α = 1e-3). log G(α) = log G(α + 1) + log(U) / α (Marsaglia & Tsang).
    # validate_args=False: argument validation calls .all(), a host sync on CUDA
    shape = torch.full((2, n), float(alpha) + 1.0, device=device, dtype=torch.float64)
    log_g = (torch.distributions.Gamma(shape, 1.0, validate_args=False).sample().log()
             + torch.rand(2, n, device=device, dtype=torch.float64).log() / float(alpha))
    return torch.sigmoid(log_g[0] - log_g[1]).float()


def mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """λ·a + (1 − λ)·b per example, lam (B,): images (B, C, H, W) or soft labels (B, K)."""
    lam = lam.reshape(-1, *([1] * (a.dim() - 1))).to(a.dtype)
    return lam * a + (1 - lam) * b
