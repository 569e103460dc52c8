"""Per-profile analysis settings of every notebook, in one table.

A notebook's run has two kinds of per-profile settings. The engine's (model, epochs, data
subset, PGD steps) live in :data:`mixlab.config.PROFILES` and the methods' ``profiles``; they
reach ``train`` through ``profile=``. What the notebook itself does with the trained runs
(how many test images it evaluates, which AutoAttack stages it runs, how many interpolation
pairs it draws, how strict its final checks are) lives here, one entry per notebook and
profile, and a notebook reads its entry with one call:

>>> s = notebook_settings("amp_cifar10", "smoke")
>>> s["n_eval"], s["aa_attacks"]
(64, ['apgd-ce', 'apgd-t'])

Profiles: ``smoke`` (CI on a CPU, a minute or two: the code path, not the papers' numbers),
``cpu`` (a laptop's CPU, about a quarter of an hour per notebook on two cores: models trained
for real on 10k images, 500 test images, AutoAttack's two APGD stages, the checks strict),
``short`` (a GPU, minutes), ``paper`` (the papers' scale). Every key is explained in
:data:`SETTING_HELP`.
"""
from __future__ import annotations

import copy
from typing import Any

#: AutoAttack on a CPU: its two APGD stages (FAB-T and Square cost ~40 s per model there)
_APGD = ["apgd-ce", "apgd-t"]
#: masking flags that measure a barely trained model on a handful of images (CW-20, FGSM or
#: AutoAttack far from PGD-20): they pass where ``trained`` is False, never elsewhere
_GAP_FLAGS = ["below PGD-20", "stronger than PGD-20"]
#: ... and, for the baselines' smoke runs (weight averages of 32 steps among them, the models
#: nearest chance), an attack above clean accuracy by an image or two: at chance, loss ascent
#: can lower p(y) and still make y the top class when the other classes fall further, turning
#: a wrong clean prediction right. Never where ``trained``: a real model shows no such gain
_NEAR_CHANCE_FLAGS = [*_GAP_FLAGS, "above clean accuracy"]
#: the cpu profile's CIFAR-10 models (a 15k-parameter CNN at 30-40% clean accuracy after 8
#: epochs of 5-step PGD-AT) resist the CE loss more than the margin loss: CW-20 lands 6 or
#: more points below PGD-20 there (PGD-AT's selected checkpoint, 500 test images: 16.8%
#: against 22.8%; GAIRAT's 12), past the 5 points the masking report allows a fully trained
#: model. The flag is printed under the table and this one passes the checks; the worst-case
#: column, which AutoAttack dominates, is the number to read. Every other flag still fails.
_SMALL_MODEL_FLAGS = ["CW-20 ("]
#: ... and on MNIST, PGD-AT's known gap: the cpu profile's PGD-AT (tiny CNN, eps 0.3, 10-step
#: PGD, 8 epochs on 8k images) loses 14 points from PGD-20 to AutoAttack (34.2% to 20.2% on
#: 500 test images) and 7.6 to CW-20: PGD-20 overrates this model, and AutoAttack (Croce &
#: Hein 2020, arXiv 2003.01690) is the number to read. Both flags print under the table; the
#: worst case (AutoAttack's) is what the README reports. Every other flag still fails.
_MNIST_AT_FLAGS = ["CW-20 (", "AutoAttack ("]

#: the baselines notebook's runs: every one of its methods, ...
_ALL_BASELINES = ["pgd_at", "pgd_at_ema", "cutmix_ema", "pgd_at_cutmix_ema", "trades", "amp_ema"]
#: ... and the cpu profile's, to fit a quarter of an hour on two cores: PGD-AT is trained once,
#: with averaging (averaging changes nothing in the loss, so with the same seed the averaged
#: run's raw weights are exactly PGD-AT's: its `pgd_at_ema_raw` rows are PGD-AT, its checkpoint
#: selected by the average); AMP is left to amp_cifar10, which trains it against PGD-AT on the
#: same budget, and CutMix without an attack (not robust at all: 0.6% worst case at this
#: scale, its clean accuracy ERM's) is left out
_CPU_BASELINES = ["pgd_at_ema", "pgd_at_cutmix_ema", "trades"]

