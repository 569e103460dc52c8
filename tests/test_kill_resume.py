"""Run directories under kills and misuse: SIGKILL at any instant, locks, refusals, unsafe files.

The kill test forks the test process (torch is imported once) into a child that trains a tiny
run and is killed with SIGKILL, either by the parent after a random delay or by itself at a
chosen event: a training step, or a file write between filling the temporary file and the
rename, or just after the rename. The run is restarted until it finishes; after each kill
the run directory must be resumable and consistent, and the finished run must equal an
uninterrupted one bit for bit. pgd_at takes most of the kills; mixup adds per-epoch method
arrays (``method/epoch_XXX.npz``) and another ``best_metric`` (val_clean); pgd_at with weight
averaging (``ema_decay``) adds the average, which must resume exactly, and a best checkpoint
selected by the average's score (``ema_val_robust``).
"""
import contextlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import numpy as np
import torch

import mixlab.train as train_mod
from mixlab import fileio
from mixlab.cli import main
from mixlab.fileio import RunLock, RunLockedError
from mixlab.methods import get_method
from mixlab.runs import (CheckpointError, best_metric, load_checkpoint, load_run,
                         nonfinite_entries, train_or_load)
from mixlab.train import NonFiniteLossError, train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")

# 4 steps an epoch, a tenth of a second or so each on one CPU core. The validation scores
# (pgd_at's best_metric val_robust, mixup's val_clean) rise, tie and fall in these epochs.
TINY = dict(method="pgd_at", dataset="synthetic", model="tiny", epochs=6, batch_size=32,
            train_subset=128, val_size=128, eval_subset=64, steps=1, eval_steps=1,
            eps=2 / 255, lr=0.5, schedule="constant", seed=2, device="cpu", quiet=True)
SHORT = dict(TINY, epochs=2)
STEPS_PER_EPOCH = 4
#: history fields that an exact resume reproduces (time measurements are not among them)
DETERMINISTIC = ("epoch", "step", "lr", "train_loss", "train_acc", "val_clean", "val_robust",
                 "ema_val_clean", "ema_val_robust")
#: where a child kills itself: "step", or "<file>:written" (temporary file filled, target not
#: yet replaced) / "<file>:replaced" (renamed, folder not yet fsync-ed), where <file> is
#: "arrays" for method/epoch_XXX.npz; "delay": the parent kills it after a random delay
WRITE_EVENTS = [f"{name}:{phase}" for name in ("last.pt", "best.pt", "metrics.jsonl")
                for phase in ("written", "replaced")] + ["config.json:written",
                                                         "provenance.json:written"]
ARRAY_EVENTS = ["arrays:written", "arrays:replaced"]
KILLS_PER_RUN = 6


def _fork():
    return multiprocessing.get_context("fork")


def _training_child(config: dict, run_dir: str, kill_at: tuple | None, error_file: str) -> None:
    """Train ``config`` in ``run_dir`` (resuming what is there); SIGKILL this process at the
    ``kill_at = (event, n)``-th occurrence of an event. Errors go to ``error_file``."""
    try:
        counts: dict[str, int] = {}

        def event(kind: str) -> None:
            counts[kind] = counts.get(kind, 0) + 1
            if kill_at == (kind, counts[kind]):
                os.kill(os.getpid(), signal.SIGKILL)

        real_writer, real_lr_at = fileio.atomic_writer, train_mod.lr_at

        @contextlib.contextmanager
        def writer(path):
            name = "arrays" if str(path).endswith(".npz") else Path(path).name
            with real_writer(path) as fh:
                yield fh
                event(f"{name}:written")
            event(f"{name}:replaced")

        def lr_at(cfg, progress):  # called once before every optimiser step
            event("step")
            return real_lr_at(cfg, progress)

        fileio.atomic_writer, train_mod.lr_at = writer, lr_at
        # a forked child must not touch CUDA, which the parent may have initialised; the run
        # is on the CPU, and without this its checkpoints would save the CUDA RNG state
        torch.cuda.is_available = lambda: False
        train(run_dir=run_dir, **config)
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        os._exit(1)


