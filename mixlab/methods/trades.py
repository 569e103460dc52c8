"""TRADES: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off
between Robustness and Accuracy", ICML 2019 (arXiv 1901.08573). Official code:
yaodongyu/TRADES (``trades.py``).

Minimises the clean cross-entropy plus β times the KL divergence between the predictions at
the clean point and at the worst point of the ball around it:

    min_θ E [ CE(f(x), y) + β · max_{‖x' − x‖ ≤ ε} KL(p(x) ‖ p(x')) ],   p = softmax ∘ f,

β = ``beta`` = 6 (the paper's CIFAR-10 and official default; 1/λ in the paper's notation).

Inner maximisation, as in the official ``trades_loss``:

* start at x' = x + 0.001·N(0, I), a small Gaussian step off the clean point (at x' = x the
  KL is at its minimum, 0, and its gradient vanishes);
* ``attack.steps`` steps of ``attack.step_size`` on KL(p(x) ‖ p(x')) w.r.t. x', each followed
  by the projection onto the ε-ball and the box [0, 1] (Linf: sign steps; L2: steps along the
  unit gradient, mixlab's L2 PGD, where the official code runs SGD on a renormalised gradient);
* the model is in eval mode during the attack (BatchNorm uses its running statistics and
  keeps them), p(x) is a constant target there, and gradients are taken w.r.t. x' only
  (``torch.autograd.grad``), so parameter gradients stay clean.

Outer loss, model in train mode: CE(f(x), y) + β·KL(p(x) ‖ p(x')) with the KL's batchmean
reduction (sum over classes, mean over the batch), computed in fp32. As in the official code
the gradient flows through both p(x) and p(x'). One forward pass of x serves both terms (the
official code runs it twice; the outputs are the same, only BatchNorm's running statistics
then see the clean batch once more).

Two details differ from the official code, both at the edges: the random start is projected
onto the ball and into [0, 1] before the first forward pass (the official code clamps it only
after the first step), and the threat model is mixlab's (``attack``: 8/255 Linf by default;
the official CIFAR-10 script uses ε = 0.031, step 0.007, 10 steps, which the ``paper``
profile's step size follows).

Mixing (``mix``, default "none"): TRADES on mixed images, as Rebuffi, Gowal, Calian,
Stimberg, Wiles, Mann, "Fixing Data Augmentation to Improve Adversarial Robustness", 2021
(arXiv 2103.01946) pair CutMix with TRADES. The mixing is data augmentation, so it happens
*before* the attack: each example is mixed with a partner from a batch permutation
(λ ~ Beta(α, α), α = ``mix_alpha``, one λ and, for CutMix, one box per example;
``mixlab.methods.mixing.mix_batch``), giving x̃ and the soft label ỹ = λ·y_a + (1 − λ)·y_b
(CutMix: λ corrected to the pasted area). Then everything above runs on x̃: the KL attack
starts at x̃ and stays in the ball around it, and the loss is

    CE_soft(f(x̃), ỹ) + β · KL(p(x̃) ‖ p(x̃')),   CE_soft(z, ỹ) = −Σ_k ỹ_k log softmax(z)_k,

the clean term against the mixed soft label (one forward pass of x̃ serves both terms). The
training accuracy is not reported with mixing (the labels are mixed). Logged per epoch with
mixing (``epoch_end``): ``lam``, every λ drawn, and with CutMix ``lam_box``. With
``mix="none"`` this is TRADES on the clean batch, unchanged. Rebuffi et al. average the
weights too (the engine setting ``ema_decay``; docs/baselines.md).

Distance measure: Linf (default) or L2, pixel units; pixels in [0, 1].
Shapes: x (B, C, H, W) in [0, 1]; y (B,) int64; logits (B, K); soft labels (B, K).

>>> model, history = train(method="trades", method_hp={"beta": 6.0}, profile="smoke")
>>> model, history = train(method="trades", method_hp={"mix": "cutmix"}, profile="smoke")
>>> x_adv = trades_perturb(model, x, eps=8/255, step_size=2/255, steps=10)
>>> loss = trades_loss(model(x), model(x_adv), y, beta=6.0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import ascent_step, autocast_for, check_eps, eval_mode, project, unwrap
from .base import SMOKE_BUDGET, Method, register, soft_cross_entropy
from .mixing import check_mixing_hp, drain_log, mix_and_log

#: std of the Gaussian start around x, pixel units (the official code's 0.001)
INIT_STD = 0.001


def kl_clean_adv(logits: torch.Tensor, logits_adv: torch.Tensor, *,
                 reduction: str = "batchmean") -> torch.Tensor:
    """KL(p(x) ‖ p(x')) = Σ_k p_k(x)·(log p_k(x) − log p_k(x')), in fp32.

    logits, logits_adv: (B, K). reduction: "batchmean" (scalar: the sum over the batch / B),
    "sum" (scalar) or "none" (B,). Computed from log-probabilities on both sides, so a class
    whose clean probability underflows to 0 contributes exactly 0."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_q = F.log_softmax(logits_adv.float(), dim=1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(1)
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if reduction == "batchmean":
        return per_example.mean()
    raise ValueError(f"reduction={reduction!r} is not one of ['batchmean', 'sum', 'none']")


