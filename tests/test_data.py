"""mixlab.data: synthetic data, the device loader (idx, order, augmentation), and every reader on
tiny files written here in the real on-disk layouts (image folder, MNIST IDX, CIFAR pickles, SVHN
.mat), plus the errors. One test reads the real MNIST copy from ../shared/data when present."""

import gzip
import io
import pathlib
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixlab import data
from mixlab.data import (DATASETS, Batch, DataError, DeviceLoader, TensorDataset, augment_crop_flip,
                         dataset_info, load_dataset, prepare_cifar10_from_archive,
                         prepare_mnist_from_gz, synthetic_dataset, train_val_split)

# torchvision 0.29 flags its PNG/JPEG encoders (used here to write test images) as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- synthetic data and the dataset object ---------------------------------------------------------

def test_synthetic_shapes_and_learnable():
    tr = synthetic_dataset(400, num_classes=4, image_size=16, channels=3, seed=1)
    te = synthetic_dataset(200, num_classes=4, image_size=16, channels=3, seed=1, split="test")
    assert tr.name == "synthetic" and tr.source == "synthetic" and tr.split == "train"
    assert tr.x.dtype == torch.uint8 and tr.x.shape == (400, 3, 16, 16)
    assert tr.y.dtype == torch.int64 and tr.y.shape == (400,)
    assert set(tr.y.tolist()) == {0, 1, 2, 3} and tr.num_classes == 4 and len(tr.classes) == 4
    assert not torch.equal(tr.x[:200], te.x)  # splits hold different samples
    # Learnable: nearest class mean (fitted on train) classifies test almost perfectly.
    xtr, xte = tr.x.flatten(1).float(), te.x.flatten(1).float()
    means = torch.stack([xtr[tr.y == c].mean(0) for c in range(4)])
    acc = (torch.cdist(xte, means).argmin(1) == te.y).float().mean()
    assert acc > 0.95
    # Deterministic in the seed.
    assert torch.equal(synthetic_dataset(50, seed=3).x, synthetic_dataset(50, seed=3).x)


def test_load_synthetic_and_info():
    ds = load_dataset("synthetic", "test")
    assert ds.name == "synthetic" and ds.x.shape[1:] == (3, 32, 32)
    info = dataset_info("cifar10")
    assert info["num_classes"] == 10 and info["in_channels"] == 3 and info["image_size"] == 32
    assert info["eps"] == {"Linf": 8 / 255, "L2": 0.5} and len(info["mean"]) == 3
    assert dataset_info("MNIST")["eps"] == {"Linf": 0.3, "L2": 2.0}
    assert {dataset_info(n)["num_classes"] for n in DATASETS} == {10, 100}


def test_subset_split_fingerprint_to():
    ds = synthetic_dataset(100)
    sub = ds.subset(30, seed=0)
    assert len(sub) == 30 and torch.equal(sub.x, ds.subset(30, seed=0).x)
    assert sub.fingerprint() != ds.subset(30, seed=1).fingerprint()
    assert ds.fingerprint() == synthetic_dataset(100).fingerprint() and len(ds.fingerprint()) == 16
    tr, va = train_val_split(ds, 20, seed=0)
    assert (len(tr), len(va), va.split) == (80, 20, "val")
    # Together they are a permutation of ds: every example exactly once.
    both = torch.cat([tr.x, va.x]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, ds.x.flatten(1).tolist()))
    moved = ds.to("cpu")
    assert moved.device.type == "cpu" and moved.fingerprint() == ds.fingerprint()


# --- loader --------------------------------------------------------------------------------------

def test_loader_each_index_once_per_epoch():
    ds = synthetic_dataset(103)
    loader = DeviceLoader(ds, 16, shuffle=True, drop_last=False, generator=_gen())
    assert len(loader) == 7
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 7 and all(isinstance(b, Batch) for b in batches)
        idx = torch.cat([b.idx for b in batches])
        assert idx.dtype == torch.int64 and sorted(idx.tolist()) == list(range(103))
    assert len(DeviceLoader(ds, 16, drop_last=True)) == 6
    assert [b.idx.tolist() for b in DeviceLoader(ds, 50, shuffle=False, drop_last=False)][2] == [100, 101, 102]
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(ds, 200, drop_last=True)