def _run_child(config: dict, run_dir: Path, plan: tuple | None, error_file: Path) -> int:
    """One training process; returns its exit code (-SIGKILL when killed, 0 when finished)."""
    kill_at = plan if plan is not None and plan[0] != "delay" else None
    child = _fork().Process(target=_training_child,
                            args=(config, str(run_dir), kill_at, str(error_file)))
    child.start()
    if plan is not None and plan[0] == "delay":
        child.join(plan[1])
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
    child.join(120)
    if child.exitcode is None:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        pytest.fail(f"the training child hung (plan {plan})")
    if child.exitcode not in (0, -signal.SIGKILL):
        pytest.fail(f"the training child failed (plan {plan}):\n"
                    f"{error_file.read_text() if error_file.exists() else child.exitcode}")
    return child.exitcode


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _numbers(history: list[dict]) -> list[tuple]:
    return [tuple(h.get(k) for k in DETERMINISTIC) for h in history]


def _best_epoch(history: list[dict], metric: str) -> int | None:
    """1-based epoch with the highest score, the earliest of ties; None without scores."""
    scored = [(h[metric], -h["epoch"]) for h in history if h.get(metric) is not None]
    return -max(scored)[1] if scored else None


def _assert_bitwise_equal(state_a: dict, state_b: dict) -> None:
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def _assert_same_average(ckpt_a: dict, ckpt_b: dict) -> None:
    """The weight averages of two checkpoints (None without ema_decay) are the same."""
    ema_a, ema_b = ckpt_a.get("ema"), ckpt_b.get("ema")
    assert (ema_a is None) == (ema_b is None)
    if ema_a is not None:
        assert ema_a["num_updates"] == ema_b["num_updates"]
        _assert_bitwise_equal(ema_a["model"], ema_b["model"])


def _arrays(run_dir: Path) -> list[dict[str, np.ndarray]]:
    return load_run(run_dir, which="last").method_arrays()


def _check_killed_run(run_dir: Path, reference: list[dict], done_before: int,
                      metric: str) -> int:
    """What a kill may leave: last.pt (the commit point) loads and holds epochs 1..k exactly
    as the uninterrupted run computed them, no fewer than before; metrics.jsonl and best.pt
    are at most one epoch behind it (a resume rebuilds them). Returns k."""
    if not (run_dir / "last.pt").exists():
        assert done_before == 0, "a completed epoch was lost"
        assert not (run_dir / "best.pt").exists()
        assert _records(run_dir / "metrics.jsonl") == []
        return 0
    ckpt = load_checkpoint(run_dir / "last.pt")
    history = ckpt["history"]
    k = len(history)
    assert [h["epoch"] for h in history] == list(range(1, k + 1))
    assert ckpt["epoch"] + 1 == k and k >= done_before, "a completed epoch was lost"
    assert _numbers(history) == _numbers(reference[:k])
    assert _records(run_dir / "metrics.jsonl") in (history, history[:-1])
    best = run_dir / "best.pt"
    best_epoch = load_checkpoint(best)["epoch"] + 1 if best.exists() else None
    assert best_epoch in (_best_epoch(history, metric), _best_epoch(history[:-1], metric))
    return k


def _check_finished_run(run_dir: Path, reference_dir: Path, reference_model,
                        metric: str) -> None:
    """A finished run equals the uninterrupted one: weights bit for bit, every epoch once."""
    last = load_checkpoint(run_dir / "last.pt")
    history = last["history"]
    ref_last = load_checkpoint(reference_dir / "last.pt")
    assert [h["epoch"] for h in history] == list(range(1, TINY["epochs"] + 1))
    assert _records(run_dir / "metrics.jsonl") == history
    assert _numbers(history) == _numbers(ref_last["history"])
    _assert_bitwise_equal(last["model"], reference_model.state_dict())
    _assert_bitwise_equal(last["model"], ref_last["model"])
    _assert_same_average(last, ref_last)
    best, ref_best = (load_checkpoint(d / "best.pt") for d in (run_dir, reference_dir))
    assert best["epoch"] + 1 == _best_epoch(history, metric) == ref_best["epoch"] + 1
    _assert_bitwise_equal(best["model"], ref_best["model"])
    _assert_same_average(best, ref_best)
    arrays, ref_arrays = _arrays(run_dir), _arrays(reference_dir)
    assert len(arrays) == len(ref_arrays)
    for got, want in zip(arrays, ref_arrays):
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in got)
    leftovers = list(run_dir.glob(".*.tmp")) + list(run_dir.glob("method/.*.tmp"))
    assert not leftovers, "temporary files of killed writers are left"


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, kills", [("pgd_at", {}, 24), ("mixup", {}, 8),
                                                  ("pgd_at", {"ema_decay": 0.5}, 8)],
                         ids=["pgd_at", "mixup", "pgd_at-ema"])
