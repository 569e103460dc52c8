"""Training and evaluation on many GPUs and machines: torchrun, DistributedDataParallel and
one global batch split across processes (docs/distributed.md).

``torchrun --nproc_per_node N -m mixlab train ...`` starts N processes; each reads the
environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), joins the process group
(NCCL on CUDA, gloo on a CPU) and takes one device. Without torchrun (or with one process)
:func:`setup` returns None and the engine runs exactly as before: no process group, no
wrapper, no collective.

What one step does on W processes, for a global batch of B = ``batch_size`` examples:

* **Data.** Each process keeps only its shard of the uint8 training set on its device: the
  examples with ``idx % W == rank``. Every process draws the epoch's order and augmentation
  from the same generator, as :class:`~mixlab.data.DeviceLoader` does in one process, so the
  sequence of global batches does not depend on W. Per step each process writes the images it
  owns into a zeroed uint8 buffer of the global batch; one reduce-scatter (sum) hands process r
  its slice ``[r·B/W, (r+1)·B/W)`` of that batch. ``idx`` stays the dataset index
  (:class:`ShardedLoader`).
* **Randomness.** Every process starts from the same seed and keeps torch's default
  generator in step with the others. Inside the method's loss, a draw shaped like the batch
  (a PGD random start, FAT's step noise, TRADES' Gaussian start, a per-example CutMix centre)
  is drawn for the whole global batch and sliced, so it equals the one-process draw; a draw
  whose size does not depend on the batch (mixup's one λ per batch) is the same on every
  process, as in one process; a draw that depends on the batch but cannot be sliced (the
  partner permutation of mixup, AMP and CutMix; per-example Beta draws of λ) comes from a
  stream of this process's own (:class:`share_of_batch`; the model's own forward passes run
  outside it, :class:`outside_share`, at no cost per layer). Hence erm, pgd_at, fat, gairat,
  gair_fat, mma and trades train the same weights on any number of processes (up to the
  order of floating-point sums); mixing methods pair examples within each process's share.
* **Model.** The model is wrapped in ``DistributedDataParallel`` for the training forward and
  backward passes. Attacks run on the module inside it (:func:`unwrap`), in eval mode: their
  forward and backward passes never enter the wrapper, so they neither arm its gradient
  reducer nor broadcast buffers. BatchNorm normalises with each process's share of the batch
  (running statistics follow rank 0's, as DistributedDataParallel broadcasts them), or with
  the global batch's statistics under ``sync_bn=True`` (``SyncBatchNorm``, CUDA).
* **Per-example state** (GAIRAT's κ and weights, MMA's ε, AMP's λ* logs: tensors of the
  method indexed by dataset index) is merged across processes before it is read at the end
  of an epoch and before every checkpoint (:func:`merge_example_state`). GAIRAT normalises
  its weights over the global batch (:func:`mixlab.methods.base.batch_sum`).
* **Files.** Rank 0 alone writes checkpoints, metrics, config and provenance; a checkpoint
  holds no trace of W, so a run resumes under any number of processes.

Evaluation splits the images into fixed chunks, seeds each chunk's attacks from (seed, chunk
start) (:func:`chunk_seed`) and gives each process whole chunks (:func:`my_chunks`), so the
numbers equal a one-process evaluation of the same images with the same seed.

>>> group = setup("auto")          # None without torchrun
>>> loader = ShardedLoader(train_ds, 512, group=group, generator=g, augment=True)
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from .attacks import unwrap  # noqa: F401 (re-exported: the module attacks run)
from .data.loader import Batch, TensorDataset, _crop_flip, _draw_crop_flip
from .methods.base import _BATCH_SUM

#: the environment variables torchrun sets for every process it starts
ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
#: a reduce-scatter of one tensor (its name since torch 2.14; reduce_scatter_tensor before)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------- processes
@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place among the processes torchrun started.

    rank: 0..world-1 (rank 0 writes files and prints); world: the number of processes;
    local_rank: the process's index on its machine (its GPU); device: the device it trains
    and evaluates on; backend: "nccl" (CUDA) or "gloo" (CPU)."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


_GROUP: Group | None = None


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().isdigit():
        raise RuntimeError(f"${name}={value!r}: under torchrun every process gets WORLD_SIZE, "
                           f"RANK and LOCAL_RANK; start mixlab with torchrun, not by hand")
    return int(value)


def _pick_device(setting: str | torch.device, local_rank: int) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for "auto" (with CUDA) and "cuda"; the CPU
    for "cpu" (or "auto" without CUDA). ``cuda:N`` is refused: torchrun gives each process
    its own GPU."""
    name = str(setting)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"device={name!r}: under torchrun each process uses the GPU of its "
                         f"LOCAL_RANK (cuda:{local_rank}); pass device='cuda' or 'auto'")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device; use "
                           "device='cpu' (gloo) or 'auto'")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine shows "
                           f"{torch.cuda.device_count()} GPU(s): start at most that many "
                           f"processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def setup(device: str | torch.device = "auto") -> Group | None:
    """Join the processes torchrun started; None when it did not (or started one).

    Reads WORLD_SIZE, RANK and LOCAL_RANK, picks this process's device (``cuda:LOCAL_RANK``,
    made the current CUDA device, or the CPU) and initialises torch's default process group
    once per process (NCCL on CUDA, gloo on a CPU; the rendezvous is torchrun's, through
    MASTER_ADDR / MASTER_PORT). A second call returns the same group; a call asking for
    another kind of device than the group was made for is refused."""
    global _GROUP
    if not launched():
        return None
    world, rank, local_rank = (_env_int(name) for name in ENV)
    dev = _pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if _GROUP is not None:
        if _GROUP.device != dev:
            raise ValueError(f"this process already joined its group on {_GROUP.device}; "
                             f"device={str(device)!r} would need {dev}")
        return _GROUP
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        try:   # device_id binds NCCL to this GPU at once (torch >= 2.3)
            dist.init_process_group(backend, **({"device_id": dev} if dev.type == "cuda" else {}))
        except TypeError:
            dist.init_process_group(backend)
        atexit.register(_teardown)
    elif dist.get_backend() != backend or dist.get_world_size() != world:
        raise RuntimeError(f"a process group ({dist.get_backend()}, {dist.get_world_size()} "
                           f"processes) exists that does not fit {backend} on {world}")
    _GROUP = Group(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend)
    return _GROUP


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Group | None:
    """The group :func:`setup` joined in this process, or None."""
    return _GROUP


