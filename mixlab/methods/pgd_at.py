"""PGD adversarial training: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning
Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv 1706.06083).

min_θ E max_{‖δ‖ ≤ ε} CE(f(x + δ), y), the inner max by PGD-10 with random start.
Distance measure: Linf 8/255 with step 2/255 (CIFAR) or L2; pixels in [0, 1].
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd
from .base import Method, register


@register
class PGDAT(Method):
    name = "pgd_at"
    defaults: dict = {}   # the threat model is the engine's (self.attack)

    def loss(self, model, x, y, idx, *, epoch):
        a = self.attack
        x_adv = pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm)
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
