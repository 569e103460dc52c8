"""Datasets as uint8 tensors on the device, and where they come from.

* :mod:`mixlab.data.loader`: :class:`TensorDataset` (a whole split as tensors),
  :class:`DeviceLoader` (batches sliced and augmented on the device) and :class:`Batch`;
* :mod:`mixlab.data.sources`: the registry of dataset names and facts (:func:`dataset_info`),
  :func:`load_dataset`, :func:`download`, the preparation of offline copies and data of your
  own (:func:`register_dataset`, :func:`as_tensor_datasets`).

Everything public in both is importable from here: ``from mixlab.data import load_dataset,
DeviceLoader``. This package knows nothing of the rest of mixlab but its file and checkout
helpers, and touches no device at import time.

>>> train_ds = load_dataset("cifar10", "train").to("cuda")
>>> loader = DeviceLoader(train_ds, 512, augment=True, generator=torch.Generator().manual_seed(0))
>>> x, y, idx = next(iter(loader))
"""
from .loader import Batch, DeviceLoader, TensorDataset, augment_crop_flip, train_val_split
from .sources import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DATASETS, SPLITS, DataError,
                      DatasetNames, as_tensor_dataset, as_tensor_datasets, available_datasets,
                      custom_dataset_name, data_root, dataset_info, download, find_dataset,
                      find_image_folder, is_custom_dataset, load_dataset,
                      prepare_cifar10_from_archive, prepare_mnist_from_gz, prepare_offline_copies,
                      read_image_folder, register_dataset, synthetic_dataset, unregister_dataset)

__all__ = [
    "Batch", "DeviceLoader", "TensorDataset", "augment_crop_flip", "train_val_split",
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "SPLITS", "DataError",
    "DatasetNames", "as_tensor_dataset", "as_tensor_datasets", "available_datasets",
    "custom_dataset_name", "data_root", "dataset_info", "download", "find_dataset",
    "find_image_folder", "is_custom_dataset", "load_dataset", "prepare_cifar10_from_archive",
    "prepare_mnist_from_gz", "prepare_offline_copies", "read_image_folder", "register_dataset",
    "synthetic_dataset", "unregister_dataset",
]
