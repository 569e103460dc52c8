"""Predictions along mixup interpolation paths, clean and in the worst case over an eps-ball.

For a trained model and pairs of images (x_a, x_b) with labels (y_a, y_b), the path is
x(λ) = λ·x_a + (1 − λ)·x_b for λ on a grid in [0, 1] (λ = 0 is x_b, λ = 1 is x_a: the mixup
convention, λ is the weight of x_a). Along it we read three curves of class probabilities:
p(y_a), p(y_b) and p(strongest other class) = max_{j ∉ {y_a, y_b}} p(j).

**Worst case** (a definition, chosen here): at each λ and for each curve separately, the most
adverse value over the eps-ball around the clean mixed point x(λ), δ = 0 included:

* p_a_worst(λ) = min_{‖δ‖ ≤ eps} p(y_a | x(λ) + δ), and likewise p_b_worst for y_b;
* p_other_worst(λ) = max_{‖δ‖ ≤ eps} max_{j ∉ {y_a, y_b}} p(j | x(λ) + δ).

Each extreme is estimated by PGD at fixed λ (``mixlab.attacks.pgd``, random start, points kept
in [0, 1]): maximising CE(·, y_a) for p_a, CE(·, y_b) for p_b, and the log of the total
probability of the other classes for p_other. The PGD value is then combined with the clean
value (min for p_a and p_b, max for p_other), since δ = 0 is in the ball: so the worst-case
probability of a label never exceeds its clean probability, by construction. The three
curves come from three different attacked points; they are envelopes, not one image.
(For a fixed λ the ball around x(λ) is the set AMP's endpoint perturbations reach, up to the
[0, 1] box; docs/amp.md#the-method-as-implemented.)

Works for any model that maps (N, C, H, W) pixels in [0, 1] to logits.

>>> path = interpolation_path(model, x_a, x_b, y_a=y_a, y_b=y_b, eps=8/255)
>>> path["p_a"].shape, path["p_a_worst"].shape      # (pairs, 51) each
>>> plot_path(path, pair=0)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import check_eps, eval_logits, eval_mode, pgd, pgd_step_size

#: a logit value that acts as "excluded" in a log-sum-exp but keeps gradients finite
_EXCLUDED = -1e4


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def _as_labels(y, n: int, device) -> torch.Tensor:
    y = torch.as_tensor(y, device=device).long().reshape(-1)
    return y.expand(n) if y.numel() == 1 else y


def _lam_grid(lams) -> torch.Tensor:
    if isinstance(lams, int):
        return torch.linspace(0, 1, lams)
    return torch.as_tensor(lams, dtype=torch.float32).reshape(-1)


def interpolation_points(x_a: torch.Tensor, x_b: torch.Tensor, lams) -> torch.Tensor:
    """The mixed images λ·x_a + (1 − λ)·x_b: x_a, x_b (P, C, H, W), lams (L,) ->
    (P, L, C, H, W)."""
    lam = _lam_grid(lams).to(x_a.device, x_a.dtype).reshape(1, -1, 1, 1, 1)
    return lam * x_a[:, None] + (1 - lam) * x_b[:, None]


def _other_mask(y_a: torch.Tensor, y_b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) bool, True at y_a and y_b (the classes the "other" curve excludes)."""
    return F.one_hot(y_a, num_classes).bool() | F.one_hot(y_b, num_classes).bool()


