"""AMP (mixlab.methods.amp) and the interpolation-path probe (mixlab.paths): invariants on a
tiny CPU net, the eps = 0 reduction to mixup, a smoke training run, CIFAR-100 class counts."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixlab.config import resolve_config
from mixlab.methods import AttackSpec, get_method
from mixlab.methods import amp as amp_mod
from mixlab.methods.amp import amp_loss, amp_perturb, geo_weight, mix
from mixlab.methods.mixing import mixup_data
from mixlab.methods.mixup import mixup_criterion
from mixlab.paths import image_strip, interpolation_path, interpolation_points
from mixlab.runs import CheckpointError, check_compatible, load_checkpoint, load_run
from mixlab.train import train

from .conftest import B, K


@pytest.fixture
def mix_batch(batch, batch_rng):
    """The shared batch x, y, then partners perm (B,) int64 and λ (B,) float32 in [0, 1) drawn
    after it from the same generator."""
    x, y = batch
    perm = torch.randperm(B, generator=batch_rng)
    lam = torch.rand(B, generator=batch_rng)
    return x, y, perm, lam


def _soft(y):
    return F.one_hot(y, K).float()


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_perturbation_stays_in_ball_and_box(net, mix_batch, norm, eps):
    x, y, perm, lam = mix_batch
    for p in net.parameters():
        p.grad = None
    x_a_adv, x_b_adv, lam_star = amp_perturb(
        net, x, x[perm], _soft(y), _soft(y[perm]), lam, eps=eps, step_size=eps / 4, steps=5,
        norm=norm, lam_opt=True, lam_min=0.2, lam_max=0.8)
    for adv, clean in [(x_a_adv, x), (x_b_adv, x[perm])]:
        delta = (adv - clean).flatten(1)
        size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1
        assert (delta.abs().amax(1) > 0).any()  # the attack moved
    assert lam_star.min() >= 0.2 - 1e-7 and lam_star.max() <= 0.8 + 1e-7
    assert net.training, "the model must be back in train mode"
    assert all(p.grad is None for p in net.parameters()), "the attack touched param.grad"


def test_lam_opt_moves_lam_in_signed_steps(net, mix_batch):
    x, y, perm, lam = mix_batch
    lam = torch.full((B,), 0.5)
    _, _, lam_star = amp_perturb(net, x, x[perm], _soft(y), _soft(y[perm]), lam, eps=0.0,
                                 step_size=0.0, steps=3, lam_opt=True, lam_step=0.05)
    steps_taken = (lam_star - 0.5).abs() / 0.05
    assert torch.allclose(steps_taken, steps_taken.round(), atol=1e-4)  # signed steps
    assert (lam_star != 0.5).any()


def test_geo_label_without_perturbation_returns_lam(mix_batch):
    x, _, perm, lam = mix_batch
    t = geo_weight(mix(x, x[perm], lam), x, x[perm], lam)
    assert torch.allclose(t, lam, atol=1e-5)
    # an example paired with itself has no segment: t falls back to λ
    assert torch.allclose(geo_weight(x, x, x, lam), lam)


def test_eps0_equals_mixup_loss(net, mix_batch):
    x, y, perm, lam = mix_batch
    out = amp_loss(net, x, y, perm, lam, num_classes=K, eps=0.0, step_size=2 / 255, steps=3)
    x_mix, y_a, y_b = mixup_data(x, y, lam, perm)
    expected = mixup_criterion(net(x_mix), y_a, y_b, lam)
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert torch.allclose(out["t"], lam, atol=1e-5)
    # geometric labels give the same loss when nothing moved
    geo = amp_loss(net, x, y, perm, lam, num_classes=K, eps=0.0, step_size=2 / 255, steps=3,
                   geo_label=True, clean_weight=0.5)
    assert torch.allclose(geo["loss"], expected, atol=1e-4)


def test_method_loss_backpropagates_and_logs(net, batch):
    x, y = batch
    method = get_method("amp")(num_train=20, num_classes=K, epochs=1,
                               attack=AttackSpec(steps=2), lam_opt=True, geo_label=True,
                               clean_weight=0.3)
    idx = torch.arange(3, 3 + B)
    loss, logits = method.loss(net, x, y, idx, epoch=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    arrays = method.epoch_end(0)
    assert set(arrays) == {"lam0", "lam_star", "t_geo_minus_lam"}
    seen = ~np.isnan(arrays["lam_star"])
    assert seen.sum() == B and seen[3:3 + B].all()
    assert np.abs(arrays["t_geo_minus_lam"][seen]).max() <= 1
    assert method.epoch_end(1) == {}, "logs restart every epoch"


def test_bf16_autocast_and_channels_last(net, batch):
    """The CUDA path (bf16 autocast, channels_last) runs on CPU too."""
    x, y = batch
    net = net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    method = get_method("amp")(num_train=B, num_classes=K, epochs=1,
                               attack=AttackSpec(steps=2), lam_opt=True, geo_label=True,
                               clean_weight=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method.loss(net, x, y, torch.arange(B), epoch=0)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_threat_model_comes_from_attack_and_alpha_is_beta_only(net, batch, monkeypatch):
    """The endpoints' balls, the PGD step and steps are the method's ``attack``; ``alpha`` is
    the Beta(α, α) concentration of λ and nothing else (it was ``mix_alpha``)."""
    x, y = batch
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return amp_loss(*args, **kwargs)
    monkeypatch.setattr(amp_mod, "amp_loss", spy)
    attack = AttackSpec(eps=0.5, step_size=0.1, steps=2, norm="L2")
    method = get_method("amp")(num_train=B, num_classes=K, epochs=1, attack=attack, alpha=0.4)
    method.loss(net, x, y, torch.arange(B), epoch=0)
    (kw,) = seen
    assert (kw["eps"], kw["step_size"], kw["steps"], kw["norm"]) == (0.5, 0.1, 2, "L2")
    assert "alpha" not in kw and method.hp["alpha"] == 0.4
    for name in ("mix_alpha", "eps", "step_size", "steps", "norm"):
        with pytest.raises(ValueError, match=name):
            get_method("amp")(num_train=B, num_classes=K, epochs=1, **{name: 1})
    with pytest.raises(ValueError, match="amp.alpha"):
        get_method("amp")(num_train=B, num_classes=K, epochs=1, alpha=0.0)
    # resolved: the engine's step size and the Beta concentration never meet
    cfg = resolve_config(method="amp", step_size=0.01, method_hp={"alpha": 0.3})
    assert cfg["step_size"] == 0.01 and cfg["method_hp"]["alpha"] == 0.3
    assert resolve_config(method="amp", step_size=0.01)["method_hp"]["alpha"] == 1.0
    assert resolve_config(method="amp", method_hp={"alpha": 0.3})["step_size"] == 8 / 255 / 4


def test_path_probe_endpoints_and_worst_case(net, mix_batch):
    x, y, perm, _ = mix_batch
    net.eval()
    path = interpolation_path(net, x[:3], x[perm][:3], y_a=y[:3], y_b=y[perm][:3], lams=11,
                              eps=8 / 255, steps=3)
    assert path["probs"].shape == (3, 11, K) and path["p_a_worst"].shape == (3, 11)
    with torch.no_grad():
        p_a_end, p_b_end = net(x[:3]).softmax(1).numpy(), net(x[perm][:3]).softmax(1).numpy()
    np.testing.assert_allclose(path["probs"][:, -1], p_a_end, atol=1e-5)  # λ = 1 is x_a
    np.testing.assert_allclose(path["probs"][:, 0], p_b_end, atol=1e-5)   # λ = 0 is x_b
    assert (path["p_a_worst"] <= path["p_a"]).all() and (path["p_b_worst"] <= path["p_b"]).all()
    assert (path["p_other_worst"] >= path["p_other"]).all()
    assert (path["p_a_worst"] < path["p_a"] - 1e-4).any(), "the attack never lowered p(y_a)"
    assert not net.training
    strip = image_strip(x[0], x[perm][0], lams=5, gap=2)
    assert strip.shape == (32, 5 * 34 - 2, 3) and 0 <= strip.min() and strip.max() <= 1
    np.testing.assert_allclose(strip[:, :32], x[perm][0].permute(1, 2, 0).numpy())  # λ = 0
    np.testing.assert_allclose(strip[:, -32:], x[0].permute(1, 2, 0).numpy())      # λ = 1
    assert (strip[:, 32:34] == 1).all()  # white gap
    assert interpolation_points(x[:2], x[perm][:2], [0.0, 1.0]).shape == (2, 2, 3, 32, 32)


def test_amp_smoke_training_lowers_loss(tmp_path):
    _, history = train(method="amp", dataset="synthetic", model="tiny", epochs=3,
                       batch_size=64, train_subset=512, eval_subset=64, eval_steps=0,
                       steps=2, lr=0.05, schedule="constant",
                       method_hp={"lam_opt": True, "geo_label": True},
                       device="cpu", quiet=True, run_dir=str(tmp_path / "run"))
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0], losses
    # eval_steps=0: no val_robust, amp's best metric, so no best.pt: the last epoch is loaded
    run = load_run(tmp_path / "run", which="last")
    assert run.config["method_hp"]["lam_opt"] is True and run.config["steps"] == 2
    arrays = run.method_arrays()
    assert len(arrays) == 3 and "lam_star" in arrays[0]


def _write_cifar100(root, n_train=256, n_test=64):
    """Synthetic data in torchvision's cifar-100-python layout, a small stand-in."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for split, n in [("train", n_train), ("test", n_test)]:
        entry = {"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(g.integers(0, 100, n))}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def test_cifar100_through_the_same_code(tmp_path):
    _write_cifar100(tmp_path / "data")
    run_dir = tmp_path / "run"
    train(method="amp", dataset="cifar100", model="tiny", epochs=1, batch_size=64,
          val_size=64, eval_steps=0, steps=1, method_hp={"lam_opt": True}, device="cpu",
          quiet=True, data_root=str(tmp_path / "data"), run_dir=str(run_dir))
    run = load_run(run_dir, which="last", num_classes=100)
    assert run.model.num_classes == 100
    with pytest.raises(CheckpointError, match="100 classes"):
        load_run(run_dir, which="last", num_classes=10)
    # continuing a CIFAR-100 run on 10-class data is refused, the difference named ...
    with pytest.raises(CheckpointError, match="dataset: 'cifar100' -> 'synthetic'"):
        train(method="amp", dataset="synthetic", model="tiny", epochs=2, batch_size=64,
              train_subset=128, val_size=64, eval_steps=0, steps=1, device="cpu",
              quiet=True, run_dir=str(run_dir))
    # ... and its checkpoint does not fit a 10-class model, with the class counts named
    with pytest.raises(CheckpointError, match="trained for 100 classes but the data has 10"):
        check_compatible(load_checkpoint(run_dir / "last.pt"), arch="tiny", num_classes=10,
                         in_channels=3)
