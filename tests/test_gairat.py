"""GAIRAT, GAIR-FAT and FAT: weight formulas, λ schedules, κ and early stopping on a model
whose answer is known, logging, and a short training run on synthetic data."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixlab.attacks import pgd
from mixlab.config import resolve_config
from mixlab.methods import AttackSpec, get_method
from mixlab.attacks import early_stopped_pgd, tau_at
from mixlab.methods.gairat import gair_weights, lam_at
from mixlab.train import train


# ----------------------------------------------------------------------------- weights
def _tanh_ref(kappa, steps, lam):
    half = steps // 2
    return (1 + np.tanh(lam + 5 * (half - kappa) / half)) / 2


def _sigmoid_ref(kappa, steps, lam):
    half = steps // 2
    return 1 / (1 + np.exp(-(lam + 5 * (half - kappa) / half)))


def _discrete_ref(kappa, steps, lam):
    return (steps + 1 - kappa) / (steps + 1)


@pytest.mark.parametrize("fn, ref", [("tanh", _tanh_ref), ("sigmoid", _sigmoid_ref),
                                     ("discrete", _discrete_ref)])
@pytest.mark.parametrize("steps", [10, 5])  # K = 5: ⌊K/2⌋ = 2, not 2.5
@pytest.mark.parametrize("lam", [-1.0, 0.0, 1.5])
def test_weights_match_the_formulas_and_average_one(fn, ref, steps, lam):
    kappa = np.array([0, 1, 2, 2, steps // 2, steps - 1, steps])
    omega = ref(kappa.astype(np.float64), steps, lam)
    expected = omega * len(omega) / omega.sum()
    w = gair_weights(torch.tensor(kappa), steps, lam, fn)
    assert w.dtype == torch.float32 and w.shape == (len(kappa),)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[1:] <= w[:-1])  # κ sorted ascending -> weights fall


def test_floor_of_half_k_matters():
    """K = 5 uses ⌊5/2⌋ = 2 (the official int(num_steps/2)); 2.5 would give other weights."""
    kappa = torch.tensor([0, 3])
    w = gair_weights(kappa, 5, 0.0)
    with_2_5 = (1 + np.tanh(5 * (2.5 - np.array([0, 3])) / 2.5)) / 2
    with_2_5 = with_2_5 * 2 / with_2_5.sum()
    assert not np.allclose(w.numpy(), with_2_5, atol=1e-3)
    # κ = ⌊K/2⌋ with λ = 0 sits at the middle of the Tanh: ω = 1/2
    raw = gair_weights(torch.tensor([2, 0]), 5, 0.0)
    assert (raw[0] / raw[1]).item() == pytest.approx(0.5 / _tanh_ref(0, 5, 0.0), rel=1e-6)


@pytest.mark.parametrize("fn", ["tanh", "sigmoid", "discrete", "Tanh"])
def test_lambda_plus_inf_is_plain_adversarial_training(fn):
    w = gair_weights(torch.tensor([0, 3, 10, 10]), 10, math.inf, fn)
    assert torch.equal(w, torch.ones(4))


def test_smaller_lambda_concentrates_weight_on_small_kappa():
    kappa = torch.arange(11)
    w_soft, w_sharp = gair_weights(kappa, 10, 1.0), gair_weights(kappa, 10, -2.0)
    assert w_sharp[0] > w_soft[0] and w_sharp[-1] < w_soft[-1]


def test_unknown_weight_function_is_refused():
    with pytest.raises(ValueError, match="weight function"):
        gair_weights(torch.tensor([1]), 10, -1.0, "relu")


# ----------------------------------------------------------------------------- λ schedules
def test_lambda_schedules_and_burn_in():
    kw = dict(epochs=100, lam=-1.0, begin_epoch=30)
    # the official (epoch + 1) >= begin_epoch: 0-based epoch 28 is the 29th -> still burn-in
    assert lam_at(28, **kw) == math.inf and lam_at(29, **kw) == -1.0
    assert lam_at(99, **kw, schedule="piecewise") == -3.0      # ResNet: λ − 2 from 60%
    assert lam_at(40, **kw, schedule="piecewise") == -1.0
    wrn = dict(epochs=120, lam=-1.0, begin_epoch=60, schedule="piecewise")
    assert [lam_at(e, **wrn) for e in (58, 59, 89, 109, 119)] == [math.inf, -1.0, -2.0, -2.5,
                                                                 -2.5]
    lin = dict(kw, schedule="linear", lam_max=3.0)
    assert lam_at(99, **lin) == pytest.approx(-1.0)             # reaches λ in the last epoch
    assert lam_at(29, **lin) == pytest.approx(3.0 - 0.3 * 4.0)  # official formula
    with pytest.raises(ValueError, match="finite lam_max"):
        lam_at(50, **kw, schedule="linear")
    with pytest.raises(ValueError, match="lam_schedule"):
        lam_at(50, **kw, schedule="cosine")


def test_method_refuses_bad_settings_at_construction():
    cls = get_method("gairat")
    with pytest.raises(ValueError, match="finite gairat.gair_lambda_max"):
        cls(num_train=8, num_classes=10, epochs=5, gair_lambda_schedule="linear",
            begin_epoch=1)
    # ... and before anything runs, where settings are resolved (--dry-run shows it)
    with pytest.raises(ValueError, match="gair_lambda_max"):
        resolve_config(method="gairat", method_hp={"gair_lambda_schedule": "linear"})
    ok = cls(num_train=8, num_classes=10, epochs=5, gair_lambda_schedule="linear",
             gair_lambda_max=3.0, begin_epoch=1)
    assert ok.lam_for(4) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="weight_fn"):
        cls(num_train=8, num_classes=10, epochs=5, weight_fn="relu")
    with pytest.raises(ValueError, match="tau"):
        get_method("fat")(num_train=8, num_classes=10, epochs=5, tau=(0, 1))


@pytest.mark.parametrize("name", ["gairat", "gair_fat"])
def test_renamed_and_engine_names_are_not_hyperparameters(name):
    """λ is ``gair_lambda`` (``lam`` would read as mixup's λ); K, eps, the step and the norm
    are the engine's threat model, the method's ``attack``."""
    cls = get_method(name)
    for old in ("lam", "lam_schedule", "lam_max", "steps", "eps", "step_size", "norm"):
        with pytest.raises(ValueError, match=old):
            cls(num_train=8, num_classes=10, epochs=5, **{old: 1})
    assert {"gair_lambda", "gair_lambda_schedule", "gair_lambda_max"} <= set(cls.defaults)
    with pytest.raises(ValueError, match="engine setting"):
        resolve_config(method=name, method_hp={"steps": 3})
    cfg = resolve_config(method=name, steps=3, method_hp={"gair_lambda": -2.0})
    assert cfg["steps"] == 3 and cfg["method_hp"]["gair_lambda"] == -2.0


def test_kappa_range_and_weights_follow_attack_steps():
    """GAIRAT's K (the range of κ and the weights' ⌊K/2⌋) is attack.steps."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    method = get_method("gairat")(num_train=16, num_classes=10, epochs=2, begin_epoch=1,
                                  attack=AttackSpec(steps=3))
    x_adv, kappa = method.adversarial_points(model, x, y, epoch=0)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert kappa.min() >= 0 and kappa.max() <= 3
    method.loss(model, x, y, torch.arange(16), epoch=0)
    log = method.epoch_end(0)
    assert int(log["steps"]) == 3 and log["kappa"].max() <= 3
    expected = gair_weights(torch.from_numpy(log["kappa"]).long(), 3, -1.0)
    np.testing.assert_allclose(log["weight"].astype(np.float32), expected.numpy(), rtol=2e-3)


