"""Running on a CPU: thread count, the progress bar, replaying a config, TensorBoard scalars,
and the refusal of GPU-sized profiles on a CPU."""
import json
import sys

import pytest
import torch

from mixlab import runtime
from mixlab.config import load_config, resolve_config
from mixlab.extras import MissingExtraError
from mixlab.runtime import configure_threads, estimate_cpu_seconds, threads_reason
from mixlab.train import train

# a tiny synthetic run on CPU: about a second
TINY = dict(dataset="synthetic", model="tiny", epochs=1, batch_size=64, train_subset=256,
            val_size=128, eval_subset=64, lr=0.05, schedule="onecycle", warmup=0.3, steps=2,
            eval_steps=2, device="cpu", quiet=True)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- threads
def test_threads_explicit_env_and_default(monkeypatch, keep_threads):
    monkeypatch.delenv("MIXLAB_THREADS", raising=False)
    assert configure_threads(2) == 2 == torch.get_num_threads()
    assert threads_reason() == "explicit"
    monkeypatch.setenv("MIXLAB_THREADS", "1")
    assert configure_threads() == 1 and threads_reason() == "MIXLAB_THREADS"
    assert configure_threads(2) == 2  # an explicit value wins over the environment
    monkeypatch.delenv("MIXLAB_THREADS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert configure_threads() == 1 and threads_reason() == "default for CPU"
    torch.set_num_threads(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert configure_threads() == 2  # a CUDA machine keeps torch's default
    assert "torch default" in threads_reason()


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_bad_thread_count_is_refused_with_the_value(value, keep_threads):
    with pytest.raises(ValueError, match=repr(value).replace(".", r"\.")):
        configure_threads(value)


def test_bad_env_thread_count_is_refused(monkeypatch, keep_threads):
    monkeypatch.setenv("MIXLAB_THREADS", "lots")
    with pytest.raises(ValueError, match="MIXLAB_THREADS 'lots'"):
        configure_threads()


# ----------------------------------------------------------------------------- progress
def test_progress_bar_counts_steps_unless_quiet(capsys):
    train(**{**TINY, "quiet": False})
    err = capsys.readouterr().err
    assert "4/4" in err and "step" in err and "epoch" in err  # 256 examples / 64 per step
    train(**TINY)
    assert "step" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- replay
def _weights(run_dir):
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    return state


def test_replay_config_gives_bitwise_equal_weights(tmp_path):
    first = tmp_path / "first"
    train(run_dir=str(first), method="mixup", method_hp={"alpha": 0.5}, **TINY)
    cfg = load_config(first / "config.json")
    saved = json.loads((first / "config.json").read_text())
    # the dataset's eps and eps / 4, derived again on replay
    assert cfg == {**saved, "eps": None, "step_size": None}
    assert resolve_config(**cfg) == saved
    assert load_config(first) == cfg  # the run directory works too
    train(**{**cfg, "run_dir": str(tmp_path / "second")})
    a, b = _weights(first), _weights(tmp_path / "second")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_with_another_eps_derives_the_step_again_and_keeps_a_chosen_one(tmp_path):
    derived = tmp_path / "derived.json"
    derived.write_text(json.dumps(resolve_config(eps=8 / 255, **TINY)))
    assert resolve_config(**{**load_config(derived), "eps": 4 / 255})["step_size"] == 1 / 255
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps(resolve_config(eps=8 / 255, step_size=0.5 / 255, **TINY)))
    assert resolve_config(**{**load_config(chosen), "eps": 4 / 255})["step_size"] == 0.5 / 255


def test_replay_on_another_dataset_takes_its_mma_radii(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(resolve_config(method="mma", dataset="cifar10",
                                              **{k: v for k, v in TINY.items()
                                                 if k != "dataset"})))
    mnist = resolve_config(**{**load_config(path), "dataset": "mnist", "eps": 0.3})
    assert (mnist["method_hp"]["d_max"], mnist["method_hp"]["mineps"]) == (0.45, 0.1)
    kept = resolve_config(method="mma", dataset="cifar10", method_hp={"d_max": 0.2},
                          **{k: v for k, v in TINY.items() if k != "dataset"})
    path.write_text(json.dumps(kept))
    assert resolve_config(**{**load_config(path), "dataset": "mnist",
                             "eps": 0.3})["method_hp"]["d_max"] == 0.2


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no config file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a mixlab config"):
        load_config(bad)
    bad.write_text(json.dumps({**resolve_config(**TINY), "gamma": 2}))
    with pytest.raises(ValueError, match=r"unknown setting.*gamma"):
        load_config(bad)
    cfg = resolve_config(**TINY)
    del cfg["tensorboard"]  # a file written before a setting existed: its default
    bad.write_text(json.dumps(cfg))
    assert load_config(bad)["tensorboard"] is False


# ----------------------------------------------------------------------------- tensorboard
def test_tensorboard_needs_a_run_dir():
    with pytest.raises(ValueError, match="run_dir"):
        resolve_config(tensorboard=True, **TINY)


def test_tensorboard_missing_package_is_one_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    with pytest.raises(MissingExtraError, match=r"pip install 'mixlab\[tensorboard\]'"):
        train(run_dir=str(tmp_path / "run"), tensorboard=True, **TINY)
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_of_each_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    _, history = train(run_dir=str(run_dir), tensorboard=True, **{**TINY, "epochs": 2})
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "train_acc", "val_clean", "val_robust", "lr", "img_per_s"} <= tags
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert loss[-1].value == pytest.approx(history[-1]["train_loss"], rel=1e-6)
    assert (run_dir / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------- slow CPU
@pytest.mark.parametrize("profile", ["short", "paper"])
def test_gpu_profile_on_cpu_is_refused_with_an_estimate(tmp_path, profile):
    with pytest.raises(ValueError, match="allow_slow_cpu=True") as info:
        train(profile=profile, dataset="synthetic", device="cpu", run_dir=str(tmp_path / "run"))
    assert "would take about" in str(info.value) and "profile='smoke'" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_allow_slow_cpu_lets_it_through_and_smoke_is_never_refused():
    cfg = resolve_config(profile="short", allow_slow_cpu=True)
    runtime.check_cpu_profile(cfg, torch.device("cpu"))  # no error
    runtime.check_cpu_profile(resolve_config(profile="short"), torch.device("cuda"))
    runtime.check_cpu_profile(resolve_config(profile="smoke"), torch.device("cpu"))


def test_estimate_follows_the_pass_counts():
    erm = estimate_cpu_seconds(resolve_config(profile="short", method="erm", val_size=0))
    pgd = estimate_cpu_seconds(resolve_config(profile="short", method="pgd_at", val_size=0))
    assert pgd / erm == pytest.approx(23 / 3)  # bench: 23 vs 3 forward-equivalents at 10 steps
    # 50,000 examples (no validation split) x 15 epochs x 23 forward-equivalents at 100 per second
    assert pgd == pytest.approx(50_000 * 15 * 23 / 100)


def test_mma_estimate_counts_its_bisection_probes_not_the_pgd_steps():
    """MMA's probes are search_steps + 1, whatever the PGD steps (the bench's 37 at 10/10)."""
    base = dict(profile="short", method="mma")
    assert runtime.forward_equivalents(resolve_config(**base)) == 37
    assert runtime.forward_equivalents(resolve_config(**base, steps=20)) == 57
    assert runtime.forward_equivalents(
        resolve_config(**base, method_hp={"search_steps": 5})) == 32


# ----------------------------------------------------------------------------- device, checkout
def test_pick_device(monkeypatch):
    from mixlab.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") == pick_device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda:0")
    with pytest.raises(ValueError):
        pick_device("gpu")


def test_project_dir(tmp_path):
    from mixlab.runtime import project_dir

    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    assert project_dir(tmp_path / "notebooks") == tmp_path.resolve()
    assert project_dir(tmp_path / "notebooks" / "deeper") == tmp_path.resolve()
    outside = tmp_path.parent
    assert project_dir(outside) == outside.resolve()
