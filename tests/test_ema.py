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


# ----------------------------------------------------------------------------- in the training loop
#: 1 epoch of 3 steps (96 training examples, batch 32) on the synthetic task, on the CPU
LOOP = dict(method="pgd_at", dataset="synthetic", model="tiny", epochs=1, batch_size=32,
            train_subset=96, val_size=64, steps=1, eval_steps=1, eps=2 / 255, lr=0.5,
            schedule="constant", seed=3, device="cpu", quiet=True)


@pytest.mark.parametrize("decay,warmup", [(0.6, True), (0.6, False)])
def test_the_loop_averages_the_weights_after_each_step(tmp_path, monkeypatch, decay, warmup):
    """3 steps of a tiny run: the saved average equals a hand-computed EMA of the weights
    the optimiser produced at each step, starting from the initial weights; the validation
    scores ema_val_* are those of the averaged model."""
    import mixlab.train as train_mod
    from mixlab.runs import load_run

    weights, real_step = [], train_mod.train_step

    def spy(method, model, optimizer, batch, **kwargs):
        if not weights:  # the initial weights, where the average starts
            weights.append(_float_state(model))
        out = real_step(method, model, optimizer, batch, **kwargs)
        weights.append(_float_state(model))  # after this step
        return out
    monkeypatch.setattr(train_mod, "train_step", spy)
    evaluated, real_eval = [], train_mod.quick_eval

    def eval_spy(model, x, y, cfg, **kwargs):
        scores = real_eval(model, x, y, cfg, **kwargs)
        evaluated.append((_float_state(model), scores))
        return scores
    monkeypatch.setattr(train_mod, "quick_eval", eval_spy)
    cfg = dict(LOOP, ema_decay=decay, ema_warmup=warmup)
    _, history = train_mod.train(run_dir=str(tmp_path), **cfg)
    assert len(weights) == 4  # the initial weights and 3 steps

    expected = weights[0]
    for t, current in enumerate(weights[1:]):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        expected = {k: d * expected[k] + (1 - d) * current[k] for k in expected}
    run = load_run(tmp_path, which="last", weights="ema")
    assert run.weights == "ema"
    got = _float_state(run.model)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-6, atol=1e-7), key
    raw = load_run(tmp_path, which="last")
    for key, value in _float_state(raw.model).items():  # raw weights: the last step's
        assert torch.equal(value, weights[-1][key]), key
    assert not all(torch.allclose(got[k], weights[-1][k]) for k in got)  # they differ

    # val_* score the raw weights, ema_val_* the averaged ones
    (raw_seen, raw_scores), (ema_seen, ema_scores) = evaluated
    for key in expected:
        assert torch.equal(raw_seen[key], weights[-1][key]), key
        assert torch.allclose(ema_seen[key], expected[key], rtol=1e-6, atol=1e-7), key
    record, = history
    assert (record["val_clean"], record["val_robust"]) == (raw_scores["val_clean"],
                                                           raw_scores["val_robust"])
    assert (record["ema_val_clean"], record["ema_val_robust"]) == (ema_scores["val_clean"],
                                                                   ema_scores["val_robust"])


def test_averaging_leaves_the_trained_weights_as_they_were(tmp_path, monkeypatch):
    """Two epochs with and without weight averaging: the raw weights and every raw validation
    score are the same bit for bit, so an averaged run's raw weights are the plain run's (the
    baselines notebook's cpu profile trains PGD-AT once on that ground). An average that drew
    from the random stream, e.g. a random-start PGD when the average is validated, would shift
    every later attack and batch: the broken variant below does, and its weights differ."""
    import mixlab.ema as ema_mod
    from mixlab.runs import load_run
    from mixlab.train import train

    cfg = dict(LOOP, epochs=2)
    _, plain = train(run_dir=str(tmp_path / "plain"), **cfg)
    _, averaged = train(run_dir=str(tmp_path / "averaged"), ema_decay=0.9, **cfg)

    def raw_weights(name):
        return _float_state(load_run(tmp_path / name, which="last").model)

    keys = ("train_loss", "val_clean", "val_robust")
    assert [[h[k] for k in keys] for h in averaged] == [[h[k] for k in keys] for h in plain]
    want = raw_weights("plain")
    assert all(torch.equal(value, want[key]) for key, value in raw_weights("averaged").items())

    real_update = ema_mod.WeightAverage.update

    def update_that_draws(self, model):
        torch.rand(1)  # one draw from the global stream
        real_update(self, model)
    monkeypatch.setattr(ema_mod.WeightAverage, "update", update_that_draws)
    train(run_dir=str(tmp_path / "broken"), ema_decay=0.9, **cfg)
    broken = raw_weights("broken")
    assert not all(torch.equal(value, want[key]) for key, value in broken.items())


