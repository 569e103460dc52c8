"""mixlab.checks: every check passes on a correct run or result and fails (CheckFailed, for
the reason it names) on a deliberately broken one. Tiny runs on the synthetic dataset."""
import numpy as np
import pytest
import torch

from mixlab import checks, theory as T
from mixlab.attacks import ascent_step, pgd
from mixlab.checks import CheckFailed
from mixlab.config import attack_spec
from mixlab.data import load_dataset
from mixlab.evaluate import evaluate, masking_report
from mixlab.methods import amp as amp_mod, gairat as gairat_mod, mixup as mixup_mod, mma as mma_mod
from mixlab.models import build_model
from mixlab.runs import load_run
from mixlab.train import train

FAST = dict(dataset="synthetic", model="tiny", epochs=2, batch_size=64, train_subset=512,
            val_size=256, eval_subset=128, lr=0.05, schedule="onecycle", warmup=0.3, steps=2,
            eval_steps=2, device="cpu", quiet=True)
#: a budget at which the tiny CNN learns the synthetic task (~85% train accuracy)
LEARN = dict(FAST, epochs=3, lr=0.2)
MMA_HP = {"d_max": 16 / 255, "mineps": 0.005, "search_steps": 5}


def _run(tmp_path_factory, name, method, method_hp=None, **settings):
    run_dir = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    train(method=method, method_hp=method_hp or {}, run_dir=str(run_dir), **{**FAST, **settings})
    return load_run(run_dir, which="last")


@pytest.fixture(scope="module")
def images():
    ds = load_dataset("synthetic", "test").subset(128, seed=0)
    return ds.x.float() / 255, ds.y


# ----------------------------------------------------------------------------- mixup
def test_mixup_lambda_passes_for_beta_1(tmp_path_factory):
    run = _run(tmp_path_factory, "mixup", "mixup", {"alpha": 1.0, "per_example": True})
    checks.mixup_lambda(run)
    checks.mixup_lambda(str(run.path))  # a run directory works too


@pytest.mark.parametrize("alpha, reason", [
    (1e-2, "collapsed"),
    # torch's float32 Beta sampler returns exactly 0.5 for ~24% of the draws at α = 1e-3
    # (both gamma draws underflow to 0); an exact sampler would give collapsed λ instead
    (1e-3, "collapsed|another concentration"),
])
def test_mixup_lambda_fails_as_alpha_goes_to_zero(tmp_path_factory, alpha, reason):
    run = _run(tmp_path_factory, "mixup_a0", "mixup", {"alpha": alpha, "per_example": True})
    with pytest.raises(CheckFailed, match=reason):
        checks.mixup_lambda(run)


def test_mixup_lambda_fails_when_alpha_is_replaced(tmp_path_factory, monkeypatch):
    real = mixup_mod.sample_lam
    monkeypatch.setattr(mixup_mod, "sample_lam", lambda alpha, n, device: real(0.2, n, device))
    run = _run(tmp_path_factory, "mixup_a02", "mixup", {"alpha": 1.0, "per_example": True})
    with pytest.raises(CheckFailed, match="another concentration"):
        checks.mixup_lambda(run)


# ----------------------------------------------------------------------------- AMP
@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    return _run(tmp_path_factory, "amp", "amp", {"lam_opt": True})


def test_amp_lambda_passes_with_and_without_lam_opt(amp_run, tmp_path_factory):
    checks.amp_lambda(amp_run)
    checks.amp_lambda(_run(tmp_path_factory, "amp_base", "amp", {}))


def test_amp_lambda_fails_when_lam_opt_is_ignored(tmp_path_factory, monkeypatch):
    real = amp_mod.amp_perturb
    monkeypatch.setattr(amp_mod, "amp_perturb",
                        lambda *a, **kw: real(*a, **{**kw, "lam_opt": False}))
    run = _run(tmp_path_factory, "amp_nolam", "amp", {"lam_opt": True})
    with pytest.raises(CheckFailed, match="lam_opt ignored"):
        checks.amp_lambda(run)


def _ascends(run, images):
    x, y = images
    checks.amp_attack_ascends(run.model, x, y, attack=attack_spec(run.config),
                              method_hp=run.config["method_hp"], num_classes=10)


def test_amp_attack_ascends_passes(amp_run, images):
    _ascends(amp_run, images)


