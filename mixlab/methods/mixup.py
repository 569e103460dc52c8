"""mixup: Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
ICLR 2018 (arXiv 1710.09412).

Trains on convex combinations of pairs of examples and of their labels:
x̃ = λ·x_a + (1 − λ)·x_b, ỹ = λ·y_a + (1 − λ)·y_b, λ ~ Beta(α, α), partners by a batch
permutation. As in the official code the loss is λ·CE(f(x̃), y_a) + (1 − λ)·CE(f(x̃), y_b),
which equals the soft-label CE. One λ per batch (official code) or per example (``per_example``).
α = 1 (uniform λ) is the default, as in Zhang et al.'s CIFAR-10 experiments and in Zhang et al.
2021 ("How does mixup help robustness and generalization?", arXiv 2010.04819).

CutMix (``mix="cutmix"``): Yun, Han, Oh, Chun, Choe, Yoo, "CutMix: Regularization Strategy to
Train Strong Classifiers with Localizable Features", ICCV 2019 (arXiv 1905.04899); official
code clovaai/CutMix-PyTorch. Instead of blending whole images, a box of the partner is pasted
into the example: x̃ = (1 − M)·x_a + M·x_b with M the box's 0/1 mask. λ ~ Beta(α, α) sets the
box: sides ⌊H·√(1 − λ)⌋ and ⌊W·√(1 − λ)⌋, centre uniform over the pixels, clipped to the image
(as the official ``rand_bbox``, which extends half the side, floored, to each side of the
centre). The label weight is then corrected to the box actually pasted,
λ_box = 1 − (pasted area)/(H·W), and the loss is λ_box·CE(f(x̃), y_a) + (1 − λ_box)·CE(f(x̃), y_b).
The boxes of a whole batch are built on the device from coordinate grids (no per-example
Python loop, no host sync); one box per batch (official code) or per example (``per_example``).
The mixing operations themselves (``mixup_data``, ``cutmix_boxes``, ``box_mask``,
``cutmix_data``) live in ``mixlab.methods.mixing``, shared with the adversarial methods that
mix (docs/baselines.md).

Logged per epoch (``epoch_end``): ``lam``, every λ drawn that epoch, so a finished run shows
which distribution it trained with (``mixlab.checks.mixup_lambda``); with CutMix also
``lam_box``, the area-corrected label weights (one per λ drawn).

>>> model, history = train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")
>>> model, history = train(method="mixup", method_hp={"mix": "cutmix"}, profile="smoke")
>>> loss = mixup_criterion(model(x_mix), y_a, y_b, lam)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, register, sample_lam
from .mixing import MIXES, cutmix_boxes, cutmix_data, mixup_data


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
        "per_example": False,    # one λ (and CutMix box) per example instead of one per batch
        "mix": "mixup",          # "mixup" (blend whole images) or "cutmix" (paste a box)
    }
    best_metric = "val_clean"
    uses_attack = False

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        if not hp["alpha"] > 0:
            raise ValueError(f"mixup.alpha={hp['alpha']!r} must be > 0 (Beta(alpha, alpha) "
                             f"concentration; 1 is uniform λ); for no mixing use method='erm'")
        if hp["mix"] not in MIXES:
            raise ValueError(f"mixup.mix={hp['mix']!r} is not one of {list(MIXES)}")
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._lams: list[torch.Tensor] = []  # λ drawn this epoch (device tensors, no sync)
        self._lam_box: list[torch.Tensor] = []  # CutMix: area-corrected label weights

    def loss(self, model, x, y, idx, *, epoch):
        batch = x.shape[0]
        n = batch if self.hp["per_example"] else 1
        lam_drawn = sample_lam(self.hp["alpha"], n, x.device)
        self._lams.append(lam_drawn.detach())
        perm = torch.randperm(batch, device=x.device)
        if self.hp["mix"] == "cutmix":
            boxes = cutmix_boxes(lam_drawn, x.shape[-2], x.shape[-1]).expand(batch, 4)
            x_mix, y_a, y_b, lam = cutmix_data(x, y, perm, boxes)
            self._lam_box.append(lam[:n].detach())
        else:
            lam = lam_drawn.expand(batch)
            x_mix, y_a, y_b = mixup_data(x, y, lam, perm)
        return mixup_criterion(model(x_mix), y_a, y_b, lam), None

    def epoch_end(self, epoch):
        out = {}
        # one host copy per epoch
        if self._lams:
            out["lam"] = torch.cat(self._lams).float().cpu().numpy()
        if self._lam_box:
            out["lam_box"] = torch.cat(self._lam_box).float().cpu().numpy()
        self._lams, self._lam_box = [], []
        return out
