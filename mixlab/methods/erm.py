"""ERM: plain empirical risk minimisation, cross-entropy on clean (augmented) inputs."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register


@register
class ERM(Method):
    """Standard training: mean CE of the clean batch. No hyperparameters of its own."""
    name = "erm"
    defaults = {}
    best_metric = "val_clean"
    uses_attack = False

    def loss(self, model, x, y, idx, *, epoch):
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits
