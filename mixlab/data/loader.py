"""Data on the device: a whole split as uint8 tensors, and a loader that slices it there.

A split is held as a :class:`TensorDataset` (``x`` uint8 ``(N, C, H, W)``, ``y`` int64 ``(N,)``),
moved to the GPU once (50k CIFAR images are 150 MB), and :class:`DeviceLoader` yields
:class:`Batch` es that are index slices of it: pixels as float in [0, 1] (normalisation is the
model's first layer), labels, and ``idx``, the dataset indices of the examples, so per-example
state (GAIRAT weights, MMA's per-example eps) is a plain tensor indexed by ``idx``. Training
augmentation (random crop with 4-pixel zero padding + horizontal flip, as torchvision's
``RandomCrop(32, 4)`` and ``RandomHorizontalFlip``) runs batched on the device (the airbench
recipe): no host sync and no Python loop over examples.

Where the tensors come from is :mod:`mixlab.data.sources`. This module knows only torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TensorDataset:
    """A whole split held as tensors.

    x: uint8 ``(N, C, H, W)``, pixels 0..255 (divide by 255 for the [0, 1] the models take).
    y: int64 ``(N,)`` class indices in ``[0, num_classes)``.
    source: the path the data was read from, or ``"synthetic"`` (for provenance records).
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> "TensorDataset":
        """The same data on ``device`` (uint8 stays uint8: 4x less memory than float)."""
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device))

    def _take(self, idx: torch.Tensor, split: str | None = None) -> "TensorDataset":
        idx = idx.to(self.x.device)
        return dataclasses.replace(self, x=self.x[idx], y=self.y[idx], split=split or self.split)

    def subset(self, n: int, seed: int = 0) -> "TensorDataset":
        """The first ``n`` examples of a permutation seeded by ``seed`` (all of them, shuffled,
        if ``n >= len(self)``). Not stratified; use it for quick runs, and record the fingerprint."""
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self._take(perm[:n])

    def fingerprint(self) -> str:
        """A short hash (16 hex digits) of shapes, pixels and labels, for provenance records:
        two datasets with the same fingerprint hold the same examples in the same order."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((tuple(self.x.shape), tuple(self.y.shape))).encode())
        h.update(self.x.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"TensorDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.x.shape[1:])}, num_classes={self.num_classes}, "
                f"device={self.x.device}, source={self.source!r})")


def train_val_split(ds: TensorDataset, val_size: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Split ``ds`` into (train, val) by a permutation seeded by ``seed``; val holds ``val_size``
    examples (MMA: 45k/5k on CIFAR-10) and gets ``split="val"``. Indices of both are new (0..n-1)."""
    if not 0 < val_size < len(ds):
        raise ValueError(f"val_size must be in (0, {len(ds)}), got {val_size}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds._take(perm[val_size:]), ds._take(perm[:val_size], split="val")


# ----------------------------------------------------------------------------- augmentation
def _crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
               padding: int) -> torch.Tensor:
    """Crop ``x[b]`` from its zero-padded copy at offset ``(dy[b], dx[b])`` in ``[0, 2*padding]``
    and mirror it left-right where ``flip[b]``; one ``gather`` for the whole batch.

    x: ``(B, C, H, W)`` any dtype; dy, dx: int64 ``(B,)``; flip: bool ``(B,)``, all on x's device.
    """
    B, C, H, W = x.shape
    Wp = W + 2 * padding
    xp = F.pad(x, (padding, padding, padding, padding))  # zeros, as RandomCrop(padding=4)
    rows = torch.arange(H, device=x.device)[None, :] + dy[:, None]  # (B, H) rows of xp
    j = torch.arange(W, device=x.device)[None, :]
    j = torch.where(flip[:, None], W - 1 - j, j)  # flipped crop reads columns right to left
    cols = j + dx[:, None]  # (B, W) columns of xp
    src = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(B, 1, H * W).expand(B, C, H * W)
    return xp.reshape(B, C, -1).gather(2, src).reshape(B, C, H, W)


