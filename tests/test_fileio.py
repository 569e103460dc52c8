"""mixlab.fileio: atomic writes that leave the old file intact when they fail, loads that refuse
pickled code, and the run-folder lock (in one process and across processes). Each malicious-file
test first shows that the crafted file really runs its payload under a plain unpickler, so that
a refusal means something."""

import io
import json
import os
import pathlib
import pickle
import re
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mixlab import fileio, nbtools
from mixlab.fileio import (RunLock, RunLockedError, append_line_atomic, atomic_savez,
                           atomic_torch_save, atomic_write_bytes, atomic_write_json,
                           atomic_write_text, atomic_writer, restricted_pickle_load,
                           safe_torch_load)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# --- atomic writes --------------------------------------------------------------------------------

def test_atomic_write_variants_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_bytes(tmp_path / "a.bin", b"new")  # replaces
    atomic_write_text(tmp_path / "b.txt", "h\u00e9\n")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5], "nan": float("nan")})
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "h\u00e9\n"
    text = (tmp_path / "c.json").read_text()
    assert text.startswith('{\n  "x"')  # indent=2 by default
    obj = json.loads(text)
    assert obj["x"] == [1, 2.5] and obj["nan"] != obj["nan"]  # json's default allows NaN
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json"]  # no temporary files left


def test_new_files_get_normal_permissions_and_replacements_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "new", b"x")  # the temp file starts 0o600; the result must not
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "old").write_bytes(b"x")
    os.chmod(tmp_path / "old", 0o640)
    atomic_write_bytes(tmp_path / "old", b"y")
    assert stat.S_IMODE((tmp_path / "old").stat().st_mode) == 0o640


def test_temp_file_is_in_the_same_folder_and_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "metrics.json"
    target.parent.mkdir()
    atomic_write_bytes(target, b"{}")
    file_sync = ("fsync", False)
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1
    _, src, dst = replaces[0]
    src = pathlib.Path(src)
    assert src.parent == target.parent and dst == str(target)
    assert src.name.startswith(".metrics.json.") and src.name.endswith(".tmp")
    # The data is synced before the rename, the folder after it.
    assert events.index(file_sync) < events.index(replaces[0]) < events.index(("fsync", True))


def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("how", ["replace fails", "fsync fails", "writer raises mid-way",
                                 "unserialisable json", "unpicklable torch object",
                                 "interrupted"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, how):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old content")
    if how == "replace fails":
        monkeypatch.setattr(os, "replace", _boom)
        with pytest.raises(OSError, match="simulated"):
            atomic_write_bytes(target, b"new content")
    elif how == "fsync fails":
        monkeypatch.setattr(os, "fsync", _boom)
        with pytest.raises(OSError, match="simulated"):
            atomic_write_text(target, "new content")
    elif how == "writer raises mid-way":
        with pytest.raises(ValueError, match="mid-way"):
            with atomic_writer(target) as fh:
                fh.write(b"half of the new ")
                fh.flush()
                raise ValueError("mid-way")
    elif how == "unserialisable json":
        with pytest.raises(TypeError):
            atomic_write_json(target, {"ok": 1, "bad": object()})
    elif how == "unpicklable torch object":
        with pytest.raises(Exception):
            atomic_torch_save({"w": torch.ones(1000), "f": lambda: 0}, target)
    else:  # Ctrl-C in the middle of a write
        with pytest.raises(KeyboardInterrupt):
            with atomic_writer(target) as fh:
                fh.write(b"half")
                raise KeyboardInterrupt
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["state.bin"]


def test_atomic_torch_save_round_trips_through_safe_torch_load(tmp_path):
    obj = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.float16)},
           "epoch": 7, "history": [{"loss": 1.5}], "name": "pgd", "rng": torch.get_rng_state()}
    atomic_torch_save(obj, tmp_path / "ckpt.pt")
    back = safe_torch_load(tmp_path / "ckpt.pt")
    assert back["epoch"] == 7 and back["history"] == [{"loss": 1.5}] and back["name"] == "pgd"
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["model"]["b"].dtype == torch.float16
    assert torch.equal(back["rng"], obj["rng"]) and back["model"]["w"].device.type == "cpu"
    assert _names(tmp_path) == ["ckpt.pt"]


