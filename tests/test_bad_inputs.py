"""Bad inputs get one clear error that names the bad value, before anything is written.

Command line: ``mixlab.cli.main([...])`` returns 2 and prints exactly one line, starting with
``mixlab: error:`` (no usage text, no traceback). Every ``train`` case runs twice: with a run
directory that does not exist (it must not be created) and with a finished run's directory
(its files must keep their bytes, ``config.json`` included). API: ``resolve_config``,
``train``, ``evaluate``, ``pgd``, ``fgsm`` and ``load_run`` raise ``ValueError``,
``TypeError`` or ``CheckpointError`` whose message names the bad value.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mixlab.attacks import fgsm, pgd
from mixlab.cli import main
from mixlab.config import resolve_config
from mixlab.evaluate import evaluate
from mixlab.models import build_model
from mixlab.runs import CheckpointError, load_run
from mixlab.train import train

RUN = dict(method="pgd_at", dataset="synthetic", model="tiny", epochs=1, batch_size=32,
           train_subset=128, val_size=128, eval_subset=32, steps=1, eval_steps=1, device="cpu",
           quiet=True)
#: the command line's version of a quick run; each case appends its bad arguments
TRAIN = ["train", "--dataset", "synthetic", "--profile", "smoke", "--epochs", "1",
         "--set", "train_subset=128", "--set", "quiet=true"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run that the cases point at and must leave as it was."""
    run_dir = tmp_path_factory.mktemp("bad_inputs") / "run"
    train(run_dir=str(run_dir), **RUN)
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _one_error_line(capsys, names: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mixlab: error:"), lines[0]
    assert names.lower() in lines[0].lower(), (names, lines[0])
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# ----------------------------------------------------------------------------- command line
CLI_TRAIN = [  # (extra arguments, text the error line must contain)
    (["--epochs", "0"], "epochs=0"),
    (["--epochs", "-3"], "epochs=-3"),
    (["--epochs", "2.5"], "'2.5'"),
    (["--set", "epochs=abc"], "epochs='abc'"),
    (["--set", "epochs=true"], "epochs=True"),
    (["--set", "norm=L3"], "norm='L3'"),
    (["--norm", "L3"], "'L3'"),
    (["--set", "steps=0"], "steps=0"),
    (["--set", "step_size=0"], "step_size=0"),
    (["--set", "step_size=-0.01"], "step_size=-0.01"),
    (["--set", "eval_steps=-1"], "eval_steps=-1"),
    (["--set", "eps=NaN"], "eps=nan"),
    (["--set", "step_size=Infinity"], "step_size=inf"),
    (["--set", "eps=8"], "eps=8"),
    (["--eps", "8"], "eps=8"),
    (["--eps", "abc"], "'abc'"),
    (["--eps", "1/0"], "'1/0'"),
    (["--eps", "-0.1"], "'-0.1'"),
    (["--set", "eps=0"], "eps=0"),
    (["--set", "eps=-0.1"], "eps=-0.1"),
    (["--method", "mixup", "--set", "mixup.alpha=0"], "alpha=0"),
    (["--method", "mixup", "--set", "mixup.alpha=NaN"], "alpha=nan"),
    (["--method", "mixup", "--set", "mixup.alpha=abc"], "alpha='abc'"),
    (["--method", "mixup", "--set", "mixup.nope=1"], "nope"),
    (["--method", "mixup", "--set", "amp.alpha=1"], "amp.alpha=1"),
    (["--set", "mixup.alpha=1"], "mixup.alpha=1"),
    (["--set", "pgd_at.alpha=1"], "alpha"),
    (["--method", "mixup", "--set", "mixup.steps=3"], "steps"),
    (["--method", "gairat", "--set", "gairat.weight_fn=relu"], "'relu'"),
    (["--method", "mma", "--set", "mma.d_max=0.1", "--set", "mma.clean_coeff=2"],
     "clean_coeff=2"),
    (["--method", "amp", "--set", "amp.lam_min=0.9", "--set", "amp.lam_max=0.1"],
     "lam_min=0.9"),
    (["--method", "nope"], "'nope'"),
    (["--dataset", "imagenet"], "'imagenet'"),
    (["--model", "resnet1000"], "'resnet1000'"),
    (["--profile", "tiny"], "'tiny'"),
    (["--set", "profile=tiny"], "profile='tiny'"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--batch-size", "5000"], "batch_size=5000"),
    (["--set", "val_size=2048"], "val_size=2048"),
    (["--set", "val_size=-1"], "val_size=-1"),
    (["--lr", "0"], "lr=0"),
    (["--lr", "-0.1"], "lr=-0.1"),
    (["--lr", "nan"], "'nan'"),
    (["--set", "lr=1e400"], "lr=inf"),
    (["--set", "milestones=[0.8,0.5]"], "[0.8, 0.5]"),
    (["--set", "milestones=[0.5,1.5]"], "[0.5, 1.5]"),
    (["--set", "milestones=0.5"], "milestones=0.5"),
    (["--set", "lr_factors=[0.1]"], "lr_factors [0.1]"),
    (["--set", "lr_factors=[0.1,-1]"], "[0.1, -1.0]"),
    (["--set", "momentum=1.5"], "momentum=1.5"),
    (["--device", "gpu"], "'gpu'"),
    (["--device", "cuda:x"], "'cuda:x'"),
    (["--set", "weight_decay=-1"], "weight_decay=-1"),
    (["--set", "train_subset=0"], "train_subset=0"),
    (["--set", "train_subset=5000"], "train_subset=5000"),
    (["--set", "val_size=0", "--set", "eval_subset=10"], "eval_subset=10"),
    (["--set", "eval_subset=0"], "eval_subset=0"),
    (["--set", "gamma=2"], "gamma"),
    (["--set", "epochs"], "'epochs'"),
    (["--set", "seed=1.5"], "seed=1.5"),
    (["--seed", "-1"], "seed=-1"),
    (["--set", "nesterov=yes"], "nesterov='yes'"),
    (["--set", "bf16=1"], "bf16=1"),
    (["--set", "schedule=linear"], "'linear'"),
    (["--set", "optimizer=rmsprop"], "'rmsprop'"),
    (["--set", "warmup=1"], "warmup=1"),
    (["--set", "check_every=0"], "check_every=0"),
    (["--set", "eval_every=0"], "eval_every=0"),
    (["--set", "stop_after=10"], "stop_after=10"),
    (["--set", "data_root=5"], "data_root=5"),
    (["--set", "method=mixup"], "method=mixup"),
    (["--set", "run_dir=null"], "run_dir=null"),
    (["--bogus-flag"], "--bogus-flag"),
]


@pytest.mark.parametrize("extra, names", CLI_TRAIN, ids=[" ".join(a) for a, _ in CLI_TRAIN])
def test_cli_train_bad_input_is_one_line_and_writes_nothing(extra, names, finished_run, tmp_path,
                                                           capsys):
    fresh = tmp_path / "fresh"
    assert main(TRAIN + extra + ["--run-dir", str(fresh)]) == 2
    _one_error_line(capsys, names)
    assert not fresh.exists()
    before = _snapshot(finished_run)
    assert main(TRAIN + extra + ["--run-dir", str(finished_run)]) == 2
    _one_error_line(capsys, names)
    assert _snapshot(finished_run) == before


def test_cli_run_dir_that_is_empty_or_a_file(tmp_path, capsys):
    assert main(TRAIN + ["--run-dir", ""]) == 2
    _one_error_line(capsys, "run_dir=''")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    assert main(TRAIN + ["--run-dir", str(afile)]) == 2
    _one_error_line(capsys, str(afile))
    assert afile.read_text() == "keep me"


CLI_OTHER = [  # ({run}: the finished run, {tmp}: an empty folder)
    (["eval", "--checkpoint", "{tmp}/missing"], "missing"),
    (["eval", "--checkpoint", "{run}/config.json"], "config.json"),
    (["eval", "--checkpoint", "{run}", "--n", "-5"], "-5"),
    (["eval", "--checkpoint", "{run}", "--n", "abc"], "'abc'"),
    (["eval", "--checkpoint", "{run}", "--attacks", "pgd7"], "pgd7"),
    (["eval", "--checkpoint", "{run}", "--attacks", "clean,PGD20"], "PGD20"),
    (["eval", "--checkpoint", "{run}", "--attacks", ","], "','"),
    (["eval", "--checkpoint", "{run}", "--eps", "abc"], "'abc'"),
    (["eval", "--checkpoint", "{run}", "--eps", "8"], "eps=8"),
    (["eval", "--checkpoint", "{run}", "--eps", "-1"], "'-1'"),
    (["eval", "--checkpoint", "{run}", "--norm", "L3"], "'L3'"),
    (["eval", "--checkpoint", "{run}", "--batch-size", "0"], "--batch-size 0"),
    (["eval", "--checkpoint", "{run}", "--which", "middle"], "'middle'"),
    (["eval", "--checkpoint", "{run}", "--device", "gpu"], "'gpu'"),
    (["eval"], "--checkpoint"),
    (["bogus"], "'bogus'"),
    ([], "command"),
    (["download", "imagenet"], "'imagenet'"),
    (["prepare", "--from", "{tmp}/nowhere"], "nowhere"),
]


@pytest.mark.parametrize("args, names", CLI_OTHER,
                         ids=[" ".join(a) or "(none)" for a, _ in CLI_OTHER])
def test_cli_other_bad_input_is_one_line(args, names, finished_run, tmp_path, capsys):
    args = [a.replace("{run}", str(finished_run)).replace("{tmp}", str(tmp_path)) for a in args]
    before = _snapshot(finished_run)
    assert main(args) == 2
    _one_error_line(capsys, names)
    assert _snapshot(finished_run) == before and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- settings
RESOLVE = [  # (settings, error type, text the message must contain)
    (dict(epochs=0), ValueError, "epochs=0"),
    (dict(epochs=True), TypeError, "epochs=True"),
    (dict(epochs="3"), TypeError, "epochs='3'"),
    (dict(epochs=2.5), TypeError, "epochs=2.5"),
    (dict(lr=float("nan")), ValueError, "lr=nan"),
    (dict(lr=0), ValueError, "lr=0"),
    (dict(lr=-0.1), ValueError, "lr=-0.1"),
    (dict(lr="0.1"), TypeError, "lr='0.1'"),
    (dict(eps=8), ValueError, "eps=8"),
    (dict(eps=-1 / 255), ValueError, "eps=-0.0039"),
    (dict(eps=float("inf")), ValueError, "eps=inf"),
    (dict(norm="L3"), ValueError, "'L3'"),
    (dict(steps=0), ValueError, "steps=0"),
    (dict(step_size=0), ValueError, "step_size=0"),
    (dict(eval_steps=-2), ValueError, "eval_steps=-2"),
    (dict(momentum=1.5), ValueError, "momentum=1.5"),
    (dict(device="gpu"), ValueError, "'gpu'"),
    (dict(weight_decay=-1), ValueError, "weight_decay=-1"),
    (dict(train_subset=0), ValueError, "train_subset=0"),
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(val_size=0, eval_subset=5), ValueError, "eval_subset=5"),
    (dict(milestones=[0.8, 0.5]), ValueError, "[0.8, 0.5]"),
    (dict(lr_factors=[0.1]), ValueError, "[0.1]"),
    (dict(milestones="0.5"), TypeError, "'0.5'"),
    (dict(milestones=[0.5, float("nan")], lr_factors=[0.1, 0.01]), TypeError, "nan"),
    (dict(method="nope"), ValueError, "'nope'"),
    (dict(method=3), TypeError, "method=3"),
    (dict(dataset="imagenet"), ValueError, "'imagenet'"),
    (dict(model="resnet1000"), ValueError, "'resnet1000'"),
    (dict(profile="tiny"), ValueError, "'tiny'"),
    (dict(gamma=3), ValueError, "gamma"),
    (dict(run_dir=""), ValueError, "run_dir=''"),
    (dict(optimizer="rmsprop"), ValueError, "'rmsprop'"),
    (dict(stop_after=5, epochs=2), ValueError, "stop_after=5"),
    (dict(seed=-1), ValueError, "seed=-1"),
    (dict(method="mixup", method_hp={"nope": 1}), ValueError, "nope"),
    (dict(method="mixup", method_hp={"steps": 3}), ValueError, "steps"),
    (dict(method="mixup", method_hp=[1]), TypeError, "[1]"),
    (dict(method="mixup", method_hp={"alpha": 0}), ValueError, "alpha=0"),
    (dict(method="pgd_at", method_hp={"alpha": 1}), ValueError, "alpha"),
    (dict(method="gairat", method_hp={"weight_fn": "relu"}), ValueError, "'relu'"),
    (dict(method="mma", method_hp={"clean_coeff": 2}), ValueError, "clean_coeff=2"),
    (dict(method="amp", method_hp={"lam_min": 0.9, "lam_max": 0.1}), ValueError,
     "lam_min=0.9"),
]


@pytest.mark.parametrize("bad, error, names", RESOLVE,
                         ids=[json.dumps(b, default=str) for b, _, _ in RESOLVE])
def test_resolve_config_names_the_bad_value(bad, error, names):
    with pytest.raises(error) as info:
        resolve_config(**bad)
    assert names.lower() in str(info.value).lower()


def test_numpy_numbers_are_settings_like_any_other():
    cfg = resolve_config(epochs=np.int64(3), lr=np.float32(0.25), milestones=[np.float64(0.5)],
                         lr_factors=[0.1])
    assert (cfg["epochs"], cfg["lr"], cfg["milestones"]) == (3, 0.25, [0.5])
    assert type(cfg["epochs"]) is int and type(cfg["lr"]) is float
    json.dumps(cfg)  # config.json holds plain numbers


TRAIN_BAD = [  # found once the data is loaded, still before the run directory is touched
    (dict(batch_size=5000), ValueError, "batch_size=5000"),
    (dict(val_size=2048), ValueError, "val_size=2048"),
    (dict(train_subset=5000), ValueError, "train_subset=5000"),
    (dict(epochs=0), ValueError, "epochs=0"),
    (dict(method_hp={"alpha": 1}), ValueError, "alpha"),
]


@pytest.mark.parametrize("bad, error, names", TRAIN_BAD,
                         ids=[json.dumps(b) for b, _, _ in TRAIN_BAD])
def test_train_bad_input_writes_nothing(bad, error, names, finished_run, tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(error) as info:
        train(run_dir=str(fresh), **{**RUN, **bad})
    assert names.lower() in str(info.value).lower() and not fresh.exists()
    before = _snapshot(finished_run)
    with pytest.raises(error):
        train(run_dir=str(finished_run), **{**RUN, **bad})
    assert _snapshot(finished_run) == before


def test_train_into_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    with pytest.raises(ValueError, match="is a file"):
        train(run_dir=str(afile), **RUN)
    assert afile.read_text() == "keep me"


# ----------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", 10, 3).eval()


def _xy(n=8):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,),
                                                                          generator=generator)