def test_tau_schedule():
    assert tau_at(7, 10, 3) == 3
    fat = dict(tau=(0, 1, 2), milestones=(50 / 120, 90 / 120))
    assert [tau_at(e, 120, **fat) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- κ and FAT
class Threshold(nn.Module):
    """Predicts class 0 when the single pixel is above 0.5, else class 1. With y = 0 every
    PGD step lowers the pixel by step_size, so where it crosses 0.5 is known in advance."""

    def forward(self, x):
        s = x.flatten(1).sum(1) - 0.5
        return torch.stack([s, -s], 1)


START = torch.tensor([0.95, 0.75, 0.55, 0.40]).reshape(-1, 1, 1, 1)
# iterates 0.95, 0.85, ...: correct while above 0.5
KAPPA = [5, 3, 1, 0]
ATTACK = dict(eps=0.5, step_size=0.1, steps=10, random_start=False)


def test_kappa_counts_correct_iterates_before_each_step():
    y = torch.zeros(4, dtype=torch.long)
    _, kappa = pgd(Threshold(), START, y, **ATTACK, return_kappa=True)
    assert kappa.tolist() == KAPPA
    _, kappa = early_stopped_pgd(Threshold(), START, y, **ATTACK, tau=2, return_kappa=True)
    assert kappa.tolist() == KAPPA
    w = gair_weights(kappa, 10, -1.0)
    assert torch.all(w[1:] >= w[:-1])  # the nearest to the boundary weighs most


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_fat_stops_tau_misclassified_iterates_after_the_first(tau):
    y = torch.zeros(4, dtype=torch.long)
    x_adv = early_stopped_pgd(Threshold(), START, y, **ATTACK, tau=tau).flatten()
    # first misclassified iterate: start − κ·step_size; τ more steps, within the 0.5 ball
    first = START.flatten() - torch.tensor(KAPPA, dtype=torch.float) * 0.1
    edge = (START.flatten() - 0.5).clamp(0, 1)  # the ball's and the box's lower end
    expected = torch.maximum(first - tau * 0.1, edge)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)
    # plain PGD keeps going to the edge of the ball
    torch.testing.assert_close(pgd(Threshold(), START, y, **ATTACK).flatten(), edge,
                               atol=1e-6, rtol=0)