def test_atomic_savez_keeps_the_name_and_round_trips(tmp_path):
    atomic_savez(tmp_path / "arrays.tmpdata", a=np.arange(5), b=np.eye(2, dtype=np.float32))
    assert _names(tmp_path) == ["arrays.tmpdata"]  # numpy appends .npz to a bare name; not here
    with np.load(tmp_path / "arrays.tmpdata") as z:
        assert z["a"].tolist() == [0, 1, 2, 3, 4] and z["b"].dtype == np.float32


def test_append_line_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line_atomic(path, '{"epoch": 1}')
    append_line_atomic(path, '{"epoch": 2}\n')  # a trailing newline is not doubled
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    path.write_text('{"epoch": 1}\n{"epo')  # a file torn by an older, non-atomic writer
    append_line_atomic(path, '{"epoch": 3}')
    assert path.read_text().splitlines()[-1] == '{"epoch": 3}'
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", _boom)
    with pytest.raises(OSError):
        append_line_atomic(path, '{"epoch": 4}')
    assert path.read_bytes() == before and _names(tmp_path) == ["metrics.jsonl"]


# --- loads that refuse code ------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls ``func(*args)``: what a malicious file would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    """Ways a pickle can run code, each creating ``marker`` when unpickled by a plain loader."""
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": _Payload(exec, code),
        "builtins.eval": _Payload(eval, f"exec({code!r})"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
def test_safe_torch_load_refuses_a_malicious_checkpoint(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _payloads(marker)[kind]}, path)
    # The file is live: a plain torch.load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(path)
    assert not marker.exists()


def _cifar_batch(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"batch_label": "training batch 1 of 5", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)]}


