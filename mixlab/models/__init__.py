"""Model zoo: every model takes pixels in [0, 1] and returns logits.

The contract (as in RobustBench / AutoAttack): a model maps (N, C, H, W) images with values in
[0, 1] to (N, num_classes) logits. Input normalisation is the model's first layer, a `Normalize`
module with `mean` and `std` buffers, so every attack, eps-ball and clamp works in pixel units
and a checkpoint carries its own normalisation.

>>> model = build_model("preactresnet18", num_classes=10)
>>> logits = model(torch.rand(8, 3, 32, 32))          # (8, 10)
>>> model.arch, model.num_classes, model.in_channels
('preactresnet18', 10, 3)
>>> type(model[0]).__name__, type(model.net).__name__
('Normalize', 'PreActResNet')

Names (case-insensitive; '-', '_' and spaces are ignored where that is unambiguous):
    preactresnet18   PreActResNet-18, 11.17M params (CIFAR default, fast)
    wrn-28-4         WideResNet-28-4, 5.85M (MMA)
    wrn-32-10        WideResNet-32-10, 46.16M (GAIRAT's Wide_ResNet_Madry)
    wrn-34-10        WideResNet-34-10, 46.16M (TRADES; the same network as wrn-32-10)
    wrn-16-8         WideResNet-16-8, 10.96M (mixup theory, SVHN)
    wrn-<d>-<k>      any other WideResNet with d = 6n+4 or 6n+2
    smallcnn         TRADES SmallCNN for MNIST, 0.31M
    lenet5-madry     Madry et al.'s MNIST CNN, 3.27M
    tiny             ~15k-parameter CNN for CPU smoke tests

Models of your own: `register_model(name, constructor)` makes a name valid everywhere a built-in
name is (train, the command line, load_run in a process that registered it too), and
`train(model=module)` trains any module mapping pixels in [0, 1] to logits (as `CustomModel`).
"""

import numbers
import re
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..data.sources import CIFAR10_MEAN, CIFAR10_STD
from .preact_resnet import PreActResNet, PreActResNet18
from .small_nets import LeNet5Madry, SmallCNN, Tiny
from .wide_resnet import WideResNet, blocks_per_stage

__all__ = [
    "build_model", "available_models", "canonical_name", "MODELS", "Normalize", "NormalizedModel",
    "CIFAR10_MEAN", "CIFAR10_STD", "PreActResNet", "PreActResNet18", "WideResNet", "SmallCNN",
    "LeNet5Madry", "Tiny", "register_model", "unregister_model", "registered_models", "CustomModel",
    "check_model_output", "custom_model_name", "CUSTOM_PREFIX",
    "load_robustbench", "export_robustbench",
]