def _draw_crop_flip(n: int, padding: int, generator: torch.Generator | None, device):
    """Crop offsets and flips for n images, drawn with ``generator`` on its own device (the CPU
    for a CPU generator; then moved, one small copy) or on ``device`` when there is none."""
    gdev = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gdev)
    flip = torch.rand(n, generator=generator, device=gdev) < 0.5
    return dy.to(device), dx.to(device), flip.to(device)


def augment_crop_flip(x: torch.Tensor, *, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop of the zero-padded image (as torchvision's ``RandomCrop(H, padding)``)
    and horizontal flip with probability 1/2, in one gather: no per-example Python loop.

    x: ``(B, C, H, W)``, uint8 or float (output has the same dtype, shape and device).
    generator: draws the offsets and flips (same generator state, same result); None uses torch's
    default generator of x's device.
    """
    dy, dx, flip = _draw_crop_flip(x.shape[0], padding, generator, x.device)
    return _crop_flip(x, dy, dx, flip, padding)


@dataclass
class Batch:
    """One batch: ``x`` float ``(B, C, H, W)`` in [0, 1] on the device; ``y`` int64 ``(B,)``;
    ``idx`` int64 ``(B,)`` the dataset indices of the examples (for per-example state).
    Unpacks as ``x, y, idx = batch``."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor

    def __iter__(self):
        return iter((self.x, self.y, self.idx))


class DeviceLoader:
    """Batches of a :class:`TensorDataset` that already sits on its device (GPU or CPU).

    Each epoch (each ``iter(loader)``) draws all its randomness up front from ``generator`` on
    the CPU, the order (``randperm``) and, with ``augment``, every example's crop offsets and
    flip, then moves it to the device in one copy. Batches are then index slices of the uint8
    data, augmented as uint8, converted with ``x.float().div_(255)`` on the device: no host sync
    and no Python loop over examples. Hence: same generator state, same epoch; saving
    ``generator.get_state()`` before an epoch and skipping ``k`` batches resumes it exactly.

    ds: the dataset (on the device the batches should be on); batch_size: examples per batch;
    shuffle: random order (else 0..N-1); augment: random crop (4-pixel zero padding) + flip;
    drop_last: skip the last, smaller batch; generator: a torch.Generator (None: torch's global
    RNG); channels_last: return x in channels_last memory format (faster convolutions on GPU).

    >>> loader = DeviceLoader(synthetic_dataset(100), 32, generator=torch.Generator().manual_seed(0))
    >>> [b.x.shape[0] for b in loader]
    [32, 32, 32]
    """

    def __init__(self, ds: TensorDataset, batch_size: int, *, shuffle: bool = True, augment: bool = False,
                 drop_last: bool = True, generator: torch.Generator | None = None,
                 channels_last: bool = False, padding: int = 4):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and len(ds) < batch_size:
            raise ValueError(f"{ds.name} ({ds.split}) has {len(ds)} examples, fewer than batch_size="
                             f"{batch_size}: with drop_last=True there would be no batch at all")
        self.ds = ds
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = generator
        self.channels_last = channels_last
        self.padding = padding  # pixels of zero padding for the random crop

    def __len__(self) -> int:
        n, b = len(self.ds), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Batch]:
        n, device = len(self.ds), self.ds.x.device
        g = self.generator
        gdev = g.device if g is not None else "cpu"
        if self.shuffle:
            order = torch.randperm(n, generator=g, device=gdev).to(device)
        else:
            order = torch.arange(n, device=device)
        if self.augment:  # indexed by dataset index, so a batch takes aug[idx]
            dy, dx, flip = _draw_crop_flip(n, self.padding, g, device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.ds.x[idx]
            if self.augment:
                x = _crop_flip(x, dy[idx], dx[idx], flip[idx], self.padding)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x=x, y=self.ds.y[idx], idx=idx)