def test_loader_batch_matches_data_and_is_reproducible():
    ds = synthetic_dataset(64)
    x, y, idx = next(iter(DeviceLoader(ds, 16, generator=_gen(5))))
    assert x.dtype == torch.float32 and torch.equal(x, ds.x[idx].float() / 255)
    assert torch.equal(y, ds.y[idx])
    # Same generator state -> same epoch; saving the state resumes exactly.
    g = _gen(5)
    first = [b.idx for b in DeviceLoader(ds, 16, generator=g)]
    assert torch.equal(first[0], idx)
    state = g.get_state()
    second = [b.x for b in DeviceLoader(ds, 16, generator=g, augment=True)]
    g.set_state(state)
    again = [b.x for b in DeviceLoader(ds, 16, generator=g, augment=True)]
    assert all(torch.equal(a, b) for a, b in zip(second, again))
    cl = next(iter(DeviceLoader(ds, 16, channels_last=True)))
    assert cl.x.is_contiguous(memory_format=torch.channels_last)


def _all_crops(img, padding):
    """Every crop (and its mirror) of the zero-padded image: the reference for the augmentation."""
    c, h, w = img.shape
    p = F.pad(img[None], (padding,) * 4)[0]
    crops = [p[:, i:i + h, j:j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [cr.flip(-1) for cr in crops]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_crop_flip(dtype):
    x = synthetic_dataset(16, image_size=8, channels=2).x
    x = x if dtype == torch.uint8 else x.float() / 255
    out = augment_crop_flip(x, padding=2, generator=_gen(0))
    assert out.shape == x.shape and out.dtype == dtype
    for a, img in zip(out, x):
        assert any(torch.equal(a, c) for c in _all_crops(img, 2))
    assert torch.equal(out, augment_crop_flip(x, padding=2, generator=_gen(0)))
    assert not torch.equal(out, augment_crop_flip(x, padding=2, generator=_gen(1)))
    # Over a batch, some images moved and some flipped (it is not the identity).
    assert not torch.equal(out, x)


def test_loader_augment_crops_the_indexed_images():
    ds = synthetic_dataset(32, image_size=8)
    for b in DeviceLoader(ds, 8, augment=True, padding=1, generator=_gen(2)):
        for a, i in zip(b.x, b.idx):
            assert any(torch.equal(a, c.float() / 255) for c in _all_crops(ds.x[i], 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_cuda_matches_cpu():
    ds = synthetic_dataset(64)
    cpu = list(DeviceLoader(ds, 16, augment=True, generator=_gen(3)))
    gpu = list(DeviceLoader(ds.to("cuda"), 16, augment=True, generator=_gen(3), channels_last=True))
    for a, b in zip(cpu, gpu):
        assert b.x.is_cuda and b.idx.is_cuda
        assert torch.equal(a.idx, b.idx.cpu()) and torch.equal(a.x, b.x.cpu())


# --- image folders ---------------------------------------------------------------------------------

def _write_pngs(folder, split, n_per_class=3, classes=("dog", "cat"), size=8):
    from torchvision.io import write_png

    imgs = {}
    for k, cls in enumerate(classes):
        (folder / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=_gen(10 * k + i))
            write_png(img, str(folder / split / cls / f"{i:04d}.png"))
            imgs[(cls, i)] = img
    return imgs


def test_image_folder_read_and_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    imgs = _write_pngs(folder, "train")
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert ds.name == "cifar10" and ds.source == str(folder)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2  # sorted alphabetically
    assert ds.x.shape == (6, 3, 8, 8) and ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(ds.x[0], imgs[("cat", 0)]) and torch.equal(ds.x[5], imgs[("dog", 2)])
    assert (folder / "train.pt").exists()
    # Second read comes from the cache: decoding would fail now.
    import torchvision.io

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(torchvision.io, "decode_image", no_decode)
    assert torch.equal(load_dataset("cifar10", "train", root=tmp_path).x, ds.x)
    monkeypatch.undo()
    # One more file: the cache is stale and rebuilt.
    _write_pngs(folder, "train", n_per_class=4, classes=("cat",))
    assert len(load_dataset("cifar10", "train", root=tmp_path)) == 7
    with pytest.raises(DataError, match="test"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_image_folder_archive_with_subfolder(tmp_path):
    # An archive that unpacks into one sub-folder, named cifar10-jpeg, with JPEGs.
    from torchvision.io import encode_jpeg

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(2):
                    img = torch.full((3, 8, 8), 40 * i + (cls == "b") * 100, dtype=torch.uint8)
                    blob = encode_jpeg(img).numpy().tobytes()
                    info = tarfile.TarInfo(f"top/{split}/{cls}/{i}.jpg")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    tar = tmp_path / "c.tar.gz"
    tar.write_bytes(buf.getvalue())
    root = tmp_path / "data"
    tree = prepare_cifar10_from_archive(tar, root)
    assert tree == root / "cifar10" / "top" and (tree / "test" / "b" / "1.jpg").exists()
    assert prepare_cifar10_from_archive(tar, root) == tree  # idempotent
    ds = load_dataset("cifar10", "test", root=root)
    assert ds.x.shape == (4, 3, 8, 8) and ds.y.tolist() == [0, 0, 1, 1]
    assert (ds.x[3].float().mean() - 140).abs() < 3  # JPEG is lossy, but not that much
    # The <root>/cifar10-jpeg name is found too.
    (root / "cifar10").rename(root / "cifar10-jpeg")
    assert data.find_dataset("cifar10", "train", root=root) == root / "cifar10-jpeg" / "top"


# --- torchvision layouts, written by hand ----------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, raw bytes."""
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _mnist_arrays():
    rng = np.random.default_rng(0)
    return {"train": (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 9, 4], np.uint8)),
            "t10k": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([7, 8, 9], np.uint8))}


def test_mnist_idx(tmp_path):
    raw = tmp_path / "gz"
    raw.mkdir()
    arrays = _mnist_arrays()
    for stem, (x, y) in arrays.items():
        (raw / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (raw / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y)))
    root = tmp_path / "data"
    assert prepare_mnist_from_gz(raw, root) == root / "MNIST" / "raw"
    prepare_mnist_from_gz(raw, root)  # idempotent
    tr = load_dataset("mnist", "train", root=root)
    te = load_dataset("mnist", "test", root=root)
    assert tr.x.shape == (5, 1, 28, 28) and tr.x.dtype == torch.uint8 and te.x.shape == (3, 1, 28, 28)
    assert torch.equal(tr.x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert tr.y.tolist() == [0, 1, 2, 9, 4] and te.y.tolist() == [7, 8, 9] and tr.num_classes == 10
    # A missing label file is a corrupt dataset: one clear error.
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="download"):
        load_dataset("mnist", "test", root=root)


def test_prepare_offline_copies(tmp_path):
    """`python -m mixlab prepare --from <folder>`: the MNIST .gz files of the folder land in
    torchvision's layout under the data root; a folder without copies prepares nothing."""
    source = tmp_path / "shared"
    raw = source / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, (x, y) in _mnist_arrays().items():
        (raw / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (raw / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y)))
    root = tmp_path / "data"
    assert data.prepare_offline_copies(source, root) == {"MNIST": root.resolve() / "MNIST"}
    assert load_dataset("mnist", "test", root=root).x.shape == (3, 1, 28, 28)
    (tmp_path / "empty").mkdir()
    assert data.prepare_offline_copies(tmp_path / "empty", tmp_path / "other") == {}
    with pytest.raises(ValueError, match="not a folder"):
        data.prepare_offline_copies(tmp_path / "nowhere", root)


