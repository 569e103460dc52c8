"""PGD adversarial training: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning
Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv 1706.06083).

min_θ E max_{‖δ‖ ≤ ε} CE(f(x + δ), y), the inner max by PGD-10 with random start.
Distance measure: Linf 8/255 with step 2/255 (CIFAR) or L2; pixels in [0, 1].

Mixing (``mix``, default "none"): adversarial training on mixed images, as Rebuffi, Gowal,
Calian, Stimberg, Wiles, Mann, "Fixing Data Augmentation to Improve Adversarial Robustness",
2021 (arXiv 2103.01946) train with CutMix (their best augmentation) or mixup. The mixing is
part of the data augmentation, so it happens *before* the attack: each example is mixed with
a partner from a batch permutation (λ ~ Beta(α, α) with α = ``mix_alpha``, one λ and, for
CutMix, one box per example; see ``mixlab.methods.mixing``), and PGD then runs on the mixed
image x̃ with the mixed soft label ỹ = λ·y_a + (1 − λ)·y_b (CutMix: λ corrected to the pasted
area). The ball is centred on x̃ (‖x_adv − x̃‖ ≤ ε, x_adv in [0, 1]) and the attack maximises
the soft-label CE(f(x_adv), ỹ); the training loss is the same soft-label CE at x_adv. With
``mix="none"`` this is plain PGD-AT on the clean batch, unchanged. Rebuffi et al. pair mixing
with weight averaging of the model (the engine setting ``ema_decay``, ``mixlab.ema``), which is
where most of its gain shows (docs/baselines.md).

Logged per epoch with mixing (``epoch_end``): ``lam``, every λ drawn (Beta(α, α)), and with
CutMix ``lam_box``, the area-corrected label weights.

Shapes: x (B, C, H, W) in [0, 1], y (B,) int64, soft labels (B, K), λ (B,).

>>> model, history = train(method="pgd_at", profile="smoke")
>>> model, history = train(method="pgd_at", method_hp={"mix": "cutmix"}, profile="smoke")
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import pgd
from .base import Method, register, soft_cross_entropy
from .mixing import check_mixing_hp, drain_log, mix_and_log


@register
class PGDAT(Method):
    name = "pgd_at"
    # the threat model is the engine's (self.attack)
    defaults = {
        "mix": "none",       # "none", or mix before the attack: "cutmix" | "mixup"
        "mix_alpha": 1.0,    # Beta(α, α) concentration of the mixing ratio (with mix only)
    }

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        check_mixing_hp("pgd_at", hp)
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._log: dict[str, list[torch.Tensor]] = {}  # this epoch's λ (device tensors)

    def loss(self, model, x, y, idx, *, epoch):
        a = self.attack
        if self.hp["mix"] == "none":
            x_adv = pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                        norm=a.norm)
            logits = model(x_adv)
            return F.cross_entropy(logits.float(), y), logits
        x_mix, y_soft = mix_and_log(self._log, x, y, mix=self.hp["mix"],
                                    alpha=self.hp["mix_alpha"], num_classes=self.num_classes)
        # y rides along for pgd's shape checks only; the loss reads the soft labels
        x_adv = pgd(model, x_mix, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                    norm=a.norm, loss=lambda logits, _y: soft_cross_entropy(logits, y_soft,
                                                                  reduction="none"))
        return soft_cross_entropy(model(x_adv), y_soft), None

    def epoch_end(self, epoch):
        return drain_log(self._log)
