"""Checks of finished runs and evaluations that can fail: each one tests a property that a
correct implementation has and a known bug lacks.

The notebooks end with these checks instead of hand-written assertions. Each function takes a
finished run (a :class:`mixlab.runs.Run`, or a run directory), the model and data it needs,
or an :func:`mixlab.evaluate.evaluate` result, and returns None or raises
:class:`CheckFailed`, whose message says what was expected, what was measured and which bug
that points to. Each docstring names the bug it catches.

The checks, and what each catches:

* ``mixup_lambda``: λ not drawn from Beta(α, α) (α lost or replaced; λ collapsed to {0, 1}).
* ``amp_lambda``: AMP's λ0 not Beta(α, α); ``lam_opt`` ignored, or λ moving without it.
* ``amp_attack_ascends``: AMP's inner maximisation not raising the loss (sign flipped).
* ``gairat_weights``: GAIR weights not normalised, not following ω(κ; λ), wrong burn-in.
* ``mma_margins``: MMA's margin search disabled (ε stuck at mineps) or never finding the
  boundary (ε stuck at max_eps).
* ``evaluation``: AutoAttack weaker than PGD-20, masking flags, accuracy below a floor.
* ``theory_bound``: the mixup bound failing, or "checked" at θ on the boundary of Θ.
* ``theory_expansion``: wrong moments or factors in the second-order mixup terms.
* ``theory_identities``: closed form ≠ autograd; a wrong mixing law D̃.

Assertions that hold by construction, and so test nothing, have no check here: the
per-example worst case below each attack's accuracy (a minimum), a clamped λ inside its clamp,
t_geo − λ in [−1, 1] (both lie in [0, 1]), a test margin > 0 exactly for clean-correct points
(0 is assigned to the others), worst-case path probabilities below clean ones after a
``torch.minimum``. Range checks that remain (λ in [0, 1], ε in [0, max_eps]) are
there to catch NaN.

Tolerances are stated in each function: statistical ones come from the number of draws (z
standard errors), numerical ones from the dtype the quantity was logged in.

>>> from mixlab import checks
>>> run = load_run("runs/mixup")
>>> checks.mixup_lambda(run)               # raises CheckFailed with the reason, or passes
>>> checks.evaluation(evaluate(run.model, x_test, y_test), min_robust=0.2)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CheckFailed", "mixup_lambda", "amp_lambda", "amp_attack_ascends",
           "gairat_weights", "mma_margins", "evaluation", "strictly_inside_theta",
           "theory_bound", "theory_expansion", "theory_identities"]

#: λ in this interval counts as "mixed" (the share of Beta(1, 1) draws in it is 80%)
MIXED = (0.1, 0.9)


class CheckFailed(AssertionError):
    """A check failed. The message says what was expected, what was measured and which bug
    it points to. A subclass of AssertionError, so a failing check stops a notebook the way
    an ``assert`` does."""


def _fail(what: str, expected: str, measured: str, bug: str) -> None:
    raise CheckFailed(f"{what}: expected {expected}; measured {measured}. Points to: {bug}")


def _as_run(run):
    """A Run as is; a run directory (str / Path) loaded at its last epoch."""
    if isinstance(run, (str, Path)):
        from .runs import load_run
        return load_run(run, which="last")
    return run


def _method_of(run, *names: str) -> dict[str, Any]:
    """The run's method_hp, after checking the run used one of ``names`` (a misuse, not a
    failed check, raises ValueError)."""
    method = run.config.get("method")
    if method not in names:
        raise ValueError(f"this check is for {' / '.join(names)} runs; {run.path} is a "
                         f"{method!r} run")
    return run.config["method_hp"]


# ----------------------------------------------------------------------------- mixup λ
def _beta_draws(lam: np.ndarray, alpha: float, *, what: str, z: float, min_mixed: float,
                min_draws: int) -> None:
    """λ draws against Beta(α, α): share in ``MIXED`` and mean, tolerances z standard errors."""
    from scipy.stats import beta as beta_dist

    lam = np.asarray(lam, dtype=np.float64).ravel()
    n = lam.size
    if n < min_draws:
        _fail(what, f"at least {min_draws} logged λ draws to test their distribution",
              f"{n}", "a run too short to check (more epochs, or per_example=True for mixup)")
    if not np.all(np.isfinite(lam)) or lam.min() < 0 or lam.max() > 1:
        _fail(what, "every λ finite and in [0, 1]",
              f"range [{np.nanmin(lam):.4g}, {np.nanmax(lam):.4g}], "
              f"{int((~np.isfinite(lam)).sum())} non-finite", "a broken λ sampler or log")
    lo, hi = MIXED
    p = float(beta_dist.cdf(hi, alpha, alpha) - beta_dist.cdf(lo, alpha, alpha))
    share = float(((lam >= lo) & (lam <= hi)).mean())
    if share < min_mixed:
        _fail(what, f"at least {min_mixed:.0%} of λ in [{lo}, {hi}] (Beta({alpha:g}, {alpha:g}) "
              f"puts {p:.1%} there)", f"{share:.1%} of {n} draws",
              "λ collapsed to {0, 1}: the run trains on unmixed examples, i.e. ERM (α → 0, "
              "or α replaced by another setting)")
    tol = z * math.sqrt(p * (1 - p) / n) + 1 / n
    if abs(share - p) > tol:
        _fail(what, f"{p:.1%} ± {tol:.1%} of λ in [{lo}, {hi}], as Beta({alpha:g}, {alpha:g})",
              f"{share:.1%} of {n} draws",
              f"λ drawn with another concentration than the configured α = {alpha:g} (α not "
              f"reaching the sampler, or replaced by another setting)")
    sd = math.sqrt(1 / (4 * (2 * alpha + 1)))  # standard deviation of Beta(α, α)
    tol = z * sd / math.sqrt(n)
    if abs(lam.mean() - 0.5) > tol:
        _fail(what, f"mean λ 0.5 ± {tol:.3f} (Beta(α, α) is symmetric)",
              f"{lam.mean():.4f} over {n} draws",
              "an asymmetric λ (e.g. max(λ, 1 − λ), or λ used for the partner's weight)")


def mixup_lambda(run, *, alpha: float | None = None, z: float = 5.0, min_mixed: float = 0.1,
                 min_draws: int = 20) -> None:
    """The λ a mixup run drew (logged as ``lam``, all epochs) follow Beta(α, α).

    Zhang et al. 2018 (arXiv 1710.09412): λ ~ Beta(α, α), α = 1 (uniform) by default. Checked:
    the share of λ in [0.1, 0.9] equals the Beta's own (80% for α = 1) within z binomial
    standard errors (+ one draw), the mean is 0.5 within z standard errors, and at least
    ``min_mixed`` of the draws are mixed at all.

    Args:
        run: a mixup Run (or run directory). alpha: the expected α (default: the run's
            ``method_hp["alpha"]``). z: tolerance in standard errors (5: a correct run fails
            about once in a million). min_mixed: smallest acceptable share of λ in [0.1, 0.9].
        min_draws: fewer logged draws than this cannot be tested (one λ per batch unless
            ``per_example``) and fail.

    Catches: λ collapsed to {0, 1} (α → 0: mixup silently became ERM), α replaced by another
    setting or not reaching the sampler, an asymmetric λ. Also a sampler that is wrong for
    small α: torch's float32 Beta returns exactly 0.5 for about a quarter of the draws at
    α = 1e-3 (most of them at 1e-4), when both of its gamma draws underflow to 0.
    """
    run = _as_run(run)
    hp = _method_of(run, "mixup")
    alpha = float(hp["alpha"] if alpha is None else alpha)
    logs = [a["lam"] for a in run.method_arrays() if "lam" in a]
    lam = np.concatenate(logs) if logs else np.zeros(0)
    _beta_draws(lam, alpha, what="mixup λ", z=z, min_mixed=min_mixed, min_draws=min_draws)


# ----------------------------------------------------------------------------- AMP
def amp_lambda(run, *, z: float = 5.0, min_moved: float = 0.5, min_draws: int = 20) -> None:
    """The λ logs of an AMP run: sampled λ0 ~ Beta(α, α), and λ* moved exactly when
    ``lam_opt`` says so (Bunk et al. 2021, arXiv 2103.11589, as reconstructed in
    ``mixlab.methods.amp``).

    Every logged epoch, over the examples drawn (non-NaN):

    * λ0 follows Beta(α, α) (as :func:`mixup_lambda`, all epochs pooled);
    * without ``lam_opt``: λ* == λ0 exactly;
    * with ``lam_opt``: at least ``min_moved`` of the examples have λ* ≠ clip(λ0), and where
      λ0 lies too far from the ends of the box [lam_min, lam_max] to reach them, every move is
      a whole number of signed steps ``lam_step``, at most ``steps`` of them.

    Catches: α not reaching AMP's sampler; ``lam_opt`` silently ignored; λ moving without
    ``lam_opt`` (a gradient reaching λ); λ updated by the raw gradient or by another step
    size than ``lam_step``.
    """
    run = _as_run(run)
    hp = _method_of(run, "amp")
    logs = run.method_arrays()
    seen = [~np.isnan(a["lam_star"]) for a in logs]
    lam0 = np.concatenate([a["lam0"][s] for a, s in zip(logs, seen)]) if logs else np.zeros(0)
    star = np.concatenate([a["lam_star"][s] for a, s in zip(logs, seen)]) if logs else lam0
    _beta_draws(lam0, float(hp["alpha"]), what="AMP sampled λ0", z=z, min_mixed=0.0,
                min_draws=min_draws)
    if not hp["lam_opt"]:
        moved = int((star != lam0).sum())
        if moved:
            _fail("AMP λ* without lam_opt", "λ* == λ0 for every example",
                  f"{moved} of {lam0.size} differ (largest |λ* − λ0| = "
                  f"{np.abs(star - lam0).max():.3g})",
                  "λ optimised although lam_opt is off (a gradient or step reaching λ)")
        return
    lo, hi, step = float(hp["lam_min"]), float(hp["lam_max"]), float(hp["lam_step"])
    start = np.clip(lam0, lo, hi)
    delta = star - start
    share = float((np.abs(delta) > 1e-6).mean())
    if share < min_moved:
        _fail("AMP λ* with lam_opt", f"λ* ≠ λ0 for at least {min_moved:.0%} of the examples",
              f"{share:.1%} of {lam0.size}", "lam_opt ignored: λ is not a PGD variable")
    steps = int(run.config["steps"])
    # examples whose λ cannot reach an end of the box in ``steps`` steps (a clip on the way
    # breaks the lattice λ0 + k·lam_step)
    inside = (start > lo + steps * step + 1e-6) & (start < hi - steps * step - 1e-6)
    k = delta[inside] / step
    off = np.abs(k - np.round(k))
    if inside.any() and (off.max() > 1e-3 or np.abs(k).max() > steps + 1e-3):
        _fail("AMP λ* with lam_opt",
              f"λ* − λ0 a whole number of steps lam_step = {step:g}, at most steps = {steps}",
              f"|λ* − λ0| / lam_step up to {np.abs(k).max():.3f}, off a whole number by up to "
              f"{off.max():.3f}",
              "λ updated by another rule than λ ← clip(λ + lam_step·sign(∂L/∂λ))")


def amp_attack_ascends(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack,
                       method_hp: Mapping[str, Any], num_classes: int,
                       min_share: float = 0.9, seed: int = 0) -> None:
    """AMP's inner maximisation raises the soft-label loss of nearly every mixed example.

    Draws partners (a permutation) and λ ~ Beta(α, α) (seeded), then compares, per example,
    the soft-label CE at the clean mixed point λ·x_a + (1 − λ)·x_b with the CE at the point
    :func:`mixlab.methods.amp.amp_perturb` returns from a zero start (``random_start`` off,
    so every change is the ascent's own doing; λ moves too with ``lam_opt``). The model is in
    eval mode, fp32.

    Args:
        model: a classifier of pixels in [0, 1] (e.g. ``run.model``). x: (N, C, H, W) in
            [0, 1]; y: (N,) labels. attack: the training threat model, an
            :class:`~mixlab.methods.AttackSpec` (``mixlab.config.attack_spec(run.config)``).
        method_hp: the AMP hyperparameters (``run.config["method_hp"]``).
        min_share: smallest share of examples whose loss must rise.

    Catches: the ascent's sign flipped (PGD descending the loss), a zero or missing step, the
    gradient taken w.r.t. the wrong tensor, the loss not backpropagated through the mix.
    """
    from .attacks import eval_mode
    from .methods import amp
    from .methods.base import mix, soft_cross_entropy

    n = len(x)
    rng = np.random.default_rng(seed)
    lam = torch.as_tensor(rng.beta(method_hp["alpha"], method_hp["alpha"], size=n),
                          dtype=torch.float32, device=x.device)
    perm = torch.as_tensor(rng.permutation(n), device=x.device)
    if method_hp["lam_opt"]:
        lam = lam.clamp(method_hp["lam_min"], method_hp["lam_max"])
    y_soft = F.one_hot(y, num_classes).float()
    x_a, x_b, y_a, y_b = x, x[perm], y_soft, y_soft[perm]
    x_a_adv, x_b_adv, lam_star = amp.amp_perturb(
        model, x_a, x_b, y_a, y_b, lam, eps=attack.eps, step_size=attack.step_size,
        steps=attack.steps, norm=attack.norm, random_start=False,
        lam_opt=method_hp["lam_opt"], lam_step=method_hp["lam_step"],
        lam_min=method_hp["lam_min"], lam_max=method_hp["lam_max"], bf16=False)
    with eval_mode(model), torch.no_grad():
        clean = soft_cross_entropy(model(mix(x_a, x_b, lam)), mix(y_a, y_b, lam),
                                   reduction="none")
        adv = soft_cross_entropy(model(mix(x_a_adv, x_b_adv, lam_star)),
                                 mix(y_a, y_b, lam_star), reduction="none")
    share = (adv > clean).float().mean().item()
    if share < min_share:
        _fail("AMP inner maximisation",
              f"the soft-label loss raised for at least {min_share:.0%} of {n} mixed examples",
              f"raised for {share:.1%}; mean loss {clean.mean().item():.4f} clean → "
              f"{adv.mean().item():.4f} after {attack.steps} steps",
              "the ascent step's sign flipped (descending), a zero step, or the gradient "
              "not flowing through the mixup interpolation")


# ----------------------------------------------------------------------------- GAIRAT
def _gair_omega(kappa: np.ndarray, steps: int, lam: float, fn: str) -> np.ndarray:
    """GAIRAT's unnormalised weight ω(κ) (Zhang et al. 2021, arXiv 2010.01736; official
    GAIR.py), written out here independently of ``mixlab.methods.gairat.gair_weights``."""
    kappa = np.asarray(kappa, dtype=np.float64)
    fn = fn.lower()
    if fn == "discrete":
        return (steps + 1 - kappa) / (steps + 1)
    half = max(steps // 2, 1)
    z = lam + 5 * (half - kappa) / half
    return (1 + np.tanh(z)) / 2 if fn == "tanh" else 1 / (1 + np.exp(-z))


def gairat_weights(run, *, mean_tol: float = 1e-2, shape_tol: float = 0.25,
                   atol: float = 1e-2, min_count: int = 5) -> None:
    """The weights a GAIRAT (or GAIR-FAT) run logged follow the paper's reweighting.

    Per logged epoch e (1-based), with ``begin_epoch`` from the run's config:

    * λ logged as +inf exactly when e < begin_epoch (burn-in), finite after it (equal to
      ``gair_lambda`` with the fixed schedule), and at least one reweighted epoch was logged;
    * burn-in: every weight is exactly 1 (plain PGD-AT);
    * after it: the weights of the examples seen average 1 within ``mean_tol`` (each batch is
      normalised to mean 1; weights are logged in float16), and the mean weight at each κ
      level (levels with ``min_count`` examples or more) is the paper's ω(κ; λ, K, weight_fn)
      times one common factor c = Σw/Σω, within ``shape_tol`` relative + ``atol`` (the
      per-batch factors B/Σω differ a little between batches; float16 resolves weights to
      about 1e-3). ω is the formula of docs/gairat.md / the official GAIR.py, written
      independently of the code under test: weights fall as κ rises, and how fast depends
      on λ's value and sign.

    At least one reweighted epoch must show two κ levels, else nothing distinguishes the
    run from plain adversarial training and the check fails.

    Catches: weights not normalised; the κ term's sign flipped (weights rising with κ);
    λ's sign flipped or λ / K / ⌊K/2⌋ wrong; reweighting during burn-in; a burn-in of the
    wrong length.
    """
    run = _as_run(run)
    hp = _method_of(run, "gairat", "gair_fat")
    logs = run.method_arrays()
    begin = int(hp["begin_epoch"])
    tested_shape, reweighted = False, 0
    for e, a in enumerate(logs, start=1):
        lam = float(a["lam"])
        w = a["weight"].astype(np.float64)
        burn_in = e < begin
        if burn_in != (lam == math.inf):
            _fail(f"GAIRAT λ in epoch {e}", f"λ = +inf exactly in epochs < begin_epoch = {begin}",
                  f"λ = {lam:g}", "a burn-in of the wrong length (an off-by-one in begin_epoch)")
        if burn_in:
            if not np.all(w == 1):
                _fail(f"GAIRAT weights in burn-in epoch {e}", "every weight exactly 1",
                      f"range [{w.min():.4g}, {w.max():.4g}]", "reweighting before begin_epoch")
            continue
        reweighted += 1
        if hp["gair_lambda_schedule"] == "fixed" and lam != float(np.float32(hp["gair_lambda"])):
            _fail(f"GAIRAT λ in epoch {e}", f"λ = gair_lambda = {hp['gair_lambda']:g} (fixed "
                  f"schedule)", f"λ = {lam:g}", "λ not taken from gair_lambda (its sign flipped, "
                  "or another setting used)")
        if abs(w.mean() - 1) > mean_tol:
            _fail(f"GAIRAT weights in epoch {e}", f"mean weight 1 ± {mean_tol:g} over the "
                  f"{w.size} examples seen", f"{w.mean():.4f}",
                  "weights not normalised per batch (w·B/Σw missing)")
        kappa = a["kappa"].astype(np.int64)
        levels = np.array([k for k in np.unique(kappa) if (kappa == k).sum() >= min_count])
        if len(levels) < 2:
            continue
        tested_shape = True
        steps = int(a["steps"])
        # w_i = c_b·ω(κ_i) with one factor c_b = B/Σω per batch: c ≈ Σw / Σω over the epoch
        c = w.sum() / _gair_omega(kappa, steps, lam, hp["weight_fn"]).sum()
        expected = c * _gair_omega(levels, steps, lam, hp["weight_fn"])
        mean_w = np.array([w[kappa == k].mean() for k in levels])
        if np.any(np.abs(mean_w - expected) > shape_tol * expected + atol):
            table = ", ".join(f"κ={k}: {m:.3g} (expected {x:.3g})"
                              for k, m, x in zip(levels, mean_w, expected))
            _fail(f"GAIRAT weights against κ in epoch {e}",
                  f"mean weight per κ level = c·ω(κ; λ={lam:g}, K={steps}, {hp['weight_fn']}) "
                  f"within {shape_tol:.0%} + {atol:g}", table,
                  "the κ term's sign flipped (weights rising with κ), λ's sign flipped, or a "
                  "wrong λ, K or ⌊K/2⌋ in the weight function")
    if not reweighted:
        _fail("GAIRAT reweighting", f"at least one logged epoch ≥ begin_epoch = {begin}",
              f"{len(logs)} logged epoch(s)", "reweighting never started (begin_epoch beyond "
              "the run, or the run too short to check)")
    if not tested_shape:
        _fail("GAIRAT weights against κ", f"an epoch with two κ levels of ≥ {min_count} "
              f"examples each", "a single κ level in every reweighted epoch",
              "nothing to tell the run from plain adversarial training (κ constant: an attack "
              "that never or always succeeds at once; or a run too short to check)")


# ----------------------------------------------------------------------------- MMA
def mma_margins(run, *, max_stuck: float = 0.5, max_capped: float = 0.9,
                min_correct: int = 10) -> None:
    """The per-example margins ε* an MMA run stored (``eps``, logged every epoch) were found
    by the AN-PGD search (Ding et al. 2020, arXiv 1812.02637).

    MMA stores ε* = 0 for clean-misclassified training examples and the AN-PGD margin for
    the others, so ε > 0 marks the correctly classified ones. Over all logged epochs pooled:

    * every ε finite and in [0, max_eps];
    * at least ``min_correct`` correctly classified examples (else nothing can be checked);
    * at most ``max_stuck`` of them still at the starting radius ``mineps`` exactly;
    * at most ``max_capped`` of them at ``max_eps`` (the search found no boundary at all).

    Catches: the margin search disabled or its result not stored (ε stuck at mineps);
    a PGD direction or bisection that never misclassifies (ε stuck at max_eps); NaN margins.
    """
    run = _as_run(run)
    hp = _method_of(run, "mma")
    logs = run.method_arrays()
    if not logs:
        _fail("MMA margins", "one ε log per epoch", "none", "a run without method logs")
    eps = np.concatenate([a["eps"] for a in logs]).astype(np.float64)
    max_eps = float(logs[-1]["max_eps"])
    mineps = float(np.float32(hp["mineps"]))
    if not np.all(np.isfinite(eps)) or eps.min() < 0 or eps.max() > max_eps * (1 + 1e-5):
        _fail("MMA margins", f"every ε finite and in [0, max_eps = {max_eps:.4g}]",
              f"range [{np.nanmin(eps):.4g}, {np.nanmax(eps):.4g}], "
              f"{int((~np.isfinite(eps)).sum())} non-finite", "a broken margin search")
    correct = eps[eps > 0]
    if correct.size < min_correct:
        _fail("MMA margins", f"at least {min_correct} correctly classified training examples "
              f"(ε > 0) over {len(logs)} epoch(s)", f"{correct.size}",
              "a model that classifies nothing correctly (a run too short to check)")
    stuck = float((np.abs(correct - mineps) <= 1e-6 * mineps).mean())
    if stuck > max_stuck:
        _fail("MMA margins", f"at most {max_stuck:.0%} of the correct examples still at "
              f"mineps = {mineps:.4g}", f"{stuck:.1%} of {correct.size}",
              "the margin search disabled or its result not stored (AN-PGD returning the "
              "radius it was given)")
    capped = float((correct >= max_eps * (1 - 1e-5)).mean())
    if capped > max_capped:
        _fail("MMA margins", f"at most {max_capped:.0%} of the correct examples at max_eps = "
              f"{max_eps:.4g}", f"{capped:.1%} of {correct.size}",
              "a search that never finds the boundary (a zero PGD direction, or probes never "
              "judged misclassified)")


# ----------------------------------------------------------------------------- evaluation
def evaluation(result: Mapping[str, Any], *, min_clean: float | None = None,
               min_robust: float | None = None,
               allow_warnings: bool | Iterable[str] = False, aa_tol: float = 0.01) -> None:
    """An :func:`mixlab.evaluate.evaluate` result passes the checks that can fail.

    * AutoAttack accuracy at most PGD-20's + max(``aa_tol``, 2/n), when one ``evaluate`` call
      ran both (same images; a result whose ``"aa"`` was copied in from a call on a subset
      is not compared): AutoAttack starts with APGD-CE, a stronger PGD;
    * no flag in ``result["warnings"]`` (:func:`mixlab.evaluate.masking_report`: attacks above
      clean accuracy, AutoAttack far below PGD-20, CW or FGSM far below PGD-20, AutoAttack's
      own checks), unless ``allow_warnings`` is True, or an iterable of substrings each
      allowed flag contains (e.g. ``["CW-20"]`` for GAIRAT, whose CW gap is its known
      symptom);
    * ``clean`` ≥ ``min_clean`` and the worst case (``robust``; without it the smallest
      attack accuracy) ≥ ``min_robust``, when the caller knows the scale allows it (e.g.
      above chance for a trained model).

    Not checked, because it holds by construction: the worst case below each attack's
    accuracy (a per-example minimum).

    Catches: an AutoAttack run on other inputs, with a smaller eps, or on a model wrapper in
    train mode / without normalisation; gradient masking; a model or evaluation at chance.
    """
    n = int(result.get("n") or 0)
    ran = result.get("attacks", ("pgd20", "aa"))  # a merged result lists only its own call's
    if "pgd20" in result and "aa" in result and "pgd20" in ran and "aa" in ran:
        tol = max(aa_tol, 2 / n) if n else aa_tol
        if result["aa"] > result["pgd20"] + tol:
            _fail("evaluation", f"AutoAttack accuracy ≤ PGD-20 accuracy + {tol:.3f}",
                  f"AutoAttack {result['aa']:.3f}, PGD-20 {result['pgd20']:.3f} (n = {n})",
                  "AutoAttack run with another eps / norm, on other images, or on a model "
                  "wrapper that differs (train mode, normalisation missing)")
    flags = list(result.get("warnings") or ())
    if allow_warnings is not True:
        allowed = () if allow_warnings is False else tuple(allow_warnings)
        flags = [f for f in flags if not any(a in f for a in allowed)]
        if flags:
            _fail("evaluation", "no masking flags", f"{len(flags)}: " + " | ".join(flags),
                  "gradient masking or a broken attack (see each flag)")
    if min_clean is not None and result["clean"] < min_clean:
        _fail("evaluation", f"clean accuracy ≥ {min_clean:.3f}",
              f"{result['clean']:.3f} (n = {n})", "an untrained or broken model, or "
              "mismatched labels / preprocessing")
    if min_robust is not None:
        attacks = [k for k in ("fgsm", "pgd10", "pgd20", "pgd50", "cw20", "aa") if k in result]
        key = "robust" if "robust" in result else min(attacks, key=lambda k: result[k])
        if result[key] < min_robust:
            _fail("evaluation", f"{key} accuracy ≥ {min_robust:.3f}",
                  f"{result[key]:.3f} (n = {n})",
                  "no robustness: training without (or with a broken) attack")


# ----------------------------------------------------------------------------- theory
def strictly_inside_theta(bound: Mapping[str, Any], *, min_R: float = 1e-8) -> bool:
    """θ lies strictly inside Θ: every training point classified correctly with a non-zero
    angle, i.e. ``in_theta`` and R = min_i |cos| > ``min_R``. ``bound`` is a
    :func:`mixlab.theory.robustness_bound` result. On the boundary of Θ (some point with
    f(x_i) = 0, θ = 0 included) R = 0, ε_mix = 0 and the bound reads L̃_mix ≥ L_std, which
    says nothing about robustness."""
    return bool(bound["in_theta"]) and bound["R"] > min_R


def theory_bound(bound: Mapping[str, Any], *, min_R: float = 1e-8, tol: float = 1e-12) -> None:
    """The robustness bound of Zhang et al. 2021 (arXiv 2010.04819), as docs/mixup_theory.md
    states it: L̃_mix(θ) ≥ L̃_adv(ε_mix·√d), checked where the theorem applies and says
    something.

    ``bound``: a :func:`mixlab.theory.robustness_bound` result. Required: θ strictly inside
    Θ (:func:`strictly_inside_theta`), centred inputs, and for the network version a
    positively homogeneous model (f(x) = ∇f(x)ᵀx) with R3 = 0. Then ``mix ≥ adv − tol``
    (nats).

    Catches: a bound "verified" at θ on the boundary of Θ (θ = 0 at the start of training,
    where it holds with equality by construction); a bound that fails (wrong ε_mix, wrong
    second-order adversarial loss, wrong mixup terms); conditions of the theorem not met.
    """
    if not strictly_inside_theta(bound, min_R=min_R):
        _fail("mixup robustness bound", f"θ strictly inside Θ: every training point "
              f"correct, R = min|cos| > {min_R:g}",
              f"in_theta={bound['in_theta']}, R={bound['R']:.3g}",
              "θ on the boundary of Θ (or outside): ε_mix = 0 there and the bound holds "
              "trivially; check snapshots strictly inside Θ")
    if not bound["centred"]:
        _fail("mixup robustness bound", "centred inputs (mean 0)", "not centred",
              "data not centred: the theorem does not apply")
    if bound.get("exact_adv") is None and not (bound["homogeneous"] and bound["r3"] == 0):
        _fail("mixup robustness bound", "a homogeneous network (f = ∇fᵀx) with R3 = 0",
              f"homogeneous={bound['homogeneous']}, R3={bound['r3']:.3g}",
              "a network the theorem's network version does not cover (biases, smooth "
              "activations)")
    if bound["mix"] < bound["adv"] - tol:
        _fail("mixup robustness bound", "L̃_mix ≥ L̃_adv(ε_mix·√d)",
              f"L̃_mix = {bound['mix']:.6g} < L̃_adv = {bound['adv']:.6g} at ε_mix·√d = "
              f"{bound['eps_l2']:.4g}", "a wrong ε_mix (R, c_x or E[1 − λ]), second-order "
              "adversarial loss or mixup term")


def theory_expansion(model, x: torch.Tensor, y: torch.Tensor, alpha: float, *,
                     rel_tol: float = 1e-2, order: int = 32) -> None:
    """The second-order mixup regulariser R1 + R2 + R3 (``mixlab.theory.approx_mixup_loss``)
    matches the exact one, mixup loss − L_std (Gauss-Jacobi quadrature over D̃), within
    ``rel_tol`` relative error, for a model where the expansion is valid (a logistic
    regression with small ‖θ‖, as in the theory notebook: 0.05 along the ERM direction).

    Catches: wrong moments E[1 − λ], E[(1 − λ)²] (e.g. those of Beta(α, α) instead of D̃), a
    missing 1/2, a wrong sign or term in R1, R2, R3.
    """
    from . import theory as T

    std = T.standard_loss(model, x, y)
    approx = T.approx_mixup_loss(model, x, y, alpha).reg
    exact = T.mixup_loss_exact(model, x, y, alpha, order=order) - std
    rel = abs(approx - exact) / abs(exact)
    if not rel < rel_tol:
        _fail(f"mixup expansion at α = {alpha:g}", f"relative error of R1 + R2 + R3 below "
              f"{rel_tol:g}", f"{rel:.3g} (approximate {approx:.6g}, exact {exact:.6g})",
              "wrong moments of 1 − λ under D̃, a missing factor 1/2, or a wrong term")


def theory_identities(model, x: torch.Tensor, y: torch.Tensor, alpha: float, *,
                      tol: float = 1e-10, order: int = 48) -> None:
    """Two identities of the mixup theory hold to rounding (float64):

    * the label-mixing identity: the mixup loss as defined (mixed inputs and labels,
      λ ~ Beta(α, α)) equals the loss with unmixed labels y_i and λ ~ D̃ (``mixup_loss_exact``);
    * for a ``LogisticRegression`` model: the closed-form terms
      (``approx_mixup_loss_logistic``) equal the autograd ones (``approx_mixup_loss``).

    Keep x small (a dozen points: the quadrature is over all n² pairs).

    Catches: a wrong mixing law D̃ (mixture components or weights swapped); a bug in either
    implementation of the mixup terms (input gradients, Hessian-vector products, Σ).
    """
    from . import theory as T

    gap = abs(T.mixup_loss_exact(model, x, y, alpha, order=order)
              - T.mixup_loss_definition(model, x, y, alpha, order=order))
    if not gap < tol:
        _fail(f"label-mixing identity at α = {alpha:g}", f"|exact − definition| < {tol:g}",
              f"{gap:.3g}", "a wrong mixing law D̃ (its Beta components or weights)")
    if isinstance(model, T.LogisticRegression):
        closed = T.approx_mixup_loss_logistic(model.theta, x, y, alpha)
        auto = T.approx_mixup_loss(model, x, y, alpha)
        for key in ("std", "r1", "r2", "r3"):
            a, b = getattr(closed, key), getattr(auto, key)
            if not abs(a - b) < tol:
                _fail(f"mixup term {key} at α = {alpha:g}", f"closed form = autograd within "
                      f"{tol:g}", f"{a:.12g} vs {b:.12g}", f"a bug in one implementation of {key}")
