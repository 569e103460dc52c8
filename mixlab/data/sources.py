"""Where datasets come from: the registry of names, reading, downloading and preparing them.

``load_dataset(name, split)`` returns a whole split as a uint8
:class:`~mixlab.data.loader.TensorDataset` on the CPU. Under ``root = data_root()``
(``$MIXLAB_DATA``, else ``./data``, else the checkout's ``data/``) it reads, in this order:

1. torchvision's own on-disk layout (``cifar-10-batches-py/``, ``cifar-100-python/``,
   ``MNIST/raw/``, ``svhn/*_32x32.mat``): the original data, preferred when present;
2. an image folder ``<root>/<name>/{train,test}/<class>/*.png|jpg`` (also ``<root>/<name>-jpeg/``,
   or one sub-folder deeper), classes sorted alphabetically as ``torchvision.datasets.ImageFolder``
   does. Decoded once and cached as ``<folder>/<split>.pt``. This is how the offline JPEG copy of
   CIFAR-10 is used (see :func:`prepare_cifar10_from_archive`);
3. a download through torchvision, only when asked (``download=True``, ``--download``,
   ``python -m mixlab download <name>``).

Offline copies are unpacked once into the data root by :func:`prepare_offline_copies`
(``python -m mixlab prepare --from <folder>``).

Data of your own: :func:`register_dataset` gives a loader a name (valid wherever a built-in name
is), and ``train(dataset=...)`` takes tensors, a torch ``Dataset`` or an image-folder path
(:func:`as_tensor_datasets`); both are checked as the built-in data is.

Anything else is a :class:`DataError` naming the dataset, the paths tried and the command that
fixes it. There is never silent random data in place of a real dataset: the only synthetic data is
the dataset named ``"synthetic"``, and results carry that name.

This module knows nothing of the rest of mixlab but :mod:`mixlab.fileio` (safe reads and atomic
writes) and :func:`mixlab.runtime.project_dir`, and touches no device at import time.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import warnings

import torch
import torch.nn.functional as F
import torch.utils.data

from ..fileio import (atomic_torch_save, atomic_writer, fsync_dir, restricted_pickle_load,
                      safe_torch_load)
from ..runtime import project_dir
from .loader import TensorDataset

DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "synthetic")
SPLITS = ("train", "test")

# Standard label order (alphabetical, as torchvision and ImageFolder give it).
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

#: per-channel pixel statistics of CIFAR-10's training split in [0, 1]: what a model's
#: normalisation layer uses (``mixlab.models.build_model``'s default for 3 channels)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Per-dataset facts. mean/std: per-channel pixel statistics of the train split in [0, 1] (what a
# model's normalisation layer uses); eps: the usual threat-model budgets in pixel units (CIFAR
# Linf 8/255 and L2 0.5, MNIST Linf 0.3 and L2 2.0 as in MMA, arXiv 1812.02637; SVHN follows
# CIFAR).
_INFO = {
    "cifar10": dict(num_classes=10, in_channels=3, image_size=32, train_size=50_000, test_size=10_000,
                    mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    eps={"Linf": 8 / 255, "L2": 0.5}, classes=CIFAR10_CLASSES),
    "cifar100": dict(num_classes=100, in_channels=3, image_size=32, train_size=50_000, test_size=10_000,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     eps={"Linf": 8 / 255, "L2": 0.5}, classes=None),  # names come from the files
    "svhn": dict(num_classes=10, in_channels=3, image_size=32, train_size=73_257, test_size=26_032,
                 mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                 eps={"Linf": 8 / 255, "L2": 0.5}, classes=[str(i) for i in range(10)]),
    "mnist": dict(num_classes=10, in_channels=1, image_size=28, train_size=60_000, test_size=10_000,
                  mean=(0.1307,), std=(0.3081,),
                  eps={"Linf": 0.3, "L2": 2.0}, classes=[str(i) for i in range(10)]),
    # Defaults of synthetic_dataset(); mean/std are those of its generator (measured: 0.49 +- 0.20).
    "synthetic": dict(num_classes=10, in_channels=3, image_size=32, train_size=2048, test_size=512,
                      mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2),
                      eps={"Linf": 8 / 255, "L2": 0.5}, classes=[f"class{i}" for i in range(10)]),
}

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataError(RuntimeError):
    """Data missing, unreadable or unknown: the message names the dataset, the path(s) tried and
    the command that fixes it."""


def data_root() -> pathlib.Path:
    """Where datasets live (absolute, not created): ``$MIXLAB_DATA`` if set; else ``./data``
    if it exists; else, inside a mixlab checkout (a notebook runs in ``notebooks/``), the
    checkout's ``data/`` if it exists; else ``./data``."""
    if os.environ.get("MIXLAB_DATA"):
        return pathlib.Path(os.environ["MIXLAB_DATA"]).expanduser().resolve()
    here = pathlib.Path.cwd()
    checkout = project_dir(here)  # here itself outside a checkout
    if (checkout / "data").is_dir() and not (here / "data").is_dir():
        return (checkout / "data").resolve()
    return (here / "data").resolve()