def test_fat_never_fooled_returns_the_last_iterate_and_stays_in_the_ball():
    y = torch.zeros(1, dtype=torch.long)
    x = torch.tensor([0.95]).reshape(1, 1, 1, 1)
    x_adv = early_stopped_pgd(Threshold(), x, y, eps=0.5, step_size=0.1, steps=3,
                              random_start=False)
    assert x_adv.item() == pytest.approx(0.65)
    x = torch.rand(16, 3, 8, 8)
    x_adv = early_stopped_pgd(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), x,
                              torch.randint(0, 10, (16,)), eps=8 / 255, step_size=2 / 255, steps=5,
                              tau=1, omega=0.01)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


# ----------------------------------------------------------------------------- training
TINY = dict(dataset="synthetic", model="tiny", epochs=3, batch_size=64, train_subset=256,
            eval_subset=64, lr=0.05, schedule="onecycle", warmup=0.3, steps=3, eval_steps=2,
            device="cpu", quiet=True)


def test_gairat_smoke_training_lowers_the_loss_and_logs_kappa(tmp_path):
    _, history = train(method="gairat", method_hp={"begin_epoch": 2}, run_dir=str(tmp_path),
                       **TINY)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    logs = [dict(np.load(f)) for f in sorted((tmp_path / "method").glob("epoch_*.npz"))]
    assert len(logs) == 3
    for epoch, log in enumerate(logs):
        assert log["kappa"].dtype == np.int8 and log["weight"].dtype == np.float16
        assert len(log["idx"]) == len(log["kappa"]) == len(log["weight"]) == 256
        assert log["kappa"].min() >= 0 and log["kappa"].max() <= 3
        # every batch averages 1 and all batches are full, so the epoch does too
        assert log["weight"].astype(np.float64).mean() == pytest.approx(1.0, abs=2e-3)
        assert (log["lam"] == math.inf) == (epoch == 0)  # burn-in in the first epoch only
    burn_in, reweighted = logs[0], logs[-1]
    assert np.all(burn_in["weight"] == 1)
    if len(np.unique(reweighted["kappa"])) > 1:  # varied κ -> varied weights
        assert reweighted["weight"].astype(np.float32).std() > 0


@pytest.mark.parametrize("name", ["gair_fat", "fat"])
def test_fat_variants_train(name):
    _, history = train(method=name, **{**TINY, "epochs": 2, "train_subset": 128},
                       method_hp={"begin_epoch": 1} if name == "gair_fat" else None)
    assert np.isfinite(history[-1]["train_loss"])
    assert 0 <= history[-1]["val_robust"] <= history[-1]["val_clean"]


@pytest.mark.gpu
def test_gairat_step_has_no_host_sync():
    from mixlab.models import build_model
    model = build_model("tiny", 10, 3).cuda()
    x, y = torch.rand(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    for name in ("gairat", "gair_fat"):
        method = get_method(name)(num_train=64, num_classes=10, epochs=2, begin_epoch=1)
        method.loss(model, x, y, torch.arange(32, device="cuda"), epoch=0)  # allocate logs
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = method.loss(model, x, y, torch.arange(32, device="cuda"), epoch=1)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
