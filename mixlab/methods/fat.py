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

from typing import Sequence

import torch
import torch.nn.functional as F

from ..attacks import (ascent_step, attack_loss, autocast_for, check_eps, eval_mode, project,
                       random_init)
from .base import Method, register

# The engine schedules of the official GAIRAT / FAT scripts (their `lr_schedule`), shared by
# fat, gairat and gair_fat so the three compare on one budget.
#: WRN (>= 110 epochs): lr ÷10 at 50%, ÷100 at 75%, ÷200 at 11/12 of training
WRN_SCHEDULE = dict(schedule="piecewise", milestones=(0.5, 0.75, 11 / 12),
                    lr_factors=(0.1, 0.01, 0.005), lr=0.1, batch_size=128, weight_decay=2e-4)
#: ResNet (< 110 epochs): lr ÷10 at 30%, ÷100 at 60% of training
RESNET_SCHEDULE = dict(schedule="piecewise", milestones=(0.3, 0.6), lr_factors=(0.1, 0.01),
                       lr=0.1, batch_size=128, weight_decay=2e-4)
#: the CPU smoke profile's budget, a little above the engine's so a tiny CNN trained this way
#: keeps PGD-20 accuracy above chance on real CIFAR-10 (~20 s per method)
SMOKE_BUDGET = dict(train_subset=2048, epochs=3, lr=0.1)


def early_stopped_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps,
                      alpha, steps: int, tau: int = 0, omega: float = 0.0, norm: str = "Linf",
                      loss: str = "ce", random_start: bool = True, amp: bool | None = None,
                      return_kappa: bool = False):
    """Early-stopped PGD, "PGD-K-τ" (FAT, Zhang et al. 2020, arXiv 2002.11242, Alg. 1).

    Per example: run PGD from a uniform random start; each iterate (before its step) the
    model misclassifies spends one unit of a budget of τ; the first misclassified iterate
    found with no budget left is returned unchanged (τ = 0: the first misclassified iterate).
    Examples that never run out return the last iterate, as plain PGD-K does. ``omega`` adds
    N(0, omega²) noise to every step (the official code's escape from flat regions; FAT
    uses 0.001, GAIR-FAT 0).

    Vectorised: the whole batch runs all ``steps`` forward/backward passes and stopped
    examples are simply not moved (no per-example Python loop, no host sync); so unlike the
    official code it saves no compute, it only changes which point each example trains on.

    Args:
        x: (B, C, H, W) in [0, 1]; y: (B,) int64. eps, alpha: floats or (B,) tensors, pixel
            units. steps: K, the most PGD steps. tau: the budget τ >= 0 (int).
        loss: attack loss maximised, "ce" (FAT) or "cw" / "slm".
        return_kappa: also return GAIRAT's κ (B,) int64: iterates still classified correctly
            while the example was running (as the official GA_earlystop counts it).
    Returns:
        x_adv (B, C, H, W) in [0, 1] within eps of x; or (x_adv, kappa).

    >>> x_adv = early_stopped_pgd(model, x, y, eps=8/255, alpha=2/255, steps=10, tau=1)
    """
    check_eps(eps, norm)
    if tau < 0:
        raise ValueError(f"tau counts misclassified iterates and must be >= 0, got {tau}")
    x = x.detach()
    batch = x.shape[0]
    budget = torch.full((batch,), int(tau), dtype=torch.long, device=x.device)
    running = torch.ones(batch, dtype=torch.bool, device=x.device)
    kappa = torch.zeros(batch, dtype=torch.long, device=x.device)
    with eval_mode(model), autocast_for(x, amp), torch.enable_grad():
        delta = random_init(x, eps, norm) if random_start else torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            fooled = logits.argmax(1) != y
            kappa += running & ~fooled
            # stop where the model errs with no budget left; elsewhere an error costs 1
            running = running & ~(fooled & (budget == 0))
            budget = budget - (running & fooled).long()
            grad, = torch.autograd.grad(attack_loss(logits, y, loss).sum(), delta)
            with torch.no_grad():
                moved = ascent_step(delta.detach(), grad, alpha, norm)
                if omega:
                    moved = moved + omega * torch.randn_like(moved)
                moved = project(moved, x, eps, norm)
                delta = torch.where(running.reshape(-1, *([1] * (x.dim() - 1))), moved,
                                    delta.detach())
    x_adv = (x + delta).detach()
    return (x_adv, kappa) if return_kappa else x_adv


def tau_at(epoch: int, epochs: int, tau: int | Sequence[int],
           milestones: Sequence[float] = ()) -> int:
    """τ for the 0-based ``epoch`` of ``epochs``: ``tau`` is one int (fixed τ) or one value
    per stage, the stages split at ``milestones`` (fractions of training). The official
    dynamic τ of FAT over 120 epochs is tau=(0, 1, 2), milestones=(50/120, 90/120)."""
    if isinstance(tau, int):
        return tau
    if len(tau) != len(milestones) + 1:
        raise ValueError(f"tau {tuple(tau)} needs one value more than milestones "
                         f"{tuple(milestones)}")
    stage = sum(epoch >= m * epochs - 1e-9 for m in milestones)
    return int(tau[stage])


FAT_DEFAULTS = {
    "eps": 8 / 255,                     # radius of the threat model, pixel units
    "alpha": 2 / 255,                   # PGD step size, pixel units (official: 0.007)
    "steps": 10,                        # K: the most PGD steps
    "norm": "Linf",                     # "Linf" or "L2"
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
        "paper": dict(model="wrn-32-10", epochs=120, alpha=0.007, **WRN_SCHEDULE),
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        tau_at(0, self.epochs, self.hp["tau"], self.hp["tau_milestones"])  # fail early

    def loss(self, model, x, y, idx, *, epoch):
        hp = self.hp
        tau = tau_at(epoch, self.epochs, hp["tau"], hp["tau_milestones"])
        x_adv = early_stopped_pgd(model, x, y, eps=hp["eps"], alpha=hp["alpha"],
                                  steps=hp["steps"], tau=tau, omega=hp["omega"],
                                  norm=hp["norm"])
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