def _probs(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return eval_logits(model, x, batch_size).softmax(1)


def _curves(probs: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor):
    """p(y_a), p(y_b), max other probability and its class, each (N,)."""
    others = probs.masked_fill(_other_mask(y_a, y_b, probs.shape[1]), 0.0)
    p_other, other_class = others.max(1)
    return (probs.gather(1, y_a[:, None]).squeeze(1), probs.gather(1, y_b[:, None]).squeeze(1),
            p_other, other_class)


def _worst_case(model, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, *, eps,
                step_size, steps, norm, batch_size, num_classes) -> tuple[torch.Tensor, ...]:
    """PGD estimates of (min p(y_a), min p(y_b), max p(other)) over the ball, each (N,)."""
    n = len(x)
    out = []
    for kind in ("a", "b", "other"):
        target = y_a if kind == "a" else y_b
        values = []
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            if kind == "other":
                mask = _other_mask(y_a[sl], y_b[sl], num_classes)

                def loss(z, _t, mask=mask):  # log of the other classes' total probability
                    z = z.float()
                    return torch.logsumexp(z.masked_fill(mask, _EXCLUDED), 1) - z.logsumexp(1)
            else:
                loss = "ce"  # maximising CE(·, y) minimises p(y)
            x_adv = pgd(model, x[sl], target[sl], eps=eps, step_size=step_size, steps=steps,
                        norm=norm, loss=loss)
            p_a, p_b, p_other, _ = _curves(_probs(model, x_adv, batch_size), y_a[sl], y_b[sl])
            values.append({"a": p_a, "b": p_b, "other": p_other}[kind])
        out.append(torch.cat(values))
    return tuple(out)


def interpolation_path(model: torch.nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, *,
                       y_a=None, y_b=None, lams: int | Sequence[float] = 51,
                       eps: float | None = None, norm: str = "Linf", steps: int = 10,
                       step_size: float | None = None, batch_size: int = 512) -> dict:
    """Class probabilities along the straight paths from x_b (λ = 0) to x_a (λ = 1).

    Args:
        model: maps (N, C, H, W) pixels in [0, 1] to logits; run in eval mode (its mode is
            restored afterwards).
        x_a, x_b: (P, C, H, W) or (C, H, W) images in [0, 1], the pairs' endpoints.
        y_a, y_b: labels (P,) or ints; None: the model's predictions at the endpoints.
        lams: number of evenly spaced λ in [0, 1] (51: steps of 0.02) or the values.
        eps: radius of the worst-case ball around each mixed point, pixel units; None: clean
            curves only. norm: "Linf" | "L2". steps, step_size: PGD iterations and step size
            (step_size None: max(eps/4, 2.5·eps/steps), as ``mixlab.evaluate`` does).
        batch_size: images per forward pass (P·L images are probed in all).
    Returns:
        dict of numpy arrays: ``lams`` (L,); ``probs`` (P, L, K) clean class probabilities;
        ``p_a``, ``p_b``, ``p_other`` (P, L) clean curves and ``other_class`` (P, L) the
        strongest other class; with eps, ``p_a_worst``, ``p_b_worst``, ``p_other_worst``
        (P, L) (worst case as defined in the module docstring); ``y_a``, ``y_b`` (P,); and
        the settings ``eps``, ``norm``, ``steps``, ``step_size``.
    """
    x_a, x_b = _as_batch(x_a).detach(), _as_batch(x_b).detach()
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} differ in shape")
    if eps is not None:
        check_eps(eps, norm)
    n_pairs, grid = len(x_a), _lam_grid(lams)
    n_lams = len(grid)
    with eval_mode(model):
        if y_a is None:
            y_a = _probs(model, x_a, batch_size).argmax(1)
        if y_b is None:
            y_b = _probs(model, x_b, batch_size).argmax(1)
        y_a, y_b = _as_labels(y_a, n_pairs, x_a.device), _as_labels(y_b, n_pairs, x_a.device)
        # flatten (P, L) -> P·L rows; each row keeps its pair's labels
        x = interpolation_points(x_a, x_b, grid).flatten(0, 1)
        ya, yb = y_a.repeat_interleave(n_lams), y_b.repeat_interleave(n_lams)
        probs = _probs(model, x, batch_size)
        p_a, p_b, p_other, other_class = _curves(probs, ya, yb)
        result = {"lams": grid.numpy(), "y_a": y_a.cpu().numpy(), "y_b": y_b.cpu().numpy(),
                  "eps": eps, "norm": norm, "steps": steps, "step_size": None}
        shape = (n_pairs, n_lams)
        for key, v in [("p_a", p_a), ("p_b", p_b), ("p_other", p_other),
                       ("other_class", other_class)]:
            result[key] = v.reshape(shape).cpu().numpy()
        result["probs"] = probs.reshape(*shape, -1).cpu().numpy()
        if eps is not None and eps > 0 and steps > 0:
            step_size = step_size if step_size is not None else pgd_step_size(eps, steps)
            a_adv, b_adv, other_adv = _worst_case(model, x, ya, yb, eps=eps, step_size=step_size,
                                                  steps=steps, norm=norm,
                                                  batch_size=batch_size,
                                                  num_classes=probs.shape[1])
            # δ = 0 is in the ball: the worst case is at least as adverse as the clean value
            result["p_a_worst"] = torch.minimum(a_adv, p_a).reshape(shape).cpu().numpy()
            result["p_b_worst"] = torch.minimum(b_adv, p_b).reshape(shape).cpu().numpy()
            result["p_other_worst"] = torch.maximum(other_adv, p_other).reshape(shape).cpu().numpy()
            result["step_size"] = step_size
        elif eps is not None:  # eps = 0 (or no steps): the ball is the clean point
            for key in ("p_a", "p_b", "p_other"):
                result[f"{key}_worst"] = result[key].copy()
    return result


def image_strip(x_a: torch.Tensor, x_b: torch.Tensor, lams: int | Sequence[float] = 9,
                gap: int = 2) -> np.ndarray:
    """One image (H, L·(W + gap) − gap, C) in [0, 1] showing the path of one pair from x_b
    (left, λ = 0) to x_a (right, λ = 1) at ``lams`` points, white gaps between; ready for
    ``plt.imshow``. x_a, x_b: (C, H, W) or (1, C, H, W)."""
    points = interpolation_points(_as_batch(x_a), _as_batch(x_b), lams)[0]  # (L, C, H, W)
    n, c, h, w = points.shape
    # pad each image on the right with a white gap, lay them side by side, drop the last gap
    padded = F.pad(points, (0, gap), value=1.0)                    # (L, C, H, W + gap)
    strip = padded.permute(1, 2, 0, 3).reshape(c, h, n * (w + gap))[:, :, :n * (w + gap) - gap]
    return strip.permute(1, 2, 0).clamp(0, 1).float().cpu().numpy()


def plot_path(path: dict, pair: int = 0, ax=None, *, classes: Sequence[str] | None = None,
              title: str | None = None, legend: bool = True):
    """Plot one pair's curves from ``interpolation_path``: p(y_a), p(y_b) and the strongest
    other class against λ, clean (solid) and worst case (dashed, when computed)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    name = (lambda k: classes[k]) if classes is not None else (lambda k: f"class {k}")
    lams, ya, yb = path["lams"], int(path["y_a"][pair]), int(path["y_b"][pair])
    curves = [("p_a", f"p(y_a = {name(ya)})", "C0"), ("p_b", f"p(y_b = {name(yb)})", "C1"),
              ("p_other", "p(strongest other)", "C2")]
    for key, label, color in curves:
        ax.plot(lams, path[key][pair], color=color, label=label)
        if f"{key}_worst" in path:
            ax.plot(lams, path[f"{key}_worst"][pair], color=color, linestyle="--")
    ax.set(xlabel="λ (weight of x_a)", ylabel="probability", ylim=(-0.02, 1.02), xlim=(0, 1))
    if title:
        ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(fontsize=7, loc="center left")
    return ax