# ----------------------------------------------------------------------------------------------
# Synthetic data (tests, smoke runs)
# ----------------------------------------------------------------------------------------------

def synthetic_dataset(n: int = 512, *, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                      seed: int = 0, split: str = "train") -> TensorDataset:
    """A learnable toy task: each class has a smooth mean image, each example is that image plus
    Gaussian pixel noise (std 0.15 in [0, 1] units), stored as uint8 like real data.

    The class means depend on ``seed`` only, so train and test splits of the same seed share them
    (a model trained on one generalises to the other); the samples differ between splits.
    Named ``"synthetic"`` so that results can never pass for a real dataset's.
    """
    _check_split(split)
    g = torch.Generator().manual_seed(seed)
    # Coarse 4x4 patterns upsampled: smooth, so random crops and flips keep the class visible.
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    means = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    means = 0.2 + 0.6 * means  # leave room for the noise inside [0, 1]
    g = torch.Generator().manual_seed(2 * seed + 1 + SPLITS.index(split))  # differs per split
    y = torch.randperm(n, generator=g) % num_classes  # balanced, shuffled
    noise = 0.15 * torch.randn(n, channels, image_size, image_size, generator=g)
    x = ((means[y] + noise).clamp_(0, 1) * 255).round_().to(torch.uint8)
    return TensorDataset(name="synthetic", split=split, x=x, y=y.long(), num_classes=num_classes,
                         classes=[f"class{i}" for i in range(num_classes)], source="synthetic")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def dataset_info(name: str) -> dict:
    """Facts about a dataset without reading it: ``num_classes``, ``in_channels``, ``image_size``,
    ``train_size``, ``test_size``, per-channel ``mean``/``std`` (pixels in [0, 1]), default
    ``eps`` per norm in pixel units (``{"Linf": 8/255, "L2": 0.5}`` for CIFAR), ``classes``
    (None when only the files know them)."""
    if is_custom_dataset(name):
        raise ValueError(
            f"dataset {name!r} is data of your own: mixlab knows no standard threat-model "
            f"radius for it; pass eps explicitly (train(eps=...), --set eps=...), e.g. 8/255 "
            f"for Linf on natural images")
    name = _check_name(name)
    table = _INFO[name] if name in _INFO else _REGISTERED[name]["info"]
    info = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in table.items()}
    return {"name": name, **info}


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """Read one split of a dataset into a :class:`TensorDataset` on the CPU.

    name: one of :data:`DATASETS`; split: ``"train"`` or ``"test"``; root: the data folder
    (default :func:`data_root`); download: fetch through torchvision when the data is absent.
    Order of preference: torchvision's layout, then an image folder, then a download (module
    docstring). Raises :class:`DataError` when none is there.

    >>> ds = load_dataset("synthetic", "train")
    >>> ds.x.dtype, ds.x.shape[1:]
    (torch.uint8, torch.Size([3, 32, 32]))
    """
    if is_custom_dataset(name):
        _check_split(split)
        return _load_custom_name(name, split)
    name = _check_name(name)
    _check_split(split)
    if name == "synthetic":
        info = _INFO["synthetic"]
        return synthetic_dataset(info[f"{split}_size"], split=split)
    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    if name in _REGISTERED:
        return _load_registered(name, split, root)
    if _torchvision_path(name, root, split) is not None:
        return _read_torchvision_layout(name, root, split)
    folder = find_image_folder(root, name, split)
    if folder is not None:
        return read_image_folder(folder, split, name=name)
    if download:
        _download(name, root)
        return _read_torchvision_layout(name, root, split)
    raise DataError(_missing_message(name, root, split))


def find_dataset(name: str, split: str = "train", *, root=None) -> pathlib.Path | None:
    """The path :func:`load_dataset` would read for ``name``/``split``, or None if absent
    (cheap: nothing is decoded; for ``python -m mixlab info``)."""
    name = _check_name(name)
    _check_split(split)
    if name == "synthetic" or name in _REGISTERED:
        return None
    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    return _torchvision_path(name, root, split) or find_image_folder(root, name, split)


def download(name: str, root=None) -> pathlib.Path:
    """Download ``name`` (both splits) through torchvision's downloaders into ``root`` (default
    :func:`data_root`), which check the official md5 sums. Returns the root. The CLI's
    ``python -m mixlab download <name>``."""
    return _download(_check_name(name), root)