X, Y = _xy()
EVALUATE = [  # (arguments, error type, text the message must contain)
    (dict(x=(X * 255).to(torch.uint8)), TypeError, "uint8"),
    (dict(x=X * 255), ValueError, "255"),
    (dict(y=torch.full((8,), 10)), ValueError, "label 10"),
    (dict(y=torch.full((8,), -1)), ValueError, "-1"),
    (dict(y=Y[:5]), ValueError, "(5,)"),
    (dict(y=Y.float()), TypeError, "float32"),
    (dict(attacks=("pgd7",)), ValueError, "pgd7"),
    (dict(attacks="clean"), TypeError, "'clean'"),
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(eps=float("nan")), ValueError, "eps=nan"),
    (dict(eps=8), ValueError, "eps=8"),
    (dict(norm="L3"), ValueError, "'L3'"),
]


@pytest.mark.parametrize("bad, error, names", EVALUATE,
                         ids=[" ".join(map(str, b)) + f":{n}" for b, _, n in EVALUATE])
def test_evaluate_names_the_bad_value_and_writes_nothing(bad, error, names, model, tmp_path):
    args = dict(x=X, y=Y, attacks=("clean", "pgd10"), eps=8 / 255, norm="Linf", batch_size=4)
    args.update(bad)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error) as info:
        evaluate(model, x, y, run_dir=tmp_path / "eval", **args)
    assert names.lower() in str(info.value).lower()
    assert not (tmp_path / "eval").exists()