def test_sigkill_at_random_instants_then_resume_equals_an_uninterrupted_run(tmp_path, method,
                                                                            extra, kills):
    config = dict(TINY, method=method, **extra)
    metric = best_metric(config)
    train(**{**config, "epochs": 1})  # warm up, so that the reference run's time means something
    t0 = time.perf_counter()
    reference_model, reference = train(run_dir=str(tmp_path / "reference"), **config)
    seconds = time.perf_counter() - t0  # for the delays: setup takes about one epoch

    rng = random.Random(20240611)
    pool = ["delay"] * 5 + ["step"] * 5 + WRITE_EVENTS * 2
    if _arrays(tmp_path / "reference"):
        pool += ARRAY_EVENTS * 2
    rng.shuffle(pool)
    landed, runs = [], 0
    while len(landed) < kills:
        run_dir, done, kills_here = tmp_path / f"run{runs}", 0, 0
        while True:
            plan = None
            if kills_here < KILLS_PER_RUN and len(landed) < kills and done < TINY["epochs"]:
                kind, left = pool[len(landed) % len(pool)], TINY["epochs"] - done
                if kind == "delay":
                    plan = ("delay", rng.uniform(0, seconds * (left + 1) / TINY["epochs"]))
                elif kind == "step":
                    plan = ("step", rng.randint(1, STEPS_PER_EPOCH * left))
                elif kind.startswith(("last.pt", "metrics.jsonl", "arrays")):
                    plan = (kind, rng.randint(1, left))
                else:  # best.pt (written when the score improves or when repaired), config
                    plan = (kind, 1)
            code = _run_child(config, run_dir, plan, tmp_path / f"error{runs}.txt")
            if code == 0:
                break
            kills_here += 1
            landed.append(plan[0])
            done = _check_killed_run(run_dir, reference, done, metric)
        _check_finished_run(run_dir, tmp_path / "reference", reference_model, metric)
        runs += 1
        assert runs <= 2 + 4 * kills // KILLS_PER_RUN, f"only {len(landed)} kills in {runs} runs"
    during_writes = [p for p in landed if p.endswith(":written")]
    assert len(during_writes) >= kills // 5, landed


