"""AMP: adversarially optimized mixup. Bunk, Chattopadhyay, Manjunath, Chandrasekaran,
"Adversarially Optimized Mixup for Robust Classification", 2021 (arXiv 2103.11589).

**A stated reconstruction.** The paper has no public code, and its abstract is all that fixes
the method. The abstract gives the idea: PGD probes the space *between* training points by backpropagating
*through the mixup interpolation*, looking for where predictions are unsmooth and incongruous;
two optional modifications are optimizing the mixup ratio and geometric label assignment.
Every other choice below is mixlab's (docs/amp.md#choices-beyond-the-abstract), and each
variant is a flag:

* pairs by a batch permutation, λ ~ Beta(α, α) with α = ``alpha`` = 1, one λ per example;
* base: perturb both endpoints, x̃_a = clip01(x_a + δ_a), x̃_b = clip01(x_b + δ_b),
  ‖δ‖ ≤ eps (the engine's threat model, ``attack``: Linf 8/255 or L2), uniform random start,
  ``attack.steps`` ascent steps of ``attack.step_size`` on
  the soft-label CE(f(λ·x̃_a + (1 − λ)·x̃_b), λ·y_a + (1 − λ)·y_b); the model is in eval mode
  during the attack and gradients are taken w.r.t. δ_a, δ_b (and λ) only. The training loss
  is the soft-label CE at the final mixed point, model in train mode;
* ``lam_opt``: λ is a PGD variable in the same loop, λ ← clip(λ + η·sign(∂L/∂λ), λ_min, λ_max),
  η = ``lam_step`` = 0.05; the label follows λ;
* ``geo_label``: the training label weight is t = clip(⟨x* − x_b, x_a − x_b⟩ / ‖x_a − x_b‖², 0, 1),
  the position of the final mixed point x* projected onto the clean segment [x_b, x_a]
  (label t·y_a + (1 − t)·y_b). With δ = 0 and λ fixed, t = λ exactly;
* ``clean_weight`` w: the loss is (1 − w)·AMP loss + w·(clean mixup loss at the sampled λ).

For a fixed λ the mixed points reachable by δ on the endpoints form an eps-ball around the
clean mixed point (up to the [0, 1] box), so perturbing the endpoints changes the dynamics, the
coupling with λ and the meaning of "geometric", not the threat set.

Name clash: "AMP" also names Adversarial Model Perturbation (Zheng et al., CVPR 2021), which is
unrelated; mixup surveys call this paper "AOM". Cite it as Bunk et al. 2021. In mixlab the
method is ``method="amp"``; bf16 autocast is always called ``bf16``.

Shapes: x (B, C, H, W) pixels in [0, 1]; y (B,) int64; soft labels (B, K); λ (B,).
Logged per epoch (``epoch_end``, arrays of length num_train indexed by dataset index, NaN for
examples not drawn as the anchor x_a this epoch): ``lam0`` (sampled λ), ``lam_star`` (λ after
the attack; equals lam0 without ``lam_opt``), ``t_geo_minus_lam`` (t_geo − λ*).

Variants of the notebook's ablation: ``VARIANTS`` (base, lam_opt, geo_label, both, clean_mix).

>>> model, history = train(method="amp", method_hp={"lam_opt": True, "geo_label": True},
...                        profile="smoke")
>>> x_a_adv, x_b_adv, lam = amp_perturb(model, x, x[perm], y_soft, y_soft[perm], lam,
...                                     eps=8/255, step_size=2/255, steps=10)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import (ascent_step, autocast_for, check_eps, eval_mode, project, random_init,
                       unwrap)
from .base import Method, mix, register, sample_lam, soft_cross_entropy


def geo_weight(x_mix: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor,
               lam: torch.Tensor) -> torch.Tensor:
    """Geometric label weight t (B,): the position of ``x_mix`` projected onto the clean
    segment from x_b (t = 0) to x_a (t = 1), clipped to [0, 1].

    Where x_a == x_b (an example paired with itself) the segment is a point and t = ``lam``.
    """
    d = (x_a - x_b).flatten(1).float()
    num = ((x_mix - x_b).flatten(1).float() * d).sum(1)
    den = (d * d).sum(1)
    # where() instead of a branch: no host sync; the clamp keeps 0/0 out of the unused side
    t = torch.where(den > 1e-12, num / den.clamp_min(1e-12), lam.float())
    return t.clamp(0, 1)


def amp_perturb(model: torch.nn.Module, x_a: torch.Tensor, x_b: torch.Tensor,
                y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, *, eps, step_size,
                steps: int, norm: str = "Linf", random_start: bool = True,
                lam_opt: bool = False, lam_step: float = 0.05, lam_min: float = 0.0,
                lam_max: float = 1.0, bf16: bool | None = None):
    """PGD through the mixup interpolation (the inner maximisation of AMP).

    Maximises the soft-label CE(f(λ·x̃_a + (1 − λ)·x̃_b), λ·y_a + (1 − λ)·y_b) over the
    endpoint perturbations δ_a, δ_b (each in its eps-ball, endpoints kept in [0, 1]) and, with
    ``lam_opt``, over λ in the box [lam_min, lam_max] by signed steps of ``lam_step``.

    Args:
        x_a, x_b: (B, C, H, W) clean endpoints in [0, 1]. y_a, y_b: (B, K) soft labels.
        lam: (B,) mixing weights of x_a (with ``lam_opt`` they are first clipped to the box).
        eps, step_size: radius and step, pixel units (floats or (B,) tensors). norm: Linf | L2.
        bf16: bf16 autocast (None: on CUDA only); the losses are fp32.
    Returns:
        (x_a_adv, x_b_adv, lam_star), detached; the final mixed point is
        ``mix(x_a_adv, x_b_adv, lam_star)``.

    The model is in eval mode while this runs; gradients come from ``torch.autograd.grad``
    w.r.t. δ (and λ) only, so parameter gradients are untouched. No host syncs.
    """
    check_eps(eps, norm)
    model = unwrap(model)  # the attack's passes stay out of a DDP wrapper's reducer
    x_a, x_b, y_a, y_b = x_a.detach(), x_b.detach(), y_a.detach(), y_b.detach()
    lam = lam.detach().float()
    if lam_opt:
        lam = lam.clamp(lam_min, lam_max)
    if random_start:
        delta_a, delta_b = random_init(x_a, eps, norm), random_init(x_b, eps, norm)
    else:
        delta_a, delta_b = torch.zeros_like(x_a), torch.zeros_like(x_b)
    with eval_mode(model), autocast_for(x_a, bf16), torch.enable_grad():
        for _ in range(steps):
            delta_a.requires_grad_(True)
            delta_b.requires_grad_(True)
            variables = [delta_a, delta_b]
            if lam_opt:
                lam.requires_grad_(True)
                variables.append(lam)
            x_mix = mix(x_a + delta_a, x_b + delta_b, lam)
            loss = soft_cross_entropy(model(x_mix), mix(y_a, y_b, lam), reduction="none").sum()
            grads = torch.autograd.grad(loss, variables)
            with torch.no_grad():
                delta_a = project(ascent_step(delta_a.detach(), grads[0], step_size, norm),
                                  x_a, eps, norm)
                delta_b = project(ascent_step(delta_b.detach(), grads[1], step_size, norm),
                                  x_b, eps, norm)
                if lam_opt:
                    lam = (lam.detach() + lam_step * grads[2].sign()).clamp(lam_min, lam_max)
    return (x_a + delta_a).detach(), (x_b + delta_b).detach(), lam.detach()


def amp_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor,
             lam: torch.Tensor, *, num_classes: int, eps, step_size, steps: int,
             norm: str = "Linf", random_start: bool = True, lam_opt: bool = False,
             lam_step: float = 0.05, lam_min: float = 0.0, lam_max: float = 1.0,
             geo_label: bool = False, clean_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """AMP's training loss for one batch with a given partner permutation and λ.

    x: (B, C, H, W) in [0, 1]; y: (B,) labels; perm: (B,) partner indices (x_b = x[perm]);
    lam: (B,) sampled mixing weights. The model is in train mode for the final forward pass.
    Returns a dict of tensors: ``loss`` (scalar), ``lam_star`` (B,), ``t`` (B,) geometric
    weight of the final mixed point (computed whether or not ``geo_label`` uses it) and
    ``x_mix`` (B, C, H, W) the point trained on.

    With eps = 0 and ``lam_opt`` off this is exactly the mixup loss at (perm, λ).
    """
    y_soft = F.one_hot(y, num_classes).float()
    x_a, x_b, y_a, y_b = x, x[perm], y_soft, y_soft[perm]
    x_a_adv, x_b_adv, lam_star = amp_perturb(
        model, x_a, x_b, y_a, y_b, lam, eps=eps, step_size=step_size, steps=steps, norm=norm,
        random_start=random_start, lam_opt=lam_opt, lam_step=lam_step, lam_min=lam_min,
        lam_max=lam_max)
    x_mix = mix(x_a_adv, x_b_adv, lam_star)
    t = geo_weight(x_mix, x_a, x_b, lam_star)
    weight = t if geo_label else lam_star
    loss = soft_cross_entropy(model(x_mix), mix(y_a, y_b, weight))
    if clean_weight:
        clean = soft_cross_entropy(model(mix(x_a, x_b, lam)), mix(y_a, y_b, lam))
        loss = (1 - clean_weight) * loss + clean_weight * clean
    return {"loss": loss, "lam_star": lam_star, "t": t, "x_mix": x_mix}


#: the ablation of the AMP notebook: variant name -> ``train(method="amp", method_hp=...)``
VARIANTS = {
    "base": {},
    "lam_opt": {"lam_opt": True},
    "geo_label": {"geo_label": True},
    "both": {"lam_opt": True, "geo_label": True},
    "clean_mix": {"clean_weight": 0.5},  # not in the default ablation: half clean mixup loss
}


@register
class AMP(Method):
    """AMP (Bunk et al. 2021), reconstructed; variants are the flags below."""
    name = "amp"
    # the endpoints' balls, the PGD step and steps are the engine's threat model (self.attack)
    defaults = {
        "random_start": True,    # start δ uniformly in the ball (else at 0)
        "alpha": 1.0,            # Beta(α, α) concentration of λ; 1 = uniform (mixup's default)
        "lam_opt": False,        # optimise λ per example as a PGD variable (signed steps)
        "lam_step": 0.05,        # η, signed step on λ per PGD iteration (unitless)
        "lam_min": 0.0,          # lower end of λ's box
        "lam_max": 1.0,          # upper end of λ's box
        "geo_label": False,      # label weight from projecting x* onto the clean segment
        "clean_weight": 0.0,     # weight w of the clean mixup loss, (1 − w)·AMP + w·mixup
    }

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        if not 0 <= hp["lam_min"] <= hp["lam_max"] <= 1:
            raise ValueError(f"amp needs 0 <= lam_min <= lam_max <= 1, got lam_min="
                             f"{hp['lam_min']}, lam_max={hp['lam_max']}")
        if not 0 <= hp["clean_weight"] <= 1:
            raise ValueError(f"amp.clean_weight={hp['clean_weight']} must lie in [0, 1]")
        if not hp["alpha"] > 0:
            raise ValueError(f"amp.alpha={hp['alpha']} must be > 0 (Beta(alpha, alpha) "
                             f"concentration of λ; 1 is uniform)")
        if not hp["lam_step"] > 0:
            raise ValueError(f"amp.lam_step={hp['lam_step']} must be > 0")
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # per-example logs of the current epoch, created on the data's device at first use
        self._log: dict[str, torch.Tensor] = {}

    def _record(self, idx: torch.Tensor, **values: torch.Tensor) -> None:
        for key, v in values.items():
            if key not in self._log:
                self._log[key] = torch.full((self.num_train,), float("nan"), device=v.device)
            self._log[key][idx] = v.detach().float()

    def loss(self, model, x, y, idx, *, epoch):
        hp, a = self.hp, self.attack
        lam = sample_lam(hp["alpha"], x.shape[0], x.device)  # λ ~ Beta(α, α), one per example
        perm = torch.randperm(x.shape[0], device=x.device)
        out = amp_loss(model, x, y, perm, lam, num_classes=self.num_classes, eps=a.eps,
                       step_size=a.step_size, steps=a.steps, norm=a.norm,
                       **{k: v for k, v in hp.items() if k != "alpha"})
        self._record(idx, lam0=lam, lam_star=out["lam_star"],
                     t_geo_minus_lam=out["t"] - out["lam_star"])
        return out["loss"], None

    def epoch_end(self, epoch):
        # one host copy per epoch; the logs start empty (NaN) for the next epoch
        arrays = {key: v.cpu().numpy() for key, v in self._log.items()}
        self._log = {}
        return {key: np.asarray(v, dtype=np.float32) for key, v in arrays.items()}
