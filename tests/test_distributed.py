"""Training and evaluation under torchrun (mixlab.distributed), on the CPU with gloo.

One ``torchrun --nproc_per_node 2`` run of this module (``python -m tests.test_distributed
<out>``, see ``worker``) does everything that needs two processes and leaves its results in a
folder; the tests compare them with one process doing the same in the test process:

* the sharded loader hands out the slices of the one-process loader's global batches;
* two processes train the weights of one (a model without BatchNorm, 2 epochs of 4 steps)
  for every method whose randomness the split keeps (erm, pgd_at, fat, gairat, gair_fat, mma,
  trades), with GAIRAT's κ and weights and MMA's per-example ε equal too; the mixing methods
  (mixup, amp) run;
* only rank 0 writes into the run directory (an audit hook records rank 1's writes);
* a two-process checkpoint resumes in one process to the run one process trains;
* the attacks of a step stay out of DistributedDataParallel: its forward passes are the
  method's training passes, and its reducer all-reduces once per step (every method, bf16
  autocast and channels_last, inside the host-sync guard, as is the sharded loader);
* a sharded evaluation (clean, FGSM, PGD-10, CW-20, AutoAttack's APGD-CE) gives every process
  the per-image results of a one-process evaluation, and rank 0 alone writes them;
* ``python -m mixlab train`` and ``eval`` under torchrun: rank 0 alone prints.

Plus: the bench's scaling rows (``--nproc 2``); in one process, the random draws of a slice
equal the whole batch's (:class:`mixlab.distributed.share_of_batch`) and a batch that cannot
be split is refused; on two GPUs, SyncBatchNorm trains the weights of one process.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixlab import distributed
from mixlab.attacks import early_stopped_pgd, pgd
from mixlab.data import Batch, DeviceLoader, load_dataset
from mixlab.methods.mma import anpgd
from mixlab.methods.trades import trades_perturb
from mixlab.models import build_model
from mixlab.runs import load_checkpoint
from mixlab.sync import no_host_sync

REPO = Path(__file__).resolve().parents[1]

#: 64 training images in 4 steps of 16 (8 per process), 2 epochs; a validation split of 32;
#: a small learning rate keeps the model confident enough that MMA finds margins
RUN = dict(dataset="synthetic", epochs=2, batch_size=16, train_subset=64, val_size=32,
           steps=2, eval_steps=2, lr=0.005, seed=3, device="cpu", quiet=True, check_every=2)
#: methods whose randomness the split keeps: two processes train the weights of one
SAME = ("erm", "pgd_at", "fat", "gairat", "gair_fat", "mma", "trades")
#: methods that pair examples within each process's share: they run, with other pairs
PAIRED = ("mixup", "amp")
METHOD_HP = {"gairat": {"begin_epoch": 1}, "gair_fat": {"begin_epoch": 1}}
#: the runs the two processes stop after one epoch, for one process to resume
RESUMED = ("gairat", "mma")
#: training forward passes through the DistributedDataParallel wrapper per step
TRAINING_PASSES = {"erm": 1, "mixup": 1, "pgd_at": 1, "fat": 1, "gairat": 1, "gair_fat": 1,
                   "amp": 1, "mma": 2, "trades": 2}
#: ``python -m mixlab train`` as torchrun runs it (a model with BatchNorm, per process)
CLI_TRAIN = ["train", "--method", "pgd_at", "--dataset", "synthetic", "--model", "tiny",
             "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--set",
             "train_subset=32", "--set", "val_size=16", "--set", "steps=1", "--set",
             "eval_steps=1", "--set", "quiet=true"]
EVAL = dict(attacks=("clean", "fgsm", "pgd10", "cw20", "aa"), aa_attacks=["apgd-ce"],
            eps=1 / 255, batch_size=16, seed=5, progress=False)


class NoBN(nn.Module):
    """A small CNN without BatchNorm: two processes compute what one does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def features(self, x):
        return torch.flatten(nn.functional.avg_pool2d(torch.relu(self.conv(x)), 8), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def new_model() -> NoBN:
    """A NoBN whose head starts as the nearest class mean of its features (scaled): confident
    from the first step, so MMA's margins and GAIRAT's κ vary between examples."""
    torch.manual_seed(0)
    model = NoBN()
    data = load_dataset("synthetic", "train")
    with torch.no_grad():
        f = model.features(data.x.float() / 255)
        mu = torch.stack([f[data.y == k].mean(0) for k in range(10)])
        model.fc.weight.copy_(50 * mu)
        model.fc.bias.copy_(-50 * (mu * mu).sum(1) / 2)
    return model


def settings(method: str, run_dir: Path, **extra):
    return dict(RUN, method=method, method_hp=METHOD_HP.get(method), model=new_model(),
                run_dir=str(run_dir), **extra)


class Bumpy(nn.Module):
    """A linear model plus a fast oscillation: where PGD ends depends on where it starts, so
    an evaluation that seeded a chunk otherwise would get other per-image results."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 32 * 32, 10)
        self.register_buffer("v", torch.randn(10, 3 * 32 * 32))

    def forward(self, x):
        z = x.flatten(1)
        return self.lin(z) + 0.3 * torch.sin(300 * z @ self.v.T / 55)


def eval_data():
    """40 test images (chunks of 16: 0 and 32 on rank 0, 16 on rank 1) labelled as the model
    predicts them: the attacks decide every result."""
    model = Bumpy().eval()
    x = load_dataset("synthetic", "test").x[:40].float() / 255
    with torch.no_grad():
        return model, x, model(x).argmax(1)


# ----------------------------------------------------------------------------- the two processes
def _audit_writes(run_root: Path, log: list[str]):
    """Record every file this process opens for writing, renames or creates under run_root."""
    root = str(run_root)

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = (list(args) + [None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and os.fsdecode(path).startswith(root):
                log.append(f"{event} {os.fsdecode(path)}")
        elif event in ("os.rename", "os.mkdir", "os.remove") and args and \
                os.fsdecode(args[0]).startswith(root):
            log.append(f"{event} {os.fsdecode(args[0])}")
    sys.addaudithook(hook)


def _loader_slices(group, out: Path) -> None:
    train_ds = load_dataset("synthetic", "train").subset(64, seed=1)
    loader = distributed.ShardedLoader(train_ds, 16, group=group, augment=True,
                                       generator=torch.Generator().manual_seed(7))
    with no_host_sync():
        batches = [(b.idx.clone(), b.x.clone(), b.y.clone()) for b in loader]
    torch.save(batches, out / f"loader_rank{group.rank}.pt")


def _reducer_counts(group) -> dict[str, list[int]]:
    """Per method, one step of the engine under DDP on a model with BatchNorm, with the GPU
    path's bf16 autocast and channels_last and the host-sync guard: how often the wrapper's
    forward ran and how often its reducer all-reduced a bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from mixlab.methods import AttackSpec, get_method
    from mixlab.train import train_step
    counts = {}
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 10
    for name in TRAINING_PASSES:
        torch.manual_seed(0)
        model = build_model("tiny", 10, 3).to(memory_format=torch.channels_last)
        ddp = distributed.wrap(model, group)
        forwards, reductions = [0], [0]
        ddp.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

        def hook(state, bucket, reductions=reductions):
            reductions[0] += 1
            return default_hooks.allreduce_hook(None, bucket)
        ddp.register_comm_hook(None, hook)
        method = get_method(name)(num_train=16, num_classes=10, epochs=2,
                                  attack=AttackSpec(steps=2), **METHOD_HP.get(name, {}))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        ddp.train()
        with no_host_sync(), distributed.step_context(group, batch_size=16, seed=0, step=0):
            train_step(method, ddp, optimizer, Batch(x, y, torch.arange(8) + 8 * group.rank),
                       epoch=1, bf16=True)
        counts[name] = [forwards[0], reductions[0]]
    return counts


def worker(out: Path) -> None:
    """Everything the two processes do (run under torchrun; see the module docstring)."""
    from mixlab.cli import main as cli_main
    from mixlab.evaluate import evaluate
    from mixlab.train import train
    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    assert group is not None and group.world == 2
    writes: list[str] = []
    if group.rank != 0:
        _audit_writes(out / "runs", writes)
    _loader_slices(group, out)
    for method in SAME + PAIRED:
        train(**settings(method, out / "runs" / method))
    for method in RESUMED:
        train(**settings(method, out / "runs" / f"{method}-half", stop_after=1))
    model, x, y = eval_data()
    result = evaluate(model, x, y, **EVAL, run_dir=out / "runs" / "eval")
    (out / f"eval_rank{group.rank}.json").write_text(json.dumps(result["per_example"]))
    counts = _reducer_counts(group)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(CLI_TRAIN + ["--run-dir", str(out / "runs" / "cli")]) == 0
        assert cli_main(["eval", "--checkpoint", str(out / "runs" / "cli"), "--which", "last",
                         "--attacks", "clean,pgd10", "--n", "24", "--batch-size", "8",
                         "--device", "cpu"]) == 0
    (out / f"report_rank{group.rank}.json").write_text(json.dumps(
        {"writes": writes, "counts": counts, "printed": printed.getvalue()}))
    # both processes finish before either tears its group down: a peer that exits while the
    # other still talks to it can abort gloo's connection threads on a loaded machine
    torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """The folder the two processes filled (one torchrun run for the whole module)."""
    out = tmp_path_factory.mktemp("two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "tests.test_distributed", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXLAB_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The same runs in this process: the reference."""
    from mixlab.train import train
    out = tmp_path_factory.mktemp("one")
    for method in SAME:
        train(**settings(method, out / method))
    return out


# ----------------------------------------------------------------------------- the tests
def _same_state(a: dict, b: dict, what: str, tol: float = 1e-5) -> None:
    """Every tensor of ``a`` within ``tol`` of ``b``'s, ``tol`` in units of the largest value
    of ``b`` (at least 1): the order of floating-point sums differs between one process and
    two (a gradient averaged over processes), by ~1e-6 of the weights after 8 steps; a
    random start drawn otherwise moves them by ~1e-4."""
    assert a.keys() == b.keys(), what
    tensors = [v for v in b.values() if isinstance(v, torch.Tensor) and v.numel()]
    scale = max([1.0] + [v.float().abs().max().item() for v in tensors])
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, torch.Tensor):
            gap = (va.float() - vb.float()).abs().max().item() if va.numel() else 0.0
            assert gap <= tol * scale, (what, key, gap)
        elif isinstance(va, dict):
            _same_state(va, vb, f"{what}.{key}", tol)


def test_the_sharded_loader_hands_out_slices_of_the_global_batches(two):
    train_ds = load_dataset("synthetic", "train").subset(64, seed=1)
    whole = list(DeviceLoader(train_ds, 16, augment=True,
                              generator=torch.Generator().manual_seed(7)))
    parts = [torch.load(two / f"loader_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 4
    for step, batch in enumerate(whole):
        for r in (0, 1):
            idx, x, y = parts[r][step]
            rows = slice(8 * r, 8 * (r + 1))
            assert torch.equal(idx, batch.idx[rows]) and torch.equal(y, batch.y[rows])
            assert torch.equal(x, batch.x[rows]), (step, r)


@pytest.mark.parametrize("method", SAME)
def test_two_processes_train_the_weights_of_one(two, one, method):
    a = load_checkpoint(two / "runs" / method / "last.pt")
    b = load_checkpoint(one / method / "last.pt")
    _same_state(a["model"], b["model"], "weights")
    _same_state(a["method"], b["method"], "method state")   # MMA's per-example eps
    assert a["step"] == b["step"] == 8
    if method == "mma":   # margins were found, not all left at 0
        assert int((b["method"]["eps"] > 0).sum()) >= 4
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-4)
        for key in ("val_clean", "val_robust", "val_mean_margin"):
            assert ha.get(key) == pytest.approx(hb.get(key), abs=1e-6), key
    arrays = sorted((two / "runs" / method / "method").glob("*.npz"))
    assert [p.name for p in arrays] == [
        p.name for p in sorted((one / method / "method").glob("*.npz"))]
    for path in arrays:   # GAIRAT's kappa and weights, MMA's eps, per epoch
        with np.load(path) as za, np.load(one / method / "method" / path.name) as zb:
            assert za.files == zb.files
            for key in za.files:
                np.testing.assert_allclose(za[key], zb[key], atol=1e-3 if key == "weight"
                                           else 1e-5, err_msg=f"{path.name}:{key}")
            if "kappa" in zb.files:   # κ and the weights vary between examples
                assert len(np.unique(zb["kappa"])) >= 2 and len(np.unique(zb["weight"])) >= 3


@pytest.mark.parametrize("method", PAIRED)
def test_methods_that_pair_examples_run_on_two_processes(two, method):
    ckpt = load_checkpoint(two / "runs" / method / "last.pt")
    assert ckpt["step"] == 8 and all(np.isfinite(h["train_loss"]) for h in ckpt["history"])


def test_only_rank_0_writes(two):
    report = json.loads((two / "report_rank1.json").read_text())
    assert report["writes"] == []
    prov = json.loads((two / "runs" / "erm" / "provenance.json").read_text())
    assert prov["distributed"]["world_size"] == 2
    assert [r["device"] for r in prov["distributed"]["ranks"]] == ["cpu", "cpu"]


@pytest.mark.parametrize("method", RESUMED)
def test_a_two_process_checkpoint_resumes_in_one_process(two, one, method, tmp_path):
    from mixlab.train import train
    half = tmp_path / method
    half.mkdir()
    for item in (two / "runs" / f"{method}-half").iterdir():
        if item.is_file():
            (half / item.name).write_bytes(item.read_bytes())
    (half / "method").mkdir()
    for item in (two / "runs" / f"{method}-half" / "method").iterdir():
        (half / "method" / item.name).write_bytes(item.read_bytes())
    saved = load_checkpoint(half / "last.pt")
    assert saved["epoch"] == 0
    if method == "mma":   # the checkpoint holds every process's margins of epoch 1
        with np.load(one / method / "method" / "epoch_001.npz") as z:
            np.testing.assert_allclose(saved["method"]["eps"].numpy(), z["eps"], atol=1e-5)
    train(**settings(method, half))
    a, b = load_checkpoint(half / "last.pt"), load_checkpoint(one / method / "last.pt")
    _same_state(a["model"], b["model"], "weights")
    _same_state(a["method"], b["method"], "method state")


def test_the_command_line_trains_and_evaluates_under_torchrun(two):
    """``torchrun -m mixlab train`` and ``eval``: rank 0 prints the record and the table,
    rank 1 nothing; the evaluation is written once."""
    printed = [json.loads((two / f"report_rank{r}.json").read_text())["printed"] for r in (0, 1)]
    assert '"epoch": 1' in printed[0] and "| pgd_at (last, epoch 1) |" in printed[0]
    assert printed[1] == ""
    saved = json.loads((two / "runs" / "cli" / "eval_cli.json").read_text())
    assert saved["n"] == 24 and len(saved["per_example"]["pgd10"]) == 24


def test_attacks_run_outside_the_gradient_reducer(two):
    """The wrapper's forward runs only for the method's training passes (an attack through it
    would add one per PGD step), and its reducer all-reduces the one bucket once a step."""
    for rank in (0, 1):
        counts = json.loads((two / f"report_rank{rank}.json").read_text())["counts"]
        assert counts == {m: [n, 1] for m, n in TRAINING_PASSES.items()}, rank


def test_sharded_evaluation_equals_one_process(two):
    from mixlab.evaluate import evaluate
    model, x, y = eval_data()
    whole = evaluate(model, x, y, **EVAL)
    assert 0 < whole["pgd10"] < 1 and 0 < whole["cw20"] < 1   # the random starts matter
    for rank in (0, 1):
        assert json.loads((two / f"eval_rank{rank}.json").read_text()) == whole["per_example"]
    saved = json.loads((two / "runs" / "eval" / "eval.json").read_text())
    assert saved["per_example"] == whole["per_example"] and saved["n"] == 40


def test_the_bench_reports_scaling_against_one_device(tmp_path):
    """``python -m mixlab.bench --nproc 2``: each method row again on one and on two processes
    (torch's elastic launcher), images per second per device and the scaling efficiency."""
    from mixlab import bench
    from mixlab.bench_report import format_bench_table
    result = bench.run_bench(quick=True, dataset="synthetic", methods=["pgd_at"], nproc=2,
                             steps=1, repeats=1, warmup=1, train_n=128)
    rec = result["scaling"]["pgd_at"]
    assert rec["processes"] == 2 and rec["global_batch"] == 2 * rec["batch_per_device"]
    assert rec["img_per_s"] > 0 and rec["one_device_img_per_s"] > 0 and rec["finite"]
    assert rec["img_per_s_per_device"] == pytest.approx(rec["img_per_s"] / 2)
    assert rec["efficiency"] == pytest.approx(rec["img_per_s"] / 2 / rec["one_device_img_per_s"])
    assert "scaling pgd_at" in format_bench_table(result)
    with pytest.raises(ValueError, match="nproc=1 must be a whole number >= 2"):
        bench.resolve_settings(quick=True, nproc=1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_sync_batchnorm_on_two_gpus_trains_the_weights_of_one(tmp_path):
    """With SyncBatchNorm (``sync_bn=True``) two GPU processes normalise over the global batch
    as one process does: a model with BatchNorm trains the same weights (bf16 off)."""
    from mixlab.train import train
    run = dict(RUN, method="pgd_at", model="tiny", device="cuda", bf16=False, sync_bn=True)
    script = tmp_path / "train_two.py"   # what torchrun runs in each process
    script.write_text(f"from mixlab.train import train\n"
                      f"train(**{dict(run, run_dir=str(tmp_path / 'two'))!r})\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train(**dict(run, run_dir=str(tmp_path / "one")))
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("two", "one"))
    _same_state(a["model"], b["model"], "weights", tol=1e-4)


# ----------------------------------------------------------------------------- one process
def _split_equals_whole(attack, x, y, world: int = 2) -> None:
    """``attack`` on each process's slice under share_of_batch, from one seed, equals the
    attack on the whole batch."""
    torch.manual_seed(5)
    whole = attack(x, y)
    b = len(x) // world
    parts = []
    for r in range(world):
        torch.manual_seed(5)   # every process starts from the same seed
        with distributed.share_of_batch(start=r * b, size=b, total=len(x), own_seed=r):
            parts.append(attack(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b]))
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_random_starts_of_a_slice_are_the_whole_batch_s(norm, channels_last):
    model = distributed.outside_share(build_model("tiny", 10, 3).eval())
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps = 8 / 255 if norm == "Linf" else 0.5
    _split_equals_whole(lambda xb, yb: pgd(model, xb, yb, eps=eps, step_size=eps / 4,
                                           steps=2, norm=norm), x, y)


@pytest.mark.parametrize("attack", ["fat", "trades", "anpgd"])
def test_the_other_training_attacks_split_too(attack):
    model = build_model("tiny", 10, 3).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    run = {
        "fat": lambda xb, yb: early_stopped_pgd(model, xb, yb, eps=8 / 255, step_size=2 / 255,
                                                steps=3, tau=1, omega=0.001),
        "trades": lambda xb, yb: trades_perturb(model, xb, eps=8 / 255, step_size=2 / 255,
                                                steps=3),
        "anpgd": lambda xb, yb: anpgd(model, xb, yb, torch.full((len(xb),), 0.02),
                                      norm="Linf", max_eps=0.1, steps=3)[0],
    }[attack]
    _split_equals_whole(run, x, y)


def test_draws_that_cannot_be_sliced_come_from_each_process_s_own_stream():
    """A permutation of the slice differs between processes and leaves the shared generator
    where one process would; a draw unrelated to the batch is the same everywhere."""
    perms, shared, after = [], [], []
    for r in range(2):
        torch.manual_seed(0)
        with distributed.share_of_batch(start=4 * r, size=4, total=8, own_seed=100 + r):
            perms.append(torch.randperm(4))
            shared.append(torch.rand(3))
        after.append(torch.rand(1))
    assert not torch.equal(perms[0], perms[1])
    assert torch.equal(shared[0], shared[1]) and torch.equal(after[0], after[1])


def test_a_global_batch_that_does_not_divide_is_refused():
    group = distributed.Group(rank=0, world=3, local_rank=0, device=torch.device("cpu"),
                              backend="gloo")
    with pytest.raises(ValueError, match="batch_size=16 is the global batch.*multiple of 3"):
        distributed.check_batch_split(16, group)
    assert distributed.check_batch_split(18, group) == 6


def test_without_torchrun_nothing_is_wrapped(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("auto") is None
    model = build_model("tiny", 10, 3)
    assert distributed.wrap(model, None) is model
    assert distributed.my_chunks(40, 16, None) == range(0, 40, 16)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
