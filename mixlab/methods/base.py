"""The contract every training method follows: one batch in, one scalar loss out.

A method is a small object because some keep per-example state across epochs (MMA's margin
estimate, GAIRAT's logged kappa), indexed by the dataset indices every batch carries. The
training loop (``mixlab.train``) exists once and runs any method; adding a method is adding a
file that subclasses ``Method`` and registers itself with ``@register``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

METHODS: dict[str, type["Method"]] = {}

#: the Madry PGD-AT threat model and inner loop on CIFAR (papers.md, shared protocol)
ATTACK_DEFAULTS = {
    "eps": 8 / 255,     # radius of the threat model, pixel units
    "alpha": 2 / 255,   # PGD step size, pixel units
    "steps": 10,        # PGD iterations in training
    "norm": "Linf",     # "Linf" or "L2"
}

# The engine schedules of the official GAIRAT / FAT scripts (their `lr_schedule`), shared by
# the methods (fat, gairat, gair_fat, ...) so the three compare on one budget.
#: WRN (>= 110 epochs): lr ÷10 at 50%, ÷100 at 75%, ÷200 at 11/12 of training
WRN_SCHEDULE = dict(schedule="piecewise", milestones=(0.5, 0.75, 11 / 12),
                    lr_factors=(0.1, 0.01, 0.005), lr=0.1, batch_size=128, weight_decay=2e-4)
#: ResNet (< 110 epochs): lr ÷10 at 30%, ÷100 at 60% of training
RESNET_SCHEDULE = dict(schedule="piecewise", milestones=(0.3, 0.6), lr_factors=(0.1, 0.01),
                       lr=0.1, batch_size=128, weight_decay=2e-4)
#: the CPU smoke profile's budget, a little above the engine's so a tiny CNN trained this way
#: keeps PGD-20 accuracy above chance on real CIFAR-10 (~20 s per method)
SMOKE_BUDGET = dict(train_subset=2048, epochs=3, lr=0.1)



def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available to ``train(method=<cls.name>)``."""
    METHODS[cls.name] = cls
    return cls


class Method:
    """Base class. Subclasses set ``name``, ``defaults`` (their hyperparameter table) and
    implement ``loss``.

    Attributes:
        hp: the resolved hyperparameters (``defaults`` updated by the caller's keywords).
        num_train: size of the training set (length of per-example state tensors).
    """
    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}
    #: engine settings this method wants per profile, e.g. {"paper": {"epochs": 120}}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}
    #: history key used to pick the best checkpoint ("test_robust" or "test_clean")
    best_metric: ClassVar[str] = "test_robust"

    def __init__(self, *, num_train: int, num_classes: int, epochs: int, **hp: Any):
        unknown = set(hp) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no hyperparameter(s) {sorted(unknown)}; "
                f"it takes {sorted(self.defaults)}")
        self.hp = {**self.defaults, **hp}
        self.num_train, self.num_classes, self.epochs = num_train, num_classes, epochs

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             idx: torch.Tensor, *, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (scalar training loss, logits of the trained-on inputs or None).

        x: (B, C, H, W) in [0, 1]; y: (B,) labels; idx: (B,) dataset indices; epoch: 0-based.
        The model is in train mode on entry and must be in train mode on return; attacks
        switch it to eval mode themselves. The logits (if given) feed the training accuracy.
        """
        raise NotImplementedError

    def epoch_end(self, epoch: int) -> dict[str, np.ndarray]:
        """Arrays to keep for this epoch (saved as ``method/epoch_XXX.npz``); called once per
        epoch, so copying device tensors to the host here costs one sync per epoch."""
        return {}

    def evaluate_extra(self, model: torch.nn.Module, x: torch.Tensor,
                       y: torch.Tensor) -> dict[str, float]:
        """Extra scalars for the epoch record, computed on the evaluation split."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-method state that must survive a checkpoint (e.g. MMA's per-example eps)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels ``target`` (B, K) that sum to 1, batch mean, fp32."""
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(1).mean()