def _hold_lock(run_dir: str, ready, release) -> None:
    with RunLock(run_dir):
        ready.set()
        release.wait(60)
    os._exit(0)


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every run file (the lock file aside)."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def test_a_second_training_in_a_locked_run_dir_gets_one_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # another training in this process
        with pytest.raises(RunLockedError, match="locked") as info:
            train(run_dir=str(run_dir), **SHORT)
    assert str(run_dir) in str(info.value)
    assert [p.name for p in run_dir.iterdir()] == [".lock"]

    ready, release = _fork().Event(), _fork().Event()
    holder = _fork().Process(target=_hold_lock, args=(str(run_dir), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError, match=f"process {holder.pid}"):
            train(run_dir=str(run_dir), **SHORT)
        assert main(["train", "--dataset", "synthetic", "--profile", "smoke", "--epochs", "1",
                     "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mixlab: error:") and "locked" in err[0]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert [p.name for p in run_dir.iterdir()] == [".lock"]
    with RunLock(run_dir):  # the kernel dropped the killed holder's lock
        pass


def test_resume_with_other_settings_is_refused_with_the_difference(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_dir=str(run_dir), stop_after=1, **SHORT)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="other settings") as info:
        train(run_dir=str(run_dir), **{**SHORT, "lr": 0.25, "steps": 2})
    message = str(info.value)
    assert "lr: 0.5 -> 0.25" in message and "steps: 1 -> 2" in message
    assert "overwrite=True" in message
    assert _snapshot(run_dir) == before

    args = ["train", "--dataset", "synthetic", "--run-dir", str(run_dir), "--lr", "0.25"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in SHORT.items()
             if k not in ("method", "dataset", "lr")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlab: error:") and "lr: 0.5 -> 0.25" in err[0]
    assert _snapshot(run_dir) == before

    _, history = train(run_dir=str(run_dir), overwrite=True, **{**SHORT, "lr": 0.25})
    assert [h["epoch"] for h in history] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.25
    assert load_checkpoint(run_dir / "last.pt")["config"]["lr"] == 0.25
    assert _records(run_dir / "metrics.jsonl") == history


def test_resume_with_another_method_hyperparameter_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    mixup = dict(SHORT, method="mixup", method_hp={"alpha": 1.0})
    train(run_dir=str(run_dir), stop_after=1, **mixup)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"method_hp\.alpha: 1\.0 -> 0\.2"):
        train(run_dir=str(run_dir), **{**mixup, "method_hp": {"alpha": 0.2}})
    assert _snapshot(run_dir) == before


def test_resume_false_on_an_existing_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir=str(run_dir), stop_after=1, **SHORT)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="epoch 1 of 2.*resume=True.*overwrite=True"):
        train(run_dir=str(run_dir), resume=False, **SHORT)
    assert _snapshot(run_dir) == before


def test_a_finished_run_is_never_silently_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    model, history = train(run_dir=str(run_dir), **SHORT)
    before = _snapshot(run_dir)
    again, history_again = train(run_dir=str(run_dir), **SHORT)  # nothing left to train
    assert _numbers(history_again) == _numbers(history)
    _assert_bitwise_equal(again.state_dict(), model.state_dict())
    train_or_load(run_dir=run_dir, **SHORT)
    assert _snapshot(run_dir) == before, "a finished run's files were rewritten"
    with pytest.raises(CheckpointError, match="epochs: 2 -> 3"):
        train(run_dir=str(run_dir), **{**SHORT, "epochs": 3})
    with pytest.raises(CheckpointError, match="epoch 2 of 2"):
        train(run_dir=str(run_dir), resume=False, **SHORT)
    with pytest.raises(CheckpointError, match="other settings"):
        train_or_load(run_dir=run_dir, **{**SHORT, "seed": 3})
    assert main(["train", "--dataset", "synthetic", "--run-dir", str(run_dir),
                 "--set", "seed=3"] + [f"--set={k}={json.dumps(v)}" for k, v in SHORT.items()
                                       if k not in ("method", "dataset", "seed")]) == 2
    assert "seed: 2 -> 3" in capsys.readouterr().err
    assert _snapshot(run_dir) == before


def test_load_run_best_without_a_validation_split_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_dir=str(run_dir), **{**SHORT, "epochs": 1, "val_size": 0, "eval_subset": None})
    assert not (run_dir / "best.pt").exists()
    with pytest.raises(CheckpointError, match="without a validation split.*which='last'"):
        load_run(run_dir)
    assert load_run(run_dir, which="last").epoch == 1
    assert main(["eval", "--checkpoint", str(run_dir), "--n", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation split" in err[0]


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir=str(run_dir), **{**SHORT, "epochs": 1})
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / name, weights_only=True)
        ckpt["model"]["net.fc.weight"][0, 0] = float("nan")
        torch.save(ckpt, run_dir / name)
    for which in ("best", "last"):
        with pytest.raises(CheckpointError, match=r"non-finite.*net\.fc\.weight"):
            load_run(run_dir, which=which)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_run(run_dir / "last.pt")