#: what each key of a notebook's settings means (units in brackets)
SETTING_HELP: dict[str, str] = {
    "n_eval": "test images of the table [images]; every attack runs on the same ones",
    "aa_attacks": "AutoAttack attacks; None: the standard version (APGD-CE, APGD-T, FAB-T, "
                  "Square)",
    "trained": "the models are trained for real: the checks demand above-chance clean "
               "accuracy, robustness and the papers' qualitative orderings",
    "tolerated_flags": "substrings of masking flags (mixlab.evaluate.masking_report) the "
                       "checks let pass; a rising robust-accuracy curve and AutoAttack's own "
                       "checks never pass, an attack above clean accuracy only in a smoke "
                       "entry that lists it (models at chance)",
    "n_seeds": "training seeds of the seed table (the notebook's seed and the ones after it): "
               "the compared runs are trained once per seed and their selected checkpoints "
               "reported as mean and spread; 1: the notebook's seed only (the smoke entries "
               "of the longest notebooks, to keep the test suite short; GAIRAT's and mixup "
               "theory's smoke entries train a second seed)",
    "n_pairs": "interpolation pairs of test images [pairs]",
    "path_steps": "PGD steps of the worst case at each point of an interpolation path",
    "n_probe": "training images whose geometry value κ is probed with the final model",
    "margin_steps": "PGD steps of the test-margin estimate (then a 10-step bisection)",
    "eps_fractions": "radii of the robust-accuracy curve, as fractions of the threat "
                     "model's eps",
    "curve_attack": "attack of the robust-accuracy curve (mixlab.evaluate ATTACKS)",
    "max_eps_factor": "how far explorer paths go and the margin search range, in multiples "
                      "of the threat model's eps",
    "n": "training points of the toy problems of sections 1-2",
    "noise": "noise of the two-moons data [input units]",
    "steps": "full-batch optimiser steps of the toy models",
    "snaps": "snapshots logged along toy training (geometric in the step)",
    "order": "Gauss-Jacobi quadrature points of the exact mixup loss",
    "width": "hidden units of the toy MLPs",
    "lr": "learning rate of the toy models",
    "alpha_grid": "α values of the approximation-ratio sweep",
    "gap_n": "training points of the noisy two-moons generalisation study",
    "gap_steps": "optimiser steps of the generalisation study",
    "gauss_n": "training points of the Gaussian mixture of section 3",
    "gauss_d": "dimension of the Gaussian mixture",
    "real_subset": "MNIST training images of the gap study and of the MNIST robustness runs",
    "robust_datasets": "section 4's datasets when datasets['robust'] is 'auto', each trained "
                       "and attacked in turn; an entry that is a list names alternatives, the "
                       "first whose data is present is used",
    "min_robust": "worst-case accuracy over every attack that an adversarially trained model "
                  "must reach [fraction]: robust above chance at this scale",
    "robust_model": "section 4's architecture on a dataset other than MNIST (MNIST: "
                    "smallcnn)",
    "baselines": "the baselines notebook's runs trained in this profile (names of its "
                 "`methods` table); the seed table retrains the PGD-AT runs among them",
}