def trades_perturb(model: torch.nn.Module, x: torch.Tensor, *, eps, step_size, steps: int,
                   norm: str = "Linf", init_std: float = INIT_STD,
                   bf16: bool | None = None) -> torch.Tensor:
    """TRADES' inner maximisation: x' in the eps-ball around x (and in [0, 1]) that maximises
    KL(p(x) ‖ p(x')), by ``steps`` PGD steps from x + init_std·N(0, I).

    Args:
        model: maps (B, C, H, W) pixels in [0, 1] to logits; run in eval mode here (its
            previous mode is restored).
        x: (B, C, H, W) clean inputs in [0, 1]. No labels: the target is p(x).
        eps, step_size: radius and step, pixel units (floats or (B,) tensors). norm: Linf | L2.
        init_std: std of the Gaussian start, pixel units (official: 0.001).
        bf16: bf16 autocast (None: on CUDA only); the KL is computed in fp32.
    Returns:
        x_adv (B, C, H, W), detached, in [0, 1] with ‖x_adv − x‖ <= eps.

    No host syncs, no per-example Python loops; ``param.grad`` is never touched.
    """
    check_eps(eps, norm, positive=True)
    model, x = unwrap(model), x.detach()   # the attack's passes stay out of a DDP wrapper
    with eval_mode(model), autocast_for(x, bf16):
        with torch.no_grad():
            log_p = F.log_softmax(model(x).float(), dim=1)  # the fixed target p(x)
        delta = project(init_std * torch.randn_like(x), x, eps, norm)
        with torch.enable_grad():
            for _ in range(steps):
                delta.requires_grad_(True)
                log_q = F.log_softmax(model(x + delta).float(), dim=1)
                # summed KL (the official size_average=False): the step direction is the same
                # for any positive scale
                kl = (log_p.exp() * (log_p - log_q)).sum()
                grad, = torch.autograd.grad(kl, delta)
                with torch.no_grad():
                    delta = project(ascent_step(delta.detach(), grad, step_size, norm), x, eps,
                                    norm)
    return (x + delta).detach()


def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                beta: float) -> torch.Tensor:
    """CE(f(x), y) + β·KL(p(x) ‖ p(x')) with batchmean reduction, fp32; gradients flow through
    both logits. logits, logits_adv: (B, K) at x and x'; y: (B,) int64."""
    return F.cross_entropy(logits.float(), y) + beta * kl_clean_adv(logits, logits_adv)


@register
class TRADES(Method):
    """TRADES (Zhang et al. 2019): clean CE + β·KL to the KL-maximising point of the ball."""
    name = "trades"
    # the ball, the PGD step and steps are the engine's threat model (self.attack)
    defaults = {
        "beta": 6.0,         # β, weight of the KL (robustness) term; 1/λ in the paper
        "mix": "none",       # "none", or mix before the attack: "cutmix" | "mixup"
        "mix_alpha": 1.0,    # Beta(α, α) concentration of the mixing ratio (with mix only)
    }
    profiles = {
        "smoke": dict(SMOKE_BUDGET),
        # the official CIFAR-10 script: WRN-34-10, SGD 0.1 (momentum 0.9), weight decay 2e-4,
        # batch 128, 76 epochs with lr ÷10 for the last one, PGD step 0.007
        "paper": dict(model="wrn-34-10", epochs=76, batch_size=128, lr=0.1, momentum=0.9,
                      weight_decay=2e-4, schedule="piecewise", milestones=[75 / 76],
                      lr_factors=[0.1], step_size=0.007),
    }

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        if not hp["beta"] >= 0:
            raise ValueError(f"trades.beta={hp['beta']!r} must be >= 0 (weight of the KL "
                             f"term; 6 in Zhang et al.; 0 trains on clean CE alone)")
        check_mixing_hp("trades", hp)
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._log: dict[str, list[torch.Tensor]] = {}  # this epoch's λ (device tensors)

    def loss(self, model, x, y, idx, *, epoch):
        a = self.attack
        if self.hp["mix"] == "none":
            x_adv = trades_perturb(model, x, eps=a.eps, step_size=a.step_size, steps=a.steps,
                                   norm=a.norm)
            logits = model(x)
            return trades_loss(logits, model(x_adv), y, beta=self.hp["beta"]), logits
        # mixing is augmentation: it comes first, and the attack and both terms see x̃
        x_mix, y_soft = mix_and_log(self._log, x, y, mix=self.hp["mix"],
                                    alpha=self.hp["mix_alpha"], num_classes=self.num_classes)
        x_adv = trades_perturb(model, x_mix, eps=a.eps, step_size=a.step_size, steps=a.steps,
                               norm=a.norm)
        logits = model(x_mix)
        loss = (soft_cross_entropy(logits, y_soft)
                + self.hp["beta"] * kl_clean_adv(logits, model(x_adv)))
        return loss, None

    def epoch_end(self, epoch):
        return drain_log(self._log)