class _Exploit:
    """Unpickling this object runs code: it writes the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_a_malicious_checkpoint_is_refused_without_running(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    train(run_dir=str(run_dir), **{**SHORT, "epochs": 1})
    evil = dict(load_checkpoint(run_dir / "last.pt"), model=_Exploit(marker))
    for name in ("last.pt", "best.pt"):
        torch.save(evil, run_dir / name)
    torch.load(run_dir / "last.pt", weights_only=False)  # an ordinary load runs the code
    assert marker.exists()
    marker.unlink()
    evil_bytes = (run_dir / "last.pt").read_bytes()

    cli = subprocess.run([sys.executable, "-m", "mixlab", "eval", "--checkpoint", str(run_dir),
                          "--attacks", "clean", "--n", "8"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = cli.stderr.strip().splitlines()
    assert cli.returncode == 2 and len(err) == 1, cli.stderr
    assert err[0].startswith("mixlab: error:") and "cannot be read safely" in err[0]
    for call in (lambda: load_run(run_dir), lambda: load_run(run_dir, which="last"),
                 lambda: load_run(run_dir / "last.pt"),
                 lambda: train(run_dir=str(run_dir), **SHORT),  # resume
                 lambda: train_or_load(run_dir=run_dir, **SHORT)):
        with pytest.raises(CheckpointError, match="cannot be read safely"):
            call()
    assert not marker.exists(), "the checkpoint's code ran"
    assert (run_dir / "last.pt").read_bytes() == evil_bytes


@pytest.mark.parametrize("diverges", ["in the first epoch", "in the second epoch"])
def test_a_nonfinite_run_keeps_finite_checkpoints_and_writes_nonfinite_pt(tmp_path, diverges):
    run_dir = tmp_path / "run"
    bad = (dict(lr=1e30) if diverges == "in the first epoch" else  # lr x 1e30 after epoch 1
           dict(schedule="piecewise", milestones=[0.5], lr_factors=[1e30]))
    with pytest.raises(NonFiniteLossError, match="NaN/inf") as info:
        train(run_dir=str(run_dir), check_every=1, **{**SHORT, **bad})
    assert str(run_dir / "nonfinite.pt") in str(info.value)
    stopped = load_checkpoint(run_dir / "nonfinite.pt")
    assert stopped["step"] >= 1
    first = diverges == "in the first epoch"
    assert (run_dir / "last.pt").exists() is not first
    assert (run_dir / "best.pt").exists() is not first
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            ckpt = load_checkpoint(run_dir / name)
            assert ckpt["epoch"] == 0 and nonfinite_entries(ckpt["model"]) == []
    if not first:
        assert _records(run_dir / "metrics.jsonl") == load_run(run_dir, which="last").history


def test_the_command_line_exits_3_on_a_nonfinite_loss(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--run-dir", str(tmp_path / "run"),
            "--lr", "1e30", "--set", "check_every=1"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in SHORT.items()
             if k not in ("method", "dataset", "lr")]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixlab: error:") and "nonfinite.pt" in err[0]
    assert (tmp_path / "run" / "nonfinite.pt").exists()


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.5}], ids=["raw", "ema"])
def test_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path, extra):
    """The window a random kill rarely hits: last.pt of an epoch that is the best so far is
    written, best.pt still holds an older epoch. Resuming must make best.pt that epoch. With
    weight averaging the average's score decides (the raw model's best is another epoch)."""
    run_dir, config = tmp_path / "run", dict(SHORT, **extra)
    train(run_dir=str(run_dir), **config)
    last = load_checkpoint(run_dir / "last.pt")
    metric = best_metric(last["config"])
    raw_metric = get_method(last["config"]["method"]).best_metric
    for i, record in enumerate(last["history"]):  # make the final epoch the clear best
        record[metric] = 1.0 if i == last["epoch"] else 0.0
        if metric != raw_metric:
            record[raw_metric] = 0.0 if i == last["epoch"] else 1.0
    torch.save(last, run_dir / "last.pt")
    stale = dict(last, epoch=0)  # best.pt as left by the kill: an older epoch
    torch.save(stale, run_dir / "best.pt")
    train(run_dir=str(run_dir), **config)  # finished: nothing trains, the files are repaired
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == last["epoch"]
