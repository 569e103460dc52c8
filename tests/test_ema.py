"""mixlab.ema.WeightAverage: the EMA with warm-up against a hand computation, parameters and
buffers, resume through state_dict, no host syncs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixlab.ema import WeightAverage, ema_decay
from mixlab.models import build_model
from mixlab.sync import no_host_sync


def _train_steps(model, n, seed=0):
    """n SGD steps in train mode (BatchNorm running statistics move too); yields after each."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        yield


def _float_state(model):
    return {k: v.detach().clone().double() for k, v in model.state_dict().items()
            if v.is_floating_point()}


@pytest.mark.parametrize("decay,warmup", [(0.3, True), (0.9, False), (0.0, False)])
def test_average_equals_a_hand_computation(decay, warmup):
    torch.manual_seed(0)
    model = build_model("tiny", 10).train()
    ema = WeightAverage(model, decay=decay, warmup=warmup)
    expected = _float_state(model)  # the average starts at the model
    for t, _ in enumerate(_train_steps(model, 6)):
        ema.update(model)
        # the literature's warm-up: min(decay, (1 + t)/(10 + t)); t = 0, 1, 2 warm up at 0.3
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        current = _float_state(model)
        expected = {k: d * expected[k] + (1 - d) * current[k] for k in expected}
    assert ema.num_updates == 6
    got = ema.averaged_model().state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value, rtol=1e-6, atol=1e-7), key
    # buffers are averaged too (BatchNorm's running mean moved, and the average lags it)
    bn = [k for k in expected if k.endswith("running_mean")]
    assert bn and torch.equal(got[bn[0]], model.state_dict()[bn[0]]) == (decay == 0)
    # integer buffers are copied
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key


def test_decay_schedule():
    assert [ema_decay(0.999, t) for t in (0, 10, 90)] == [0.1, 11 / 20, 91 / 100]
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999


def test_model_is_untouched_and_average_is_a_frozen_eval_copy():
    torch.manual_seed(0)
    model = build_model("tiny", 10).train()
    ema = WeightAverage(model, decay=0.5)
    for _ in _train_steps(model, 2):
        before = copy.deepcopy(model.state_dict())
        ema.update(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    avg = ema.averaged_model()
    assert avg is not model and not avg.training
    assert not any(p.requires_grad for p in avg.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_resume_through_state_dict_equals_an_uninterrupted_average(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", 10).train()
    start = copy.deepcopy(model)
    full = WeightAverage(model, decay=0.8)
    states = []
    for _ in _train_steps(model, 5, seed=1):
        full.update(model)
        states.append(copy.deepcopy(model.state_dict()))
    # the same trajectory, saved after 2 updates and resumed in a new object
    half = WeightAverage(start, decay=0.8)
    for state in states[:2]:
        start.load_state_dict(state)
        half.update(start)
    torch.save(half.state_dict(), tmp_path / "ema.pt")
    resumed = WeightAverage(build_model("tiny", 10), decay=0.1, warmup=False)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert (resumed.decay, resumed.warmup, resumed.num_updates) == (0.8, True, 2)
    for state in states[2:]:
        start.load_state_dict(state)
        resumed.update(start)
    for key, value in full.state_dict()["model"].items():
        assert torch.equal(resumed.state_dict()["model"][key], value), key


def test_update_is_free_of_host_syncs():
    model = build_model("tiny", 10).to(memory_format=torch.channels_last)
    ema = WeightAverage(model, decay=0.999)
    with no_host_sync():
        for _ in range(3):
            ema.update(model)


def test_tied_weights_are_averaged_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, bias=False)
            self.b = nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    ema = WeightAverage(model, decay=0.5, warmup=False)
    w0 = model.a.weight.detach().clone()
    with torch.no_grad():
        model.a.weight.add_(1.0)
    ema.update(model)
    avg = ema.averaged_model()
    assert avg.a.weight is avg.b.weight
    assert torch.allclose(avg.a.weight, 0.5 * w0 + 0.5 * (w0 + 1))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.9"])
def test_bad_decay_is_refused(bad):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(2, 2), decay=bad)


def test_another_model_is_refused():
    ema = WeightAverage(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="same model"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.gpu
def test_update_on_cuda_without_host_syncs():
    model = build_model("tiny", 10).cuda().to(memory_format=torch.channels_last)
    ema = WeightAverage(model, decay=0.999)
    ema.update(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    avg = ema.averaged_model()
    assert next(avg.parameters()).is_cuda and ema.num_updates == 4
    for key, value in model.state_dict().items():  # the model did not move: the average is it
        assert torch.allclose(avg.state_dict()[key].float(), value.float()), key