def is_main(group: Group | None = None) -> bool:
    """True on rank 0 and in a process without a group: the one that writes and prints."""
    group = group if group is not None else _GROUP
    return group is None or group.main


def facts(group: Group | None) -> dict[str, Any]:
    """What provenance records about the processes: their number, backend, hosts and
    devices (one entry per rank). A collective: every process calls it."""
    if group is None:
        return {"world_size": 1}
    me = (socket.gethostname(), str(group.device),
          torch.cuda.get_device_name(group.device) if group.device.type == "cuda" else "cpu")
    everyone: list[Any] = [None] * group.world
    dist.all_gather_object(everyone, me)
    return {"world_size": group.world, "backend": group.backend,
            "nodes": len({host for host, _, _ in everyone}),
            "ranks": [{"host": h, "device": d, "device_name": n} for h, d, n in everyone]}


# ----------------------------------------------------------------------------- collectives
def all_sum(t: torch.Tensor, group: Group | None) -> torch.Tensor:
    """``t`` summed over the processes (a new tensor; ``t`` itself without a group). No host
    sync: the collective is queued like a kernel."""
    if group is None:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def on_main(fn: Callable[[], Any], group: Group | None) -> Any:
    """``fn()`` run on rank 0 alone, its result handed to every process; an error it raises
    is raised on every process (same class and message), so no process waits for one that
    already failed. Without a group, just ``fn()``. For work on files only rank 0 touches:
    the run directory's lock, its checks and the checkpoint to resume from."""
    if group is None:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if group.main:
        try:
            payload = [("ok", fn())]
        except Exception as err:  # handed to the others, then raised here as it was
            error = err
            payload = [("error", (type(err), str(err)))]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "ok":
        return value
    if error is not None:
        raise error
    cls, message = value
    try:
        raise cls(message)
    except TypeError:  # an exception class that takes other arguments
        raise RuntimeError(f"{cls.__name__} on rank 0: {message}") from None


