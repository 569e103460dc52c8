"""Writing and reading files safely: the one place mixlab does it.

Runs take hours, notebooks are interrupted, two trainings can be pointed at one folder, and data
files come from the internet. The rules below keep all of that from corrupting a run or running
someone else's code.

Writing: never in place. Every file is written to a temporary file in the *same* folder
(``.<name>.<random>.tmp``), flushed and ``fsync``-ed, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows), and the folder itself is ``fsync``-ed so that the
rename survives a power cut. A reader therefore sees either the old file or the new one, never
half of one, and a writer that fails (an exception, Ctrl-C, a full disk) leaves the old file as
it was and removes its temporary file. The temporary file must be in the same folder because a
rename is only atomic within one file system. Use :func:`atomic_writer` for anything streamed,
or one of the ``atomic_*`` helpers below. Files get the permissions a plain ``open(path, "w")``
would give them (or keep those of the file they replace).

Appending: :func:`append_line_atomic` rewrites the whole (small) file, so an append is all or
nothing. It is not a lock: two processes appending at once can lose a line, so a run's files are
written by the one process that holds the run's :class:`RunLock`.

One writer per run: :class:`RunLock` takes an exclusive ``flock`` on ``<run_dir>/.lock`` and
raises :class:`RunLockedError` when another training (another process, or another place in this
process) already holds it. The kernel drops the lock when its process dies, so a crash never
leaves a stale lock behind.

Reading: never unpickle arbitrary objects. Unpickling a file can run any code its author chose,
so a checkpoint or dataset file from elsewhere is a program, not data. :func:`safe_torch_load`
loads tensors and plain containers only (``torch.load(..., weights_only=True)``), and
:func:`restricted_pickle_load` reads CIFAR's pickled batches while refusing every Python global
except the few numpy needs to rebuild an array.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import pathlib
import pickle
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = [
    "RunLock",
    "RunLockedError",
    "append_line_atomic",
    "atomic_savez",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_writer",
    "fsync_dir",
    "restricted_pickle_load",
    "safe_torch_load",
]

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------

def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk. Best effort: platforms and file
    systems that cannot open or fsync a folder are skipped silently."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), since
    setting it to read it back races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: pathlib.Path) -> int:
    """Permissions for the new file: those of the file it replaces, else what ``open(path, "w")``
    would give (0o666 less the umask). The temporary file starts private (0o600)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing, atomically: yields a binary file object; the target is replaced
    only when the ``with`` block ends without an exception.

    The file object is a temporary file beside ``path``; on success it is flushed, fsync-ed and
    renamed over ``path`` and the folder is fsync-ed. On any exception (including Ctrl-C) the
    temporary file is removed, ``path`` is untouched and the exception propagates. The parent
    folder must exist.

    >>> with atomic_writer(tmp / "out.bin") as fh:      # doctest: +SKIP
    ...     fh.write(b"all or nothing")
    """
    path = pathlib.Path(path)
    folder = path.parent
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".tmp",
                                      delete=False)
    try:
        with tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, _target_mode(path))
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` (encoded with ``encoding``) atomically. Newlines are written
    as given (no platform translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically. ``json_kwargs`` go to :func:`json.dumps`
    (``indent=2`` unless given). The object is serialised before anything is written, so an
    unserialisable object leaves the old file as it was."""
    json_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically: a checkpoint is either the old one or the new one,
    never a truncated zip that fails to load on resume. (Argument order as ``torch.save``.)"""
    import torch  # here, so that the module imports without torch

    with atomic_writer(path) as fh:
        torch.save(obj, fh)


def atomic_savez(path: PathLike, **arrays: Any) -> None:
    """``numpy.savez_compressed(path, **arrays)``, atomically. The name is used exactly as given:
    no ``.npz`` is appended (numpy would append one to a name that lacks it)."""
    import numpy as np

    with atomic_writer(path) as fh:
        np.savez_compressed(fh, **arrays)


def append_line_atomic(path: PathLike, line: str) -> None:
    """Append ``line`` and a newline to the text file ``path`` (created if absent) by rewriting it
    atomically, so a crash leaves the file with or without the whole line, never part of it.

    For small files (metrics logs): the whole file is read and rewritten each time. A trailing
    newline already in ``line`` is not doubled; a file whose last line lacks its newline gets one
    first, so two records never run together. Not safe for two concurrent writers (one may lose
    the other's line): hold the run's :class:`RunLock`.
    """
    path = pathlib.Path(path)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = line if line.endswith("\n") else line + "\n"
    atomic_write_bytes(path, old + new.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Safe reads
# ----------------------------------------------------------------------------------------------

def safe_torch_load(path: PathLike | IO[bytes], *, map_location: Any = "cpu") -> Any:
    """``torch.load`` that cannot run code: ``weights_only=True`` admits tensors, numbers,
    strings and plain containers (dict, list, tuple, OrderedDict) and refuses any other pickled
    global. Tensors go to ``map_location`` (the CPU by default). Errors (missing file, corrupt
    zip, refused global: ``pickle.UnpicklingError``) propagate; callers turn them into messages."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stands in for ``_codecs.encode``, which a pickle written by Python 3 with protocol 2 uses
    to rebuild a ``bytes`` object (as ``_codecs.encode(text, "latin1")``). Only that use is
    admitted: any other codec or argument is refused."""
    codec = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or codec not in ("latin1", "iso88591", "l1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"refused _codecs.encode with encoding {encoding!r}: this file is not a CIFAR batch")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a CIFAR batch may name: what numpy needs to rebuild an array, a dtype or a
    scalar, under every module name numpy has used for them (``numpy.core`` up to 1.x,
    ``numpy._core`` from 2.0; resolved from the installed numpy without importing the deprecated
    ``numpy.core`` alias), plus bytes as Python 3 writes them with protocol 2."""
    import numpy as np

    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct  # array, protocol <= 4
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar  # a numpy scalar
        if hasattr(numeric, "_frombuffer"):  # array, protocol 5 (numpy >= 1.16)
            allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers, strings, numbers and numpy arrays, nothing else."""

    def __init__(self, fileobj: IO[bytes], *, encoding: str):
        super().__init__(fileobj, encoding=encoding)
        self._allowed = _allowed_globals()
        self._source = getattr(fileobj, "name", None)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            where = f" in {self._source}" if isinstance(self._source, (str, os.PathLike)) else ""
            raise pickle.UnpicklingError(
                f"refused to load the Python global '{module}.{name}'{where}: this file is not a "
                f"CIFAR batch (those hold only numpy arrays, lists, strings and numbers), and "
                f"loading it could run arbitrary code") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: this file is not a CIFAR batch")


def restricted_pickle_load(fileobj: IO[bytes] | bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle a CIFAR-10/100 python batch (``data_batch_1``, ``test_batch``, ``batches.meta``,
    CIFAR-100's ``train``/``test``/``meta``) from the binary file ``fileobj``, refusing anything
    that is not data.

    Dicts, lists, tuples, strings, bytes and numbers are built as usual; of Python globals only
    what numpy needs to rebuild an array, dtype or scalar is admitted (``ndarray``, ``dtype``,
    ``multiarray._reconstruct``, ``multiarray.scalar``, ``numeric._frombuffer``), plus
    ``_codecs.encode`` for latin-1 only (bytes in a protocol-2 pickle written by Python 3). Any
    other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``
    naming it, before anything is called.
    ``encoding="latin1"`` reads the Python 2 pickles CIFAR ships (their byte strings hold the
    pixels). ``fileobj`` may also be the pickle's bytes.
    """
    if isinstance(fileobj, (bytes, bytearray)):
        fileobj = io.BytesIO(fileobj)
    return _CifarUnpickler(fileobj, encoding=encoding).load()


# ----------------------------------------------------------------------------------------------
# One writer per run folder
# ----------------------------------------------------------------------------------------------

class RunLockedError(RuntimeError):
    """Another training holds the run folder's lock: the message names the folder and the fix."""


class RunLock:
    """Exclusive ownership of a run folder while a training writes it.

    ``with RunLock(run_dir): ...`` creates ``run_dir`` if needed and takes a non-blocking
    exclusive ``flock`` on ``run_dir/.lock``. If another process, or another ``RunLock`` on the
    same folder in this process, holds it, :class:`RunLockedError` is raised at once instead of
    letting two trainings interleave their checkpoints and metrics. The lock is released when the
    block ends, and by the kernel if the process dies, so there is never a stale lock to delete.
    The ``.lock`` file itself stays (it records the pid of the last holder, for the message).
    """

    def __init__(self, run_dir: PathLike):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock (see the class docstring); returns self."""
        if self._fd is not None:
            raise RuntimeError(f"this RunLock already holds {self.path}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f" (process {holder})" if holder else ""
            raise RunLockedError(
                f"run folder {self.run_dir} is locked{by}: another training is writing it. "
                f"Wait for it to finish or choose another run_dir.") from None
        try:  # record the holder for the message above; the lock does not depend on it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (nothing happens if it is not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, held={self.held})"


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