def _download(name: str, root) -> pathlib.Path:  # load_dataset's `download` argument hides the name
    if name == "synthetic":
        raise DataError("the 'synthetic' dataset is generated in memory: nothing to download")
    if name in _REGISTERED:
        raise DataError(f"dataset {name!r} was registered with register_dataset: its loader "
                        f"reads it, mixlab has nothing to download")
    import torchvision.datasets as tvd

    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "cifar10":
            tvd.CIFAR10(str(root), train=True, download=True)
        elif name == "cifar100":
            tvd.CIFAR100(str(root), train=True, download=True)
        elif name == "mnist":
            tvd.MNIST(str(root), train=True, download=True)
            tvd.MNIST(str(root), train=False, download=True)
        elif name == "svhn":
            for split in SPLITS:
                tvd.SVHN(str(root / "svhn"), split=split, download=True)
    except Exception as err:  # network errors come in many types (URLError, RuntimeError, OSError)
        hint = (f" Or put an image-folder copy in {root / name}/{{train,test}}/<class>/*.png|jpg."
                if name == "cifar10" else "")
        raise DataError(
            f"Could not download dataset '{name}' into {root}: {type(err).__name__}: {err}\n"
            f"Check the network, or copy the files in torchvision's layout into {root} (or set "
            f"MIXLAB_DATA to a folder that has them).{hint}") from err
    return root


# ----------------------------------------------------------------------------------------------
# Data of your own: registered datasets and in-memory data
# ----------------------------------------------------------------------------------------------
#
# Two ways to train on data mixlab does not ship:
#
# * register_dataset(name, loader, ...) gives the data a name, valid wherever a built-in name is
#   (train(dataset=name), --set dataset=name, load_run). The registration lives in the process:
#   a process that loads such a run must register the name again first.
# * train(dataset=<data>) takes the data itself: (x, y) tensors, ((x, y), (x_test, y_test)), a
#   torch Dataset of (image, label) pairs, a TensorDataset, or an image-folder path
#   <path>/{train,test}/<class>/*.png|jpg. as_tensor_dataset converts it.
#
# Either way the data becomes a uint8 TensorDataset with the checks of the built-ins: pixels
# uint8 or float in [0, 1], images (N, C, H, W) with C in (1, 3), labels int64 in
# [0, num_classes).

#: name (lower case, '-' removed) -> {"loader": loader, "info": dataset_info-style table}
_REGISTERED: dict[str, dict] = {}


def available_datasets() -> list[str]:
    """The built-in dataset names, then the names registered with :func:`register_dataset`."""
    return list(DATASETS) + [entry["name"] for entry in _REGISTERED.values()]


class DatasetNames:
    """The valid values of the ``dataset`` setting, looked up when asked: the built-in names,
    the registered ones, ``"custom:<description>"`` (data passed to ``train``) and image-folder
    paths. Iterating lists the names (for error messages and ``--help``)."""

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        return _key(name) in DATASETS or _key(name) in _REGISTERED or is_custom_dataset(name)

    def __iter__(self):
        return iter(available_datasets())

    def __repr__(self) -> str:
        return f"DatasetNames({available_datasets()})"


