"""MMA (Ding et al. 2020): SLM loss, the boundary bisection, AN-PGD and margin estimates on a
linear model whose margin is known in closed form; the MMA loss and its hinge; the stored eps
through a checkpoint and resume; a smoke training run; the presets."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixlab.attacks import boundary_bisection, cw_margin, slm_margin
from mixlab.margins import estimate_margin, run_margins
from mixlab.methods import AttackSpec, get_method
from mixlab.methods.mma import MMA, PRESETS, THREATS, anpgd, mma_loss
from mixlab.models import build_model
from mixlab.config import resolve_config
from mixlab.runs import load_checkpoint
from mixlab.train import train

DUAL = {"Linf": 1, "L2": 2}  # the dual norm's order: distance to a hyperplane = |g| / ||w||_dual


class Linear(nn.Module):
    """f(x) = W·flatten(x) + b, a model whose margin is known in closed form."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def linear_problem(num_classes: int, n: int = 64, seed: int = 0):
    """A linear model, inputs in [0.5, 0.6] (so a perturbation of Linf size <= 0.4 never meets
    the box) and their predicted labels (every point is classified correctly)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.25 * torch.randn(num_classes, 16, generator=g)
    b = 0.3 * torch.randn(num_classes, generator=g)
    x = 0.5 + 0.1 * torch.rand(n, 1, 4, 4, generator=g)
    model = Linear(w, b - w @ torch.full((16,), 0.55))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def analytic_margin(model: Linear, x, y, norm: str) -> torch.Tensor:
    """min_{j≠y} (z_y − z_j) / ||w_y − w_j||_dual: the distance to the nearest halfspace where
    class j wins (exact while the box [0, 1] is not reached)."""
    with torch.no_grad():
        z = model(x)
        gap = z.gather(1, y[:, None]) - z                                   # (n, K)
        dw = model.w[y][:, None, :] - model.w[None, :, :]                   # (n, K, D)
        dist = gap / dw.norm(p=DUAL[norm], dim=2).clamp_min(1e-12)
        dist[torch.arange(len(y)), y] = float("inf")
        return dist.min(1).values


def in_range(margin, lo=0.02, hi=0.3):
    return (margin > lo) & (margin < hi)


# ----------------------------------------------------------------------------- losses
def test_slm_margin_closed_form():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0]])
    y = torch.tensor([0, 1])
    expected = torch.tensor([np.log(np.exp(1) + np.exp(0)) - 2.0, np.log(np.exp(0) + np.exp(3)) - 3.0])
    assert torch.allclose(slm_margin(logits, y), expected.float(), atol=1e-6)
    # SLM is a smooth upper bound of the CW margin, equal to it for two classes
    assert (slm_margin(logits, y) >= cw_margin(logits, y)).all()
    two = torch.tensor([[1.0, -0.5], [0.2, 0.7]])
    assert torch.allclose(slm_margin(two, torch.tensor([0, 0])), cw_margin(two, torch.tensor([0, 0])))


# ----------------------------------------------------------------------------- bisection
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_bisection_along_optimal_direction_finds_analytic_margin(norm):
    model, x, y = linear_problem(2)
    truth = analytic_margin(model, x, y, norm)
    # the steepest direction out of class y: -sign(w_y - w_o) (Linf), -(w_y - w_o)/|.| (L2)
    dw = (model.w[y] - model.w[1 - y]).detach()
    u = -dw.sign() if norm == "Linf" else -dw / dw.norm(dim=1, keepdim=True)
    eps = boundary_bisection(model, x, y, u.reshape(x.shape), lo=0.0, hi=0.4, steps=12)
    keep = in_range(truth)
    assert keep.sum() > 10
    assert torch.allclose(eps[keep], truth[keep], atol=0.4 / 2 ** 12 + 1e-5)
    assert (eps[keep] >= truth[keep] - 1e-5).all(), "hi must always be a misclassified radius"
    assert model.training, "the model's mode is restored"
    assert all(p.grad is None for p in model.parameters())


def test_bisection_keeps_hi_when_never_fooled():
    model, x, y = linear_problem(2)
    eps = boundary_bisection(model, x, y, torch.zeros_like(x), lo=0.0, hi=0.3, steps=5)
    assert torch.equal(eps, torch.full_like(eps, 0.3))


# ----------------------------------------------------------------------------- margins
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_estimate_margin_matches_linear_margin(norm):
    model, x, y = linear_problem(2)
    truth = analytic_margin(model, x, y, norm)
    est = estimate_margin(model, x, y, norm=norm, max_eps=0.4, steps=20, search_steps=10)
    keep = in_range(truth)
    assert est.shape == (len(x),) and keep.sum() > 10
    # Linf: PGD's sign steps find the optimal direction exactly; L2: within a few percent
    # (the random start is not fully projected out in 20 steps)
    rtol = 1e-4 if norm == "Linf" else 0.05
    assert ((est[keep] - truth[keep]).abs() <= 0.4 / 2 ** 10 + rtol * truth[keep]).all()
    assert (est >= truth - 1e-4).all(), "a margin estimate is an upper bound"
    # no boundary within max_eps: reported as max_eps
    small = 0.5 * truth.min().item()
    assert torch.allclose(estimate_margin(model, x, y, norm=norm, max_eps=small),
                          torch.tensor(small))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_estimate_margin_multiclass_is_close_upper_bound(norm):
    model, x, y = linear_problem(10)
    truth = analytic_margin(model, x, y, norm)
    est = estimate_margin(model, x, y, norm=norm, max_eps=0.4)
    keep = in_range(truth)
    assert (est[keep] >= truth[keep] - 1e-4).all()
    assert (est[keep] <= 1.5 * truth[keep] + 1e-3).float().mean() > 0.9


def test_estimate_margin_zero_for_misclassified():
    model, x, y = linear_problem(3)
    y_wrong = (y + 1) % 3
    est = estimate_margin(model, x, y_wrong, norm="Linf", max_eps=0.4)
    assert torch.equal(est, torch.zeros_like(est))


def test_run_margins_saved_with_the_run(tmp_path):
    model, x, y = linear_problem(2, n=16)
    run = type("Run", (), {"model": model, "path": tmp_path})()
    first = run_margins(run, x, y, norm="Linf", max_eps=0.4, steps=5)
    assert (tmp_path / "margins" / "test.npz").exists()
    with torch.no_grad():
        model.w.zero_()  # a changed model: the saved margins are read, not recomputed
    assert np.array_equal(run_margins(run, x, y, norm="Linf", max_eps=0.4, steps=5), first)


# ----------------------------------------------------------------------------- AN-PGD
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_anpgd_lands_on_the_boundary(norm):
    model, x, y = linear_problem(2)
    truth = analytic_margin(model, x, y, norm)
    keep = in_range(truth)
    for start in (0.01, 0.2):  # below and (for most points) above the margin
        eps0 = torch.full((len(x),), start)
        x_adv, eps_star = anpgd(model, x, y, eps0, norm=norm, max_eps=0.4, steps=10)
        tol = 0.4 / 2 ** 10 + (1e-5 if norm == "Linf" else 1e-2)
        assert (eps_star[keep] - truth[keep]).abs().max() < tol
        size = (x_adv - x).flatten(1).norm(p=float("inf") if norm == "Linf" else 2, dim=1)
        assert (size <= eps_star + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():  # two classes: SLM = CW, the AN-PGD point is misclassified
            assert (model(x_adv).argmax(1) != y)[keep].all()


def test_anpgd_slm_search_stops_no_later_than_cw():
    model, x, y = linear_problem(10)
    eps0 = torch.full((len(x),), 0.4)
    torch.manual_seed(0)
    _, by_slm = anpgd(model, x, y, eps0, norm="Linf", max_eps=0.4, steps=10, margin="slm")
    torch.manual_seed(0)
    _, by_cw = anpgd(model, x, y, eps0, norm="Linf", max_eps=0.4, steps=10, margin="cw")
    assert (by_slm <= by_cw + 0.4 / 2 ** 10).all()


# ----------------------------------------------------------------------------- the loss
def test_mma_loss_hinge_and_clean_term():
    logits_adv, logits_clean = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    correct = torch.tensor([True, True, True, False, False, True])
    eps_star = torch.tensor([0.1, 0.5, 0.2, 0.0, 0.0, 0.05])
    ce = F.cross_entropy(logits_adv, y, reduction="none")
    clean = F.cross_entropy(logits_clean, y)
    # d_max 0.15: example 1 (0.5) and 2 (0.2) are past the hinge
    mma = (ce[0] + ce[3] + ce[4] + ce[5]) / 6
    got = mma_loss(logits_adv, logits_clean, y, correct, eps_star, d_max=0.15, clean_coeff=1 / 3)
    assert torch.allclose(got, 2 / 3 * mma + 1 / 3 * clean)
    omma = mma_loss(logits_adv, logits_clean, y, correct, eps_star, d_max=0.15, clean_coeff=0)
    assert torch.allclose(omma, mma)


def test_mma_loss_only_clean_when_every_margin_beyond_d_max():
    """A linear model whose every point has a margin > max_eps: AN-PGD finds no boundary, the
    hinge drops every example, and the loss is exactly c·(clean CE)."""
    model, x, y = linear_problem(2)
    truth = analytic_margin(model, x, y, "Linf")
    x, y = x[truth > 0.05], y[truth > 0.05]
    method = MMA(num_train=len(x), num_classes=2, epochs=1, d_max=0.02, mineps=0.01)
    loss, logits = method.loss(model, x, y, torch.arange(len(x)), epoch=0)
    expected = F.cross_entropy(model(x), y) / 3
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(method.eps, torch.full((len(x),), method.max_eps))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("bf16", [False, True])
def test_mma_step_on_tiny_net(norm, bf16):
    torch.manual_seed(0)
    model = build_model("tiny", 10, 3).train()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    attack = AttackSpec(norm=norm, eps={"Linf": 8 / 255, "L2": 0.5}[norm], steps=2)
    method = get_method("mma")(num_train=40, num_classes=10, epochs=1, attack=attack)
    idx = torch.arange(10, 26)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, logits = method.loss(model, x, y, idx, epoch=0)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (16, 10)
    assert model.training
    assert all(p.grad is None for p in model.parameters()), "attacks must not touch param grads"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    eps = method.eps
    assert (eps[idx] >= 0).all() and (eps[idx] <= method.max_eps + 1e-6).all()
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[idx] = False
    assert (eps[untouched] == method.hp["mineps"]).all()
    assert method.hp["d_max"] == {"Linf": 32 / 255, "L2": 2.0}[norm]


@pytest.mark.gpu
def test_mma_step_on_cuda_bf16_channels_last_without_host_syncs():
    """The GPU path as the engine runs it; a host sync inside the step raises."""
    model = build_model("tiny", 10, 3).cuda().to(memory_format=torch.channels_last).train()
    x = torch.rand(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    idx = torch.arange(32, device="cuda")
    method = MMA(num_train=64, num_classes=10, epochs=1, attack=AttackSpec(steps=3))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        method.loss(model, x, y, idx, epoch=0)  # the first call moves the stored eps over
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, logits = method.loss(model, x, y, idx, epoch=0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    loss.backward()
    assert torch.isfinite(loss).item() and method.eps.device.type == "cuda"
    assert ((method.eps >= 0) & (method.eps <= method.max_eps + 1e-6)).all()


def test_load_state_dict_rejects_other_data():
    method = MMA(num_train=10, num_classes=10, epochs=1)
    with pytest.raises(ValueError, match="training"):
        method.load_state_dict({"eps": torch.zeros(11)})


# ----------------------------------------------------------------------------- engine
# big steps on few examples, so that some become confidently correct (SLM < 0) in one epoch
SMOKE = dict(method="mma", dataset="synthetic", profile="smoke", train_subset=128,
             eval_subset=32, val_size=32, epochs=2, steps=2, batch_size=16, lr=0.3,
             schedule="constant", quiet=True)


@pytest.mark.slow
def test_eps_survives_checkpoint_and_resume(tmp_path, monkeypatch):
    _, first = train(run_dir=str(tmp_path / "split"), stop_after=1, **SMOKE)
    assert len(first) == 1
    saved = load_checkpoint(tmp_path / "split" / "last.pt")["method"]["eps"]
    logged = np.load(tmp_path / "split" / "method" / "epoch_001.npz")["eps"]
    assert np.array_equal(saved.numpy(), logged)
    assert (logged > 0).any(), "epoch 1 should have found some margins"

    loaded = []
    original = MMA.load_state_dict

    def spy(self, state):
        original(self, state)
        loaded.append(self.eps.clone())
    monkeypatch.setattr(MMA, "load_state_dict", spy)
    _, resumed = train(run_dir=str(tmp_path / "split"), **SMOKE)
    assert len(loaded) == 1 and np.array_equal(loaded[0].numpy(), logged)

    _, straight = train(run_dir=str(tmp_path / "straight"), **SMOKE)
    assert len(resumed) == len(straight) == 2
    a = np.load(tmp_path / "split" / "method" / "epoch_002.npz")["eps"]
    b = np.load(tmp_path / "straight" / "method" / "epoch_002.npz")["eps"]
    np.testing.assert_allclose(a, b, atol=1e-6)  # resumed == uninterrupted


def test_mma_smoke_training_runs(tmp_path):
    model, history = train(run_dir=str(tmp_path), **{**SMOKE, "norm": "L2", "epochs": 1})
    record = history[-1]
    assert np.isfinite(record["train_loss"]) and 0 <= record["val_mean_margin"] <= 1.05 * 2.0
    assert (tmp_path / "best.pt").exists()
    arrays = np.load(tmp_path / "method" / "epoch_001.npz")
    assert arrays["eps"].shape == (128,) and float(arrays["d_max"]) == pytest.approx(2.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name):
    for profile, kwargs in PRESETS[name].items():
        assert "method_hp" not in kwargs and not set(kwargs) & set(MMA.defaults), \
            "presets hold engine settings only; d_max and mineps follow from THREATS"
        cfg = resolve_config(**kwargs)
        assert cfg["method"] == "mma" and cfg["profile"] == profile
        assert cfg["norm"] == kwargs["norm"]
        threat = THREATS[(kwargs["dataset"], kwargs["norm"])]
        assert {k: cfg["method_hp"][k] for k in ("d_max", "mineps")} == threat
        # the AN-PGD steps are the engine's `steps`, never a hyperparameter of the method
        assert "steps" not in cfg["method_hp"]
        assert "steps" not in kwargs or cfg["steps"] == kwargs["steps"]
    paper = resolve_config(**PRESETS[name]["paper"])
    if name.startswith("cifar10"):  # 50k steps of batch 128 on 45k images
        assert paper["model"] == "wrn-28-4" and paper["val_size"] == 5000
        assert abs(paper["epochs"] * (45_000 // 128) - 50_000) < 400
    else:  # 100k steps of batch 50 on 55k images
        assert paper["model"] == "lenet5-madry" and paper["optimizer"] == "adam"
        assert paper["steps"] == 40 and "steps" not in paper["method_hp"]
        assert abs(paper["epochs"] * (55_000 // 50) - 100_000) < 1100
