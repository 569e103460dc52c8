"""GAIRAT: Zhang, Zhu, Niu, Han, Sugiyama, Kankanhalli, "Geometry-aware Instance-reweighted
Adversarial Training", ICLR 2021 (arXiv 2010.01736). Official code:
zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training (GAIR.py, GAIRAT.py).

Adversarial training where each example's loss is weighted by how close it lies to the
decision boundary, measured by its *geometry value* κ(x) ∈ {0..K}: the number of PGD-K
iterates the model still classifies correctly (small κ: near the boundary, attackable; large
κ: far inside its class). Near-boundary examples get large weights:

    min_θ  (1/B) Σ_i w_i · CE(f(x_adv_i), y_i),   w = normalise(ω(κ, λ)),  mean(w) = 1

with ω the Tanh (default), Sigmoid or Discrete weight function (:func:`gair_weights`). Before
``begin_epoch`` λ = +∞: all weights are 1 and this is plain PGD-AT (Madry et al. 2018).

GAIR-FAT (``gair_fat``) puts the same weights on FAT's early-stopped PGD points
(``mixlab.methods.fat``), with λ = 0.

Distance measure: Linf 8/255, PGD-10 with uniform random start (official: eps 0.031,
step 0.007), or L2; pixels in [0, 1]. Shapes: x (B, C, H, W) in [0, 1], y and κ (B,).

>>> model, history = train(method="gairat", profile="short", run_dir="runs/gairat")
>>> w = gair_weights(torch.tensor([0, 5, 10]), steps=10, lam=-1.0)   # tensor([2.68, 0.32, 0.00])
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import early_stopped_pgd, pgd, tau_at
from .base import RESNET_SCHEDULE, SMOKE_BUDGET, WRN_SCHEDULE, Method, batch_sum, register

WEIGHT_FNS = ("tanh", "sigmoid", "discrete")
LAM_SCHEDULES = ("fixed", "linear", "piecewise")


def gair_weights(kappa: torch.Tensor, steps: int, lam: float,
                 fn: str = "tanh") -> torch.Tensor:
    """GAIR weights of a batch, normalised to average 1 (GAIR.py of the official code).

    With h = ⌊K/2⌋ (the official ``int(num_steps/2)``; h = 1 when K = 1):

        tanh:     ω = (1 + tanh(λ + 5·(h − κ)/h)) / 2
        sigmoid:  ω = sigmoid(λ + 5·(h − κ)/h)
        discrete: ω = (K + 1 − κ) / (K + 1)            (λ unused)

    then w = ω · B / Σω, the sum and B over the step's whole batch (every process's share
    under torchrun: :func:`mixlab.methods.base.batch_sum`). λ = +∞ means "no reweighting"
    (the burn-in): every weight is 1, whatever ``fn``. Smaller λ concentrates the weight on
    the smallest κ.

    Args:
        kappa: (B,) geometry values in {0..steps}, any numeric dtype, on any device.
        steps: K, the PGD steps κ was counted over. lam: λ, a Python float (may be inf).
        fn: "tanh", "sigmoid" or "discrete" (case-insensitive: "Tanh" as the official flag).
    Returns:
        (B,) float32 weights, mean 1, on kappa's device. No host sync.
    """
    fn = fn.lower()
    if fn not in WEIGHT_FNS:
        raise ValueError(f"unknown weight function {fn!r}; choose one of {WEIGHT_FNS}")
    kappa = kappa.float()  # fp32 even under autocast: weights feed the loss directly
    if math.isinf(lam) and lam > 0:
        return torch.ones_like(kappa)
    if fn == "discrete":
        omega = (steps + 1 - kappa) / (steps + 1)
    else:
        half = max(steps // 2, 1)
        z = lam + 5 * (half - kappa) / half
        omega = (torch.tanh(z) + 1) / 2 if fn == "tanh" else torch.sigmoid(z)
    # mean 1 over the step's whole batch: under torchrun the sums run over every process's
    # share (batch_sum). The floor only matters if every ω underflows to 0 (λ → −∞)
    sums = batch_sum(torch.stack([omega.sum(), omega.new_full((), omega.numel())]))
    return omega * (sums[1] / sums[0].clamp_min(torch.finfo(omega.dtype).tiny))


def lam_at(epoch: int, *, epochs: int, lam: float, begin_epoch: int,
           schedule: str = "fixed", lam_max: float | None = None) -> float:
    """λ for the 0-based ``epoch`` (GAIRAT.py's ``adjust_Lambda``).

    Reweighting starts in the ``begin_epoch``-th epoch counted from 1, as the official
    ``(epoch + 1) >= begin_epoch``; before it λ = +∞ (plain PGD-AT). After it:

    * fixed: λ = ``lam``.
    * linear: λ = lam_max − (e/epochs)·(lam_max − lam), e the 1-based epoch: it reaches
      ``lam`` in the last epoch. Needs a finite ``lam_max`` (the official default, +∞,
      gives NaN; None here).
    * piecewise: λ drops with the later learning-rate steps: ``lam``, then lam − 1 from 75%
      and lam − 1.5 from 11/12 of training (≥ 110 epochs, WRN), or lam − 2 from 60%
      (ResNet). **choice**: the official branches are written after ``if epoch >= 60`` in one
      if/elif chain and never run (there piecewise equals fixed); mixlab runs what they say
      (docs/gairat.md#where-the-official-code-differs-and-what-mixlab-does).
    """
    if schedule not in LAM_SCHEDULES:
        raise ValueError(f"unknown lam_schedule {schedule!r}; choose one of {LAM_SCHEDULES}")
    e = epoch + 1
    if e < begin_epoch:
        return math.inf
    if schedule == "fixed":
        return float(lam)
    if schedule == "linear":
        if lam_max is None or not math.isfinite(lam_max):
            raise ValueError("lam_schedule='linear' needs a finite lam_max (λ it starts from)")
        return lam_max - (e / epochs) * (lam_max - lam)
    drops = [(0.75, 1.0), (11 / 12, 1.5)] if epochs >= 110 else [(0.6, 2.0)]
    shift = max((d for frac, d in drops if e >= frac * epochs), default=0.0)
    return float(lam) - shift


GAIR_DEFAULTS = {
    "gair_lambda": -1.0,              # λ of the weight function after burn-in (GAIRAT: −1)
    "gair_lambda_schedule": "fixed",  # fixed | linear | piecewise (see lam_at)
    "gair_lambda_max": None,          # linear schedule only: the (finite) λ it starts from
    "weight_fn": "tanh",              # tanh | sigmoid | discrete
    "begin_epoch": 60,                # 1-based epoch where reweighting starts; before: plain AT
}


@register
class GAIRAT(Method):
    """Geometry-aware instance-reweighted adversarial training on GA-PGD points.

    Logs per epoch (``epoch_end``), for the examples seen that epoch: ``idx`` (int64),
    ``kappa`` (int8, κ of the last time each was seen), ``weight`` (float16, its weight) and
    ``lam`` (λ of the epoch, +inf during burn-in)."""
    name = "gairat"
    # the threat model is the engine's (self.attack): PGD-K with K = attack.steps, which is
    # also the range of κ ∈ {0..K}; official step 0.007 in the paper profile
    defaults = dict(GAIR_DEFAULTS)
    profiles = {
        # CPU, ~20 s: enough for robust accuracy above chance
        "smoke": dict(SMOKE_BUDGET),
        "short": dict(model="preactresnet18", epochs=30, **RESNET_SCHEDULE),
        "paper": dict(model="wrn-32-10", epochs=120, step_size=0.007, **WRN_SCHEDULE),
    }
    hp_profiles = {
        "smoke": dict(begin_epoch=2),    # reweighting from epoch 2 of 3
        "cpu": dict(begin_epoch=3),      # from epoch 3 of 8, about short's 30%
        "short": dict(begin_epoch=10),   # from the first lr drop (30%), as 30 of 100 epochs
        "paper": dict(begin_epoch=60),
    }

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        if hp["weight_fn"].lower() not in WEIGHT_FNS:
            raise ValueError(f"{cls.name}.weight_fn={hp['weight_fn']!r} is not one of "
                             f"{list(WEIGHT_FNS)}")
        if hp["gair_lambda_schedule"] not in LAM_SCHEDULES:
            raise ValueError(f"{cls.name}.gair_lambda_schedule={hp['gair_lambda_schedule']!r} "
                             f"is not one of {list(LAM_SCHEDULES)}")
        lam_max = hp["gair_lambda_max"]
        if hp["gair_lambda_schedule"] == "linear" and (lam_max is None or isinstance(
                lam_max, bool) or not isinstance(lam_max, (int, float))
                or not math.isfinite(lam_max)):
            raise ValueError(f"{cls.name}.gair_lambda_schedule='linear' needs a finite "
                             f"{cls.name}.gair_lambda_max (the λ it starts from), got "
                             f"{lam_max!r}")
        if isinstance(hp["begin_epoch"], bool) or not isinstance(hp["begin_epoch"], int) \
                or hp["begin_epoch"] < 1:
            raise ValueError(f"{cls.name}.begin_epoch={hp['begin_epoch']!r} must be a whole "
                             f"number >= 1 (1-based epoch where reweighting starts)")
        return hp

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lam_for(self.epochs - 1)  # a bad schedule fails now, not after the burn-in
        # per-example logs of the current epoch, created on the data's device at first use
        self._kappa = self._weight = self._seen = None
        self._lam_logged = math.inf

    def lam_for(self, epoch: int) -> float:
        """λ used in the 0-based ``epoch``."""
        hp = self.hp
        return lam_at(epoch, epochs=self.epochs, lam=hp["gair_lambda"],
                      begin_epoch=hp["begin_epoch"], schedule=hp["gair_lambda_schedule"],
                      lam_max=hp["gair_lambda_max"])

    def adversarial_points(self, model, x, y, *, epoch):
        """(x_adv, κ): GA-PGD, Madry's PGD counting the correctly classified iterates."""
        a = self.attack
        return pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm,
                   return_kappa=True)

    def loss(self, model, x, y, idx, *, epoch):
        x_adv, kappa = self.adversarial_points(model, x, y, epoch=epoch)
        lam = self.lam_for(epoch)
        weight = gair_weights(kappa, self.attack.steps, lam, self.hp["weight_fn"])
        self._log(idx, kappa, weight, lam)
        logits = model(x_adv)
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        return (weight * ce).mean(), logits

    def _log(self, idx, kappa, weight, lam):
        if self._kappa is None:
            n, dev = self.num_train, kappa.device
            # κ <= K fits int8 for K <= 127; wider only for unusual step counts
            kdtype = torch.int8 if self.attack.steps <= 127 else torch.int16
            self._kappa = torch.zeros(n, dtype=kdtype, device=dev)
            self._weight = torch.zeros(n, dtype=torch.float16, device=dev)
            self._seen = torch.zeros(n, dtype=torch.bool, device=dev)
        self._kappa[idx] = kappa.to(self._kappa.dtype)
        self._weight[idx] = weight.to(torch.float16)
        self._seen[idx] = True
        self._lam_logged = lam

    def epoch_end(self, epoch):
        if self._seen is None:
            return {}
        seen = self._seen.nonzero().squeeze(1)  # the one host sync of the epoch
        arrays = dict(idx=seen.cpu().numpy(), kappa=self._kappa[seen].cpu().numpy(),
                      weight=self._weight[seen].cpu().numpy(),
                      lam=np.float32(self._lam_logged), steps=np.int16(self.attack.steps))
        self._seen.zero_()
        return arrays


@register
class GAIRFAT(GAIRAT):
    """GAIR-FAT: GAIR weights (λ = 0) on FAT's early-stopped PGD points, with the official
    GAIR_FAT.py dynamic τ (0, then 3 from 1/3, then 6 from 7/12 of training) and no noise.

    Two departures from the official code, both label alignments: its GA_earlystop compares
    the predictions of the shrinking set of running examples with the full batch's labels,
    position by position; and after burn-in GAIR_FAT.py scores the early-stopped points,
    which GA_earlystop returns reordered (stopped examples first), against the labels in the
    original order. Here every iterate and every point is compared with its own label
    (docs/gairat.md#where-the-official-code-differs-and-what-mixlab-does)."""
    name = "gair_fat"
    defaults = {
        "tau": (0, 3, 6),                         # τ per stage (GAIR_FAT.py's dynamic τ)
        "tau_milestones": (40 / 120, 70 / 120),   # fractions of training where τ steps up
        "omega": 0.0,                             # std of the noise added to each PGD step
        **GAIR_DEFAULTS,
        "gair_lambda": 0.0,                       # λ after burn-in (GAIR-FAT: 0)
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        tau_at(0, self.epochs, self.hp["tau"], self.hp["tau_milestones"])  # fail early

    def adversarial_points(self, model, x, y, *, epoch):
        hp, a = self.hp, self.attack
        tau = tau_at(epoch, self.epochs, hp["tau"], hp["tau_milestones"])
        return early_stopped_pgd(model, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps,
                                 tau=tau, omega=hp["omega"], norm=a.norm, return_kappa=True)