class Normalize(nn.Module):
    """(x - mean) / std per channel; the first layer of every mixlab model.

    mean and std are buffers of shape (1, C, 1, 1): saved in the state dict, moved by `.to()`,
    and never trained. Input (N, C, H, W) pixels in [0, 1]; output the same shape.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean.shape != std.shape:
            raise ValueError(f"mean has {mean.shape[1]} channels but std has {std.shape[1]}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


class NormalizedModel(nn.Sequential):
    """`Normalize` followed by a bare network: pixels in [0, 1] in, logits out.

    `model[0]` / `model.normalize` is the Normalize layer, `model.net` the network, and
    `model(x) == model.net(model.normalize(x))`. `arch`, `num_classes` and `in_channels` are
    plain attributes (not in the state dict) that training code saves with a checkpoint so a
    load can check it builds the same thing.
    """

    def __init__(self, normalize: Normalize, net: nn.Module, *, arch: str, num_classes: int,
                 in_channels: int):
        super().__init__(OrderedDict([("normalize", normalize), ("net", net)]))
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, in_channels={self.in_channels}"


# name -> constructor(num_classes, in_channels) -> bare network (no Normalize).
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "preactresnet18": lambda num_classes, in_channels: PreActResNet18(num_classes, in_channels),
    "wrn-28-4": lambda num_classes, in_channels: WideResNet(28, 4, num_classes, in_channels),
    "wrn-32-10": lambda num_classes, in_channels: WideResNet(32, 10, num_classes, in_channels),
    "wrn-34-10": lambda num_classes, in_channels: WideResNet(34, 10, num_classes, in_channels),
    "wrn-16-8": lambda num_classes, in_channels: WideResNet(16, 8, num_classes, in_channels),
    "smallcnn": lambda num_classes, in_channels: SmallCNN(num_classes, in_channels),
    "lenet5-madry": lambda num_classes, in_channels: LeNet5Madry(num_classes, in_channels),
    "tiny": lambda num_classes, in_channels: Tiny(num_classes, in_channels),
}

# Spellings seen in the papers' code, with '-', '_' and spaces removed, -> registry name.
_ALIASES = {
    "preactresnet18": "preactresnet18",
    "preactresnet": "preactresnet18",
    "wrnmadry": "wrn-32-10",          # GAIRAT's --net WRN_madry (default depth 32, width 10)
    "wideresnetmadry": "wrn-32-10",
    "smallcnn": "smallcnn",
    "lenet5madry": "lenet5-madry",
    "tiny": "tiny",
    "tinycnn": "tiny",
}
_WRN_PATTERN = re.compile(r"(?:wrn|wide[-_]?resnet)[-_]?(\d+)[-_x](\d+)")


# Models of your own, by name: register_model(name, constructor). Lower-case name ->
# constructor(num_classes, in_channels) -> a bare network (normalised input) or a NormalizedModel.
_REGISTERED: dict[str, Callable[[int, int], nn.Module]] = {}

#: prefix of the ``model`` setting of a run trained on a module passed to ``train(model=...)``
CUSTOM_PREFIX = "custom:"


def available_models() -> list[str]:
    """The registry names, the generic 'wrn-<depth>-<width>' form, then the names registered
    with `register_model`."""
    return list(MODELS) + ["wrn-<depth>-<width>"] + list(_REGISTERED)


def register_model(name: str, constructor: Callable[[int, int], nn.Module]) -> None:
    """Make `name` a model like the built-ins: valid as `train(model=name)`, `--set model=name`
    and in `load_run` (in a process that registered it too).

    constructor(num_classes, in_channels) returns either a bare network taking *normalised*
    input (as the `MODELS` entries; `build_model` puts the dataset's `Normalize` in front), or a
    `NormalizedModel` that carries its own normalisation. Either way the result maps
    (N, in_channels, H, W) to (N, num_classes) logits; training checks that on one batch.
    Names are case-insensitive. Raises ValueError for a name already taken or a constructor
    that is not callable.

    >>> register_model("mlp", lambda num_classes, in_channels: nn.Sequential(
    ...     nn.Flatten(), nn.LazyLinear(num_classes)))
    >>> train(model="mlp", dataset="synthetic", epochs=1)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_model: name={name!r} must be a non-empty string")
    key = name.strip().lower()
    if key.startswith(CUSTOM_PREFIX):
        raise ValueError(f"register_model: name={name!r} may not start with {CUSTOM_PREFIX!r} "
                         f"(that prefix marks a module passed to train(model=...))")
    try:
        taken = canonical_name(key)
    except ValueError:
        taken = None
    if taken is not None:
        raise ValueError(f"register_model: the name {name!r} is taken (it means {taken!r}); "
                         f"pick another, or unregister_model({name!r}) first")
    if not callable(constructor) or isinstance(constructor, nn.Module):
        raise ValueError(f"register_model: constructor={constructor!r} must be a function (or "
                         f"class) called as constructor(num_classes, in_channels) that returns "
                         f"a new network")
    _REGISTERED[key] = constructor


def registered_models() -> list[str]:
    """The names given to `register_model` in this process."""
    return list(_REGISTERED)


def unregister_model(name: str) -> None:
    """Forget a name given to `register_model` (KeyError if it was not registered)."""
    key = str(name).strip().lower()
    if key not in _REGISTERED:
        raise KeyError(f"model {name!r} is not registered")
    del _REGISTERED[key]


def canonical_name(name: str) -> str:
    """Map a user spelling ('WRN_34_10', 'PreActResNet-18', ...) to its registry name.

    Raises ValueError, listing the known names, for anything else.
    """
    if not isinstance(name, str):
        raise TypeError(f"model={name!r} must be a name (a string) or, for train, an nn.Module")
    if name.strip().lower().startswith(CUSTOM_PREFIX):
        return CUSTOM_PREFIX + name.strip()[len(CUSTOM_PREFIX):]  # a module passed to train
    key = name.strip().lower()
    if key in _REGISTERED:
        return key
    match = _WRN_PATTERN.fullmatch(key)
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        blocks_per_stage(depth)  # raises a ValueError that says which depths are valid
        if width < 1:
            raise ValueError(f"WideResNet width must be >= 1, got {width} in {name!r}")
        return f"wrn-{depth}-{width}"
    squashed = re.sub(r"[-_\s]", "", key)
    if squashed in _ALIASES:
        return _ALIASES[squashed]
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(available_models())}. "
                     f"A model of your own must be registered in this process first, with "
                     f"mixlab.models.register_model({name!r}, constructor), or passed as a "
                     f"module: train(model=module)")


