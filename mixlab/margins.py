"""Input-space margins: how far each test point is from the nearest input the model gets wrong.

The margin of (x, y) under a model f is d(x, y) = min ||δ|| such that f(x + δ) ≠ y (Linf or
L2, pixel units, x + δ kept in [0, 1]). It is what MMA training maximises (Ding et al., "MMA
Training: Direct Input Space Margin Maximization through Adversarial Training", ICLR 2020,
arXiv 1812.02637), and any model has one, so the same estimate compares MMA, PGD-AT and ERM.

The estimate is the paper's "ANPGD for test": PGD with the soft-logit-margin loss at radius
``max_eps`` finds a direction that leaves the class fast; a bisection along that direction
then finds where the decision changes. Every value is an *upper bound* on the true margin (a
misclassified point was found at that distance), up to max_eps / 2**search_steps, except
``max_eps`` itself, which reads "no boundary found within max_eps".

>>> eps = estimate_margin(model, x_test, y_test, norm="Linf", max_eps=16/255)   # (N,)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .attacks import boundary_bisection, check_eps, eval_mode, pgd

#: examples per attack batch (memory, not results: every example is searched on its own)
BATCH_SIZE = 500


def estimate_margin(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str,
                    max_eps: float, steps: int = 20, search_steps: int = 10) -> torch.Tensor:
    """Estimated input-space margin of each example, shape (N,), pixel units.

    Distance measure: ``norm`` ("Linf" or "L2"). PGD-``steps`` on the SLM loss at radius
    ``max_eps`` with step 2.5·max_eps/steps and a random start (MMA's settings), then
    ``search_steps`` bisection steps along u = (x_adv - x)/max_eps for the smallest t at which
    ``clamp(x + t·u, 0, 1)`` is misclassified (argmax ≠ y, judged in fp32).

    Args:
        x: (N, C, H, W) in [0, 1]; y: (N,) labels; any model mapping pixels to logits.
    Returns:
        (N,) float tensor on x's device: 0 where the clean point is already misclassified,
        ``max_eps`` where no misclassified point was found up to max_eps, else the distance.
    """
    check_eps(max_eps, norm)
    out = []
    for i in range(0, len(x), BATCH_SIZE):
        xb, yb = x[i:i + BATCH_SIZE], y[i:i + BATCH_SIZE]
        with eval_mode(model), torch.no_grad():
            correct = model(xb).float().argmax(1) == yb
        x_adv = pgd(model, xb, yb, eps=max_eps, step_size=2.5 * max_eps / steps, steps=steps,
                    norm=norm, loss="slm")
        # fp32 probes: near the boundary bf16 logits are too coarse to place it
        eps = boundary_bisection(model, xb, yb, (x_adv - xb) / max_eps, lo=0.0, hi=max_eps,
                                 steps=search_steps, margin="cw", bf16=False)
        out.append(torch.where(correct, eps, torch.zeros_like(eps)))
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def run_margins(run, x: torch.Tensor, y: torch.Tensor, *, norm: str, max_eps: float,
                steps: int = 20, search_steps: int = 10, name: str = "test") -> np.ndarray:
    """Margins of a saved run's model, kept with the run as ``<run.path>/margins/<name>.npz``.

    ``run`` is anything with ``.model`` and ``.path`` (``mixlab.train.load_run``'s Run). A
    second call with the same settings and the same number of examples reads the file
    instead of attacking again. Returns (N,) float32 margins (see :func:`estimate_margin`).
    """
    settings = dict(norm=norm, max_eps=float(max_eps), steps=steps, search_steps=search_steps,
                    n=len(x))
    path = Path(run.path) / "margins" / f"{name}.npz"
    if path.exists():
        saved = np.load(path)
        if json.loads(str(saved["settings"])) == settings:
            return saved["margin"]
    device = next(run.model.parameters()).device
    margin = estimate_margin(run.model, x.to(device), y.to(device), norm=norm, max_eps=max_eps,
                             steps=steps, search_steps=search_steps).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, margin=margin, y=y.cpu().numpy(),
                        settings=np.array(json.dumps(settings)))
    return margin