def check_same_settings(cfg: dict[str, Any], group: Group | None) -> None:
    """Refuse processes started with different settings (a mistyped node's command line):
    every process compares a hash of its resolved settings with rank 0's."""
    if group is None:
        return
    mine = hashlib.blake2b(json.dumps(cfg, sort_keys=True, default=str).encode(),
                           digest_size=8).hexdigest()
    everyone: list[Any] = [None] * group.world
    dist.all_gather_object(everyone, mine)
    odd = [rank for rank, h in enumerate(everyone) if h != everyone[0]]
    if odd:
        raise ValueError(f"ranks {odd} were started with other settings than rank 0; start "
                         f"every node with the same command")


def sum_dicts(values: dict[str, float], group: Group | None) -> dict[str, float]:
    """Per key, the sum of ``values`` over the processes (a key a process lacks counts 0);
    ``values`` itself without a group. For host-side numbers at the end of an epoch."""
    if group is None:
        return values
    everyone: list[Any] = [None] * group.world
    dist.all_gather_object(everyone, values)
    out: dict[str, float] = {}
    for part in everyone:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def barrier(group: Group | None) -> None:
    """Wait until every process gets here (nothing without a group): e.g. until rank 0 has
    written what the others will read next."""
    if group is not None:
        dist.barrier()


def from_main(value: Any, group: Group | None) -> Any:
    """Rank 0's ``value`` in every process (``value`` itself without a group)."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(values: list, group: Group | None) -> list[list]:
    """Every process's ``values``, in rank order (``[values]`` without a group)."""
    if group is None:
        return [values]
    everyone: list[Any] = [None] * group.world
    dist.all_gather_object(everyone, list(values))
    return everyone


def slowest(seconds: float, group: Group | None) -> float:
    """The largest of the processes' ``seconds``: the wall-clock time of work they share."""
    if group is None:
        return seconds
    return max(gather_lists([seconds], group))[0]


def broadcast_buffers(model: torch.nn.Module, group: Group | None) -> None:
    """Give every process rank 0's buffers (BatchNorm's running statistics): at the end of an
    epoch, so that every process evaluates, and rank 0 saves, the same model."""
    if group is None:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


# ----------------------------------------------------------------------------- the model
def wrap(fwd: torch.nn.Module, group: Group | None) -> torch.nn.Module:
    """The module the training step calls: ``fwd`` (the model, or ``torch.compile(model)``)
    run outside the step's random-draw mode (:class:`outside_share`) inside
    ``DistributedDataParallel`` on this process's device; ``fwd`` unchanged without a group.
    Attacks get ``outside_share(fwd)`` back from :func:`unwrap`. Convert BatchNorm to
    SyncBatchNorm first, before the optimiser is built (:func:`convert_sync_bn`)."""
    if group is None:
        return fwd
    ids = [group.device.index] if group.device.type == "cuda" else None
    # buffers: rank 0's are broadcast before every forward pass (DistributedDataParallel's
    # default), so BatchNorm's running statistics are the same in every process
    return torch.nn.parallel.DistributedDataParallel(outside_share(fwd), device_ids=ids)


def convert_sync_bn(model: torch.nn.Module, group: Group | None,
                    sync_bn: bool) -> torch.nn.Module:
    """BatchNorm layers as ``SyncBatchNorm`` (statistics over the global batch) when
    ``sync_bn`` and a group of CUDA processes; the model unchanged otherwise. The state dict
    keeps its keys, so checkpoints load into a plain model."""
    if not sync_bn or group is None:
        return model
    if group.device.type != "cuda":
        raise ValueError("sync_bn=True needs CUDA (torch's SyncBatchNorm runs on GPUs only); "
                         "on CPU processes leave it off: BatchNorm then normalises per process")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ----------------------------------------------------------------------------- data
