"""PGD adversarial training: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning
Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv 1706.06083).

min_θ E max_{‖δ‖ ≤ ε} CE(f(x + δ), y), the inner max by PGD-10 with random start.
Distance measure: Linf 8/255 with step 2/255 (CIFAR) or L2; pixels in [0, 1].
"""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd
from .base import ATTACK_DEFAULTS, Method, register


@register
class PGDAT(Method):
    name = "pgd_at"
    defaults = dict(ATTACK_DEFAULTS)

    def loss(self, model, x, y, idx, *, epoch):
        hp = self.hp
        x_adv = pgd(model, x, y, eps=hp["eps"], alpha=hp["alpha"], steps=hp["steps"],
                    norm=hp["norm"])
        logits = model(x_adv)
        return F.cross_entropy(logits.float(), y), logits
