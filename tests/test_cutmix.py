"""CutMix (mixlab.methods.mixing; mixup's ``mix="cutmix"``) and mixing inside PGD-AT and
TRADES (``pgd_at.mix``, ``trades.mix``): boxes inside the image, label weights equal to the
pasted area, the mixed image against a hand-built one, the attack on the mixed image with soft
labels, no host syncs, and methods that share the helpers without importing each other."""
import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixlab.config import resolve_config
from mixlab.methods import AttackSpec, get_method
from mixlab.methods import pgd_at as pgd_at_mod
from mixlab.methods import trades as trades_mod
from mixlab.methods.base import sample_lam, soft_cross_entropy
from mixlab.methods.mixing import box_mask, cutmix_boxes, cutmix_data
from mixlab.methods.mixup import mixup_criterion
from mixlab.methods.trades import kl_clean_adv
from mixlab.models import build_model
from mixlab.sync import no_host_sync

from .conftest import B, K


# ----------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("height,width", [(32, 32), (28, 32), (7, 5)])
def test_boxes_lie_inside_the_image_and_have_the_paper_size(height, width):
    torch.manual_seed(0)
    lam = torch.cat([torch.tensor([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6]), torch.rand(4000)])
    boxes = cutmix_boxes(lam, height, width)
    assert boxes.shape == (len(lam), 4) and boxes.dtype == torch.int64
    top, bottom, left, right = boxes.unbind(1)
    assert (0 <= top).all() and (top <= bottom).all() and (bottom <= height).all()
    assert (0 <= left).all() and (left <= right).all() and (right <= width).all()
    # unclipped sides: half of ⌊H·√(1 − λ)⌋ (floored) on each side of the centre
    side_h = torch.tensor([2 * (math.floor(height * math.sqrt(1 - v)) // 2) for v in lam.tolist()])
    side_w = torch.tensor([2 * (math.floor(width * math.sqrt(1 - v)) // 2) for v in lam.tolist()])
    free_h = (top > 0) & (bottom < height)
    free_w = (left > 0) & (right < width)
    assert free_h.sum() > 100 and free_w.sum() > 100
    assert torch.equal((bottom - top)[free_h], side_h[free_h])
    assert torch.equal((right - left)[free_w], side_w[free_w])
    assert ((bottom - top) <= side_h).all() and ((right - left) <= side_w).all()
    assert ((bottom - top) * (right - left))[lam == 1.0].eq(0).all()  # λ = 1: nothing pasted


def test_box_centres_cover_the_image():
    torch.manual_seed(0)
    boxes = cutmix_boxes(torch.full((20000,), 0.99), 32, 32)  # tiny boxes: sides 2 pixels
    centres = (boxes[:, 0] + boxes[:, 1]) // 2
    assert centres.min() <= 1 and centres.max() >= 30


# ----------------------------------------------------------------------------- mixing
def test_mixed_image_equals_a_hand_built_one_for_fixed_boxes(batch):
    x, y = batch
    perm = torch.tensor([3, 0, 1, 2, 7, 4, 5, 6])
    boxes = torch.tensor([[2, 10, 5, 20], [0, 32, 0, 32], [0, 0, 3, 9], [31, 32, 0, 1],
                          [4, 5, 6, 7], [10, 30, 0, 32], [0, 16, 16, 32], [8, 9, 8, 24]])
    x_mix, y_a, y_b, lam = cutmix_data(x, y, perm, boxes)
    expected = x.clone()
    for i, (t, b, l, r) in enumerate(boxes.tolist()):
        expected[i, :, t:b, l:r] = x[perm[i], :, t:b, l:r]
    assert torch.equal(x_mix, expected)
    assert torch.equal(y_a, y) and torch.equal(y_b, y[perm])
    areas = [(b - t) * (r - l) for t, b, l, r in boxes.tolist()]
    assert lam.dtype == torch.float32
    assert lam.tolist() == pytest.approx([1 - a / 1024 for a in areas], abs=1e-7)
    assert lam[1] == 0 and lam[2] == 1  # the whole image pasted; an empty box


@pytest.mark.parametrize("height,width", [(32, 32), (28, 28)])
def test_label_weights_equal_the_exact_pasted_area_fraction(height, width):
    """Images whose every pixel says which example it came from: the fraction of pixels that
    are still the example's own is the weight of its label, for random boxes."""
    torch.manual_seed(0)
    n = 256
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 3, height, width)
    y = torch.arange(n) % K
    perm = torch.roll(torch.arange(n), 1)  # no example is its own partner
    lam_drawn = sample_lam(1.0, n, x.device)
    boxes = cutmix_boxes(lam_drawn, height, width)
    x_mix, _, _, lam = cutmix_data(x, y, perm, boxes)
    own = (x_mix[:, 0] == x[:, 0]).flatten(1).sum(1).double() / (height * width)
    pasted = (x_mix[:, 0] == x[perm, 0]).flatten(1).sum(1)
    assert torch.equal(lam.double(), own.float().double())
    assert torch.equal(pasted, ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])))
    # corrected λ: never below the drawn one (clipping only shrinks the box), often above
    assert (lam >= lam_drawn - 1e-6).all() and (lam > lam_drawn + 0.01).float().mean() > 0.2
    assert torch.equal(box_mask(boxes, height, width).flatten(1).sum(1), pasted)


def test_method_loss_is_the_area_weighted_criterion(net, batch):
    """Mixup(mix="cutmix") trains on the box-pasted image with the area-corrected weights: the
    same RNG draws rebuilt by hand give the same loss."""
    x, y = batch
    for per_example in (False, True):
        method = get_method("mixup")(num_train=B, num_classes=K, epochs=1, mix="cutmix",
                                     per_example=per_example)
        torch.manual_seed(5)
        loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
        torch.manual_seed(5)
        n = B if per_example else 1
        lam_drawn = sample_lam(1.0, n, x.device)
        perm = torch.randperm(B)
        boxes = cutmix_boxes(lam_drawn, 32, 32).expand(B, 4)
        x_mix, y_a, y_b, lam = cutmix_data(x, y, perm, boxes)
        expected = mixup_criterion(net(x_mix), y_a, y_b, lam)
        assert logits is None and torch.allclose(loss, expected, atol=1e-6)
        arrays = method.epoch_end(0)
        assert set(arrays) == {"lam", "lam_box"} and len(arrays["lam"]) == n
        np.testing.assert_allclose(arrays["lam_box"], lam[:n].numpy())
        if not per_example:
            assert (boxes == boxes[0]).all()  # one box for the whole batch, as the official code


def test_mix_names_are_checked():
    with pytest.raises(ValueError, match="mixup.mix='cutmx'"):
        get_method("mixup")(num_train=B, num_classes=K, epochs=1, mix="cutmx")
    with pytest.raises(ValueError, match="pgd_at.mix='mixup2'"):
        get_method("pgd_at")(num_train=B, num_classes=K, epochs=1, mix="mixup2")
    with pytest.raises(ValueError, match="pgd_at.mix_alpha"):
        get_method("pgd_at")(num_train=B, num_classes=K, epochs=1, mix="cutmix", mix_alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):  # pgd_at's alpha would read as a step size
        get_method("pgd_at")(num_train=B, num_classes=K, epochs=1, alpha=1.0)
    with pytest.raises(ValueError, match="trades.mix='cut'"):
        get_method("trades")(num_train=B, num_classes=K, epochs=1, mix="cut")
    with pytest.raises(ValueError, match="trades.mix_alpha"):
        get_method("trades")(num_train=B, num_classes=K, epochs=1, mix="mixup", mix_alpha=-1.0)
    assert resolve_config(method="pgd_at")["method_hp"] == {"mix": "none", "mix_alpha": 1.0}
    assert resolve_config(method="mixup")["method_hp"]["mix"] == "mixup"
    assert resolve_config(method="trades")["method_hp"]["mix"] == "none"


# ----------------------------------------------------------------------------- PGD-AT + mix
@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_pgd_at_attacks_the_mixed_image_with_the_soft_label(net, batch, mix, monkeypatch):
    x, y = batch
    calls, real = [], pgd_at_mod.pgd

    def spy(model, x_in, y_in, **kwargs):
        out = real(model, x_in, y_in, **kwargs)
        calls.append((x_in, y_in, kwargs, out))
        return out
    monkeypatch.setattr(pgd_at_mod, "pgd", spy)
    attack = AttackSpec(eps=8 / 255, step_size=2 / 255, steps=3)
    method = get_method("pgd_at")(num_train=B, num_classes=K, epochs=1, attack=attack, mix=mix,
                                  mix_alpha=0.7)
    torch.manual_seed(7)
    loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
    # the same draws, by hand
    torch.manual_seed(7)
    lam_drawn = sample_lam(0.7, B, x.device)
    perm = torch.randperm(B)
    if mix == "cutmix":
        x_mix, _, _, lam = cutmix_data(x, y, perm, cutmix_boxes(lam_drawn, 32, 32))
    else:
        lam = lam_drawn
        x_mix = lam.reshape(-1, 1, 1, 1) * x + (1 - lam.reshape(-1, 1, 1, 1)) * x[perm]
    y_soft = lam[:, None] * F.one_hot(y, K) + (1 - lam[:, None]) * F.one_hot(y[perm], K)
    (x_in, y_in, kwargs, x_adv), = calls
    assert torch.equal(x_in, x_mix)  # the ball is centred on the mixed image
    assert (kwargs["eps"], kwargs["step_size"], kwargs["steps"]) == (8 / 255, 2 / 255, 3)
    probe = torch.randn(B, K)
    assert torch.allclose(kwargs["loss"](probe, y_in),
                          soft_cross_entropy(probe, y_soft, reduction="none"))
    assert (x_adv - x_mix).abs().max() <= 8 / 255 + 1e-6
    assert logits is None and torch.allclose(loss, soft_cross_entropy(net(x_adv), y_soft),
                                             atol=1e-6)
    arrays = method.epoch_end(0)
    assert set(arrays) == ({"lam", "lam_box"} if mix == "cutmix" else {"lam"})
    loss.backward()
    assert net.training


def test_pgd_at_without_mix_is_plain_pgd_at(net, batch, monkeypatch):
    x, y = batch
    seen = []
    real = pgd_at_mod.pgd
    monkeypatch.setattr(pgd_at_mod, "pgd", lambda m, xi, yi, **kw: seen.append((xi, kw)) or
                        real(m, xi, yi, **kw))
    method = get_method("pgd_at")(num_train=B, num_classes=K, epochs=1,
                                  attack=AttackSpec(steps=2))
    loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
    (xi, kw), = seen
    assert xi is x and "loss" not in kw and logits.shape == (B, K)
    assert method.epoch_end(0) == {}


# ----------------------------------------------------------------------------- TRADES + mix
@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_trades_attacks_and_trains_on_the_mixed_image_with_the_soft_label(net, batch, mix,
                                                                         monkeypatch):
    """The KL attack starts from the mixed image, the KL term compares the mixed image with
    its attacked copy, and the clean term is the soft-label CE of the mixed image."""
    x, y = batch
    calls, real = [], trades_mod.trades_perturb

    def spy(model, x_in, **kwargs):
        out = real(model, x_in, **kwargs)
        calls.append((x_in, kwargs, out))
        return out
    monkeypatch.setattr(trades_mod, "trades_perturb", spy)
    attack = AttackSpec(eps=8 / 255, step_size=2 / 255, steps=3)
    method = get_method("trades")(num_train=B, num_classes=K, epochs=1, attack=attack, mix=mix,
                                  mix_alpha=0.7, beta=3.0)
    torch.manual_seed(7)
    loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
    # the same draws, by hand: λ, the partners, (CutMix) the boxes, then the attack
    torch.manual_seed(7)
    lam_drawn = sample_lam(0.7, B, x.device)
    perm = torch.randperm(B)
    if mix == "cutmix":
        x_mix, _, _, lam = cutmix_data(x, y, perm, cutmix_boxes(lam_drawn, 32, 32))
    else:
        lam = lam_drawn
        x_mix = lam.reshape(-1, 1, 1, 1) * x + (1 - lam.reshape(-1, 1, 1, 1)) * x[perm]
    y_soft = lam[:, None] * F.one_hot(y, K) + (1 - lam[:, None]) * F.one_hot(y[perm], K)
    (x_in, kwargs, x_adv), = calls
    assert torch.equal(x_in, x_mix)  # the ball is centred on the mixed image
    assert (kwargs["eps"], kwargs["step_size"], kwargs["steps"]) == (8 / 255, 2 / 255, 3)
    assert (x_adv - x_mix).abs().max() <= 8 / 255 + 1e-6
    assert not torch.equal(x_mix, x)
    clean = net(x_mix)
    expected = soft_cross_entropy(clean, y_soft) + 3.0 * kl_clean_adv(clean, net(x_adv))
    assert logits is None and torch.allclose(loss, expected, atol=1e-6)
    # not the hard-label CE of the mixed image, not the clean batch
    hard = F.cross_entropy(clean, y) + 3.0 * kl_clean_adv(clean, net(x_adv))
    assert not torch.allclose(loss, hard, atol=1e-4)
    arrays = method.epoch_end(0)
    assert set(arrays) == ({"lam", "lam_box"} if mix == "cutmix" else {"lam"})
    np.testing.assert_allclose(arrays["lam"], lam_drawn.numpy())
    loss.backward()
    assert net.training


def test_trades_without_mix_is_plain_trades(net, batch, monkeypatch):
    x, y = batch
    seen = []
    real = trades_mod.trades_perturb
    monkeypatch.setattr(trades_mod, "trades_perturb",
                        lambda m, xi, **kw: seen.append(xi) or real(m, xi, **kw))
    method = get_method("trades")(num_train=B, num_classes=K, epochs=1,
                                  attack=AttackSpec(steps=2))
    loss, logits = method.loss(net, x, y, torch.arange(B), epoch=0)
    (xi,) = seen
    assert xi is x and logits.shape == (B, K) and method.epoch_end(0) == {}


def test_methods_do_not_import_each_other():
    """A method file imports attacks, base and mixing (shared helpers), never another method."""
    folder = Path(pgd_at_mod.__file__).parent
    shared = {"base", "mixing", "__init__"}
    methods = {p.stem for p in folder.glob("*.py")} - shared
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                if path.stem != "__init__":
                    assert not set(names) & methods, f"{path.name} imports {names}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "mixlab.methods.") and path.stem != "__init__":
                assert node.module.split(".")[-1] not in methods, f"{path.name}: {node.module}"


@pytest.mark.parametrize("name,hp", [("mixup", dict(mix="cutmix")),
                                     ("mixup", dict(mix="cutmix", per_example=True)),
                                     ("pgd_at", dict(mix="cutmix")),
                                     ("pgd_at", dict(mix="mixup")),
                                     ("trades", dict(mix="cutmix")),
                                     ("trades", dict(mix="mixup"))])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-channels-last"])
def test_mixing_steps_are_free_of_host_syncs(name, hp, bf16, net, batch):
    x, y = batch
    if bf16:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    method = get_method(name)(num_train=B, num_classes=K, epochs=1, attack=AttackSpec(steps=2),
                              **hp)
    with no_host_sync(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = method.loss(net, x, y, torch.arange(B), epoch=0)
    with no_host_sync():
        loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.parametrize("name,hp", [("mixup", dict(mix="cutmix", per_example=True)),
                                     ("pgd_at", dict(mix="cutmix")), ("trades", {}),
                                     ("trades", dict(mix="cutmix"))])
def test_steps_on_cuda_bf16_channels_last_without_host_syncs(name, hp):
    """The GPU path as the engine runs it; a host sync inside the step raises."""
    model = build_model("tiny", K, 3).cuda().to(memory_format=torch.channels_last).train()
    x = torch.rand(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (32,), device="cuda")
    idx = torch.arange(32, device="cuda")
    method = get_method(name)(num_train=32, num_classes=K, epochs=1,
                              attack=AttackSpec(steps=3), **hp)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        method.loss(model, x, y, idx, epoch=0)  # first call: kernels load, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = method.loss(model, x, y, idx, epoch=0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    loss.backward()
    assert torch.isfinite(loss).item()