def check_batch_split(batch_size: int, group: Group | None) -> int:
    """Examples per process of a global batch of ``batch_size``; a clear error when the
    processes cannot share it equally."""
    if group is None:
        return batch_size
    if batch_size % group.world:
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide among "
                         f"the {group.world} processes; give a multiple of {group.world}, "
                         f"e.g. {batch_size - batch_size % group.world or group.world}")
    return batch_size // group.world


class ShardedLoader:
    """The batches of a :class:`~mixlab.data.DeviceLoader` over ``ds``, each cut to this
    process's slice, with the images held in shards.

    Process r keeps the uint8 images of the examples ``idx % W == r`` on its device (and every
    label: 8 bytes each). Each epoch draws its order and its augmentation from ``generator``
    exactly as ``DeviceLoader`` does, so the global batches are the same for any W. For each
    step the owners write their images into a zeroed uint8 buffer of the global batch and one
    reduce-scatter (sum: exactly one process is non-zero per image) delivers slice r; the
    collective of the next batch is queued before the current one is handed out, so it
    overlaps the step. Batches are ``Batch(x, y, idx)`` with ``idx`` the dataset indices of
    the slice.

    It also records which examples this process and all processes trained on since the last
    :func:`merge_example_state` (``trained_here``, ``trained_anywhere``), for that merge.

    ds: the whole split (any device; the shard is copied to the group's device);
    batch_size: the global batch; the other arguments as ``DeviceLoader``'s. Only
    ``drop_last=True``: every process takes the same number of equal steps.
    """

    def __init__(self, ds: TensorDataset, batch_size: int, *, group: Group,
                 shuffle: bool = True, augment: bool = False,
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 padding: int = 4):
        self.local_batch = check_batch_split(batch_size, group)
        if len(ds) < batch_size:
            raise ValueError(f"{ds.name} ({ds.split}) has {len(ds)} examples, fewer than "
                             f"batch_size={batch_size}: there would be no batch at all")
        self.group, self.batch_size, self.n = group, batch_size, len(ds)
        device = group.device
        # this process's images only (a copy: the whole split can be freed)
        self.x = ds.x[group.rank::group.world].to(device).contiguous()
        self.y = ds.y.to(device)
        self.shuffle, self.augment, self.generator = shuffle, augment, generator
        self.channels_last, self.padding = channels_last, padding
        self.trained_here = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.trained_anywhere = torch.zeros(self.n, dtype=torch.bool, device=device)
        self.steps_since_merge = 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def _gather(self, gidx: torch.Tensor):
        """Queue the collective that brings this process its slice of the global batch
        ``gidx``; returns (work handle, the slice's uint8 buffer)."""
        g = self.group
        owned = (gidx % g.world) == g.rank
        local = torch.where(owned, gidx // g.world, torch.zeros_like(gidx))
        buf = self.x[local] * owned.reshape(-1, 1, 1, 1).to(torch.uint8)
        out = buf.new_empty((self.local_batch, *buf.shape[1:]))
        work = _REDUCE_SCATTER(out, buf, async_op=True)
        return work, out

    def __iter__(self) -> Iterator[Batch]:
        n, device, g = self.n, self.group.device, self.generator
        gdev = g.device if g is not None else "cpu"
        # the same draws, in the same order, as DeviceLoader.__iter__
        if self.shuffle:
            order = torch.randperm(n, generator=g, device=gdev).to(device)
        else:
            order = torch.arange(n, device=device)
        if self.augment:
            dy, dx, flip = _draw_crop_flip(n, self.padding, g, device)
        B, b, r = self.batch_size, self.local_batch, self.group.rank
        pending = self._gather(order[:B]) if len(self) else None
        for i in range(len(self)):
            gidx = order[i * B:(i + 1) * B]
            work, x = pending
            if i + 1 < len(self):
                pending = self._gather(order[(i + 1) * B:(i + 2) * B])
            work.wait()
            idx = gidx[r * b:(r + 1) * b]
            if self.augment:
                x = _crop_flip(x, dy[idx], dx[idx], flip[idx], self.padding)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.trained_here[idx] = True
            self.trained_anywhere[gidx] = True
            self.steps_since_merge += 1
            yield Batch(x=x, y=self.y[idx], idx=idx)


# ----------------------------------------------------------------------------- randomness
#: random functions whose output takes the shape of their first (tensor) argument
_LIKE = frozenset({"rand_like", "randn_like", "randint_like"})
#: random factories shaped by a size argument
_SIZED = frozenset({"rand", "randn", "randint"})
#: in-place random fills of their first argument
_INPLACE = frozenset({"uniform_", "normal_", "bernoulli_", "random_", "exponential_",
                      "cauchy_", "log_normal_", "geometric_"})
#: other random functions: per-process when their size depends on the batch
_OTHER = frozenset({"randperm", "bernoulli", "multinomial", "poisson", "binomial", "normal",
                    "_standard_gamma", "_sample_dirichlet", "dropout", "alpha_dropout",
                    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu",
                    "native_dropout"})
_RANDOM = _LIKE | _SIZED | _INPLACE | _OTHER


def _seed_of(*parts: int) -> int:
    """A 31-bit seed from integers (blake2b of their decimal text; 31 bits so that any
    library's seed function takes it): the same in every process."""
    text = "/".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little") >> 1


def _empty_wider(t: torch.Tensor, dim: int, total: int) -> torch.Tensor:
    """An empty tensor like ``t`` (dtype, device, dimension order in memory) with ``total``
    entries along ``dim``: a random fill of it visits its elements in the order the same fill
    of the global batch's tensor visits them."""
    shape = list(t.shape)
    shape[dim] = total
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))   # outermost first
    inverse = [order.index(i) for i in range(t.dim())]
    return torch.empty([shape[i] for i in order], dtype=t.dtype,
                       device=t.device).permute(inverse)