def _pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    _pickle(folder / "train", {"data": x, "fine_labels": [0, 5, 99, 3, 3, 1], "coarse_labels": [0] * 6})
    _pickle(folder / "test", {"data": x[:2], "fine_labels": [1, 2], "coarse_labels": [0] * 2})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    ds = load_dataset("cifar100", "train", root=tmp_path)
    assert ds.x.shape == (6, 3, 32, 32) and ds.num_classes == 100 and ds.classes[99] == "c99"
    assert torch.equal(ds.x.reshape(6, -1), torch.from_numpy(x))  # rows are CHW already
    assert ds.y.tolist() == [0, 5, 99, 3, 3, 1] and len(load_dataset("cifar100", "test", root=tmp_path)) == 2
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar100.*corrupt"):
        load_dataset("cifar100", "test", root=tmp_path)


def test_cifar10_pickles_preferred_over_image_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", {"data": np.full((2, 3072), i, np.uint8), "labels": [i, 0]})
    _pickle(folder / "test_batch", {"data": np.zeros((1, 3072), np.uint8), "labels": [9]})
    _write_pngs(tmp_path / "cifar10", "train")
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert ds.source == str(folder) and ds.x.shape == (10, 3, 32, 32) and ds.classes[0] == "airplane"
    assert ds.y.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0] and ds.x[9].unique().tolist() == [5]


