"""Catch device-to-host syncs in a training step on any device, a CPU included.

On a GPU, a step that reads a value back to Python (``loss.item()``, ``if (x > 0).any():``,
``x[mask]``, ``y.tolist()``) makes the host wait for every queued kernel, and the GPU then
idles while Python catches up. ``torch.cuda.set_sync_debug_mode("error")`` finds these only on
a GPU; ``no_host_sync()`` finds the same Python-level calls on a CPU, so a method written on a
laptop can be checked before it ever meets a GPU:

>>> with no_host_sync():
...     loss, logits = method.loss(model, x, y, idx, epoch=0)    # raises HostSyncError if it syncs

What counts as a sync (each forces the device's values onto the host, or has an output whose
size depends on them): ``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()`` / ``int()`` /
``float()`` / ``__index__`` of a tensor (``if t:``, ``range(t)``, ``lst[t]``), ``nonzero``,
``unique``, ``masked_select``, one-argument ``torch.where``, ``repeat_interleave`` without
``output_size``, and indexing with a boolean tensor. Not caught: syncs inside C++ (a CUDA
``cudaMemcpy`` that a kernel issues itself) and a host tensor copied to the device, which
does not wait for the device's queue.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

#: torch functions and Tensor methods (by ``__name__``) that read device values on the host
SYNCING = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
                     "__index__", "nonzero", "argwhere", "unique", "unique_consecutive",
                     "masked_select", "bincount"})


class HostSyncError(RuntimeError):
    """A call inside ``no_host_sync()`` would make the host wait for the device."""


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class no_host_sync(TorchFunctionMode):  # noqa: N801 (used as a context manager, like torch's)
    """Raise ``HostSyncError`` at the first host sync (see the module docstring) inside the
    ``with`` block. ``allow``: names from ``SYNCING`` to let through."""

    def __init__(self, allow: tuple[str, ...] = ()):
        super().__init__()
        self.forbidden = SYNCING - set(allow)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        why = None
        if name in self.forbidden:
            why = f"{name}() reads a tensor's values on the host"
        elif name == "where" and len(args) + len(kwargs) == 1:
            why = "torch.where(condition) returns indices whose number depends on the values"
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            why = "repeat_interleave without output_size computes its size on the host"
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
            why = ("indexing with a boolean mask selects a data-dependent number of elements "
                   "(use torch.where(mask, a, b) or multiply by the mask)")
        if why is not None:
            raise HostSyncError(f"host sync inside a step: {why}. On a GPU this stalls the "
                                f"device every step; keep values on the device.")
        return func(*args, **kwargs)
