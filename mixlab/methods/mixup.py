"""mixup: Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
ICLR 2018 (arXiv 1710.09412).

Trains on convex combinations of pairs of examples and of their labels:
x̃ = λ·x_a + (1 − λ)·x_b, ỹ = λ·y_a + (1 − λ)·y_b, λ ~ Beta(α, α), partners by a batch
permutation. As in the official code the loss is λ·CE(f(x̃), y_a) + (1 − λ)·CE(f(x̃), y_b),
which equals the soft-label CE. One λ per batch (official code) or per example (``per_example``).
α = 1 (uniform λ) is the default, as in Zhang et al.'s CIFAR-10 experiments and in Zhang et al.
2021 ("How does mixup help robustness and generalization?", arXiv 2010.04819).

Logged per epoch (``epoch_end``): ``lam``, every λ drawn that epoch, so a finished run shows
which distribution it trained with (``mixlab.checks.mixup_lambda``).

>>> model, history = train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, register


def sample_lam(alpha: float, n: int, device: torch.device) -> torch.Tensor:
    """n draws from Beta(alpha, alpha) on ``device``; alpha > 0 (the Beta concentration)."""
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


def mixup_data(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor):
    """Mix each example with its partner ``perm``: returns (x_mix, y_a, y_b).
    lam: (B,) mixing weights in [0, 1] (weight of the example itself)."""
    lam_img = lam.reshape(-1, 1, 1, 1).to(x.dtype)
    return lam_img * x + (1 - lam_img) * x[perm], y, y[perm]


def mixup_criterion(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                    lam: torch.Tensor) -> torch.Tensor:
    """λ·CE(logits, y_a) + (1 − λ)·CE(logits, y_b), batch mean, fp32. lam: (B,)."""
    logits = logits.float()
    ce_a = F.cross_entropy(logits, y_a, reduction="none")
    ce_b = F.cross_entropy(logits, y_b, reduction="none")
    return (lam * ce_a + (1 - lam) * ce_b).mean()


@register
class Mixup(Method):
    name = "mixup"
    defaults = {
        "alpha": 1.0,            # Beta(α, α) concentration; α = 1 is uniform λ (Zhang et al.)
        "per_example": False,    # one λ per example instead of one per batch
    }
    best_metric = "val_clean"
    uses_attack = False

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        if not hp["alpha"] > 0:
            raise ValueError(f"mixup.alpha={hp['alpha']!r} must be > 0 (Beta(alpha, alpha) "
                             f"concentration; 1 is uniform λ); for no mixing use method='erm'")
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._lams: list[torch.Tensor] = []  # λ drawn this epoch (device tensors, no sync)

    def loss(self, model, x, y, idx, *, epoch):
        n = x.shape[0] if self.hp["per_example"] else 1
        lam_drawn = sample_lam(self.hp["alpha"], n, x.device)
        self._lams.append(lam_drawn.detach())
        lam = lam_drawn.expand(x.shape[0])
        perm = torch.randperm(x.shape[0], device=x.device)
        x_mix, y_a, y_b = mixup_data(x, y, lam, perm)
        return mixup_criterion(model(x_mix), y_a, y_b, lam), None

    def epoch_end(self, epoch):
        if not self._lams:
            return {}
        lam = torch.cat(self._lams).float().cpu().numpy()  # one host copy per epoch
        self._lams = []
        return {"lam": lam}
