"""TRADES (mixlab.methods.trades): the loss against a transcription of the official formula,
the attack raises the KL and respects the ball, the threat model comes from the AttackSpec."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixlab.config import SETTINGS, resolve_config
from mixlab.methods import AttackSpec, get_method
from mixlab.methods import trades as trades_mod
from mixlab.methods.trades import kl_clean_adv, trades_loss, trades_perturb

from .conftest import B, K


def official_loss(model, x, x_adv, y, beta):
    """The outer loss of yaodongyu/TRADES ``trades_loss`` written out: KLDivLoss with
    size_average=False (a sum) divided by the batch size, the target softmax(model(x)) not
    detached, model in train mode."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                F.softmax(model(x), dim=1))
    return loss_natural + beta * loss_robust


@pytest.mark.parametrize("beta", [6.0, 1.0, 0.0])
def test_loss_equals_the_official_formula_and_its_gradient(net, batch, beta):
    """At a fixed adversarial point (no attack randomness), value and parameter gradients,
    on a net with confident predictions (a near-uniform one hides the KL's direction)."""
    x, y = batch
    with torch.no_grad():
        net.net.fc.weight.mul_(100)
    x_adv = 0.2 * x  # a fixed point far enough away that KL(p‖q) and KL(q‖p) differ
    net.eval()  # the official forward runs twice; eval mode makes the two runs identical
    expected = official_loss(net, x, x_adv, y, beta)
    robust_expected = official_loss(net, x, x_adv, y, 1.0) - official_loss(net, x, x_adv, y, 0.0)
    grads_expected = torch.autograd.grad(expected, list(net.parameters()))
    got = trades_loss(net(x), net(x_adv), y, beta=beta)
    grads_got = torch.autograd.grad(got, list(net.parameters()))
    assert robust_expected > 1  # the KL term is large enough to be checked
    assert torch.allclose(kl_clean_adv(net(x), net(x_adv)), robust_expected, rtol=1e-5)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for g_got, g_exp in zip(grads_got, grads_expected):  # fp32 rounding, relative to scale
        assert torch.allclose(g_got, g_exp, rtol=1e-4, atol=1e-5 * float(g_exp.abs().max()))


def test_kl_is_batchmean_and_zero_at_the_clean_point():
    g = torch.Generator().manual_seed(4)
    logits, logits_adv = 3 * torch.randn(B, K, generator=g), 3 * torch.randn(B, K, generator=g)
    per_example = kl_clean_adv(logits, logits_adv, reduction="none")
    assert per_example.shape == (B,) and (per_example >= 0).all()
    torch_kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
    assert torch.allclose(kl_clean_adv(logits, logits_adv), torch_kl, rtol=1e-5)
    assert torch.allclose(kl_clean_adv(logits, logits_adv, reduction="sum"), per_example.sum())
    assert kl_clean_adv(logits, logits).abs().max() < 1e-6


def _random_in_ball(x, eps, norm):
    if norm == "Linf":
        return (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    d = torch.randn_like(x)
    return (x + eps * d / d.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).clamp(0, 1)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_attack_increases_the_kl_and_stays_in_ball_and_box(net, batch, norm, eps):
    x, _ = batch
    for p in net.parameters():
        p.grad = None
    x_adv = trades_perturb(net, x, eps=eps, step_size=eps / 4, steps=10, norm=norm)
    x_one = trades_perturb(net, x, eps=eps, step_size=eps / 4, steps=1, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    net.eval()
    with torch.no_grad():
        logits = net(x)
        kl = {name: kl_clean_adv(logits, net(point), reduction="none") for name, point in [
            ("adv", x_adv), ("one step", x_one),
            ("start", (x + 0.001 * torch.randn_like(x)).clamp(0, 1)),
            ("random", _random_in_ball(x, eps, norm))]}
    # every example ends far above its start; more steps climb higher; a random point of the
    # ball is no match
    assert (kl["adv"] > 100 * kl["start"]).all()
    assert kl["adv"].mean() > kl["one step"].mean()
    assert kl["adv"].mean() > 10 * kl["random"].mean()
    assert all(p.grad is None for p in net.parameters()), "the attack touched param.grad"


def test_attack_runs_in_eval_mode_and_restores_train_mode(net, batch):
    x, _ = batch
    modes = []
    net.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    trades_perturb(net, x, eps=8 / 255, step_size=2 / 255, steps=3)
    assert modes and not any(modes) and net.training


def test_method_uses_the_attack_spec_and_beta(net, batch, monkeypatch):
    x, y = batch
    seen = []

    def spy(model, x, **kwargs):
        seen.append(kwargs)
        return trades_perturb(model, x, **kwargs)
    monkeypatch.setattr(trades_mod, "trades_perturb", spy)
    attack = AttackSpec(eps=0.5, step_size=0.1, steps=2, norm="L2")
    method = get_method("trades")(num_train=B, num_classes=K, epochs=1, attack=attack, beta=2.5)
    loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
    (kw,) = seen
    assert (kw["eps"], kw["step_size"], kw["steps"], kw["norm"]) == (0.5, 0.1, 2, "L2")
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (B, K)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert net.training


def test_beta_is_a_method_hyperparameter_not_an_engine_setting():
    assert "beta" not in SETTINGS
    assert resolve_config(method="trades")["method_hp"] == {"beta": 6.0, "mix": "none",
                                                            "mix_alpha": 1.0}
    assert resolve_config(method="trades", method_hp={"beta": 1.0})["method_hp"]["beta"] == 1.0
    with pytest.raises(ValueError, match="trades.beta"):
        get_method("trades")(num_train=B, num_classes=K, epochs=1, beta=-1.0)
    with pytest.raises(ValueError, match="eps"):
        get_method("trades")(num_train=B, num_classes=K, epochs=1, eps=0.1)
    paper = resolve_config(method="trades", profile="paper")
    assert (paper["model"], paper["epochs"], paper["step_size"]) == ("wrn-34-10", 76, 0.007)
