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

Logged per epoch (``epoch_end``): ``lam``, every λ drawn that epoch, so a finished run shows
which distribution it trained with (``mixlab.checks.mixup_lambda``); with CutMix also
``lam_box``, the area-corrected label weights (one per λ drawn).

>>> model, history = train(method="mixup", method_hp={"alpha": 0.2}, profile="smoke")
>>> model, history = train(method="mixup", method_hp={"mix": "cutmix"}, profile="smoke")
>>> boxes = cutmix_boxes(lam, 32, 32)                     # (B, 4) [top, bottom, left, right)
>>> x_mix, y_a, y_b, lam_box = cutmix_data(x, y, perm, boxes)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, mix, register, sample_lam


def mixup_data(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor):
    """Mix each example with its partner ``perm``: returns (x_mix, y_a, y_b).
    lam: (B,) mixing weights in [0, 1] (weight of the example itself)."""
    return mix(x, x[perm], lam), y, y[perm]


def mixup_criterion(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                    lam: torch.Tensor) -> torch.Tensor:
    """λ·CE(logits, y_a) + (1 − λ)·CE(logits, y_b), batch mean, fp32. lam: (B,)."""
    logits = logits.float()
    ce_a = F.cross_entropy(logits, y_a, reduction="none")
    ce_b = F.cross_entropy(logits, y_b, reduction="none")
    return (lam * ce_a + (1 - lam) * ce_b).mean()


#: the mixing operations of ``mix``
MIXES = ("mixup", "cutmix")


def cutmix_boxes(lam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One random CutMix box per λ: (n, 4) int64 ``[top, bottom, left, right)``, pixel indices
    with 0 <= top <= bottom <= height and 0 <= left <= right <= width.

    lam: (n,) draws of Beta(α, α) in [0, 1]. The box's unclipped sides are
    ⌊height·√(1 − λ)⌋ and ⌊width·√(1 − λ)⌋ around a centre drawn uniformly over the pixels;
    half a side (floored) goes to each side of the centre and the box is clipped to the image
    (Yun et al. 2019, ``rand_bbox``). The area actually pasted is
    (bottom − top)·(right − left). On lam's device, no host sync."""
    n, device = lam.shape[0], lam.device
    ratio = torch.sqrt((1 - lam.double()).clamp(0, 1))   # float64: ⌊·⌋ as the official int()
    half_h = (height * ratio).floor().long() // 2
    half_w = (width * ratio).floor().long() // 2
    cy = torch.randint(0, height, (n,), device=device)
    cx = torch.randint(0, width, (n,), device=device)
    return torch.stack([(cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height),
                        (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)], 1)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 1, height, width) bool masks, True inside each box ``[top, bottom, left, right)``;
    built by comparing coordinate grids with the (n, 4) boxes (no loop over examples)."""
    rows = torch.arange(height, device=boxes.device).reshape(1, height, 1)
    cols = torch.arange(width, device=boxes.device).reshape(1, 1, width)
    top, bottom, left, right = (b.reshape(-1, 1, 1) for b in boxes.unbind(1))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside.unsqueeze(1)


def cutmix_data(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, boxes: torch.Tensor):
    """Paste each partner's box into the example: returns (x_mix, y_a, y_b, lam).

    x: (B, C, H, W); y: (B,); perm: (B,) partner indices (x_b = x[perm]); boxes: (B, 4) from
    :func:`cutmix_boxes` (or hand-made). x_mix takes x[perm] inside the box and x elsewhere;
    lam (B,) float32 is the weight of the example's own label, 1 − (box area)/(H·W): exactly
    the fraction of pixels that are still its own."""
    height, width = x.shape[-2:]
    x_mix = torch.where(box_mask(boxes, height, width), x[perm], x)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    lam = 1 - area.double() / (height * width)
    return x_mix, y, y[perm], lam.float()


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