ATTACK = [  # (attack, arguments, error type, text the message must contain)
    (pgd, dict(x=X * 3 - 1), ValueError, "[-1, 2]"),
    (pgd, dict(steps=0), ValueError, "steps=0"),
    (pgd, dict(steps=2.0), TypeError, "2.0"),
    (pgd, dict(eps=float("nan")), ValueError, "eps=nan"),
    (pgd, dict(step_size=float("nan")), ValueError, "step_size=nan"),
    (pgd, dict(eps=8), ValueError, "eps=8"),
    (pgd, dict(norm="L3"), ValueError, "'L3'"),
    (pgd, dict(restarts=0), ValueError, "restarts=0"),
    (pgd, dict(y=Y.float()), TypeError, "float32"),
    (pgd, dict(y=torch.full((8,), 10)), ValueError, "label 10"),
    (pgd, dict(y=Y[:5]), ValueError, "(5,)"),
    (pgd, dict(loss="mse"), ValueError, "'mse'"),
    (fgsm, dict(x=(X * 255).to(torch.uint8)), TypeError, "uint8"),
    (fgsm, dict(eps=-1), ValueError, "eps=-1"),
    (fgsm, dict(eps="8/255"), TypeError, "'8/255'"),
]
ATTACK_CASES = [pytest.param(*case, id=f"{case[0].__name__}:{case[3]}") for case in ATTACK] + [
    pytest.param(pgd, dict(x=X[0], y=Y[:3]), ValueError, "(3, 32, 32)", id="pgd:unbatched image"),
]