def _py2_style_pickle(obj):
    """A pickle as Python 2 wrote CIFAR's: protocol 2, arrays under ``numpy.core.multiarray``
    and pixel bytes as a (latin-1) text string, which is what reading it with
    ``encoding="latin1"`` hands to numpy."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct

    class Py2Pickler(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, np.ndarray):
                state = (1, o.shape, o.dtype, False, o.tobytes().decode("latin1"))
                return _reconstruct, (np.ndarray, (0,), "b"), state
            return NotImplemented

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    return data


@pytest.mark.parametrize("protocol", [2, 4, 5, "py2"])
def test_restricted_pickle_load_reads_a_cifar_batch(protocol):
    batch = _cifar_batch()
    if protocol == "py2":
        raw = _py2_style_pickle(batch)
    else:  # also a numpy scalar and bytes (Python 3 pickles bytes through _codecs.encode)
        batch["scalar"], batch["raw"] = np.float32(0.5), b"\x00\xff"
        raw = pickle.dumps(batch, protocol=protocol)
    back = restricted_pickle_load(io.BytesIO(raw))
    assert back["data"].dtype == np.uint8 and np.array_equal(back["data"], batch["data"])
    assert back["labels"] == batch["labels"] and back["filenames"] == batch["filenames"]
    assert back["batch_label"] == batch["batch_label"]
    if protocol != "py2":
        assert back["scalar"] == np.float32(0.5) and back["raw"] == b"\x00\xff"
    meta = {"label_names": ["airplane", "automobile"], "num_cases_per_batch": 10000}
    assert restricted_pickle_load(io.BytesIO(pickle.dumps(meta, protocol=2))) == meta


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_restricted_pickle_load_refuses_code(tmp_path, kind, protocol):
    marker = tmp_path / "pwned"
    batch = _cifar_batch()
    batch["labels"] = [1, 2, _payloads(marker)[kind]]  # hidden inside an otherwise good batch
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    with open(path, "rb") as fh:  # the file is live: a plain unpickler runs the payload
        pickle.load(fh, encoding="latin1")
    assert marker.exists()
    marker.unlink()
    with open(path, "rb") as fh, pytest.raises(pickle.UnpicklingError) as err:
        restricted_pickle_load(fh)
    # The message names the refused global (protocol 2 spells builtins as Python 2 did).
    func = kind.split(".")[1]
    assert re.search(rf"'(posix|builtins|__builtin__)\.{func}'", str(err.value)), err.value
    assert "not a CIFAR batch" in str(err.value)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_restricted_pickle_load_admits_latin1_bytes_only():
    # Python 3 writes bytes as _codecs.encode(text, "latin1") in protocol 2; other codecs refused.
    evil = _Payload(__import__("_codecs").encode, "eJzLSM3JyQcABiwCFQ==", "base64")
    with pytest.raises(pickle.UnpicklingError, match="base64"):
        restricted_pickle_load(pickle.dumps({"x": evil}, protocol=2))
    other = _Payload(np.frombuffer, b"\x00" * 8)  # numpy, but not in the list
    with pytest.raises(pickle.UnpicklingError, match="frombuffer"):
        restricted_pickle_load(pickle.dumps(other, protocol=2))


# --- the run lock ----------------------------------------------------------------------------------

def test_run_lock_in_one_process(tmp_path):
    run = tmp_path / "runs" / "a"  # created by the lock
    with RunLock(run) as lock:
        assert lock.held and (run / ".lock").exists()
        with pytest.raises(RunLockedError) as err, RunLock(run):
            pass
        msg = str(err.value)
        assert str(run) in msg and "another training" in msg
        assert "wait for it to finish or choose another run_dir" in msg.lower()
        assert isinstance(err.value, RuntimeError)
        with RunLock(tmp_path / "runs" / "b"):  # another folder is independent
            pass
    assert not lock.held
    with RunLock(run):  # released on exit
        pass
    with pytest.raises(ZeroDivisionError):
        with RunLock(run):
            1 / 0
    with RunLock(run):  # released when the block raises, too
        pass


_HOLD_LOCK = textwrap.dedent("""
    import sys
    from mixlab.fileio import RunLock, RunLockedError
    try:
        with RunLock(sys.argv[1]):
            print("locked", flush=True)
            sys.stdin.read()  # hold it until the parent closes our stdin
    except RunLockedError as err:
        print("refused:", err, flush=True)
""")


def _child(run):
    return subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_run_lock_across_processes(tmp_path):
    run = tmp_path / "run"
    child = _child(run)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match="another training is writing it") as err:
            with RunLock(run):
                pass
        assert f"process {child.pid}" in str(err.value)  # the message names the holder
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    with RunLock(run):  # free once the holder is gone
        # ... and the other way round: a child cannot take a lock this process holds.
        child = _child(run)
        out, _ = child.communicate(timeout=30)
    assert out.startswith("refused:") and str(run) in out


# --- notebook outputs ------------------------------------------------------------------------------

def test_nbtools_outputs_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    png = nbtools.save_figure(fig, "curve", profile="smoke", folder=tmp_path, extra={"n": 1})
    plt.close(fig)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads(png.with_suffix(".json").read_text())["n"] == 1
    table = nbtools.save_table({"pgd": {"acc": np.float32(0.5)}}, "tbl", profile="smoke", folder=tmp_path)
    assert json.loads(table.read_text())["table"] == {"pgd": {"acc": 0.5}}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(fileio.os, "replace", _boom)
    with pytest.raises(OSError):
        nbtools.save_table({"pgd": {"acc": 0.9}}, "tbl", profile="smoke", folder=tmp_path)
    fig, ax = plt.subplots(figsize=(2, 2))
    with pytest.raises(OSError):
        nbtools.save_figure(fig, "curve", profile="smoke", folder=tmp_path)
    plt.close(fig)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
