"""Paths from a test image towards the decision boundary: the margin explorer's computation.

The margin of a classifier at ``(x, y)`` is the distance from ``x`` to the nearest point it
misclassifies (MMA, Ding et al. 2020, arXiv 1812.02637). Along a direction ``u`` (unit length
in the threat model's norm) the path

    x(t) = clip(x + t * u, 0, 1),      t in [0, t_max], pixel units (Linf: 8/255 = 0.0314)

shows every class's probability and logit, the predicted class, and the point where the
prediction first leaves the true class (the boundary crossing along this path). ``t`` is the
nominal distance; where the clip to [0, 1] bites, the true distance is smaller. The model's own
margin estimate (:func:`mixlab.attacks.estimate_margin`) is the crossing along its adversarial
direction, so along any path the crossing sits at or beyond it.

Directions (all unit length in ``norm``):

* ``"pgd"``: PGD-CE at the threat model's ``eps`` against the chosen model, then extended;
* ``"anpgd"``: MMA's adaptive-norm PGD direction, PGD with the SLM loss at ``max_eps``;
* ``"random"``: random signs (Linf: a corner of the cube) or a Gaussian (L2), seeded;
* ``"image"``: the straight line towards another test image, ``t_max`` = its distance.

Pure functions of tensors, no widgets and no plotting: ``mixlab.margin_figure`` draws a path,
``mixlab.explorer`` is the interactive view.

>>> u, t_max, note = path_direction("anpgd", model, x, y, norm="Linf", eps=8/255, max_eps=32/255)
>>> ts = torch.linspace(0, t_max, 101)
>>> path = path_data(model, x, y, u, ts, margin=float(estimate_margin(model, x, y, norm="Linf",
...                                                                   max_eps=32/255)))
>>> path.crossing                                   # pixel units, nan if the path stays correct
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .attacks import boundary_bisection, cw_margin, eval_logits, pgd, pgd_step_size

#: direction keys and the labels the explorer shows
DIRECTIONS = {
    "pgd": "adversarial (PGD-CE at eps)",
    "anpgd": "adversarial (AN-PGD, SLM at max_eps)",
    "random": "random",
    "image": "towards another image",
}


def _norm_of(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example Linf or L2 norm, shape (B,)."""
    flat = v.flatten(1).float()
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a parameterless one)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_of(run: Any) -> torch.nn.Module:
    """A ``Run`` (anything with a ``.model``) or a bare model -> the model."""
    return run.model if hasattr(run, "model") else run


def path_direction(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   norm: str, eps: float, max_eps: float, steps: int = 10,
                   x_target: torch.Tensor | None = None, seed: int = 0
                   ) -> tuple[torch.Tensor, float, str]:
    """A unit direction (in ``norm``) from one image, and how far the path should go.

    x: (1, C, H, W) in [0, 1]; y: (1,) label; model: the model the adversarial directions are
    computed against. ``kind`` is a key of :data:`DIRECTIONS`; ``x_target`` (1, C, H, W) is
    needed for ``"image"``. Adversarial directions start PGD at zero (no random start), so
    the same image always gives the same path; their step is 2.5·radius/steps (MMA's).
    Returns ``(u, t_max, note)``: u (1, C, H, W) with ``||u|| = 1``, t_max in pixel units, and
    a note (empty, or why a fallback was used).
    """
    note = ""
    t_max = float(max_eps)
    if kind in ("pgd", "anpgd"):
        radius, loss = (eps, "ce") if kind == "pgd" else (max_eps, "slm")
        x_adv = pgd(model, x, y, eps=radius, step_size=pgd_step_size(radius, steps, floor=0),
                    steps=steps, norm=norm, loss=loss, random_start=False)
        delta = (x_adv - x).float()
        if float(_norm_of(delta, norm)[0]) == 0.0:
            # a zero gradient (e.g. an untrained zero-initialised last layer): no direction
            kind, note = "random", "the attack found no direction (zero gradient); random used"
    elif kind == "image":
        if x_target is None:
            raise ValueError("direction 'image' needs x_target, the image to walk towards")
        delta = (x_target.to(x.device) - x).float()
        t_max = float(_norm_of(delta, norm)[0])
        if t_max == 0.0:
            raise ValueError("the target image equals the start image; pick another one")
    elif kind != "random":
        raise ValueError(f"unknown direction {kind!r}; choose one of {list(DIRECTIONS)}")
    if kind == "random":
        # a CPU generator: the same seed gives the same direction on every device
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x.shape, generator=g)
        delta = (noise.sign() if norm == "Linf" else noise).to(x.device)
    u = delta / _norm_of(delta, norm).reshape(-1, *([1] * (x.dim() - 1)))
    return u.to(x.dtype), t_max, note


def path_points(x: torch.Tensor, u: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """``clip(x + t·u, 0, 1)`` for every t: x, u (1, C, H, W), ts (n,) -> (n, C, H, W)."""
    ts = ts.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (x + ts * u).clamp(0, 1)


def first_crossing(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
                   ts: np.ndarray, logits: np.ndarray, search_steps: int = 10) -> float:
    """Where the prediction first leaves class ``y`` along ``clip(x + t·u, 0, 1)``, pixel units.

    The grid ``ts`` (n,) with its logits (n, K) brackets the first misclassified point (CW
    margin ``max_{j≠y} z_j − z_y >= 0``, the decision itself); ``search_steps`` bisection
    steps inside that grid interval (``boundary_bisection``, fp32 probes) place it to
    (t_max / (n-1)) / 2**search_steps. x, u: (1, C, H, W); y: (1,). Returns 0 if the start is
    already misclassified, ``nan`` if the whole path stays correct (a later crossing hidden
    between two grid points that are both correct is missed, by design of the grid)."""
    z = torch.as_tensor(logits, dtype=torch.float32)
    m = cw_margin(z, y.cpu().expand(len(z))).numpy()
    wrong = np.flatnonzero(m >= 0)
    if len(wrong) == 0:
        return float("nan")
    k = int(wrong[0])
    if k == 0:
        return 0.0
    t = boundary_bisection(model, x, y, u, lo=float(ts[k - 1]), hi=float(ts[k]),
                           steps=search_steps, margin="cw", bf16=False)
    return float(t[0])


@dataclasses.dataclass
class PathData:
    """One model's view of one path: ts (n,), logits and probs (n, K), pred (n,), the first
    boundary crossing (nan: none within t_max) and the model's margin estimate at the start."""
    ts: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    crossing: float
    margin: float


def path_data(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
              ts: torch.Tensor, *, margin: float) -> PathData:
    """Walk the path ``clip(x + t·u, 0, 1)`` for every t in ``ts`` (n,) with ``model``: one
    batched fp32 forward (:func:`mixlab.attacks.eval_logits`; bf16 logits are too coarse near
    the boundary the crossing is placed on), then the first crossing. x, u: (1, C, H, W) and
    y: (1,) on the model's device; margin: the model's margin estimate at x, kept with it."""
    logits = eval_logits(model, path_points(x, u, ts), batch_size=512).cpu()
    ts_np = ts.cpu().numpy()
    return PathData(ts=ts_np, logits=logits.numpy(), probs=logits.softmax(1).numpy(),
                    pred=logits.argmax(1).numpy(),
                    crossing=first_crossing(model, x, y, u, ts_np, logits.numpy()),
                    margin=margin)