def test_a_resumed_run_continues_the_average_exactly(tmp_path):
    """Stopped after epoch 1 and resumed: the average, its update count (the warm-up's
    position) and every ema_val_* score equal those of an uninterrupted run."""
    from mixlab.runs import load_checkpoint
    from mixlab.train import train

    cfg = dict(LOOP, epochs=3, ema_decay=0.7)
    _, whole = train(run_dir=str(tmp_path / "whole"), **cfg)
    train(run_dir=str(tmp_path / "resumed"), stop_after=1, **cfg)
    _, resumed = train(run_dir=str(tmp_path / "resumed"), **cfg)
    keys = ("val_clean", "val_robust", "ema_val_clean", "ema_val_robust", "train_loss")
    assert [[h[k] for k in keys] for h in resumed] == [[h[k] for k in keys] for h in whole]
    for name in ("last.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / run / name) for run in ("whole", "resumed"))
        assert a["epoch"] == b["epoch"]
        assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 3 * (a["epoch"] + 1)
        assert a["ema"]["model"].keys() == b["ema"]["model"].keys()
        for key, value in a["ema"]["model"].items():
            assert torch.equal(value, b["ema"]["model"][key]), (name, key)


def test_best_is_chosen_by_the_averaged_model_and_load_run_gives_either(tmp_path, monkeypatch):
    """Scripted validation scores: the raw model is best in epoch 1, the average in epoch 3.
    With weight averaging on, best.pt is epoch 3; without, epoch 1."""
    import mixlab.train as train_mod
    from mixlab.runs import CheckpointError, load_checkpoint, load_run

    calls = {"raw": 0, "ema": 0}
    scores = {"raw": [0.9, 0.5, 0.1], "ema": [0.1, 0.5, 0.9]}

    def scripted(model, x, y, cfg, batch_size=500, **kwargs):
        which = "raw" if any(p.requires_grad for p in model.parameters()) else "ema"
        score = scores[which][calls[which]]
        calls[which] += 1
        return {"val_clean": score, "val_robust": score}
    monkeypatch.setattr(train_mod, "quick_eval", scripted)
    cfg = dict(LOOP, epochs=3, ema_decay=0.9)
    train_mod.train(run_dir=str(tmp_path / "ema"), **cfg)
    assert calls == {"raw": 3, "ema": 3}
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    assert best["epoch"] + 1 == 3
    for weights in ("raw", "ema"):
        run = load_run(tmp_path / "ema", weights=weights)  # which="best"
        assert (run.epoch, run.which, run.weights) == (3, "best", weights)
        want = best["model"] if weights == "raw" else best["ema"]["model"]
        for key, value in run.model.state_dict().items():
            assert torch.equal(value, want[key]), (weights, key)

    calls.update(raw=0, ema=0)
    train_mod.train(run_dir=str(tmp_path / "plain"), **LOOP | {"epochs": 3})
    assert calls == {"raw": 3, "ema": 0}
    assert load_checkpoint(tmp_path / "plain" / "best.pt")["epoch"] + 1 == 1
    with pytest.raises(CheckpointError, match="no weight average.*weights='raw'"):
        load_run(tmp_path / "plain", weights="ema")
    with pytest.raises(ValueError, match="weights='averaged'"):
        load_run(tmp_path / "ema", weights="averaged")


def test_weight_averaging_settings_are_engine_settings():
    from mixlab.config import SETTINGS, config_difference, resolve_config
    from mixlab.methods import METHODS

    cfg = resolve_config(method="trades", ema_decay=0.999)
    assert (cfg["ema_decay"], cfg["ema_warmup"]) == (0.999, True)
    assert resolve_config()["ema_decay"] is None  # off by default
    for cls in METHODS.values():
        assert not {"ema_decay", "ema_warmup"} & set(cls.defaults)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay"):
            resolve_config(ema_decay=bad)
    with pytest.raises(ValueError, match="is an engine setting"):  # not a hyperparameter
        resolve_config(method="trades", method_hp={"ema_decay": 0.9})
    # a run saved before the settings existed ran without averaging: the same settings
    old = {k: v for k, v in resolve_config().items() if k not in ("ema_decay", "ema_warmup")}
    assert config_difference(old, resolve_config()) == []
    assert config_difference(old, resolve_config(ema_decay=0.99)) == ["ema_decay: None -> 0.99"]
    assert "ema_decay" in SETTINGS and SETTINGS["ema_decay"].optional
