"""RobustBench checkpoints in and out: the model contract shared with RobustBench.

RobustBench (Croce et al. 2021, arXiv 2010.09670) ranks models that map (N, 3, H, W) pixels in
[0, 1] to logits, normalisation inside the model: mixlab's own contract. This module moves
weights across that line in both directions, from local files only (nothing is downloaded):

* :func:`load_robustbench` reads a checkpoint of RobustBench's standard CIFAR architectures
  into a mixlab model (a :class:`~mixlab.models.NormalizedModel`: ``Normalize`` then the
  network), so every mixlab analysis (``evaluate``, ``margins``, ``paths``, the explorer)
  runs on it unchanged;
* :func:`export_robustbench` writes a trained mixlab run as a state dict that RobustBench's
  architecture classes load with ``load_state_dict(strict=True)``, plus a model card.

Architectures (their module names are RobustBench's, so state dicts load without renaming;
the code is a re-implementation of ``robustbench/model_zoo/architectures``):

==================  ==========================================  ================================
arch                RobustBench class                           used by, e.g.
==================  ==========================================  ================================
wrn-28-10           ``wide_resnet.WideResNet(depth=28,          Carmon2019Unlabeled, Wang2020
                    widen_factor=10)``                          Improving (TRADES' WRN)
wrn-34-10           ``wide_resnet.WideResNet(depth=34, ...)``   Zhang2019Theoretically (TRADES)
wrn-70-16           ``dm_wide_resnet.DMWideResNet(depth=70,     Gowal2020Uncovering_70_16,
                    width=16, activation_fn=Swish)``            Rebuffi2021Fixing_70_16_cutmix
wrn-28-10 (DM)      ``DMWideResNet(depth=28, width=10)``        Gowal2020Uncovering_28_10_extra
preactresnet18      ``resnet.PreActResNet(PreActBlock,          Wong2020Fast, Andriushchenko2020
                    [2, 2, 2, 2])``                             Understanding
preactresnet18      ``PreActResNet(PreActBlockV2, [2, 2, 2,     Rice2020Overfitting (L2),
(with final BN)     2], bn_before_fc=True)``                    Kireev2021Effectiveness
==================  ==========================================  ================================

Any depth 6n+4 and width k of either WideResNet works (``wrn-10-1`` is a tiny one with the
same names, for tests). Which family a file holds is read from its key names
(``block1.layer.0.conv1`` is RobustBench's WideResNet, ``init_conv`` / ``layer.0.block.0``
DeepMind's); ``arch`` is checked against the weights' shapes, and may be left out.

Details that matter for exact logits:

* RobustBench's ``WideResNet`` and ``PreActResNet`` take raw pixels unless the zoo entry
  subclasses them with ``mu``/``sigma`` buffers; those buffers are read from the file when
  present. Some zoo entries normalise without saving their statistics (Wong2020Fast:
  CIFAR-10 mean/std): pass ``mean``/``std`` for those.
* DeepMind's ``DMWideResNet`` normalises with non-persistent buffers (not in the file): the
  dataset's statistics from ``dm_wide_resnet.py`` (CIFAR-10: mean (0.4914, 0.4822, 0.4465),
  std (0.2471, 0.2435, 0.2616); CIFAR-100: (0.5071, 0.4865, 0.4409), (0.2673, 0.2564,
  0.2762)), pads "SAME"-style before strided convs, and uses Swish, x·sigmoid(x)
  (``activation="swish"``; "silu" is torch's fused kernel, equal up to rounding; "relu").
* The two PreActResNet-18 variants have the same key names; the one with a final BatchNorm
  (``bn.*`` keys) is the one whose projection shortcuts read the pre-activated tensor
  (``PreActBlockV2`` / ``out_shortcut=True`` in every RobustBench entry that has it), which is
  also mixlab's own PreActResNet-18; without ``bn.*`` the shortcuts read the block's input.
* ``sub_block1.*`` (a copy of the first stage that RobustBench's WideResNet builds for
  TRADES-era checkpoints but never runs) is dropped.
* Checkpoints nested under "state_dict", "model" (or RobustBench's "last") and keys prefixed
  with ``module.`` (DataParallel), ``model.`` or ``_orig_mod.`` (torch.compile) are accepted.

Pooling is RobustBench's fixed ``avg_pool2d`` (8 for WideResNets, 4 for PreActResNet), so these
models take 32x32 inputs, as the checkpoints were trained.

Files are data, not code: checkpoints are read with ``torch.load(..., weights_only=True)``
(:func:`mixlab.fileio.safe_torch_load`), and everything is written atomically.

>>> model = load_robustbench("Carmon2019Unlabeled.pt", arch="wrn-28-10")
>>> evaluate(model, x_test, y_test, eps=8/255)
>>> export_robustbench(mixlab.load_run("runs/at"), "export/at")
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fileio import atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load

__all__ = ["load_robustbench", "export_robustbench", "robustbench_state_dict",
           "RBWideResNet", "DMWideResNet", "RBPreActResNet", "DM_STATS", "ARCHS"]

#: DeepMind's normalisation constants (robustbench dm_wide_resnet.py), per dataset
DM_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: the standard architectures named in RobustBench's leaderboards (any wrn-<6n+4>-<k> works)
ARCHS = ("wrn-28-10", "wrn-34-10", "wrn-70-16", "preactresnet18")
#: prefixes wrapped around keys by DataParallel, wrapper modules and torch.compile
_PREFIXES = ("module.", "model.", "_orig_mod.")
#: keys under which trainers nest the state dict ("last": RobustBench's Kireev2021 files)
_NESTS = ("state_dict", "model", "last")
_WRN = re.compile(r"(?:dm-?)?(?:wrn|wide[-_]?resnet)[-_]?(\d+)[-_x](\d+)")


# ----------------------------------------------------------------------------- architectures
class Swish(nn.Module):
    """x·sigmoid(x), computed as DeepMind's ``Swish`` computes it (bit for bit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