def _size_arg(name: str, args: tuple, kwargs: dict):
    """(size, rebuild) for a sized factory call: ``rebuild(new_size)`` gives (args, kwargs)
    with the size replaced; None where the call does not fit the known signatures."""
    if "size" in kwargs:
        return tuple(kwargs["size"]), lambda s: (args, {**kwargs, "size": s})
    if name == "randint":   # randint(high, size) | randint(low, high, size)
        if args and isinstance(args[-1], (tuple, list, torch.Size)):
            return tuple(args[-1]), lambda s: ((*args[:-1], s), kwargs)
        return None
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return tuple(args[0]), lambda s: ((s,), kwargs)
    if args and all(isinstance(a, int) for a in args):
        return tuple(args), lambda s: (tuple(s), kwargs)
    return None


class share_of_batch(TorchFunctionMode):  # noqa: N801 (a context manager, like torch's modes)
    """Inside the block, this process trains on rows ``[start, start + size)`` of a global
    batch of ``total`` rows: its random draws become those of the whole batch, sliced.

    torch's default generator is kept in step across processes (same seed, same draws), so:

    * a draw with a dimension of ``size`` (a tensor like the batch, or a size naming it) is
      made for ``total`` along that dimension and sliced: it equals, element for element,
      the rows the one-process draw gives these examples, and every process advances the
      generator as one process would;
    * a draw whose size has no such dimension is made as it is: the same value on every
      process, as in one process;
    * a batch-sized draw that cannot be widened (``randperm(size)``, a draw shaped by a
      tensor of per-example values) comes from this process's own stream, seeded by
      ``own_seed`` (the engine: seed, rank and step), leaving the shared generator alone.

    A draw given its own ``generator=`` is left alone. The model's forward passes run
    outside the mode (:func:`outside_share`, which the engine puts around the module the step
    calls): intercepting each of their operations would cost a microsecond or two apiece,
    and their randomness (dropout) comes from this process's own stream.

    While the block runs, :func:`mixlab.methods.base.batch_sum` sums over every process's
    share (``reduce``), and ``device`` (this process's) is whose own stream forward passes
    use."""

    def __init__(self, *, start: int, size: int, total: int, own_seed: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.start, self.size, self.total, self.own_seed = start, size, total, own_seed
        self.reduce, self.device = reduce, torch.device(device)
        self._own: dict[tuple[str, int], torch.Tensor] = {}
        self._token = None

    def __enter__(self):
        if self.reduce is not None:
            self._token = _BATCH_SUM.set(self.reduce)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if self._token is not None:
            _BATCH_SUM.reset(self._token)
            self._token = None
        return super().__exit__(*exc)

    # -- this process's own stream
    def _swap(self, device):
        """Put this process's own stream into the default generator of ``device``; returns
        what :meth:`_unswap` needs to put the shared stream back (None: nothing swapped)."""
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            get = lambda: torch.cuda.get_rng_state(index)  # noqa: E731
            put = lambda s: torch.cuda.set_rng_state(s, index)  # noqa: E731
        elif device.type == "cpu":
            index, get, put = -1, torch.get_rng_state, torch.set_rng_state
        else:   # another accelerator: its shared stream (not sliced, but in step)
            return None
        key = (device.type, index)
        if key not in self._own:
            self._own[key] = torch.Generator(device=device).manual_seed(self.own_seed).get_state()
        shared = get()
        put(self._own[key])
        return key, get, put, shared

    def _unswap(self, token) -> None:
        if token is not None:
            key, get, put, shared = token
            self._own[key] = get()
            put(shared)

    def _own_stream(self, device, call):
        token = self._swap(device)
        try:
            return call()
        finally:
            self._unswap(token)

    @contextlib.contextmanager
    def lifted(self):
        """The block runs without this mode (and with this process's own stream in the
        default generator of ``device``), if the mode is the innermost one; else as it is."""
        try:
            on_top = torch.overrides._get_current_function_mode() is self
        except AttributeError:  # a torch without the helper: keep intercepting
            on_top = False
        if not on_top:
            yield
            return
        torch.overrides._pop_mode()
        token = self._swap(self.device)
        try:
            yield
        finally:
            self._unswap(token)
            torch.overrides._push_mode(self)

    # -- the draws
    def _dim(self, shape) -> int | None:
        for d, s in enumerate(shape):
            if s == self.size:
                return d
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _RANDOM or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        call = lambda: func(*args, **kwargs)  # noqa: E731
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if name in _LIKE and args and isinstance(args[0], torch.Tensor):
            d = self._dim(args[0].shape)
            if d is None:
                return call()
            wide = func(_empty_wider(args[0], d, self.total), *args[1:], **kwargs)
            return wide.narrow(d, self.start, self.size)
        if name in _SIZED:
            parsed = _size_arg(name, args, kwargs)
            if parsed is None:
                return call()
            size, rebuild = parsed
            d = self._dim(size)
            if d is None:
                return call()
            wide_args, wide_kwargs = rebuild(tuple(self.total if i == d else s
                                                   for i, s in enumerate(size)))
            return func(*wide_args, **wide_kwargs).narrow(d, self.start, self.size)
        if name in _INPLACE and args and isinstance(args[0], torch.Tensor):
            target = args[0]
            d = self._dim(target.shape)
            if d is None:
                return call()
            if len(tensors) > 1:   # per-element parameters (bernoulli_(p)): not widenable
                return self._own_stream(target.device, call)
            wide = _empty_wider(target, d, self.total)
            func(wide, *args[1:], **kwargs)
            with torch.no_grad():
                target.copy_(wide.narrow(d, self.start, self.size))
            return target
        # the rest: batch-sized draws come from this process's own stream
        if name == "randperm":
            n = args[0] if args else kwargs.get("n")
            if n == self.size:
                return self._own_stream(kwargs.get("device"), call)
            return call()
        if name == "multinomial" and (args[1:2] or [kwargs.get("num_samples")])[0] == self.size:
            return self._own_stream(tensors[0].device, call)
        if any(self._dim(t.shape) is not None for t in tensors):
            return self._own_stream(tensors[0].device, call)
        if name == "normal" and not tensors:   # normal(mean, std, size): a sized factory
            size = kwargs.get("size", args[2] if len(args) > 2 else None)
            if size is not None and self._dim(tuple(size)) is not None:
                return self._own_stream(kwargs.get("device"), call)
        return call()


#: the share_of_batch blocks open in this process, innermost last
_ACTIVE: list[share_of_batch] = []


class outside_share(torch.nn.Module):  # noqa: N801 (named for what it does, as a block)
    """``module`` whose forward passes run outside the step's :class:`share_of_batch` mode
    (see there). The engine puts it inside DistributedDataParallel, so both the training
    forward and the attacks (which get it from :func:`unwrap`) call it; without an open
    share_of_batch block it is ``module`` itself."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if not _ACTIVE:
            return self.module(*args, **kwargs)
        with _ACTIVE[-1].lifted():
            return self.module(*args, **kwargs)


def step_context(group: Group | None, *, batch_size: int, seed: int, step: int):
    """The context a training step runs in: :class:`share_of_batch` for this process's slice
    of the global batch (own stream seeded by (seed, rank, step)); nothing without a group."""
    if group is None:
        return contextlib.nullcontext()
    b = batch_size // group.world
    return share_of_batch(start=group.rank * b, size=b, total=batch_size,
                          own_seed=_seed_of(seed, group.rank, step),
                          reduce=lambda t: all_sum(t, group), device=group.device)


# ----------------------------------------------------------------------------- per-example state
def example_state(method) -> list[tuple[dict, str, torch.Tensor]]:
    """The method's per-example state: every tensor attribute (or tensor in a dict attribute)
    whose first dimension is ``method.num_train``, indexed by dataset index (the Method
    contract). As (holder, key, tensor), in attribute order, the same in every process."""
    found = []
    for key, value in vars(method).items():
        holders = [(vars(method), key, value)] if isinstance(value, torch.Tensor) else (
            [(value, k, v) for k, v in value.items()] if isinstance(value, dict) else [])
        for holder, k, v in holders:
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == method.num_train:
                found.append((holder, k, v))
    return found


def merge_example_state(method, loader: ShardedLoader, group: Group | None) -> None:
    """Make the method's per-example state whole in every process: for each example trained
    since the last merge, the value of the process that trained it (one all-reduce per
    tensor: the owner's value plus zeros); other examples keep the value every process
    shares. Called at the end of every epoch (before ``epoch_end`` reads the logs) and before
    every checkpoint. No host sync."""
    if group is None or loader.steps_since_merge == 0:
        return
    here, anywhere = loader.trained_here, loader.trained_anywhere
    for holder, key, t in example_state(method):
        shape = (-1, *([1] * (t.dim() - 1)))
        value = t.to(here.device)
        part = torch.where(here.reshape(shape), value, torch.zeros((), dtype=t.dtype,
                                                                   device=here.device))
        wire = part.to(torch.uint8) if t.dtype == torch.bool else part
        dist.all_reduce(wire)
        merged = torch.where(anywhere.reshape(shape), wire.to(t.dtype), value)
        if t.device == merged.device:
            t.copy_(merged)
        else:
            holder[key] = merged.to(t.device)
    here.zero_()
    anywhere.zero_()
    loader.steps_since_merge = 0


# ----------------------------------------------------------------------------- evaluation
def chunk_seed(seed: int, start: int) -> int:
    """The seed of the attacks on the chunk of images that starts at image ``start``: the
    same whichever process evaluates the chunk, and whatever ran before it."""
    return _seed_of(seed, start)


def my_chunks(n: int, chunk: int, group: Group | None) -> range:
    """Start indices of the chunks of ``chunk`` images (of ``n``) this process evaluates:
    chunk k goes to rank k mod W; every chunk without a group."""
    world, rank = (1, 0) if group is None else (group.world, group.rank)
    return range(rank * chunk, n, world * chunk)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run the block with torch's generators (CPU and ``device``) seeded by ``seed``; the
    caller's generator states are restored afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def gather_rows(rows: torch.Tensor, starts: range, chunk: int, n: int,
                group: Group | None) -> torch.Tensor:
    """Per-image results of this process's chunks (``rows``: its chunks' rows, concatenated
    in ``starts`` order) placed into all ``n`` rows, summed over the processes: every process
    gets every row. Bool and integer rows travel as integers."""
    if group is None:
        return rows
    full = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype if rows.dtype != torch.bool
                       else torch.uint8, device=rows.device)
    at = 0
    for start in starts:
        m = min(chunk, n - start)
        full[start:start + m] = rows[at:at + m]
        at += m
    dist.all_reduce(full)
    return full.to(rows.dtype)