def is_custom_dataset(name) -> bool:
    """True for the ``dataset`` value of data passed to ``train`` itself: ``"custom:..."`` or
    the path of an image folder (a folder with a ``train/`` sub-folder)."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        return False
    if name.startswith("custom:"):
        return True
    if _key(name) in DATASETS or _key(name) in _REGISTERED:
        return False
    return (os.sep in name or "/" in name or name.startswith(".")) and \
        (pathlib.Path(name).expanduser() / "train").is_dir()


def register_dataset(name: str, loader, *, num_classes: int, in_channels: int, image_size: int,
                     eps: dict, mean=None, std=None) -> None:
    """Make ``name`` a dataset like the built-ins, read by ``loader(split, root)``.

    loader: called with ``split`` (``"train"`` or ``"test"``) and ``root`` (the data folder,
        :func:`data_root` unless ``data_root`` is set); returns a :class:`TensorDataset` or a
        pair ``(x, y)``: x uint8 ``(N, C, H, W)`` or float in [0, 1], y integer class indices.
    num_classes, in_channels (1 or 3), image_size (H = W): what every split must have.
    eps: the standard radius per norm in pixel units, ``{"Linf": 8/255, "L2": 0.5}``; used when
        a run gives no eps.
    mean, std: per-channel statistics of the training pixels in [0, 1] (the models'
        normalisation); None: computed from the training split when a model is built.

    Raises ValueError for a name already taken (built-in or registered) or a bad argument.

    >>> register_dataset("blobs", lambda split, root: (x, y), num_classes=3, in_channels=3,
    ...                  image_size=32, eps={"Linf": 8 / 255, "L2": 0.5})
    >>> train(dataset="blobs", model="tiny", epochs=1)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_dataset: name={name!r} must be a non-empty string")
    if name.startswith("custom:") or "/" in name or os.sep in name:
        raise ValueError(f"register_dataset: name={name!r} may not start with 'custom:' or "
                         f"hold a path separator (those mean data passed to train)")
    key = _key(name)
    if key in DATASETS or key in _REGISTERED:
        raise ValueError(f"register_dataset: the name {name!r} is taken (datasets: "
                         f"{', '.join(available_datasets())}); pick another, or "
                         f"unregister_dataset({name!r}) first")
    if not callable(loader):
        raise ValueError(f"register_dataset: loader={loader!r} must be callable as "
                         f"loader(split, root)")
    for what, value, low in (("num_classes", num_classes, 2), ("image_size", image_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"register_dataset: {what}={value!r} must be an integer >= {low}")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise ValueError(f"register_dataset: in_channels={in_channels!r} must be 3 (colour) "
                         f"or 1 (greyscale)")
    if not isinstance(eps, dict) or set(eps) != {"Linf", "L2"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
            for v in eps.values()):
        raise ValueError(f"register_dataset: eps={eps!r} must be a dict of positive radii in "
                         f"pixel units for both norms, e.g. {{'Linf': 8/255, 'L2': 0.5}}")
    if eps["Linf"] > 1:
        raise ValueError(f"register_dataset: eps['Linf']={eps['Linf']} is outside [0, 1]: "
                         f"radii are in pixel units, write 8/255 rather than 8")
    stats = {}
    for what, value in (("mean", mean), ("std", std)):
        if value is None:
            stats[what] = None
            continue
        try:
            values = tuple(float(v) for v in value)
        except TypeError:
            values = ()
        if len(values) != in_channels or (what == "std" and min(values) <= 0):
            raise ValueError(f"register_dataset: {what}={value!r} must hold one "
                             f"{'positive ' if what == 'std' else ''}number per channel "
                             f"({in_channels})")
        stats[what] = values
    _REGISTERED[key] = dict(name=name, loader=loader, info=dict(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size,
        train_size=None, test_size=None, mean=stats["mean"], std=stats["std"],
        eps={"Linf": float(eps["Linf"]), "L2": float(eps["L2"])}, classes=None))


def unregister_dataset(name: str) -> None:
    """Forget a name given to :func:`register_dataset` (KeyError if it was not registered)."""
    key = _key(name)
    if key not in _REGISTERED:
        raise KeyError(f"dataset {name!r} is not registered")
    del _REGISTERED[key]


def _load_registered(key: str, split: str, root: pathlib.Path) -> TensorDataset:
    entry = _REGISTERED[key]
    info, name = entry["info"], entry["name"]
    try:
        out = entry["loader"](split, root)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"the loader registered for dataset {name!r} failed on split "
                        f"{split!r}: {type(err).__name__}: {err}") from err
    ds = as_tensor_dataset(out, name=name, split=split, num_classes=info["num_classes"],
                           source=f"register_dataset({name!r})")
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    if tuple(ds.x.shape[1:]) != shape:
        raise ValueError(f"dataset {name!r} ({split}) has images of shape "
                         f"{tuple(ds.x.shape[1:])}, but it was registered with in_channels="
                         f"{info['in_channels']}, image_size={info['image_size']} ({shape})")
    return ds


def _load_custom_name(name: str, split: str) -> TensorDataset:
    """A ``dataset`` value of data passed to ``train``: a folder path is read again; the
    description ``"custom:..."`` only names data that cannot be found again."""
    if not name.startswith("custom:"):
        folder = pathlib.Path(name).expanduser()
        return read_image_folder(folder, split, name=str(name))
    raise DataError(f"dataset {name!r} was passed to train() as data, and mixlab cannot read "
                    f"it again by its description: pass the data itself "
                    f"(train(dataset=...)), or register it with mixlab.data.register_dataset")