_ACTIVATIONS = {"swish": Swish, "silu": nn.SiLU, "relu": nn.ReLU}


class _WRNBlock(nn.Module):
    """RobustBench ``wide_resnet.BasicBlock``: BN-ReLU-conv twice; a 1x1 ``convShortcut`` on
    the activated input where the width changes, else the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = (None if in_planes == out_planes  # noqa: N815 (RobustBench's name)
                             else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return (x if self.convShortcut is None else self.convShortcut(a)) + out


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            _WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class RBWideResNet(nn.Module):
    """RobustBench's ``WideResNet`` (from TRADES): module names ``conv1``, ``block{1,2,3}.layer.i``,
    ``bn1``, ``fc``. Bare network, takes what the checkpoint was trained on (raw pixels for the
    plain zoo entries). depth = 6n + 4; 32x32 inputs (avg_pool2d(8))."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 bias_last: bool = True):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"RobustBench's WideResNet needs depth = 6n + 4 (10, 16, 22, 28, 34, "
                             f"...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.nChannels = depth, widen_factor, widths[3]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


class _DMBlock(nn.Module):
    """DeepMind's ``_Block``: TF "SAME" padding by hand before ``conv_0`` (1 on every side at
    stride 1; 0 before and 1 after at stride 2), 1x1 ``shortcut`` on the activated input where
    the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: type):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
                         if self.has_shortcut else None)
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu_0(self.batchnorm_0(x))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(F.pad(a, self._pad)))))
        return (self.shortcut(a) if self.has_shortcut else x) + out


class _DMBlockGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, activation: type):
        super().__init__()
        self.block = nn.Sequential(*[
            _DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                     activation) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """DeepMind's ``DMWideResNet`` (Gowal et al. 2020, arXiv 2010.03593; Rebuffi et al. 2021):
    module names ``init_conv``, ``layer.{0,1,2}.block.i``, ``batchnorm``, ``logits``. Bare
    network: the normalisation DeepMind's class does first is the ``Normalize`` in front of it
    here. depth = 6n + 4; 32x32 inputs."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10,
                 activation: str = "swish"):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DMWideResNet needs depth = 6n + 4, got {depth}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {list(_ACTIVATIONS)}")
        act = _ACTIVATIONS[activation]
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.depth, self.width, self.num_channels = depth, width, widths[3]
        self.init_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(_DMBlockGroup(n, widths[0], widths[1], 1, act),
                                   _DMBlockGroup(n, widths[1], widths[2], 2, act),
                                   _DMBlockGroup(n, widths[2], widths[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.relu = act()
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.batchnorm(self.layer(self.init_conv(x))))
        return self.logits(F.avg_pool2d(out, 8).view(-1, self.num_channels))


class _PreActBlock(nn.Module):
    """RobustBench ``resnet.PreActBlock`` / ``PreActBlockV2``: BN-ReLU-conv twice, 1x1 conv
    ``shortcut.0`` where the shape changes, reading the activated tensor (``out_shortcut``,
    V2) or the block's input (V1)."""

    def __init__(self, in_planes: int, planes: int, stride: int, out_shortcut: bool):
        super().__init__()
        self.out_shortcut = out_shortcut
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(a if self.out_shortcut else x)
        else:
            shortcut = x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + shortcut


class RBPreActResNet(nn.Module):
    """RobustBench's ``PreActResNet``: ``conv1``, ``layer{1..4}.i``, optional ``bn`` (the
    ``bn_before_fc`` variant, which goes with shortcuts on the activated tensor), ``linear``.
    ``width`` is the first stage's (64 in every RobustBench model; smaller only for tests).
    32x32 inputs (avg_pool2d(4))."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, *,
                 bn_before_fc: bool = False, out_shortcut: bool | None = None,
                 width: int = 64):
        super().__init__()
        out_shortcut = bn_before_fc if out_shortcut is None else out_shortcut
        self.bn_before_fc, self.out_shortcut = bn_before_fc, out_shortcut
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        in_planes, stages = width, []
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(_PreActBlock(in_planes, planes, (1 if i == 0 else 2) if j == 0
                                           else 1, out_shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


# ----------------------------------------------------------------------------- reading files
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (nested under "state_dict" / "model" / "last"), with
    the ``module.`` / ``model.`` / ``_orig_mod.`` key prefixes removed."""
    for _ in range(4):
        if _is_state_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict")
        inner = next((obj[k] for k in _NESTS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = sorted(map(str, obj))[:8]
            raise ValueError(f"{where} holds no state dict: a dict with keys {keys}, none of "
                             f"them a dict of tensors nor one of {list(_NESTS)}")
        obj = inner
    else:
        raise ValueError(f"{where}: no state dict found within 4 levels of nesting")
    out = OrderedDict()
    for key, value in obj.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive children ``prefix{i}.`` in the keys."""
    found = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)]
             if m}
    return len(found) if found == set(range(len(found))) else -1


def _family(sd: Mapping[str, torch.Tensor], where: str) -> str:
    if "init_conv.weight" in sd and "layer.0.block.0.conv_0.weight" in sd:
        return "dm-wrn"
    if "block1.layer.0.conv1.weight" in sd:
        return "wrn"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd and "linear.weight" in sd:
        if "bn1.weight" in sd:
            raise ValueError(f"{where} holds a post-activation ResNet (top-level bn1), not "
                             f"RobustBench's PreActResNet; it is not one of the supported "
                             f"architectures {list(ARCHS)}")
        return "preact"
    if "conv_2d.weight" in sd:
        raise ValueError(f"{where} holds DeepMind's DMPreActResNet, which load_robustbench does "
                         f"not support (supported: {list(ARCHS)} and wrn-<depth>-<width>)")
    if "normalize.mean" in sd and "net.conv1.weight" in sd:
        raise ValueError(f"{where} is a mixlab checkpoint's model state: load the run with "
                         f"mixlab.load_run, or build_model(...).load_state_dict(...)")
    raise ValueError(f"{where} does not look like a RobustBench WideResNet, DMWideResNet or "
                     f"PreActResNet (first keys: {list(sd)[:5]}); supported: {list(ARCHS)}")


def _geometry(family: str, sd: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Depth, width, classes and variant flags read from the weights' names and shapes."""
    if family == "wrn":
        counts = {_count(sd, f"block{s}.layer.") for s in (1, 2, 3)}
        n = counts.pop() if len(counts) == 1 else -1
        width = sd["block1.layer.0.conv1.weight"].shape[0] // 16
        geo = dict(depth=6 * n + 4, width=width, num_classes=sd["fc.weight"].shape[0],
                   bias_last="fc.bias" in sd)
    elif family == "dm-wrn":
        counts = {_count(sd, f"layer.{s}.block.") for s in (0, 1, 2)}
        n = counts.pop() if len(counts) == 1 else -1
        width = sd["layer.0.block.0.conv_0.weight"].shape[0] // 16
        geo = dict(depth=6 * n + 4, width=width, num_classes=sd["logits.weight"].shape[0])
    else:
        blocks = tuple(_count(sd, f"layer{s}.") for s in (1, 2, 3, 4))
        n = min(blocks)
        geo = dict(num_blocks=blocks, width=sd["conv1.weight"].shape[0],
                   num_classes=sd["linear.weight"].shape[0], bn_before_fc="bn.weight" in sd)
    if n < 1:
        raise ValueError(f"{where}: the blocks of a {family} are not numbered 0, 1, 2, ... in "
                         f"every stage; the file is truncated or not a RobustBench model")
    return geo


def _arch_name(family: str, geo: Mapping[str, Any]) -> str:
    if family == "preact":
        depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}.get(tuple(geo["num_blocks"]))
        name = f"preactresnet{depth}" if depth else f"preactresnet{list(geo['num_blocks'])}"
        return name if geo["width"] == 64 else f"{name}-w{geo['width']}"
    return f"wrn-{geo['depth']}-{geo['width']}"


def _check_arch(arch: str | None, family: str, geo: Mapping[str, Any], where: str) -> str:
    held = _arch_name(family, geo)
    if arch is None:
        return held
    if not isinstance(arch, str):
        raise TypeError(f"arch={arch!r} must be a name such as {list(ARCHS)}")
    key = arch.strip().lower()
    if family == "preact":
        wanted = re.sub(r"[-_\s]", "", key)
        ok = wanted in ("preactresnet18", "preactresnet") and held.startswith("preactresnet18")
    else:
        match = _WRN.fullmatch(key)
        ok = bool(match) and f"wrn-{match.group(1)}-{match.group(2)}" == held
    if not ok:
        kind = {"wrn": "RobustBench WideResNet", "dm-wrn": "DeepMind DMWideResNet",
                "preact": "RobustBench PreActResNet"}[family]
        raise ValueError(f"arch={arch!r}, but {where} holds a {kind} {held} ({geo['num_classes']} "
                         f"classes); pass arch={held!r} (or leave arch out)")
    return held


def _stats(value, name: str) -> tuple[float, ...]:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be 3 finite per-channel values (pixel units), got "
                         f"{t.tolist()}")
    return tuple(t.tolist())


def _normalisation(sd: dict[str, torch.Tensor], family: str, num_classes: int, mean, std,
                   dataset: str | None) -> tuple[tuple, tuple, str]:
    """(mean, std, where they came from); pops the file's own buffers from ``sd``."""
    found = None
    for m_key, s_key in (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std")):
        if m_key in sd and s_key in sd:
            found = (sd.pop(m_key), sd.pop(s_key), f"the file's {m_key}/{s_key} buffers")
            break
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        return _stats(mean, "mean"), _stats(std, "std"), "the mean/std arguments"
    if found is not None:
        return _stats(found[0], "mean"), _stats(found[1], "std"), found[2]
    if family == "dm-wrn":
        if dataset is None:
            dataset = "cifar100" if num_classes == 100 else "cifar10"
        if dataset not in DM_STATS:
            raise ValueError(f"dataset={dataset!r}: DeepMind's statistics exist for "
                             f"{list(DM_STATS)}; pass mean and std for other data")
        m, s = DM_STATS[dataset]
        return m, s, f"DMWideResNet's {dataset} statistics"
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none (the network takes raw pixels)"


def load_robustbench(path, arch: str | None = None, *, dataset: str | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     activation: str = "swish", map_location: Any = "cpu") -> nn.Module:
    """Load a RobustBench checkpoint from a local file into a mixlab model.

    Args:
        path: a ``.pt`` / ``.pth`` file (RobustBench's own downloads, or a checkpoint of a
            network with RobustBench's module names). Read with ``weights_only=True``.
        arch: "wrn-28-10", "wrn-34-10", "wrn-70-16", "preactresnet18" or any
            "wrn-<6n+4>-<k>"; checked against the weights; None: read from the weights.
        dataset: "cifar10" / "cifar100": which DeepMind statistics a DMWideResNet uses (None:
            CIFAR-100's for 100 classes, else CIFAR-10's). Ignored by the other families.
        mean, std: per-channel normalisation (pixel units), overriding both the file's
            ``mu``/``sigma`` and the defaults (see the module docstring).
        activation: a DMWideResNet's activation: "swish" (DeepMind's, default), "silu", "relu".
        map_location: where the tensors go (default the CPU).
    Returns:
        a :class:`~mixlab.models.NormalizedModel` in eval mode, fp32: ``model.normalize`` then
        ``model.net`` (:class:`RBWideResNet`, :class:`DMWideResNet` or
        :class:`RBPreActResNet`), mapping (N, 3, 32, 32) pixels in [0, 1] to logits;
        ``model.arch`` is ``"robustbench:<arch>"`` and ``model.robustbench`` records the
        family, variant, normalisation and its source, and the file.
    Raises:
        FileNotFoundError for a missing file; ValueError for a file that is not a weights-only
        checkpoint of a supported architecture, or whose shapes contradict ``arch``.

    >>> model = load_robustbench("models/cifar10/Linf/Gowal2020Uncovering_70_16.pt",
    ...                          arch="wrn-70-16")
    """
    from . import Normalize, NormalizedModel  # the package imports this module at its end

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        raw = safe_torch_load(path, map_location=map_location)
    except Exception as err:  # refused global, corrupt zip, not a torch file
        raise ValueError(f"{path} could not be read as a weights-only checkpoint "
                         f"(torch.load(weights_only=True)): {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    where = str(path)
    sd = _unwrap(raw, where)
    sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("sub_block1."))
    family = _family(sd, where)
    geo = _geometry(family, sd, where)
    name = _check_arch(arch, family, geo, where)
    mean, std, norm_from = _normalisation(sd, family, geo["num_classes"], mean, std, dataset)
    if family == "wrn":
        net = RBWideResNet(geo["depth"], geo["width"], geo["num_classes"],
                           bias_last=geo["bias_last"])
    elif family == "dm-wrn":
        net = DMWideResNet(geo["depth"], geo["width"], geo["num_classes"], activation)
    else:
        net = RBPreActResNet(geo["num_blocks"], geo["num_classes"],
                             bn_before_fc=geo["bn_before_fc"], width=geo["width"])
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where} does not fit RobustBench's {name}: {err}") from err
    model = NormalizedModel(Normalize(mean, std), net, arch=f"robustbench:{name}",
                            num_classes=geo["num_classes"], in_channels=3)
    model.robustbench = {"arch": name, "family": family, "file": where,
                         "normalization": {"mean": list(mean), "std": list(std),
                                           "from": norm_from},
                         **({"activation": activation} if family == "dm-wrn" else {}),
                         **({"bn_before_fc": geo["bn_before_fc"],
                             "shortcut": "activated" if geo["bn_before_fc"] else "input"}
                            if family == "preact" else {})}
    return model.float().to(next(iter(sd.values())).device).eval()


# ----------------------------------------------------------------------------- writing files
def _mixlab_wrn_key(key: str) -> str:
    """mixlab WideResNet name -> RobustBench WideResNet name."""
    m = re.fullmatch(r"block(\d)\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        stage, i, module, leaf = m.groups()
        return f"block{stage}.layer.{i}.{'convShortcut' if module == 'shortcut' else module}.{leaf}"
    if key.startswith("bn."):
        return "bn1." + key[3:]
    return key  # conv1.*, fc.*


def _mixlab_preact_key(key: str) -> str:
    """mixlab PreActResNet name -> RobustBench PreActResNet name."""
    m = re.fullmatch(r"(layer\d\.\d+)\.shortcut\.(\w+)", key)
    return f"{m.group(1)}.shortcut.0.{m.group(2)}" if m else key


def robustbench_state_dict(model: nn.Module) -> tuple[OrderedDict, dict[str, Any]]:
    """A mixlab model's weights under RobustBench's names, with its normalisation as ``mu``
    and ``sigma`` buffers (1, 3, 1, 1) as RobustBench's zoo entries carry them; and a
    description of the RobustBench class that loads them with ``strict=True``.

    Supported: mixlab's ``wrn-<d>-<k>`` (Zagoruyko's 6n+4 or Madry's 6n+2 depth: the network
    is RobustBench's WideResNet(depth=6n+4)), ``preactresnet18`` (RobustBench's
    PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)), both on 3 channels, and a
    model from :func:`load_robustbench` (written back as it was read). Tensors are copied to
    the CPU, contiguous."""
    from . import NormalizedModel
    from .preact_resnet import PreActResNet
    from .wide_resnet import WideResNet

    if not isinstance(model, NormalizedModel):
        raise ValueError(f"export needs a mixlab model (Normalize + network), got "
                         f"{type(model).__name__}; a model of your own has no RobustBench "
                         f"architecture to load it into")
    net = model.net
    if model.in_channels != 3:
        raise ValueError(f"RobustBench's architectures take 3 channels; this model takes "
                         f"{model.in_channels}")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    if isinstance(net, WideResNet):
        n = len(net.block1)
        rb = OrderedDict((_mixlab_wrn_key(k), v) for k, v in state.items())
        info = dict(family="wrn", arch=f"wrn-{6 * n + 4}-{net.widen_factor}",
                    robustbench_class="robustbench.model_zoo.architectures.wide_resnet."
                                      "WideResNet",
                    constructor=f"WideResNet(depth={6 * n + 4}, widen_factor="
                                f"{net.widen_factor}, num_classes={model.num_classes})")
    elif isinstance(net, PreActResNet):
        blocks = [len(s) for s in (net.layer1, net.layer2, net.layer3, net.layer4)]
        if blocks != [2, 2, 2, 2]:
            raise ValueError(f"only PreActResNet-18 has a RobustBench twin; this one has "
                             f"blocks {blocks}")
        rb = OrderedDict((_mixlab_preact_key(k), v) for k, v in state.items())
        info = dict(family="preact", arch="preactresnet18",
                    robustbench_class="robustbench.model_zoo.architectures.resnet.PreActResNet",
                    constructor=f"PreActResNet(PreActBlockV2, [2, 2, 2, 2], num_classes="
                                f"{model.num_classes}, bn_before_fc=True)")
    elif isinstance(net, (RBWideResNet, DMWideResNet, RBPreActResNet)):
        rb = OrderedDict(state)
        meta = getattr(model, "robustbench", {})
        info = dict(family=meta.get("family"), arch=meta.get("arch"),
                    robustbench_class=type(net).__name__, constructor="as loaded")
    else:
        raise ValueError(f"mixlab model {model.arch!r} has no RobustBench twin; export "
                         f"supports wrn-<depth>-<width> and preactresnet18")
    for key in ("mu", "sigma"):
        if key in rb:
            raise ValueError(f"the network already has a {key!r} entry")
    rb["mu"] = model.normalize.mean.detach().cpu().reshape(1, 3, 1, 1).clone()
    rb["sigma"] = model.normalize.std.detach().cpu().reshape(1, 3, 1, 1).clone()
    return rb, info


def _eval_results(run_dir: Path | None, weights: str = "raw") -> list[tuple[Path, dict]]:
    """Evaluation results (``mixlab.evaluate`` JSON files) found in a run directory: of the
    averaged weights (``weights="ema"``: files named ``*_ema.json``, as ``python -m mixlab
    eval --weights ema`` writes them) or of the raw ones (every other file)."""
    if run_dir is None or not run_dir.is_dir():
        return []
    found = []
    for f in sorted(run_dir.glob("*.json")):
        if f.stem.endswith("_ema") != (weights == "ema"):
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"attacks", "n", "eps", "clean"} <= set(data):
            found.append((f, data))
    return found


def _pick_result(results, eps, norm):
    """The evaluation to report: same threat model, AutoAttack first, then the most images,
    then the newest."""
    same = [(f, r) for f, r in results
            if r.get("norm") == norm and math.isclose(float(r.get("eps", -1)), eps,
                                                      rel_tol=1e-6, abs_tol=1e-9)]
    if not same:
        return None
    return max(same, key=lambda fr: ("aa" in fr[1], fr[1].get("n", 0), fr[0].stat().st_mtime
                                     if fr[0] is not None else 0))


def _data_note(dataset: str, provenance: Mapping[str, Any] | None) -> tuple[str, str]:
    """(data source, caveat) for the model card."""
    source = str((provenance or {}).get("data_source", "unknown"))
    if dataset != "cifar10":
        return source, ""
    if "cifar-10-batches-py" in source:
        return source, ("Trained on the original CIFAR-10 (torchvision's pickled batches), "
                        "the data RobustBench evaluates on.")
    if source == "unknown":
        return source, ("The training data's source was not recorded. mixlab's offline "
                        "CIFAR-10 copy is a JPEG re-encoding of the original images; if this "
                        "run used it, its accuracies were measured on JPEG-decoded pixels and "
                        "can differ from RobustBench's evaluation on the original test set.")
    return source, ("Trained on mixlab's offline CIFAR-10 copy, a JPEG re-encoding of the "
                    "original images (an image folder, not torchvision's pickled batches). "
                    "Accuracies measured by mixlab on it are on JPEG-decoded pixels; "
                    "RobustBench evaluates on the original CIFAR-10 test set, where they can "
                    "differ. Re-evaluate with RobustBench before submitting.")


def _snippet(info: Mapping[str, Any], name: str) -> str:
    """Python that builds the RobustBench class and loads the exported file."""
    if info["family"] == "wrn":
        imports = "from robustbench.model_zoo.architectures.wide_resnet import WideResNet"
        base = "WideResNet"
    elif info["family"] == "preact":
        imports = ("from robustbench.model_zoo.architectures.resnet import PreActBlockV2, "
                   "PreActResNet")
        base = "PreActResNet"
    else:
        return ("# exported from a model loaded with mixlab.models.load_robustbench: build the "
                "RobustBench class it came from")
    args = info["constructor"][len(base) + 1:-1]
    return "\n".join([
        "import torch",
        imports,
        "",
        "",
        f"class Net({base}):",
        "    def __init__(self):",
        f"        super().__init__({args})",
        "        self.register_buffer('mu', torch.zeros(1, 3, 1, 1))",
        "        self.register_buffer('sigma', torch.ones(1, 3, 1, 1))",
        "",
        "    def forward(self, x):",
        "        return super().forward((x - self.mu) / self.sigma)",
        "",
        "",
        "model = Net()",
        f"model.load_state_dict(torch.load('{name}.pt', weights_only=True))",
        "model.eval()",
    ])


def export_robustbench(run, out_dir, *, name: str | None = None,
                       result: Mapping[str, Any] | str | Path | None = None,
                       check: bool = True) -> dict[str, Path]:
    """Write a trained mixlab run as a RobustBench-loadable state dict and a model card.

    Args:
        run: a ``mixlab.runs.Run`` (``mixlab.load_run(path)``): ``model``, ``config``,
            ``path``, ``which``, ``epoch`` and ``weights`` ("raw", or "ema" for the averaged
            weights of a run trained with ``ema_decay``: ``load_run(path, weights="ema")``).
            Its model must be ``wrn-<d>-<k>`` or ``preactresnet18`` (or one from
            :func:`load_robustbench`).
        out_dir: folder to write into (created).
        name: the file stem (RobustBench looks a model up as ``<name>.pt``); default
            ``mixlab_<method>_<arch>``.
        result: the evaluation to report (a ``mixlab.evaluate`` result dict or its JSON path);
            default: the run directory's evaluation of the same weights (raw, or averaged:
            files ``*_ema.json``) with the run's threat model, AutoAttack first, then the most
            test images. None found: accuracies are left out.
        check: reload the written state dict with :func:`load_robustbench` and compare its
            logits with the run's model on a fixed random batch (recorded in the card).
    Returns:
        {"state_dict": <name>.pt, "card_json": <name>.json, "card_md": <name>.md}

    The state dict holds RobustBench's parameter names and ``mu``/``sigma`` buffers, as
    RobustBench's zoo classes do; the card gives the class that loads it with
    ``strict=True`` (a 10-line subclass adding those two buffers, the pattern of RobustBench's
    own entries) and the data caveat. Every file is written atomically.

    >>> paths = export_robustbench(mixlab.load_run("runs/trades"), "export/trades")
    >>> paths = export_robustbench(mixlab.load_run("runs/ema", weights="ema"), "export/ema")
    """
    model, cfg = run.model, dict(run.config)
    out_dir = Path(out_dir)
    sd, info = robustbench_state_dict(model)
    name = name or f"mixlab_{cfg.get('method', 'model')}_{info['arch']}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name={name!r} must be a plain file stem (letters, digits, _ . -)")
    run_dir = Path(run.path) if getattr(run, "path", None) is not None else None
    eps, norm = float(cfg.get("eps", 8 / 255)), str(cfg.get("norm", "Linf"))
    weights = str(getattr(run, "weights", "raw"))
    if result is None:
        picked = _pick_result(_eval_results(run_dir, weights), eps, norm)
        result_file, result = picked if picked else (None, None)
    elif isinstance(result, (str, Path)):
        result_file, result = Path(result), json.loads(Path(result).read_text())
    else:
        result_file = None
    provenance = None
    if run_dir is not None and (run_dir / "provenance.json").is_file():
        provenance = json.loads((run_dir / "provenance.json").read_text())
    dataset = str(cfg.get("dataset", "unknown"))
    data_source, caveat = _data_note(dataset, provenance)

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"state_dict": out_dir / f"{name}.pt", "card_json": out_dir / f"{name}.json",
             "card_md": out_dir / f"{name}.md"}
    atomic_torch_save(sd, paths["state_dict"])
    digest = hashlib.sha256(paths["state_dict"].read_bytes()).hexdigest()

    max_diff = None
    if check:
        reloaded = load_robustbench(paths["state_dict"])
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(4, 3, 32, 32, generator=gen)
        was_training = model.training
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()
            ref = model(x.to(device)).float().cpu()
            model.train(was_training)
            got = reloaded(x)
        max_diff = float((ref - got).abs().max())
        if not max_diff <= 1e-4 * max(1.0, float(ref.abs().max())):
            raise RuntimeError(f"the exported weights give other logits than the run's model "
                               f"(max difference {max_diff:.3g}); nothing is wrong with the "
                               f"run, but {paths['state_dict']} must not be used")

    accuracy = None
    if result is not None:
        accuracy = {"clean": result.get("clean"), "autoattack": result.get("aa"),
                    "worst_case": result.get("robust"), "n": result.get("n"),
                    "eps": result.get("eps"), "norm": result.get("norm"),
                    "aa_version": result.get("aa_version"),
                    "attacks": result.get("attacks"),
                    "file": str(result_file) if result_file else None}
    from .. import __version__
    card = {
        "name": name,
        "dataset": dataset,
        "robustbench_dataset": dataset if dataset in ("cifar10", "cifar100") else None,
        "threat_model": norm,
        "eps": eps,
        "eps_255": eps * 255 if norm == "Linf" else None,
        "architecture": {"arch": info["arch"], "mixlab_arch": getattr(model, "arch", None),
                         "num_classes": model.num_classes,
                         "robustbench_class": info["robustbench_class"],
                         "constructor": info["constructor"],
                         "buffers": "mu, sigma (1, 3, 1, 1): forward((x - mu) / sigma)",
                         "mean": sd["mu"].flatten().tolist(),
                         "std": sd["sigma"].flatten().tolist()},
        "training": {"method": cfg.get("method"), "method_hp": cfg.get("method_hp"),
                     "epochs": cfg.get("epochs"), "model": cfg.get("model"),
                     "profile": cfg.get("profile"), "checkpoint": getattr(run, "which", None),
                     "epoch": getattr(run, "epoch", None), "weights": weights,
                     "ema_decay": cfg.get("ema_decay"),
                     "run_dir": str(run_dir) if run_dir else None},
        "accuracy": accuracy,
        "data_source": data_source,
        "data_caveat": caveat,
        "state_dict": {"file": paths["state_dict"].name, "sha256": digest,
                       "keys": len(sd), "reload_max_logit_diff": max_diff},
        "provenance": {"mixlab": __version__, "torch": torch.__version__,
                       "git_commit": (provenance or {}).get("git_commit"),
                       "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    atomic_write_json(paths["card_json"], card, indent=2)
    atomic_write_text(paths["card_md"], _card_markdown(card, _snippet(info, name)))
    return paths


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _eps_text(eps, norm) -> str:
    """8/255 for a Linf radius on the 1/255 grid, else the number."""
    eps = float(eps)
    on_grid = norm == "Linf" and math.isclose(eps * 255, round(eps * 255), abs_tol=1e-6)
    return f"{round(eps * 255)}/255" if on_grid else f"{eps:.4g}"


def _pct(v) -> str:
    return "not measured" if v is None else f"{100 * float(v):.2f}%"


def _card_markdown(card: Mapping[str, Any], snippet: str) -> str:
    arch, acc, train = card["architecture"], card["accuracy"], card["training"]
    eps = _eps_text(card["eps"], card["threat_model"])
    lines = [
        f"# {card['name']}",
        "",
        f"- **Dataset:** {card['dataset']}"
        + ("" if card["robustbench_dataset"] else " (not a RobustBench dataset)"),
        f"- **Threat model:** {card['threat_model']}, eps = {eps}",
        f"- **Architecture:** {arch['arch']} ({arch['constructor']}), "
        f"{arch['num_classes']} classes; normalisation inside: mean {_floats(arch['mean'])}, "
        f"std {_floats(arch['std'])}",
        f"- **Training:** mixlab method `{train['method']}`, hyperparameters "
        f"`{json.dumps(train['method_hp'])}`, {train['epochs']} epochs; checkpoint "
        f"`{train['checkpoint']}` (epoch {train['epoch']})"
        + (f"; weights averaged over training (EMA, decay {train['ema_decay']})"
           if train.get("weights") == "ema" else ""),
    ]
    if acc is None:
        lines.append("- **Accuracy:** no evaluation with this threat model was found in the "
                     "run directory (run `python -m mixlab eval --checkpoint RUN --attacks "
                     "clean,aa`, then export again)")
    else:
        lines += [f"- **Clean accuracy:** {_pct(acc['clean'])} (n = {acc['n']})",
                  f"- **AutoAttack accuracy:** {_pct(acc['autoattack'])}"
                  + (f" ({acc['aa_version']})" if acc.get("aa_version") else ""),
                  f"  measured by mixlab, {acc['norm']} eps = {_eps_text(acc['eps'], acc['norm'])}"
                  + (f", from {acc['file']}" if acc.get("file") else "")]
    lines += [
        f"- **Data:** {card['data_source']}",
        "",
    ]
    if card["data_caveat"]:
        lines += ["## Data caveat", "", card["data_caveat"], ""]
    sd = card["state_dict"]
    lines += [
        "## Loading with RobustBench's architecture",
        "",
        f"`{sd['file']}` (sha256 `{sd['sha256']}`) is a plain state dict with RobustBench's "
        f"parameter names plus the `mu`/`sigma` buffers, the pattern of RobustBench's own zoo "
        f"entries (a subclass that normalises first):",
        "",
        "```python",
        snippet,
        "```",
        "",
        "In mixlab: `mixlab.models.load_robustbench(path)`.",
        "",
    ]
    if sd["reload_max_logit_diff"] is not None:
        lines += [f"Reloaded and checked against the run's model: largest logit difference "
                  f"{sd['reload_max_logit_diff']:.2g} on a random batch.", ""]
    return "\n".join(lines)