@pytest.mark.parametrize("attack, bad, error, names", ATTACK_CASES)
def test_attack_names_the_bad_value(attack, bad, error, names, model):
    args = dict(x=X, y=Y, eps=8 / 255)
    if attack is pgd:
        args.update(step_size=2 / 255, steps=3)
    args.update(bad)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error) as info:
        attack(model, x, y, **args)
    assert names.lower() in str(info.value).lower()


# ----------------------------------------------------------------------------- load_run
LOAD_RUN = [  # ({run}: the finished run)
    (dict(path="{run}", which="middle"), ValueError, "'middle'"),
    (dict(path="{run}/missing"), CheckpointError, "missing"),
    (dict(path="{run}/config.json"), CheckpointError, "config.json"),
    (dict(path=5), TypeError, "path=5"),
    (dict(path="{run}", num_classes=100), CheckpointError, "not 100"),
]


@pytest.mark.parametrize("bad, error, names", LOAD_RUN, ids=[n for _, _, n in LOAD_RUN])
def test_load_run_names_the_bad_value(bad, error, names, finished_run):
    args = dict(bad)
    if isinstance(args["path"], str):
        args["path"] = args["path"].replace("{run}", str(finished_run))
    before = _snapshot(finished_run)
    with pytest.raises(error) as info:
        load_run(**args)
    assert names.lower() in str(info.value).lower()
    assert _snapshot(finished_run) == before
