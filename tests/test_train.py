"""The training engine: learning, resume equality, config resolution, errors, run files."""
import json

import pytest
import torch

from mixlab import load_run
from mixlab.methods import METHODS, get_method
from mixlab.config import resolve_config
from mixlab.runs import CheckpointError, train_or_load
from mixlab.train import NonFiniteLossError, lr_at, train

# tiny synthetic task on CPU: a few seconds per run
TINY = dict(dataset="synthetic", model="tiny", epochs=3, batch_size=64, train_subset=512,
            val_size=256, eval_subset=128, lr=0.05, schedule="onecycle", warmup=0.3, steps=2, eval_steps=2,
            device="cpu", quiet=True)


def test_erm_learns_the_synthetic_task():
    model, history = train(method="erm", **{**TINY, "epochs": 5, "lr": 0.1})
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_clean"] > 0.5  # 10 classes: chance is 0.1


def test_pgd_at_runs_and_reports_robust_accuracy():
    _, history = train(method="pgd_at", **TINY)
    last = history[-1]
    assert 0 <= last["val_robust"] <= last["val_clean"]
    assert last["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_loss_is_finite_and_backpropagates(name):
    torch.manual_seed(0)
    from mixlab.models import build_model
    model = build_model("tiny", 10, 3)
    method = get_method(name)(num_train=32, num_classes=10, epochs=1)
    x, y, idx = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8)
    loss, _ = method.loss(model, x, y, idx, epoch=0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.training


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_under_cpu_bf16_autocast_and_channels_last(name):
    from mixlab.models import build_model
    model = build_model("tiny", 10, 3).to(memory_format=torch.channels_last)
    method = get_method(name)(num_train=32, num_classes=10, epochs=1)
    x = torch.rand(8, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method.loss(model, x, torch.randint(0, 10, (8,)), torch.arange(8), epoch=0)
    loss.backward()
    assert torch.isfinite(loss)


def test_torch_compile_path_on_cpu(tmp_path):
    pytest.importorskip("torch._dynamo")
    try:
        _, history = train(method="pgd_at", **{**TINY, "epochs": 1, "compile": True})
    except Exception as err:  # no C++ compiler for inductor would be an environment problem
        if "compiler" in str(err).lower() or "cpp" in str(err).lower():
            pytest.skip(f"torch.compile needs a working C++ toolchain here: {err}")
        raise
    assert history[0]["train_loss"] > 0


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = dict(TINY, method="pgd_at")
    model_a, hist_a = train(run_dir=str(tmp_path / "a"), **cfg)
    train(run_dir=str(tmp_path / "b"), stop_after=1, **cfg)
    assert len(load_run(tmp_path / "b", which="last").history) == 1
    model_b, hist_b = train(run_dir=str(tmp_path / "b"), **cfg)
    for pa, pb in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(pa, pb)
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]


def test_run_directory_contents_and_load_run(tmp_path):
    train(run_dir=str(tmp_path), method="erm", **TINY)
    for name in ("config.json", "provenance.json", "metrics.jsonl", "last.pt", "best.pt"):
        assert (tmp_path / name).exists(), name
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["dataset"] == "synthetic" and prov["data_source"] == "synthetic"
    run = load_run(tmp_path)
    assert run.config["method"] == "erm" and len(run.history) == 3
    assert not run.model.training


def test_train_or_load_reuses_a_finished_run_and_refuses_other_settings(tmp_path):
    run = train_or_load(run_dir=tmp_path, method="erm", **TINY)
    mtime = (tmp_path / "last.pt").stat().st_mtime
    train_or_load(run_dir=tmp_path, method="erm", **TINY)
    assert (tmp_path / "last.pt").stat().st_mtime == mtime
    with pytest.raises(CheckpointError, match="other settings"):
        train_or_load(run_dir=tmp_path, method="erm", **{**TINY, "lr": 0.01})
    assert run.history


def test_checkpoint_with_wrong_class_count_is_refused(tmp_path):
    train(run_dir=str(tmp_path), method="erm", **{**TINY, "epochs": 1})
    with pytest.raises(CheckpointError, match="classes"):
        load_run(tmp_path, num_classes=100)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["num_classes"] = 100
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="100 classes"):
        train(run_dir=str(tmp_path), method="erm", **{**TINY, "epochs": 1})


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(tmp_path)
    with pytest.raises(CheckpointError, match="no run directory or checkpoint"):
        load_run(tmp_path / "missing")


def test_nonfinite_loss_stops_and_saves(tmp_path):
    with pytest.raises(NonFiniteLossError, match="NaN"):
        train(run_dir=str(tmp_path), method="erm", **{**TINY, "lr": 1e30, "check_every": 1})
    assert (tmp_path / "nonfinite.pt").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(dataset="imagenet"), "dataset='imagenet' is not one of"),
    (dict(method="no_such_method"), "unknown method"),
    (dict(eps=8.0), "pixel space"),
    (dict(profile="huge"), "profile='huge' is not one of"),
    (dict(gamma=3), "unknown setting"),
])
def test_bad_settings_get_one_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(**{**TINY, **bad})


def test_config_resolution_order_and_dataset_threat_model():
    cfg = resolve_config(profile="smoke", method="pgd_at", dataset="mnist", lr=0.3)
    assert cfg["model"] == "tiny" and cfg["lr"] == 0.3
    # the threat model is an engine setting; method_hp holds only the method's own table
    assert cfg["eps"] == pytest.approx(0.3)
    assert cfg["method_hp"] == get_method("pgd_at").defaults
    assert cfg["step_size"] == pytest.approx(0.075)
    cfg = resolve_config(method="pgd_at", steps=7, norm="L2")
    assert cfg["steps"] == 7 and cfg["eps"] == pytest.approx(0.5)


def test_lr_schedules():
    cfg = dict(schedule="piecewise", milestones=[0.5, 0.75], lr_factors=[0.1, 0.01], warmup=0)
    assert [lr_at(cfg, p) for p in (0, 0.6, 0.9)] == [1.0, 0.1, 0.01]
    one = dict(schedule="onecycle", warmup=0.5)
    assert lr_at(one, 0.25) == pytest.approx(0.5) and lr_at(one, 1.0) == 0
    assert lr_at(dict(schedule="cosine"), 1.0) == pytest.approx(0)
