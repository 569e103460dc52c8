"""FAT, friendly adversarial training: Zhang, Xu, Han, Niu, Cui, Sugiyama, Kankanhalli,
"Attacks Which Do Not Kill Training Make Adversarial Learning Stronger", ICML 2020
(arXiv 2002.11242). Official code: zjfheart/Friendly-Adversarial-Training.

Instead of the most adversarial point in the ball, FAT trains on a *friendly* one: the PGD
iterate at which the model first errs, or τ misclassified iterates later (early-stopped PGD,
"PGD-K-τ", Alg. 1 of the paper). min_θ E CE(f(x̃), y) with x̃ = early_stopped_pgd(x).
τ grows during training (the official "dynamic τ": 0, then 1, then 2 over 120 epochs).

Distance measure: Linf (default, 8/255) or L2; pixels in [0, 1].
Shapes: x (B, C, H, W) in [0, 1], y (B,) int64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import early_stopped_pgd, tau_at
from .base import RESNET_SCHEDULE, SMOKE_BUDGET, WRN_SCHEDULE, Method, register

FAT_DEFAULTS = {
    "tau": (0, 1, 2),                   # τ, misclassified iterates allowed before stopping:
                                        # an int, or one per stage (official dynamic τ)
    "tau_milestones": (50 / 120, 90 / 120),  # fractions of training where τ steps up
    "omega": 0.001,                     # std of the Gaussian noise added to each PGD step
}


@register
class FAT(Method):
    """Friendly adversarial training: mean CE on early-stopped PGD points."""
    name = "fat"
    defaults = dict(FAT_DEFAULTS)
    profiles = {
        "smoke": dict(SMOKE_BUDGET),
        "short": dict(model="preactresnet18", epochs=30, **RESNET_SCHEDULE),
        "paper": dict(model="wrn-32-10", epochs=120, step_size=0.007, **WRN_SCHEDULE),
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        tau_at(0, self.epochs, self.hp["tau"], self.hp["tau_milestones"])  # fail early

    def loss(self, model, x, y, idx, *, epoch):
        hp, a = self.hp, self.attack
        tau = tau_at(epoch, self.epochs, hp["tau"], hp["tau_milestones"])
        x_adv = early_stopped_pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                                  tau=tau, omega=hp["omega"], norm=a.norm)
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
