"""The command line: a real training run, evaluation, info, and one clear error per bad input."""
import subprocess
import sys

import pytest

from mixlab.cli import main


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
    assert "| pgd_at |" in out and "n=64" in out


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet", "--run-dir", "x"], "unknown dataset"),
    (["train", "--method", "nope", "--run-dir", "x"], "unknown method"),
    (["train", "--model", "resnet1000", "--dataset", "synthetic", "--profile", "smoke",
      "--run-dir", "{tmp}/m"], "unknown model"),
    (["train", "--eps", "8", "--run-dir", "x"], "pixel space"),
    (["train", "--set", "gamma=2", "--run-dir", "x"], "unknown setting"),
    (["eval", "--checkpoint", "{tmp}/missing"], "no checkpoint"),
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
    for sub in ("train", "eval", "info"):
        result = run_cli(sub, "--help")
        assert result.returncode == 0 and "usage" in result.stdout
    info = run_cli("info")
    assert info.returncode == 0 and "torch" in info.stdout and "data root" in info.stdout
