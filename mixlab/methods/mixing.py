"""Mixing operations shared by the methods that mix examples: mixup, CutMix, and the mixing
that adversarial methods (``pgd_at``, ``trades``) apply before their attack.

* **mixup**: Zhang, Cisse, Dauphin, Lopez-Paz, "mixup: Beyond Empirical Risk Minimization",
  ICLR 2018 (arXiv 1710.09412). x̃ = λ·x_a + (1 − λ)·x_b with λ ~ Beta(α, α)
  (:func:`mixup_data`).
* **CutMix**: Yun, Han, Oh, Chun, Choe, Yoo, "CutMix: Regularization Strategy to Train Strong
  Classifiers with Localizable Features", ICCV 2019 (arXiv 1905.04899); official code
  clovaai/CutMix-PyTorch. A box of the partner is pasted into the example,
  x̃ = (1 − M)·x_a + M·x_b with M the box's 0/1 mask (:func:`cutmix_boxes`, :func:`box_mask`,
  :func:`cutmix_data`); the label weight is the fraction of pixels still the example's own.
* **Mixing before an attack**: Rebuffi, Gowal, Calian, Stimberg, Wiles, Mann, "Fixing Data
  Augmentation to Improve Adversarial Robustness", 2021 (arXiv 2103.01946) train adversarially
  on mixed images. :func:`mix_batch` mixes a batch (one λ and, for CutMix, one box per
  example) and returns the mixed soft labels the attack and the loss then use.

Partners come from a batch permutation; the boxes of a whole batch are built on the device
from coordinate grids (no per-example Python loop, no host sync). The methods' pages:
``mixlab.methods.mixup`` and docs/baselines.md.

Shapes: x (B, C, H, W) in [0, 1], y (B,) int64, lam (B,) float32, soft labels (B, K),
boxes (B, 4) int64 ``[top, bottom, left, right)``.

>>> boxes = cutmix_boxes(lam, 32, 32)
>>> x_mix, y_a, y_b, lam_box = cutmix_data(x, y, perm, boxes)
>>> x_mix, y_soft, lam, lam_drawn = mix_batch(x, y, mix="cutmix", alpha=1.0, num_classes=10)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import mix, sample_lam

__all__ = ["MIXES", "mixup_data", "cutmix_boxes", "box_mask", "cutmix_data", "mix_batch"]

#: the mixing operations a method's ``mix`` hyperparameter names
MIXES = ("mixup", "cutmix")


def check_mixing_hp(method: str, hp: dict) -> None:
    """The ``mix`` and ``mix_alpha`` hyperparameters of a method that mixes its training
    images before its attack (pgd_at, trades): ``mix`` "none" or one of :data:`MIXES`,
    ``mix_alpha`` > 0. Raises ValueError naming the method, the value and the choices."""
    if hp["mix"] not in ("none", *MIXES):
        raise ValueError(f"{method}.mix={hp['mix']!r} is not one of {['none', *MIXES]}")
    if not hp["mix_alpha"] > 0:
        raise ValueError(f"{method}.mix_alpha={hp['mix_alpha']!r} must be > 0 "
                         f"(Beta(alpha, alpha) concentration; 1 is uniform λ)")


def mixup_data(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor):
    """Mix each example with its partner ``perm``: returns (x_mix, y_a, y_b).
    lam: (B,) mixing weights in [0, 1] (weight of the example itself)."""
    return mix(x, x[perm], lam), y, y[perm]


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


def mix_batch(x: torch.Tensor, y: torch.Tensor, *, mix: str, alpha: float,
              num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix every example with a partner from a batch permutation, one λ per example: the
    mixing that adversarial methods apply before their attack (Rebuffi et al. 2021).

    mix: "mixup" or "cutmix"; alpha: the Beta(α, α) concentration of λ.
    Returns (x_mix (B, C, H, W), y_soft (B, K) = λ·onehot(y) + (1 − λ)·onehot(y[perm]),
    lam (B,) the weight of the example's own label (CutMix: area-corrected), lam_drawn (B,)
    the Beta(α, α) draws). The draws, in order: λ, the permutation, the box centres. On x's
    device, no host sync."""
    if mix not in MIXES:
        raise ValueError(f"mix={mix!r} is not one of {list(MIXES)}")
    batch = x.shape[0]
    lam_drawn = sample_lam(alpha, batch, x.device)
    perm = torch.randperm(batch, device=x.device)
    if mix == "cutmix":
        boxes = cutmix_boxes(lam_drawn, x.shape[-2], x.shape[-1])
        x_mix, y_a, y_b, lam = cutmix_data(x, y, perm, boxes)
    else:
        x_mix, y_a, y_b = mixup_data(x, y, lam_drawn, perm)
        lam = lam_drawn
    w = lam.reshape(-1, 1)
    y_soft = (w * F.one_hot(y_a, num_classes).float()
              + (1 - w) * F.one_hot(y_b, num_classes).float())
    return x_mix, y_soft, lam, lam_drawn


def mix_and_log(log: dict[str, list[torch.Tensor]], x: torch.Tensor, y: torch.Tensor, *,
                mix: str, alpha: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mix_batch`, keeping its draws in ``log`` (device tensors, no host sync): "lam"
    (the Beta draws) and, for CutMix, "lam_box" (the area-corrected weights). Returns (x_mix,
    y_soft). :func:`drain_log` turns the epoch's log into arrays."""
    x_mix, y_soft, lam, lam_drawn = mix_batch(x, y, mix=mix, alpha=alpha,
                                              num_classes=num_classes)
    log.setdefault("lam", []).append(lam_drawn.detach())
    if mix == "cutmix":
        log.setdefault("lam_box", []).append(lam.detach())
    return x_mix, y_soft


def drain_log(log: dict[str, list[torch.Tensor]]) -> dict:
    """The epoch's logged draws as numpy arrays (one host copy per epoch); empties ``log``."""
    out = {key: torch.cat(v).float().cpu().numpy() for key, v in log.items() if v}
    log.clear()
    return out
