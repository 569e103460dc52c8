"""Input-space margins: how far each test point is from the nearest input the model gets wrong.

The margin of (x, y) under a model f is d(x, y) = min ||δ|| such that f(x + δ) ≠ y (Linf or
L2, pixel units, x + δ kept in [0, 1]). It is what MMA training maximises (Ding et al., "MMA
Training: Direct Input Space Margin Maximization through Adversarial Training", ICLR 2020,
arXiv 1812.02637), and any model has one, so the same estimate compares MMA, PGD-AT and ERM.

The estimate is :func:`mixlab.attacks.estimate_margin` (imported here; MMA's validation margin
and the margin explorer use the same function; how it differs from the official "ANPGD for
test": docs/mma.md#the-validation-margin): PGD with the soft-logit-margin loss at radius
``max_eps`` finds a direction that leaves the class fast; a bisection along that direction
then finds where the decision changes, all in fp32. Every value
is an *upper bound* on the true margin (a misclassified point was found at that distance), up
to max_eps / 2**search_steps, except ``max_eps`` itself, which reads "no boundary found within
max_eps".

>>> eps = estimate_margin(model, x_test, y_test, norm="Linf", max_eps=16/255)   # (N,)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .attacks import estimate_margin


def run_margins(run, x: torch.Tensor, y: torch.Tensor, *, norm: str, max_eps: float,
                steps: int = 20, search_steps: int = 10, name: str = "test") -> np.ndarray:
    """Margins of a saved run's model, kept with the run as ``<run.path>/margins/<name>.npz``.

    ``run`` is anything with ``.model`` and ``.path`` (``mixlab.runs.load_run``'s Run). A
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
