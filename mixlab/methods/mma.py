"""MMA training: Ding, Sharma, Lui, Huang, "MMA Training: Direct Input Space Margin
Maximization through Adversarial Training", ICLR 2020 (arXiv 1812.02637). Official code:
BorealisAI/mma_training (anpgd.py, trainer.py, config.py).

What it optimises: the input-space margin d(x, y), the distance from x to the nearest input
the model misclassifies, up to a cap d_max. For each correctly classified example, AN-PGD
("adaptive-norm PGD") finds the point x + ε*·u on the decision boundary closest to x along a
PGD direction u; cross-entropy at that point pushes the boundary away from x, with each example
at its own radius ε* instead of one fixed ε for all:

    MMA  = (Σ_{correct, ε* < d_max} CE(f(x + ε*·u), y) + Σ_{wrong} CE(f(x), y)) / B
    loss = (1 − c)·MMA + c·mean CE(f(x), y)        c = 1/3 ("MMA-d_max"), c = 0: OMMA

AN-PGD per correct example i, with ε_i the example's margin estimate kept across epochs by its
dataset index (starting at ``mineps``): PGD at radius ε_i, step 2.5·ε_i/steps, SLM loss
(logsumexp_{j≠y} z_j − z_y); u = (x_adv − x)/ε_i; bisection (``search_steps``, clamped to
[0, 1]) along u in [0, max_eps] for the smallest ε at which SLM ≥ 0; max_eps = 1.05·d_max;
ε* becomes the new ε_i (0 for clean-misclassified examples, as in the official trainer).

Distance measure: the engine's threat model (``attack.norm``, Linf or L2), pixel units
(d_max 32/255 Linf, 2.0 L2 on CIFAR-10; 0.45 Linf, 4.0 L2 on MNIST). AN-PGD runs
``attack.steps`` PGD iterations (the official ``nb_iter``: 10 on CIFAR-10, 40 on MNIST); the
radius is per example, so ``attack.eps`` and ``attack.step_size`` only set the evaluation.
Shapes: x (B, C, H, W) in [0, 1], y and idx (B,); the stored ε is (num_train,) on the device.

Choices where the official code leaves room (these and the official code's other differences:
docs/mma.md):
the bisection returns the smallest ε *found* misclassified (the official code returns its last
midpoint, either side of the boundary: the two differ by < max_eps/2**10); the training point
x + ε*·u is clamped to [0, 1] like every probe of the search; the search and the validation
margins run with the model in eval mode (the official search ran in train mode).

Cost per batch, in forward passes (``mixlab.bench.PassCounter``): a training pass on the clean
batch (3), ``steps`` PGD passes with input-only gradients (2 each), one probe at the PGD point
and ``search_steps`` bisection probes (1 each), the training pass at the AN-PGD points (3):
27 + 2·(steps − 10) + search_steps, i.e. 37 at the paper's settings against PGD-10 AT's 23, so
MMA takes about 1.6x the time of PGD-AT per example on any device. The measured ratio follows
(CPU: 1.67x measured, 1.61x predicted). Cheaper, at the paper's expense: ``search_steps=5``
(bisection precision max_eps/32 instead of /1024) gives 32 (1.39x); OMMA (``clean_coeff=0``)
makes the clean pass a probe, 35 at the paper's settings.

>>> model, history = train(**PRESETS["cifar10-linf"]["short"], run_dir="runs/mma")
>>> model, history = train(method="mma", norm="L2", method_hp={"d_max": 2.0}, profile="smoke")
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks import (attack_loss, boundary_bisection, estimate_margin, eval_mode, pgd,
                       pgd_step_size, slm_margin, unwrap)
from .base import SMOKE_BUDGET, Method, register

#: the paper's CIFAR-10 hinge and starting radius per norm
CIFAR10_THREAT = {"Linf": dict(d_max=32 / 255, mineps=0.005),
                  "L2": dict(d_max=2.0, mineps=0.5)}
#: the paper's hinge d_max and starting radius mineps per (dataset, norm), used when d_max /
#: mineps are None (CIFAR-10 MMA-32 / MMA-2.0; MNIST MMA-0.45 Linf, MMA-4.0 L2)
THREATS = {
    ("cifar10", "Linf"): CIFAR10_THREAT["Linf"],
    ("cifar10", "L2"): CIFAR10_THREAT["L2"],
    ("mnist", "Linf"): dict(d_max=0.45, mineps=0.1),
    ("mnist", "L2"): dict(d_max=4.0, mineps=0.5),
}
#: datasets that take another's THREATS entry: "synthetic" is CIFAR-10-shaped, with CIFAR-10's
#: eps (mixlab.data), and stands in for it in tests and the CPU benchmark
THREAT_OF = {"synthetic": "cifar10"}


def anpgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *,
          norm: str, max_eps: float, steps: int, search_steps: int = 10,
          step_scale: float = 2.5, margin: str = "slm") -> tuple[torch.Tensor, torch.Tensor]:
    """AN-PGD: the boundary point nearest to x along a PGD direction, per example.

    Args:
        x: (B, C, H, W) in [0, 1]; y: (B,) labels; eps: (B,) PGD radius per example (the
            previous margin estimate), pixel units, in (0, max_eps].
        max_eps: upper end of the search, pixel units. steps: PGD iterations (step size
            step_scale·eps/steps). search_steps: bisection steps.
        margin: when a probe counts as misclassified: "slm" (training, as the paper) or "cw"
            (the decision itself; test-time margins).
    Returns:
        (x_adv, eps_star): x_adv = clamp(x + eps_star·u, 0, 1), (B, C, H, W), detached;
        eps_star (B,): the smallest misclassifying radius found along u, or max_eps if none.
    """
    step_size = pgd_step_size(eps, steps, scale=step_scale, floor=0)  # per example
    x_pgd = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss="slm")
    # u has norm <= 1 (== 1 unless the box clipped it): t·u is a perturbation of size <= t
    direction = (x_pgd - x) / eps.clamp_min(1e-12).reshape(-1, *([1] * (x.dim() - 1)))
    probe = unwrap(model)   # the probe's pass stays out of a DDP wrapper's reducer
    with eval_mode(probe), torch.no_grad():
        fooled = attack_loss(probe(x_pgd), y, margin) >= 0
    # the PGD point is one probe already: the boundary lies below eps if it fooled the
    # model, above it otherwise
    eps_star = boundary_bisection(model, x, y, direction, lo=torch.where(fooled, 0.0, eps),
                                  hi=torch.where(fooled, eps, max_eps), steps=search_steps,
                                  margin=margin)
    x_adv = (x + eps_star.reshape(-1, *([1] * (x.dim() - 1))) * direction).clamp(0, 1)
    return x_adv.detach(), eps_star


def mma_loss(logits_adv: torch.Tensor, logits_clean: torch.Tensor, y: torch.Tensor,
             correct: torch.Tensor, eps_star: torch.Tensor, *, d_max: float,
             clean_coeff: float) -> torch.Tensor:
    """(1 − c)·MMA + c·clean CE, fp32 scalar.

    logits_adv: (B, K) at the AN-PGD points of the clean-correct examples and at the clean
    points of the others; logits_clean: (B, K); correct: (B,) bool; eps_star: (B,).
    An AN-PGD point counts only while its margin is below d_max (the hinge)."""
    ce = F.cross_entropy(logits_adv.float(), y, reduction="none")
    counted = ~correct | (eps_star < d_max)
    mma = (ce * counted).sum() / len(y)
    if clean_coeff == 0:  # OMMA: no clean term (and no graph for it was built)
        return mma
    return (1 - clean_coeff) * mma + clean_coeff * F.cross_entropy(logits_clean.float(), y)


@register
class MMA(Method):
    """Max-Margin Adversarial training (MMA-d_max; OMMA with clean_coeff=0)."""
    name = "mma"
    defaults = {
        "d_max": None,           # hinge: margins beyond it earn no loss, pixel units;
                                 # None: the paper's value for the dataset and norm (THREATS)
        "mineps": None,          # starting (and smallest) PGD radius of AN-PGD, pixel units;
                                 # None: the paper's value (THREATS)
        "step_scale": 2.5,       # PGD step = step_scale·eps_i/steps (eps_iter_scale)
        "search_steps": 10,      # bisection steps along the PGD direction
        "max_eps_factor": 1.05,  # the search runs up to max_eps = max_eps_factor·d_max
        "clean_coeff": 1 / 3,    # c in (1 − c)·MMA + c·clean CE; 0 gives OMMA
    }
    # the best checkpoint is the one with the largest mean margin on the evaluation split
    # (the validation split when val_size > 0), as the official train.py picks it
    best_metric = "val_mean_margin"
    profiles = {  # CIFAR-10; MNIST and L2 runs: see PRESETS
        # the methods' smoke budget (2k images, 3 epochs): with the engine's (1k, 2) the tiny
        # CNN is confident on almost no CIFAR-10 training image and every margin stays 0
        "smoke": dict(val_size=256, **SMOKE_BUDGET),
        "short": dict(val_size=5000, eval_subset=1000),
        # 50k steps of batch 128 on 45k images = 143 epochs; lr 0.3 → 0.09 (20k steps)
        # → 0.03 (30k) → 0.009 (40k)
        "paper": dict(model="wrn-28-4", epochs=143, batch_size=128, optimizer="sgd", lr=0.3,
                      momentum=0.9, weight_decay=2e-4, schedule="piecewise",
                      milestones=(0.4, 0.6, 0.8), lr_factors=(0.3, 0.1, 0.03),
                      val_size=5000),
    }

    @classmethod
    def check_hp(cls, hp, *, dataset, attack):
        """Fill d_max / mineps from THREATS for (dataset, attack.norm); check the ranges."""
        hp = super().check_hp(hp, dataset=dataset, attack=attack)
        for key in ("d_max", "mineps"):
            if hp[key] is None:
                # a method built directly (no dataset) gets CIFAR-10's values
                source = THREAT_OF.get(dataset, dataset or "cifar10")
                threat = THREATS.get((source, attack.norm))
                if threat is None:
                    raise ValueError(
                        f"mma.{key} has no default for dataset {dataset!r} with norm "
                        f"{attack.norm!r} (the paper gives CIFAR-10 and MNIST); set it, e.g. "
                        f"--set mma.{key}=VALUE (pixel units)")
                hp[key] = threat[key]
            if isinstance(hp[key], bool) or not isinstance(hp[key], (int, float)) \
                    or not 0 < hp[key] < float("inf"):
                raise ValueError(f"mma.{key}={hp[key]!r} must be a finite number > 0, pixel units")
        for key in ("search_steps",):
            if not isinstance(hp[key], int) or hp[key] < 1:
                raise ValueError(f"mma.{key}={hp[key]!r} must be a whole number >= 1")
        if not 0 <= hp["clean_coeff"] <= 1:
            raise ValueError(f"mma.clean_coeff={hp['clean_coeff']!r} must lie in [0, 1]")
        if not hp["step_scale"] > 0 or not hp["max_eps_factor"] >= 1:
            raise ValueError(f"mma.step_scale={hp['step_scale']!r} must be > 0 and "
                             f"mma.max_eps_factor={hp['max_eps_factor']!r} >= 1")
        max_eps = hp["max_eps_factor"] * hp["d_max"]
        if not hp["mineps"] <= max_eps:
            raise ValueError(f"mma.mineps={hp['mineps']} must lie in (0, max_eps={max_eps:.4g}] "
                             f"(max_eps = max_eps_factor * d_max)")
        return hp

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        hp = self.hp
        self.max_eps = hp["max_eps_factor"] * hp["d_max"]
        # ε_i of every training example (index = dataset index); moved to the data's device
        # on first use, saved in checkpoints through state_dict
        self.eps = torch.full((self.num_train,), float(hp["mineps"]))

    def loss(self, model, x, y, idx, *, epoch):
        hp = self.hp
        if self.eps.device != x.device:
            self.eps = self.eps.to(x.device)
        # clean pass in train mode, as the official trainer (its CE is the c-term); "correct"
        # uses the SLM margin, stricter than argmax: SLM < 0 implies z_y is the largest
        with torch.set_grad_enabled(hp["clean_coeff"] > 0):
            logits_clean = model(x)
        correct = slm_margin(logits_clean.detach().float(), y) < 0
        eps_prev = self.eps[idx].clamp(hp["mineps"], self.max_eps)
        x_adv, eps_star = anpgd(model, x, y, eps_prev, norm=self.attack.norm,
                                max_eps=self.max_eps, steps=self.attack.steps,
                                search_steps=hp["search_steps"],
                                step_scale=hp["step_scale"])
        # every example runs AN-PGD (no boolean indexing: that would sync with the host);
        # the ones not confidently correct then train on their clean point
        eps_star = torch.where(correct, eps_star, torch.zeros_like(eps_star))
        logits_adv = model(torch.where(correct.reshape(-1, 1, 1, 1), x_adv, x))
        self.eps[idx] = eps_star
        loss = mma_loss(logits_adv, logits_clean, y, correct, eps_star, d_max=hp["d_max"],
                        clean_coeff=hp["clean_coeff"])
        # logits of the clean batch: the engine's train_acc is then the clean training accuracy
        # (at the AN-PGD points accuracy is ~0 by construction)
        return loss, logits_clean

    def epoch_end(self, epoch):
        return {"eps": self.eps.float().cpu().numpy(),
                "d_max": np.float32(self.hp["d_max"]), "max_eps": np.float32(self.max_eps)}

    def evaluate_extra(self, model, x, y, batch_size: int = 500):
        """Mean margin on the evaluation split: the test-time estimate
        (``mixlab.attacks.estimate_margin``: PGD at max_eps, then a bisection decided by the
        argmax, fp32), 0 for misclassified points. Not the official "ANPGD for test", which
        credits its PGD probe at the test radius with max_eps/2: the two numbers differ
        (docs/mma.md#the-validation-margin)."""
        margin = estimate_margin(model, x, y, norm=self.attack.norm, max_eps=self.max_eps,
                                 steps=self.attack.steps, search_steps=self.hp["search_steps"],
                                 step_scale=self.hp["step_scale"], batch_size=batch_size)
        return {"mean_margin": margin.sum().item() / max(1, len(x))}  # as val_mean_margin

    def state_dict(self):
        return {"eps": self.eps}

    def load_state_dict(self, state):
        if "eps" not in state:
            return
        if len(state["eps"]) != self.num_train:
            raise ValueError(f"the checkpoint holds margins for {len(state['eps'])} training "
                             f"examples, this run has {self.num_train}: same data settings "
                             f"(train_subset, val_size, seed) are needed to resume")
        self.eps = state["eps"].detach().clone()


# --------------------------------------------------------------------------- presets
# Engine settings per dataset and profile, on top of the engine's profile. "paper" is the
# official config.py / train.py: CIFAR-10 above (MMA.profiles); MNIST LeNet5-Madry, Adam 1e-4,
# batch 50, 100k steps (91 epochs of 55k images), nb_iter 40 (the AN-PGD steps are the engine's
# ``steps``). d_max and mineps follow from THREATS. smoke: CPU, seconds; short: GPU, minutes.
_DATASET_PROFILES = {
    "cifar10": MMA.profiles,
    "mnist": {
        "smoke": dict(model="smallcnn", optimizer="adam", lr=1e-3, weight_decay=0.0,
                      schedule="constant", val_size=256, steps=5),
        # CPU, a quarter of an hour: the engine's cpu profile (tiny CNN, 8 epochs) on 8k
        # images with the official MNIST optimiser at a larger step and 10 AN-PGD steps (MMA
        # costs about twice PGD-AT per image; PGD-AT and ERM get the same budget)
        "cpu": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                    steps=10, train_subset=8000),
        "short": dict(model="lenet5-madry", epochs=10, batch_size=128, optimizer="adam", lr=1e-3,
                      weight_decay=0.0, schedule="constant", val_size=5000, eval_subset=1000,
                      steps=20),
        "paper": dict(model="lenet5-madry", epochs=91, batch_size=50, optimizer="adam", lr=1e-4,
                      weight_decay=0.0, schedule="constant", val_size=5000, steps=40),
    },
}
#: keyword arguments for ``train``: PRESETS["<dataset>-<norm>"][profile]
PRESETS = {
    f"{dataset}-{norm.lower()}": {
        profile: dict(method="mma", dataset=dataset, norm=norm, profile=profile, **settings)
        for profile, settings in _DATASET_PROFILES[dataset].items()}
    for dataset, norm in THREATS
}