def build_model(name: str, num_classes: int, in_channels: int = 3, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> NormalizedModel:
    """Build a model that takes (N, in_channels, H, W) pixels in [0, 1] and returns (N, num_classes) logits.

    Args:
        name: a registry name or alias (see the module docstring / `available_models()`).
        num_classes: number of logits, >= 2.
        in_channels: 3 (colour) or 1 (greyscale).
        mean, std: per-channel normalisation, in pixel units. Defaults: CIFAR-10 statistics for 3
            channels; no normalisation (mean 0, std 1) for 1 channel, since the MNIST networks
            of the papers take raw pixels. Pass your dataset's statistics for other data.

    The model is on the CPU in float32 and in train mode; the weights are freshly initialised
    from torch's global RNG (seed it for reproducibility).
    """
    arch = canonical_name(name)
    if arch.startswith(CUSTOM_PREFIX):
        raise ValueError(f"model {arch!r} was a module passed to train(model=...): mixlab "
                         f"cannot build it by name; pass the module again (train(model=module), "
                         f"load_run(path, model=module)), or register a constructor with "
                         f"mixlab.models.register_model")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (10 for CIFAR-10/MNIST/SVHN, "
                         f"100 for CIFAR-100), got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 3 (colour images) or 1 (greyscale, e.g. MNIST), "
                         f"got {in_channels!r}")
    num_classes, in_channels = int(num_classes), int(in_channels)  # plain ints, e.g. from numpy

    if mean is None:
        mean = CIFAR10_MEAN if in_channels == 3 else (0.0,)
    if std is None:
        std = CIFAR10_STD if in_channels == 3 else (1.0,)
    mean, std = _per_channel(mean, in_channels, "mean"), _per_channel(std, in_channels, "std")

    if arch in _REGISTERED:
        net = _REGISTERED[arch](num_classes, in_channels)
        if not isinstance(net, nn.Module):
            raise ValueError(f"the constructor registered for model {arch!r} returned "
                             f"{type(net).__name__}, not an nn.Module")
        if isinstance(net, NormalizedModel):  # it brings its own normalisation
            if (net.num_classes, net.in_channels) != (num_classes, in_channels):
                raise ValueError(
                    f"the constructor registered for model {arch!r} returned a model for "
                    f"{net.num_classes} classes and {net.in_channels} channels, but "
                    f"{num_classes} and {in_channels} were asked for")
            net.arch = arch
            return net
    elif arch in MODELS:
        net = MODELS[arch](num_classes, in_channels)
    else:  # a generic wrn-<depth>-<width>, already validated by canonical_name
        _, depth, width = arch.split("-")
        net = WideResNet(int(depth), int(width), num_classes, in_channels)
    return NormalizedModel(Normalize(mean, std), net, arch=arch, num_classes=num_classes,
                           in_channels=in_channels)


def _per_channel(values, in_channels: int, what: str) -> tuple[float, ...]:
    """A float or a sequence of in_channels floats -> a tuple of in_channels floats."""
    values = torch.as_tensor(values, dtype=torch.float32).flatten().tolist()
    if len(values) == 1:
        values = values * in_channels
    if len(values) != in_channels:
        raise ValueError(f"{what} has {len(values)} values but the model has {in_channels} "
                         f"input channels; give one value per channel")
    return tuple(values)


class CustomModel(nn.Module):
    """A module of your own, as `train(model=module)` trains it: `model.net` is your module
    (trained in place), `model(x) == model.net(x)`, and `arch` ('custom:<ClassName>'),
    `num_classes` and `in_channels` are recorded with checkpoints like a built-in model's.

    Your module takes (N, C, H, W) pixels in [0, 1] (normalise inside it if it needs to) and
    returns (N, num_classes) logits.
    """

    def __init__(self, net: nn.Module, *, num_classes: int, in_channels: int):
        super().__init__()
        self.net = net
        self.arch = custom_model_name(net)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, in_channels={self.in_channels}"


def custom_model_name(module: nn.Module) -> str:
    """The ``model`` setting recorded for a module passed to ``train``: 'custom:<ClassName>'."""
    return CUSTOM_PREFIX + type(module).__name__


@torch.no_grad()
def check_model_output(model: nn.Module, x: torch.Tensor, num_classes: int, *,
                       name: str = "model") -> None:
    """Run `model` once on the batch `x` (pixels in [0, 1]) and check that it returns finite
    (B, num_classes) logits; raises one ValueError saying what came back otherwise. The model
    is run in eval mode (no BatchNorm statistics change) and put back in its previous mode."""
    was_training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as err:
        raise ValueError(f"{name} failed on a training batch of shape {tuple(x.shape)} "
                         f"(pixels in [0, 1]): {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    expected = (x.shape[0], num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must map images (B, C, H, W) in [0, 1] to logits of shape "
                         f"(B, num_classes) = {expected}, but a training batch of shape "
                         f"{tuple(x.shape)} gave {got}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} returned NaN/inf logits on a training batch of shape "
                         f"{tuple(x.shape)}; check its initialisation and normalisation")


# RobustBench checkpoints in and out; imported last because it builds on Normalize above
from .robustbench import export_robustbench, load_robustbench  # noqa: E402