def test_amp_attack_ascends_fails_when_the_step_descends(amp_run, images, monkeypatch):
    # PGD steps down the loss: δ ← δ − step·sign(∇L)
    monkeypatch.setattr(amp_mod, "ascent_step", lambda delta, grad, step_size, norm:
                        ascent_step(delta, -grad, step_size, norm))
    with pytest.raises(CheckFailed, match="sign flipped"):
        _ascends(amp_run, images)


# ----------------------------------------------------------------------------- GAIRAT
GAIR = dict(method_hp={"begin_epoch": 2}, epochs=3)  # epoch 1 burn-in, epochs 2-3 reweighted


def test_gairat_weights_pass(tmp_path_factory):
    run = _run(tmp_path_factory, "gairat", "gairat", **GAIR)
    assert [float(a["lam"]) for a in run.method_arrays()] == [np.inf, -1.0, -1.0]
    checks.gairat_weights(run)


def test_gairat_weights_fail_when_the_kappa_sign_is_flipped(tmp_path_factory, monkeypatch):
    real = gairat_mod.gair_weights
    # z = λ + 5(κ − h)/h instead of λ + 5(h − κ)/h: the boundary examples get the least weight
    monkeypatch.setattr(gairat_mod, "gair_weights",
                        lambda kappa, steps, lam, fn="tanh": real(steps - kappa, steps, lam, fn))
    run = _run(tmp_path_factory, "gairat_flip", "gairat", **GAIR)
    with pytest.raises(CheckFailed, match="sign flipped"):
        checks.gairat_weights(run)


def test_gairat_weights_fail_when_lambdas_sign_is_flipped(tmp_path_factory, monkeypatch):
    real = gairat_mod.gair_weights
    # the configured (and logged) λ = −1 enters the weight function as +1
    monkeypatch.setattr(gairat_mod, "gair_weights",
                        lambda kappa, steps, lam, fn="tanh": real(kappa, steps, abs(lam), fn))
    run = _run(tmp_path_factory, "gairat_lam", "gairat", **GAIR)
    with pytest.raises(CheckFailed, match="λ's sign flipped"):
        checks.gairat_weights(run)