class _RunsCode:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for a malicious dataset file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("bad_file", ["test_batch", "batches.meta"])
def test_cifar_pickles_that_run_code_are_refused(tmp_path, bad_file):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", {"data": np.full((2, 3072), i, np.uint8), "labels": [i, 0]})
    _pickle(folder / "test_batch", {"data": np.zeros((1, 3072), np.uint8), "labels": [9]})
    _pickle(folder / "batches.meta", {"label_names": list(data.CIFAR10_CLASSES)})
    evil = {"test_batch": {"data": np.zeros((1, 3072), np.uint8), "labels": [_RunsCode(marker)]},
            "batches.meta": {"label_names": _RunsCode(marker)}}[bad_file]
    _pickle(folder / bad_file, evil)
    pickle.loads((folder / bad_file).read_bytes())  # the file is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    split = "test" if bad_file == "test_batch" else "train"  # batches.meta is read for both
    with pytest.raises(DataError, match=r"cifar10.*builtins\.exec.*not a CIFAR batch"):
        load_dataset("cifar10", split, root=tmp_path)
    assert not marker.exists()
    if bad_file == "test_batch":  # the good files still load
        assert len(load_dataset("cifar10", "train", root=tmp_path)) == 10


def test_mnist_gunzip_is_atomic(tmp_path):
    raw = tmp_path / "gz"
    raw.mkdir()
    x, y = _mnist_arrays()["train"]
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y))[:-12])  # truncated
    root = tmp_path / "data"
    with pytest.raises(EOFError):
        prepare_mnist_from_gz(raw, root)
    out = root / "MNIST" / "raw"
    # The good file is complete, the truncated one left nothing behind (no partial, no temp file).
    assert sorted(p.name for p in out.iterdir()) == ["train-images-idx3-ubyte"]
    assert (out / "train-images-idx3-ubyte").read_bytes() == _idx_bytes(x)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # HWCN, as the official files
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [5], [10]], np.uint8)})
    ds = load_dataset("svhn", "test", root=tmp_path)
    assert ds.x.shape == (4, 3, 32, 32) and ds.y.tolist() == [0, 1, 5, 0]  # label 10 is digit 0
    assert torch.equal(ds.x[2], torch.from_numpy(x[:, :, :, 2]).permute(2, 0, 1))


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist"])
def test_missing_data_error(tmp_path, name):
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", root=tmp_path / "nowhere")
    msg = str(err.value)
    assert name in msg and str(tmp_path / "nowhere") in msg and "download" in msg
    assert f"python -m mixlab download {name}" in msg and "MIXLAB_DATA" in msg


def test_bad_name_and_split(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cifar10, cifar100, svhn, mnist, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic", "validation")
    monkeypatch.setenv("MIXLAB_DATA", str(tmp_path))
    assert data.data_root() == tmp_path.resolve()
    monkeypatch.delenv("MIXLAB_DATA")
    monkeypatch.chdir(tmp_path)
    assert data.data_root() == (tmp_path / "data").resolve()  # not a checkout: ./data


def test_data_root_from_a_checkouts_notebooks_folder(tmp_path, monkeypatch):
    """papermill runs notebooks with cwd notebooks/: without $MIXLAB_DATA they still find the
    checkout's data/, and a ./data beside the cwd still wins."""
    monkeypatch.delenv("MIXLAB_DATA", raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert data.data_root() == (tmp_path / "notebooks" / "data").resolve()  # no data/ yet
    (tmp_path / "data").mkdir()
    assert data.data_root() == (tmp_path / "data").resolve()
    (tmp_path / "notebooks" / "data").mkdir()
    assert data.data_root() == (tmp_path / "notebooks" / "data").resolve()


# --- the real MNIST, when the shared offline copy is there -----------------------------------------

@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                    reason=f"offline data copy {SHARED_DATA} absent (only on the project's machines)")
def test_real_mnist(tmp_path):
    prepare_mnist_from_gz(SHARED_DATA / "MNIST" / "raw", tmp_path)
    tr = load_dataset("mnist", "train", root=tmp_path)
    te = load_dataset("mnist", "test", root=tmp_path)
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.y.bincount().tolist()[:2] == [5923, 6742]  # the well-known class counts
    mean = tr.x.float().mean().item() / 255
    assert abs(mean - dataset_info("mnist")["mean"][0]) < 1e-3