#: notebook -> profile -> settings. Literal values, so a profile reads the way it runs.
NOTEBOOK_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "quickstart": {
        "smoke": dict(n_eval=64, aa_attacks=_APGD, trained=False, tolerated_flags=_GAP_FLAGS,
                      min_robust=None),
        "cpu": dict(n_eval=500, aa_attacks=_APGD, trained=True,
                    tolerated_flags=_SMALL_MODEL_FLAGS, min_robust=0.15),
        "short": dict(n_eval=1000, aa_attacks=None, trained=True, tolerated_flags=[],
                      min_robust=0.3),
        "paper": dict(n_eval=10000, aa_attacks=None, trained=True, tolerated_flags=[],
                      min_robust=0.3),
    },
    "amp_cifar10": {
        "smoke": dict(n_eval=64, aa_attacks=_APGD, n_pairs=4, path_steps=5, trained=False,
                      tolerated_flags=_GAP_FLAGS, n_seeds=1),
        "cpu": dict(n_eval=500, aa_attacks=_APGD, n_pairs=4, path_steps=10, trained=True,
                    tolerated_flags=_SMALL_MODEL_FLAGS, n_seeds=2),
        "short": dict(n_eval=1000, aa_attacks=None, n_pairs=6, path_steps=10, trained=True,
                      tolerated_flags=[], n_seeds=2),
        "paper": dict(n_eval=10000, aa_attacks=None, n_pairs=6, path_steps=20, trained=True,
                      tolerated_flags=[], n_seeds=1),
    },
    "baselines_cifar10": {
        "smoke": dict(n_eval=64, aa_attacks=_APGD, trained=False,
                      tolerated_flags=_NEAR_CHANCE_FLAGS, min_robust=None, n_seeds=1,
                      baselines=_ALL_BASELINES),
        "cpu": dict(n_eval=500, aa_attacks=_APGD, trained=True,
                    tolerated_flags=_SMALL_MODEL_FLAGS, min_robust=0.15, n_seeds=2,
                    baselines=_CPU_BASELINES),
        "short": dict(n_eval=1000, aa_attacks=None, trained=True, tolerated_flags=[],
                      min_robust=0.3, n_seeds=2,
                      baselines=_ALL_BASELINES),
        "paper": dict(n_eval=10000, aa_attacks=None, trained=True, tolerated_flags=[],
                      min_robust=0.3, n_seeds=1,
                      baselines=_ALL_BASELINES),
    },
    "gairat_cifar10": {
        "smoke": dict(n_eval=64, aa_attacks=_APGD, n_probe=512, trained=False,
                      tolerated_flags=_GAP_FLAGS, min_robust=None, n_seeds=2),
        "cpu": dict(n_eval=500, aa_attacks=_APGD, n_probe=2000, trained=True,
                    tolerated_flags=_SMALL_MODEL_FLAGS, min_robust=0.15, n_seeds=2),
        "short": dict(n_eval=1000, aa_attacks=None, n_probe=5000, trained=True,
                      tolerated_flags=[], min_robust=0.25, n_seeds=2),
        "paper": dict(n_eval=10000, aa_attacks=None, n_probe=10000, trained=True,
                      tolerated_flags=[], min_robust=0.25, n_seeds=1),
    },
    "mma": {
        "smoke": dict(n_eval=64, aa_attacks=_APGD, margin_steps=10,
                      eps_fractions=[0, 0.5, 1, 1.5, 2], curve_attack="pgd10", trained=False,
                      tolerated_flags=_GAP_FLAGS, min_robust=None),
        "cpu": dict(n_eval=500, aa_attacks=_APGD, margin_steps=20,
                    eps_fractions=[0, 0.25, 0.5, 0.75, 1, 1.5], curve_attack="pgd20",
                    trained=True, tolerated_flags=_MNIST_AT_FLAGS, min_robust=0.15),
        "short": dict(n_eval=1000, aa_attacks=None, margin_steps=20,
                      eps_fractions=[0, 0.25, 0.5, 0.75, 1, 1.5, 2], curve_attack="pgd20",
                      trained=True, tolerated_flags=[], min_robust=0.25),
        "paper": dict(n_eval=10000, aa_attacks=None, margin_steps=20,
                      eps_fractions=[0, 0.25, 0.5, 0.75, 1, 1.5, 2], curve_attack="pgd20",
                      trained=True, tolerated_flags=[], min_robust=0.25),
    },
    "margin_explorer": {
        "smoke": dict(max_eps_factor=4),
        "cpu": dict(max_eps_factor=4),
        "short": dict(max_eps_factor=4),
        "paper": dict(max_eps_factor=4),
    },
    "mixup_theory": {
        "smoke": dict(n=64, noise=0.15, steps=300, snaps=7, order=32, width=32, lr=0.05,
                      alpha_grid=5, gap_n=40, gap_steps=600, gauss_n=100, gauss_d=10,
                      real_subset=1024, n_eval=128, aa_attacks=_APGD,
                      robust_datasets=["mnist"], robust_model="tiny",
                      tolerated_flags=_GAP_FLAGS, n_seeds=2),
        "cpu": dict(n=128, noise=0.15, steps=1000, snaps=10, order=48, width=64, lr=0.02,
                    alpha_grid=8, gap_n=60, gap_steps=3000, gauss_n=200, gauss_d=20,
                    real_subset=5000, n_eval=500, aa_attacks=_APGD,
                    robust_datasets=["mnist", "cifar10"], robust_model="tiny",
                    tolerated_flags=_GAP_FLAGS, n_seeds=2),
        "short": dict(n=200, noise=0.15, steps=2000, snaps=12, order=48, width=64, lr=0.02,
                      alpha_grid=12, gap_n=60, gap_steps=5000, gauss_n=200, gauss_d=20,
                      real_subset=2048, n_eval=1000, aa_attacks=None,
                      robust_datasets=[["svhn", "cifar10"]], robust_model="preactresnet18",
                      tolerated_flags=[], n_seeds=2),
        "paper": dict(n=300, noise=0.15, steps=5000, snaps=16, order=64, width=64, lr=0.02,
                      alpha_grid=16, gap_n=60, gap_steps=10000, gauss_n=400, gauss_d=50,
                      real_subset=2048, n_eval=10000, aa_attacks=None,
                      robust_datasets=[["svhn", "cifar10"]], robust_model="wrn-16-8",
                      tolerated_flags=[], n_seeds=1),
    },
}


def notebook_settings(notebook: str, profile: str) -> dict[str, Any]:
    """The settings of ``notebook`` (its file name without ``.ipynb``) in ``profile``, as a
    new dict (changing it changes nothing here). Raises ValueError naming the notebook or the
    profile and the choices."""
    if notebook not in NOTEBOOK_SETTINGS:
        raise ValueError(f"no notebook settings for {notebook!r}; notebooks: "
                         f"{', '.join(NOTEBOOK_SETTINGS)} (mixlab.notebook_settings)")
    by_profile = NOTEBOOK_SETTINGS[notebook]
    if profile not in by_profile:
        raise ValueError(f"notebook {notebook!r} has no settings for profile {profile!r}; "
                         f"profiles: {', '.join(by_profile)} (mixlab.notebook_settings)")
    return copy.deepcopy(by_profile[profile])