def _omega_only(kappa, steps, lam, fn="tanh"):
    """Tanh GAIR weights without the final w·B/Σw (the burn-in's ones stay ones)."""
    if lam == float("inf"):
        return torch.ones_like(kappa, dtype=torch.float32)
    half = max(steps // 2, 1)
    return (1 + torch.tanh(lam + 5 * (half - kappa.float()) / half)) / 2


def test_gairat_weights_fail_without_normalisation(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(gairat_mod, "gair_weights", _omega_only)
    run = _run(tmp_path_factory, "gairat_raw", "gairat", **GAIR)
    with pytest.raises(CheckFailed, match="not normalised"):
        checks.gairat_weights(run)


# ----------------------------------------------------------------------------- MMA
@pytest.fixture(scope="module")
def mma_run(tmp_path_factory):
    return _run(tmp_path_factory, "mma", "mma", MMA_HP, **LEARN)


def test_mma_margins_pass(mma_run):
    checks.mma_margins(mma_run)


def test_mma_margins_fail_when_the_search_is_disabled(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(mma_mod, "anpgd", lambda model, x, y, eps, **kw: (x, eps))
    run = _run(tmp_path_factory, "mma_off", "mma", MMA_HP, **LEARN)
    with pytest.raises(CheckFailed, match="search disabled"):
        checks.mma_margins(run)


# ----------------------------------------------------------------------------- evaluation
EPS = 8 / 255


def _pgd50(model, x, y, *, eps, norm, **kw):
    """A stand-in for AutoAttack (which takes minutes on CPU): PGD-50, step eps/4."""
    return pgd(model, x, y, eps=eps, step_size=eps / 4, steps=50, norm=norm, bf16=False), ["pgd50"]


def test_evaluation_passes_for_an_honest_result(mma_run, images, monkeypatch):
    monkeypatch.setattr("mixlab.evaluate._autoattack", _pgd50)
    x, y = images
    result = evaluate(mma_run.model, x, y, attacks=("clean", "fgsm", "pgd20", "aa"), eps=EPS)
    checks.evaluation(result, min_clean=0.5)


def test_evaluation_fails_when_autoattack_is_weaker_than_pgd(mma_run, images, monkeypatch):
    # an AutoAttack that moved nothing (run with eps ≈ 0, or on a wrapper that is not attacked)
    monkeypatch.setattr("mixlab.evaluate._autoattack", lambda model, x, y, **kw: (x, ["none"]))
    x, y = images
    result = evaluate(mma_run.model, x, y, attacks=("clean", "pgd20", "aa"), eps=EPS)
    assert result["aa"] == result["clean"] > result["pgd20"] + 0.1
    with pytest.raises(CheckFailed, match="AutoAttack accuracy ≤ PGD-20"):
        checks.evaluation(result, allow_warnings=True)


def test_evaluation_fails_on_masking_flags_unless_allowed():
    result = {"clean": 0.8, "pgd20": 0.6, "aa": 0.3, "robust": 0.3, "n": 1000}
    result["warnings"] = masking_report(result)
    with pytest.raises(CheckFailed, match="masking"):
        checks.evaluation(result)
    checks.evaluation(result, allow_warnings=["AutoAttack"])


def test_evaluation_fails_for_an_untrained_model(images):
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).eval()
    x, y = images
    result = evaluate(model, x[:64], y[:64], attacks=("clean", "pgd20"), eps=EPS)
    with pytest.raises(CheckFailed, match="robust accuracy ≥ 0.200"):
        checks.evaluation(result, min_robust=0.2, allow_warnings=True)


# ----------------------------------------------------------------------------- theory
@pytest.fixture(scope="module")
def gauss():
    data = T.make_gaussian_mixture(100, 10, seed=0)
    model = T.LogisticRegression(10)
    T.fit(model, data.x, data.y, method="erm", steps=300, lr=0.05, seed=0)
    return data.x, data.y, model.theta.detach()


def test_theory_bound_passes_inside_theta(gauss):
    x, y, theta = gauss
    bound = T.robustness_bound(None, x, y, 1.0, theta=theta)
    assert bound["R"] > 1e-3
    checks.theory_bound(bound)


def test_theory_bound_fails_at_theta_zero(gauss):
    x, y, _ = gauss
    bound = T.robustness_bound(None, x, y, 1.0, theta=torch.zeros(10, dtype=torch.float64))
    assert bound["in_theta"] and bound["holds"]  # what a bare `holds` assertion would accept
    with pytest.raises(CheckFailed, match="boundary of Θ"):
        checks.theory_bound(bound)


def test_theory_bound_fails_with_a_point_on_the_boundary(gauss):
    x, y, theta = gauss
    k = int(((2 * y - 1) * (x @ theta)).argmin())     # the point nearest the boundary
    on_edge = theta - (theta @ x[k]) / (x[k] @ x[k]) * x[k]
    bound = T.robustness_bound(None, x, y, 1.0, theta=on_edge)
    assert ((2 * y - 1) * (x @ on_edge)).abs().min() < 1e-12
    with pytest.raises(CheckFailed, match="boundary of Θ"):
        checks.theory_bound(bound)


@pytest.fixture(scope="module")
def moons_small():
    data = T.make_moons(64, noise=0.15, seed=0)
    erm = T.LogisticRegression(2)
    T.fit(erm, data.x, data.y, method="erm", steps=300, lr=0.05, seed=0)
    small = T.LogisticRegression(2, 0.05 * erm.theta.detach() / erm.theta.detach().norm())
    return small, data.x, data.y


def test_theory_expansion_and_identities_pass(moons_small):
    model, x, y = moons_small
    for alpha in (0.2, 1.0):
        checks.theory_expansion(model, x, y, alpha)
        checks.theory_identities(model, x[:12], y[:12], alpha)


def test_theory_expansion_fails_with_the_moments_of_beta(moons_small, monkeypatch):
    # E[1 − λ] and E[(1 − λ)²] of Beta(α, α) instead of the mixing law D̃
    monkeypatch.setattr(T, "mixing_moments",
                        lambda a, b=None: (0.5, (a + 1) / (2 * (2 * a + 1))))
    model, x, y = moons_small
    with pytest.raises(CheckFailed, match="relative error"):
        checks.theory_expansion(model, x, y, 1.0)


def test_theory_identities_fail_with_a_swapped_mixing_law(moons_small, monkeypatch):
    # D̃ = Beta(α + 1, α) for α = β; the mirrored Beta(α, α + 1) is the classic slip
    monkeypatch.setattr(T, "mixing_quadrature",
                        lambda a, b=None, order=48: T.beta_quadrature(a, a + 1, order))
    model, x, y = moons_small
    with pytest.raises(CheckFailed, match="mixing law"):
        checks.theory_identities(model, x[:12], y[:12], 1.0)
