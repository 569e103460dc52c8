"""The command line: a real training run, evaluation, info, and one clear error per bad input."""
import json
import subprocess
import sys

import pytest

from mixlab.cli import main
from mixlab.methods import get_method


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mixlab", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_train_then_eval(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["train", "--method", "pgd_at", "--dataset", "synthetic", "--profile", "smoke",
                 "--epochs", "1", "--run-dir", run_dir, "--set", "train_subset=256",
                 "--set", "quiet=true"]) == 0
    assert main(["eval", "--checkpoint", run_dir, "--attacks", "clean,fgsm,pgd20",
                 "--n", "64"]) == 0
    out = capsys.readouterr().out
    assert "| pgd_at (best, epoch " in out and "n=64" in out


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet", "--run-dir", "x"], "dataset='imagenet'"),
    (["train", "--method", "nope", "--run-dir", "x"], "'nope'"),
    (["train", "--model", "resnet1000", "--dataset", "synthetic", "--profile", "smoke",
      "--run-dir", "{tmp}/m"], "unknown model"),
    (["train", "--eps", "8", "--run-dir", "x"], "pixel space"),
    (["train", "--set", "gamma=2", "--run-dir", "x"], "unknown setting"),
    (["train", "--method", "mixup", "--set", "alpha=0.5", "--run-dir", "x"], "mixup.alpha"),
    (["train", "--method", "mixup", "--set", "mixup.step_size=0.1", "--run-dir", "x"],
     "engine setting"),
    (["eval", "--checkpoint", "{tmp}/missing"], "checkpoint at"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlab: error:") and message in err[0].lower()


def test_missing_dataset_error_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXLAB_DATA", str(tmp_path))
    assert main(["train", "--dataset", "cifar100", "--profile", "smoke",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cifar100" in err and str(tmp_path) in err and "download" in err


def test_help_and_info_as_subprocess():
    assert run_cli("--help").returncode == 0
    for sub in ("train", "eval", "export", "info"):
        result = run_cli(sub, "--help")
        assert result.returncode == 0 and "usage" in result.stdout
    info = run_cli("info")
    assert info.returncode == 0 and "torch" in info.stdout and "data root" in info.stdout


# a 1-epoch mixup run on 128 synthetic images, no robust evaluation: a few seconds
SHORT_RUN = ["train", "--method", "mixup", "--dataset", "synthetic", "--profile", "smoke",
             "--epochs", "1", "--set", "train_subset=128", "--set", "eval_steps=0",
             "--set", "quiet=true"]


def dry_run(capsys, *args):
    assert main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out, json.loads(captured.out)


def test_dry_run_prints_exactly_the_config_json_of_the_run(tmp_path, capsys):
    args = [*SHORT_RUN, "--run-dir", str(tmp_path / "run"), "--set", "mixup.alpha=0.5"]
    text, printed = dry_run(capsys, *args)
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"
    assert main(args) == 0
    saved = (tmp_path / "run" / "config.json").read_text()
    assert json.loads(saved) == printed
    assert saved.strip() == text.strip()
    assert printed["method"] == "mixup" and printed["epochs"] == 1
    assert printed["method_hp"] == {**get_method("mixup").defaults, "alpha": 0.5}


def test_set_method_key_lands_in_method_hp_only(capsys):
    _, cfg = dry_run(capsys, *SHORT_RUN, "--set", "mixup.alpha=0.5")
    assert cfg["method_hp"]["alpha"] == 0.5
    assert "alpha" not in cfg and cfg["step_size"] == cfg["eps"] / 4  # the engine's, untouched
    _, cfg = dry_run(capsys, *SHORT_RUN, "--set", "step_size=0.01")
    assert cfg["step_size"] == 0.01 and cfg["method_hp"]["alpha"] == 1.0


def test_set_for_another_method_is_one_error_line(capsys):
    assert main([*SHORT_RUN, "--set", "amp.alpha=1", "--dry-run"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlab: error:"), err
    assert "amp.alpha" in err[0] and "mixup" in err[0]
    assert captured.out == ""


def test_train_replays_a_config_file_with_overrides(tmp_path, capsys):
    import torch
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", "--method", "mixup", "--dataset", "synthetic", "--profile", "smoke",
                 "--epochs", "1", "--run-dir", str(first), "--set", "train_subset=256",
                 "--set", "mixup.alpha=0.5", "--set", "quiet=true"]) == 0
    assert main(["train", "--config", str(first / "config.json"),
                 "--run-dir", str(second)]) == 0
    a = torch.load(first / "last.pt", weights_only=True)["model"]
    b = torch.load(second / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    # the file is the base; flags and --set override it
    assert main(["train", "--config", str(first), "--epochs", "2", "--set", "mixup.alpha=0.3",
                 "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["method"], cfg["epochs"], cfg["method_hp"]["alpha"]) == ("mixup", 2, 0.3)
    assert cfg["train_subset"] == 256 and cfg["run_dir"] == str(first)
    # a step the file holds only because it was eps / 4 follows a new eps
    assert main(["train", "--config", str(first), "--set", "eps=0.0156862745", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["step_size"] == 0.0156862745 / 4
    assert main(["train", "--config", str(tmp_path / "nope.json"), "--dry-run"]) == 2
    assert "no config file" in capsys.readouterr().err


def test_threads_tensorboard_and_slow_cpu_flags(tmp_path, capsys):
    import torch
    before = torch.get_num_threads()
    try:
        for argv in (["--threads", "2", "info"], ["info", "--threads", "2"]):
            assert main(argv) == 0
            assert "threads: 2 (why: explicit)" in capsys.readouterr().out
        assert main(["--threads", "0", "info"]) == 2
        assert "threads=0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    assert main(["train", "--profile", "short", "--device", "cpu", "--allow-slow-cpu",
                 "--tensorboard", "--run-dir", str(tmp_path / "r"), "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["allow_slow_cpu"] is True and cfg["tensorboard"] is True
    assert main(["train", "--profile", "short", "--dataset", "synthetic", "--device", "cpu",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--allow-slow-cpu" in err and not (tmp_path / "r").exists()


def test_info_prints_the_thread_count():
    import os
    info = run_cli("info", env={**os.environ, "MIXLAB_THREADS": "1"})
    assert info.returncode == 0 and "threads: 1 (why: MIXLAB_THREADS)" in info.stdout


def test_export_robustbench_reloads_with_the_same_logits(tmp_path, capsys):
    """A tiny WRN-10-1 run with weight averaging, exported raw and averaged: each file reloads
    with load_robustbench and gives the logits of the model load_run returns."""
    import torch

    from mixlab.models.robustbench import load_robustbench
    from mixlab.runs import load_run

    run_dir = str(tmp_path / "run")
    assert main(["train", "--method", "erm", "--dataset", "synthetic", "--model", "wrn-10-1",
                 "--profile", "smoke", "--epochs", "1", "--run-dir", run_dir,
                 "--set", "train_subset=128", "--set", "val_size=64", "--set", "ema_decay=0.5",
                 "--set", "quiet=true"]) == 0
    capsys.readouterr()
    # an evaluation of the averaged weights: its own file, reported in the averaged export only
    assert main(["eval", "--checkpoint", run_dir, "--which", "last", "--weights", "ema",
                 "--attacks", "clean", "--n", "16"]) == 0
    assert "averaged weights" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval_cli_ema.json").is_file()
    assert not (tmp_path / "run" / "eval_cli.json").exists()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = {}
    for weights in ("raw", "ema"):
        out = tmp_path / f"export-{weights}"
        assert main(["export", "--robustbench", run_dir, str(out), "--which", "last",
                     "--weights", weights, "--name", "tiny_wrn"]) == 0
        printed = capsys.readouterr().out
        assert f"state_dict: {out / 'tiny_wrn.pt'}" in printed
        card = json.loads((out / "tiny_wrn.json").read_text())
        assert card["training"]["weights"] == weights and card["training"]["checkpoint"] == "last"
        assert card["state_dict"]["reload_max_logit_diff"] < 1e-4
        if weights == "ema":
            assert card["accuracy"]["file"].endswith("eval_cli_ema.json")
        else:
            assert card["accuracy"] is None  # the raw weights were never evaluated
        reloaded = load_robustbench(out / "tiny_wrn.pt")
        model = load_run(run_dir, which="last", weights=weights).model
        with torch.no_grad():
            logits[weights] = reloaded(x)
            assert torch.allclose(logits[weights], model(x), atol=1e-5)
    assert not torch.allclose(logits["raw"], logits["ema"], atol=1e-3)  # two different models

    assert main(["export", run_dir, str(tmp_path / "x")]) == 2  # no format
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlab: error:") and "--robustbench" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["export", "--robustbench", run_dir, str(tmp_path / "x"),
                 "--result", str(tmp_path / "missing.json")]) == 2
    assert "--result" in capsys.readouterr().err


def test_eval_and_export_of_averaged_weights_need_a_run_that_averaged(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert main(["train", "--method", "erm", "--dataset", "synthetic", "--profile", "smoke",
                 "--epochs", "1", "--run-dir", run_dir, "--set", "train_subset=128",
                 "--set", "val_size=64", "--set", "quiet=true"]) == 0
    for args in (["eval", "--checkpoint", run_dir, "--weights", "ema", "--n", "8"],
                 ["export", "--robustbench", run_dir, str(tmp_path / "x"), "--weights", "ema"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no weight average" in err[0], err
    assert main(["export", "--robustbench", run_dir, str(tmp_path / "x")]) == 2  # tiny CNN
    assert "no RobustBench twin" in capsys.readouterr().err