def _split_parts(data) -> tuple:
    """(training part, test part or None) of data passed to ``train(dataset=...)``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(part, (tuple, list, TensorDataset, torch.utils.data.Dataset))
            for part in data):
        return data[0], data[1]
    return data, None


def custom_dataset_name(data) -> str:
    """What ``config.json`` records as ``dataset`` for data passed to ``train`` (read
    nothing): the folder path of an image folder, else ``"custom:<description>"``, e.g.
    ``"custom:tensors"`` or ``"custom:<Dataset class name>"``."""
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    part = _split_parts(data)[0]
    if isinstance(part, TensorDataset):
        return part.name if part.name.startswith("custom:") else f"custom:{part.name}"
    if isinstance(part, torch.utils.data.Dataset):
        return f"custom:{type(part).__name__}"
    return "custom:tensors"


def as_tensor_datasets(data) -> tuple[TensorDataset, TensorDataset | None, str]:
    """Data passed to ``train(dataset=...)`` as ``(train split, test split or None, name)``.

    data: ``(x, y)`` tensors (training data only); ``((x, y), (x_test, y_test))``; a torch
    ``Dataset`` yielding ``(image tensor, int label)``; a :class:`TensorDataset`; or an
    image-folder path ``<path>/{train,test}/<class>/*.png|jpg``. name is what ``config.json``
    records: the folder path, or ``"custom:<description>"``. The number of classes is
    1 + the largest label of both splits. Raises ValueError/TypeError for anything else.
    """
    if isinstance(data, (str, os.PathLike)):
        folder = pathlib.Path(data).expanduser()
        if not (folder / "train").is_dir():
            raise ValueError(f"dataset={str(data)!r} is neither a dataset name "
                             f"({', '.join(available_datasets())}) nor an image folder with "
                             f"a train/ sub-folder (<path>/train/<class>/*.png|jpg)")
        name = os.fspath(data)
        train_ds = read_image_folder(folder, "train", name=name)
        test_ds = read_image_folder(folder, "test", name=name) if (folder / "test").is_dir() \
            else None
        if test_ds is not None and test_ds.classes != train_ds.classes:
            raise ValueError(f"image folder {name}: train/ has classes {train_ds.classes} but "
                             f"test/ has {test_ds.classes}; both need the same class folders")
        return train_ds, test_ds, name
    train_part, test_part = _split_parts(data)
    name = custom_dataset_name(data)
    train_ds = as_tensor_dataset(train_part, name=name, split="train")
    test_ds = None
    if test_part is not None:
        test_ds = as_tensor_dataset(test_part, name=name, split="test")
        if test_ds.x.shape[1:] != train_ds.x.shape[1:]:
            raise ValueError(f"dataset: test images have shape {tuple(test_ds.x.shape[1:])} "
                             f"but training images {tuple(train_ds.x.shape[1:])}")
    num_classes = max(train_ds.num_classes, test_ds.num_classes if test_ds else 0)
    train_ds = dataclasses.replace(train_ds, num_classes=num_classes,
                                   classes=[str(i) for i in range(num_classes)])
    if test_ds is not None:
        test_ds = dataclasses.replace(test_ds, num_classes=num_classes,
                                      classes=train_ds.classes)
    return train_ds, test_ds, name


def as_tensor_dataset(data, *, name: str, split: str = "train", num_classes: int | None = None,
                      source: str = "user data") -> TensorDataset:
    """One split as a uint8 :class:`TensorDataset`, checked as the built-in data is.

    data: a TensorDataset, ``(x, y)`` tensors or a torch ``Dataset`` of ``(image, label)``.
    x must be ``(N, C, H, W)`` with C 1 or 3, uint8 or float in [0, 1] (stored as uint8,
    rounded to 1/255); y integer class indices ``(N,)``, in ``[0, num_classes)`` when
    num_classes is given, else >= 0 (num_classes is then 1 + the largest label, at least 2).
    """
    if isinstance(data, TensorDataset):
        x, y = data.x, data.y
        num_classes = num_classes or data.num_classes
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        x, y = _stack_dataset(data, name)
    else:
        raise TypeError(
            f"dataset {name!r} ({split}): cannot read {type(data).__name__}; give (x, y) "
            f"tensors, ((x, y), (x_test, y_test)), a torch Dataset of (image, label) pairs, "
            f"or an image-folder path")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"dataset {name!r} ({split}): images must be (N, C, H, W) with C = 1 "
                         f"or 3, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"dataset {name!r} ({split}) holds no examples")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"dataset {name!r} ({split}): labels must be one class index per "
                         f"image, shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise ValueError(f"dataset {name!r} ({split}): labels have dtype {y.dtype}; class "
                         f"indices (integers, int64) are needed")
    y = y.detach().cpu().to(torch.int64)
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        if lo < 0:
            raise ValueError(f"dataset {name!r} ({split}) has labels in [{lo}, {hi}]: labels "
                             f"must be class indices 0, 1, ..., num_classes - 1")
        num_classes = max(hi + 1, 2)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"dataset {name!r} ({split}) has labels in [{lo}, {hi}]: labels must "
                         f"lie in [0, {num_classes - 1}] ({num_classes} classes)")
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise ValueError(f"dataset {name!r} ({split}): pixels have dtype {x.dtype}; give "
                             f"uint8 (0..255) or float in [0, 1]")
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise ValueError(f"dataset {name!r} ({split}): float pixels must lie in [0, 1], "
                             f"got [{float(x.min()):.4g}, {float(x.max()):.4g}]; divide "
                             f"0..255 values by 255 (or pass them as uint8)")
        x = (x.float() * 255).round_().to(torch.uint8)
    return TensorDataset(name=name, split=split, x=x.contiguous(), y=y, num_classes=num_classes,
                         classes=[str(i) for i in range(num_classes)], source=source)


def _stack_dataset(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a torch Dataset as (x, y) tensors."""
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"dataset {name!r}: the torch Dataset has no len(); give (x, y) "
                        f"tensors instead") from None
    if n == 0:
        raise ValueError(f"dataset {name!r}: the torch Dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and isinstance(item[0], torch.Tensor)):
            raise TypeError(f"dataset {name!r}: item {i} of the torch Dataset is not an "
                            f"(image tensor, int label) pair")
        xs.append(item[0])
        ys.append(int(item[1]))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"dataset {name!r}: images of different shapes {sorted(shapes)[:3]}; "
                         f"all images must have one shape (C, H, W)")
    if {x.dtype for x in xs} != {xs[0].dtype}:
        raise ValueError(f"dataset {name!r}: images of different dtypes")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


# --- torchvision layouts ------------------------------------------------------------------------
#
# MNIST is read by torchvision itself. CIFAR pickles and SVHN .mat files are read here, in exactly
# torchvision's layout and with its decoding, because torchvision's CIFAR10/100 and SVHN classes
# refuse any file whose md5 is not the official one: that would make these code paths untestable
# with small files. torchvision still does every download (and checks the md5 sums then).

def _torchvision_path(name: str, root: pathlib.Path, split: str) -> pathlib.Path | None:
    """The folder/file of torchvision's layout for this split, if it exists."""
    if name == "cifar10":
        candidates = [root / "cifar-10-batches-py"]
    elif name == "cifar100":
        candidates = [root / "cifar-100-python"]
    elif name == "mnist":
        stem = "train" if split == "train" else "t10k"
        candidates = [root / "MNIST" / "raw" / f"{stem}-images-idx3-ubyte"]
    else:  # svhn: our download goes to root/svhn; torchvision's default puts it in root itself
        candidates = [root / "svhn" / f"{split}_32x32.mat", root / f"{split}_32x32.mat"]
    return next((p for p in candidates if p.exists()), None)


def _read_torchvision_layout(name: str, root: pathlib.Path, split: str) -> TensorDataset:
    path = _torchvision_path(name, root, split)
    if path is None:
        raise DataError(_missing_message(name, root, split))
    try:
        if name in ("cifar10", "cifar100"):
            x, y, classes = _read_cifar_pickles(name, path, split)
        elif name == "mnist":
            import torchvision.datasets as tvd

            tv = tvd.MNIST(str(root), train=(split == "train"), download=False)
            x, y, classes = tv.data.unsqueeze(1), tv.targets, [str(i) for i in range(10)]
            path = pathlib.Path(tv.raw_folder)
        else:
            x, y, classes = _read_svhn_mat(path)
    except DataError:
        raise
    except Exception as err:  # truncated pickle, bad .mat, missing label file, ...
        raise DataError(
            f"Dataset '{name}' ({split}) at {path} is incomplete or corrupt: {type(err).__name__}: {err}\n"
            f"Fix: delete it and run `python -m mixlab download {name}` (or pass download=True / "
            f"--download), or set MIXLAB_DATA to a folder with a good copy.") from err
    x = torch.as_tensor(x).to(torch.uint8).contiguous()
    y = torch.as_tensor(y).to(torch.int64)
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise DataError(f"Dataset '{name}' at {path}: images {tuple(x.shape)} and labels "
                        f"{tuple(y.shape)} do not match; re-download with `python -m mixlab download {name}`.")
    return TensorDataset(name=name, split=split, x=x, y=y, num_classes=_INFO[name]["num_classes"],
                         classes=classes, source=str(path))


def _read_cifar_pickles(name: str, folder: pathlib.Path, split: str):
    """torchvision's CIFAR pickle layout: ``data`` (N, 3072) uint8 rows in CHW order, labels in
    ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). The rows reshape straight to NCHW.
    The pickles are read with :func:`mixlab.fileio.restricted_pickle_load`, which builds numpy
    arrays, lists and strings only: a file that names any other Python global is refused
    (``pickle.UnpicklingError``) instead of running code."""
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, names_key = "batches.meta", "label_names"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_file, names_key = "meta", "fine_label_names"
    xs, ys = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = restricted_pickle_load(fh)
        xs.append(torch.as_tensor(entry["data"]).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(entry["labels"] if "labels" in entry else entry["fine_labels"]))
    classes = CIFAR10_CLASSES if name == "cifar10" else [str(i) for i in range(100)]
    if (folder / meta_file).exists():
        with open(folder / meta_file, "rb") as fh:
            classes = list(restricted_pickle_load(fh)[names_key])
    return torch.cat(xs), torch.cat(ys), classes


def _read_svhn_mat(path: pathlib.Path):
    """torchvision's SVHN layout: ``X`` (32, 32, 3, N) uint8 as HWCN, ``y`` (N, 1) in 1..10 where
    10 stands for digit 0 (mapped to 0, as torchvision does)."""
    import scipy.io as sio

    mat = sio.loadmat(str(path))
    x = torch.as_tensor(mat["X"]).permute(3, 2, 0, 1)  # HWCN -> NCHW
    y = torch.as_tensor(mat["y"].astype("int64")).reshape(-1)
    y[y == 10] = 0
    return x, y, [str(i) for i in range(10)]


def _missing_message(name: str, root: pathlib.Path, split: str) -> str:
    tv = {"cifar10": root / "cifar-10-batches-py", "cifar100": root / "cifar-100-python",
          "mnist": root / "MNIST" / "raw", "svhn": root / "svhn" / f"{split}_32x32.mat"}[name]
    msg = (f"Dataset '{name}' ({split}) not found under {root}.\n"
           f"Tried: {tv} (torchvision layout) and {root / name}/{split}/<class>/*.png|jpg (image folder).\n"
           f"Fix: run `python -m mixlab download {name}` (or pass download=True / --download), "
           f"or set MIXLAB_DATA to the folder that holds it.")
    if name == "cifar10":
        msg += (f"\nAn image-folder copy also works: unpack it so that {root / 'cifar10'}/train/<class>/*.jpg "
                f"exists (prepare_cifar10_from_archive(tar_path, root) does this for a .tar.gz).")
    return msg


# --- image folders --------------------------------------------------------------------------------

def find_image_folder(root, name: str, split: str) -> pathlib.Path | None:
    """The image-folder tree for ``name`` under ``root`` that has a ``<split>/`` sub-folder:
    ``root/<name>``, ``root/<name>-jpeg``, or one folder below either (archives that unpack into a
    sub-folder). None if there is none."""
    root = pathlib.Path(root)
    for base in (root / name, root / f"{name}-jpeg"):
        if not base.is_dir():
            continue
        if (base / split).is_dir():
            return base
        for sub in sorted(p for p in base.iterdir() if p.is_dir()):
            if (sub / split).is_dir():
                return sub
    return None


def _list_images(split_dir: pathlib.Path) -> tuple[list[str], list[tuple[pathlib.Path, int]]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files = []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(split_dir / cls)
                       if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES))
        files += [(split_dir / cls / n, label) for n in names]
    return classes, files


def read_image_folder(folder, split: str, *, name: str | None = None) -> TensorDataset:
    """Read ``folder/<split>/<class>/*.png|jpg`` into a TensorDataset (labels = alphabetical class
    order, files in name order). All images must have one size; grey images stay 1-channel, others
    are read as RGB.

    Decoding is done once (60k CIFAR JPEGs take about 20 s) and cached as ``folder/<split>.pt``;
    the cache is rebuilt when the class list or the number of files changes. A read-only folder
    just goes uncached.
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    folder = pathlib.Path(folder)
    name = name or folder.name
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"Image folder for '{name}' has no {split_dir}; expected "
                        f"{folder}/{split}/<class>/*.png|jpg.")
    classes, files = _list_images(split_dir)
    if not files:
        raise DataError(f"Image folder {split_dir} for '{name}' holds no .png/.jpg files in "
                        f"<class>/ sub-folders.")
    cache = folder / f"{split}.pt"
    x = y = None
    if cache.exists():
        try:
            c = safe_torch_load(cache)
            if c["num_files"] == len(files) and c["classes"] == classes:
                x, y = c["x"], c["y"]
        except Exception:  # unreadable cache: rebuild it
            pass
    if x is None:
        if len(files) > 1000:
            print(f"mixlab.data: decoding {len(files)} images from {split_dir} once "
                  f"(cached to {cache})", file=sys.stderr)
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 flags its decoders as deprecated in favour of TorchCodec (a
                # new dependency); they still work, and once per image the warning is noise.
                warnings.simplefilter("ignore", DeprecationWarning)
                first = decode_image(read_file(str(files[0][0])), mode=ImageReadMode.UNCHANGED)
                mode = ImageReadMode.GRAY if first.shape[0] in (1, 2) else ImageReadMode.RGB
                x = torch.stack([decode_image(read_file(str(p)), mode=mode) for p, _ in files])
        except RuntimeError as err:  # undecodable file or images of different sizes
            raise DataError(f"Could not read the image folder {split_dir} for '{name}': {err}\n"
                            f"All images must decode and have one size.") from err
        y = torch.tensor([label for _, label in files], dtype=torch.int64)
        _save_atomic({"x": x, "y": y, "classes": classes, "num_files": len(files)}, cache)
    return TensorDataset(name=name, split=split, x=x, y=y, num_classes=len(classes),
                         classes=classes, source=str(folder))


def _save_atomic(obj, path: pathlib.Path) -> None:
    """torch.save through a temporary file + rename (:func:`mixlab.fileio.atomic_torch_save`), so
    a crash or a concurrent reader never sees half a cache. Failing to write (read-only folder)
    is not an error: the data was read."""
    try:
        atomic_torch_save(obj, path)
    except OSError:
        pass


# --- preparing the offline copies -----------------------------------------------------------------

def prepare_cifar10_from_archive(tar_path, root=None) -> pathlib.Path:
    """Unpack an image-folder archive of CIFAR-10 (``train/<class>/*.jpg``, ``test/...``, possibly
    inside one top folder) into ``root/cifar10`` once; returns the tree that has ``train/``.

    Idempotent: does nothing when the tree is there. Unpacks into a temporary folder then renames
    it, so an interrupted run leaves nothing half-done behind.
    """
    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    found = find_image_folder(root, "cifar10", "train")
    if found is not None and (found / "test").is_dir():
        return found
    tar_path = pathlib.Path(tar_path)
    if not tar_path.is_file():
        raise DataError(f"CIFAR-10 archive {tar_path} not found (dataset 'cifar10'). Fix: point to "
                        f"the .tar.gz, or run `python -m mixlab download cifar10`.")
    root.mkdir(parents=True, exist_ok=True)
    dest = root / "cifar10"
    if dest.exists():
        raise DataError(f"{dest} exists but holds no train/ and test/ image folders; remove it "
                        f"and run again to unpack {tar_path} (dataset 'cifar10').")
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-unpack-"))
    try:
        with tarfile.open(tar_path) as tf:
            # The "data" filter refuses absolute paths, links out of the tree and device files
            # (Python >= 3.10.12 / 3.11.4; older ones lack it and extract as before).
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:
                tf.extractall(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the data is for everyone who reads root
        os.replace(tmp, dest)
        fsync_dir(root)  # make the rename durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    found = find_image_folder(root, "cifar10", "train")
    if found is None:
        raise DataError(f"Unpacked {tar_path} into {dest} but found no train/<class>/ images in it "
                        f"(dataset 'cifar10'); is it the right archive?")
    return found


def prepare_mnist_from_gz(src_dir, root=None) -> pathlib.Path:
    """Gunzip the 4 MNIST IDX files ``src_dir/*-ubyte.gz`` into ``root/MNIST/raw/`` (torchvision's
    layout) once; returns that folder. Idempotent: files already there are kept."""
    src_dir = pathlib.Path(src_dir)
    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for fname in _MNIST_FILES:
        dst = raw / fname
        if dst.exists() and dst.stat().st_size > 0:
            continue
        src = src_dir / f"{fname}.gz"
        if not src.is_file():
            raise DataError(f"MNIST file {src} not found (dataset 'mnist'). Fix: point src_dir to "
                            f"the folder with the 4 .gz files, or run `python -m mixlab download mnist`.")
        with gzip.open(src, "rb") as fin, atomic_writer(dst) as fout:  # temporary file + rename
            shutil.copyfileobj(fin, fout, length=1 << 20)
    return raw


def prepare_offline_copies(source, root=None) -> dict[str, pathlib.Path]:
    """Unpack the offline copies found in the folder ``source`` into ``root`` (default
    :func:`data_root`), once: ``MNIST/raw/*-ubyte.gz`` (:func:`prepare_mnist_from_gz`) and
    ``cifar10-jpeg.tar.gz`` (:func:`prepare_cifar10_from_archive`, whose JPEGs are then decoded
    once, so later loads read the cache). Returns what is ready: a label ("MNIST",
    "CIFAR-10 (JPEG copy)") -> its folder. The CLI's ``python -m mixlab prepare --from``."""
    source = pathlib.Path(source)
    root = pathlib.Path(root).expanduser().resolve() if root is not None else data_root()
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    ready = {}
    if (source / "MNIST" / "raw").is_dir():
        prepare_mnist_from_gz(source / "MNIST" / "raw", root)
        ready["MNIST"] = root / "MNIST"
    tar = source / "cifar10-jpeg.tar.gz"
    if tar.exists():
        prepare_cifar10_from_archive(tar, root)
        for split in SPLITS:  # decode the JPEGs once now; later loads hit the cache
            load_dataset("cifar10", split, root=root)
        ready["CIFAR-10 (JPEG copy)"] = root
    return ready


# ----------------------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    key = _key(name)
    if key not in DATASETS and key not in _REGISTERED:
        raise DataError(
            f"Unknown dataset {name!r}; valid names: {', '.join(available_datasets())}. A "
            f"dataset of your own must be registered in this process first, with "
            f"mixlab.data.register_dataset({str(name)!r}, loader, ...), or passed as data: "
            f"train(dataset=(x, y)) or train(dataset='<folder>')")
    return key


def _key(name) -> str:
    return str(name).strip().lower().replace("-", "")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
