"""Models and data of your own: train(model=module), train(dataset=data), register_model and
register_dataset, with the checks and errors of the built-ins."""
import json

import pytest
import torch
import torch.nn as nn

from mixlab import data as data_mod
from mixlab import models
from mixlab.runs import CheckpointError, load_run
from mixlab.train import train

EPS = 8 / 255
FAST = dict(epochs=1, batch_size=32, val_size=64, steps=2, eval_steps=2, device="cpu",
            quiet=True, lr=0.05)


class TinyNet(nn.Module):
    """A small CNN taking pixels in [0, 1]."""

    def __init__(self, num_classes=4, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 7)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class PairDataset(torch.utils.data.Dataset):
    """(image tensor, int label) pairs, as torchvision datasets with ToTensor give them."""

    def __init__(self, n=160):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _tensors(n=256, classes=4, size=16, channels=3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = (0.3 * torch.rand(n, channels, size, size, generator=g) + 0.6 * (y[:, None, None, None]
                                                                        / classes)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("method", ["pgd_at", "mixup"])
def test_custom_module_on_tensors(tmp_path, method):
    net = TinyNet()
    model, history = train(model=net, dataset=_tensors(), method=method, eps=EPS,
                           run_dir=str(tmp_path / "run"), **FAST)
    assert model.net is net and len(history) == 1
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == "custom:TinyNet" and cfg["dataset"] == "custom:tensors"
    run = load_run(tmp_path / "run", which="last", model=TinyNet())
    assert run.model.net.fc.weight.equal(net.fc.weight.cpu())
    with pytest.raises(CheckpointError, match="model="):
        load_run(tmp_path / "run", which="last")
    # the same module again resumes (here: the run is finished, nothing is retrained)
    _, again = train(model=TinyNet(), dataset=_tensors(), method=method, eps=EPS,
                     run_dir=str(tmp_path / "run"), **FAST)
    assert again == history


def test_torch_dataset_and_train_test_pair():
    _, history = train(model=TinyNet(), dataset=PairDataset(), eps=EPS, **FAST)
    assert len(history) == 1
    (x, y), (xt, yt) = _tensors(), _tensors(64)
    train_ds, test_ds, name = data_mod.as_tensor_datasets(((x, y), (xt, yt)))
    assert train_ds.x.dtype == torch.uint8 and test_ds is not None and name == "custom:tensors"
    assert train_ds.num_classes == 4 and len(test_ds) == 64


def test_image_folder(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("test", 4)):
        for c, cls in enumerate(("cat", "dog")):
            folder = tmp_path / "pets" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pix = (torch.rand(16, 16, 3, generator=g) * 100 + 120 * c).to(torch.uint8)
                Image.fromarray(pix.numpy()).save(folder / f"{i}.png")
    path = str(tmp_path / "pets")
    model, history = train(model="tiny", dataset=tmp_path / "pets", eps=EPS,
                           run_dir=str(tmp_path / "run"), **{**FAST, "val_size": 16})
    assert model.num_classes == 2 and len(history) == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == path
    run = load_run(tmp_path / "run", which="last")
    assert run.model.arch == "tiny"
    # the folder path is a valid dataset setting as a plain string too (command line)
    _, history = train(model="tiny", dataset=path, eps=EPS, **{**FAST, "val_size": 16})
    assert len(history) == 1


def test_register_model_and_dataset(tmp_path):
    x, y = _tensors(n=192, classes=3)

    def loader(split, root):
        return (x, y) if split == "train" else (x[:32], y[:32])

    models.register_model("mytiny", lambda num_classes, in_channels: TinyNet(num_classes,
                                                                               in_channels))
    data_mod.register_dataset("blobs", loader, num_classes=3, in_channels=3, image_size=16,
                              eps={"Linf": 4 / 255, "L2": 0.25})
    try:
        assert "mytiny" in models.available_models()
        assert "blobs" in data_mod.available_datasets()
        with pytest.raises(ValueError, match="taken"):
            models.register_model("MyTiny", TinyNet)
        with pytest.raises(ValueError, match="taken"):
            data_mod.register_dataset("blobs", loader, num_classes=3, in_channels=3,
                                      image_size=16, eps={"Linf": 0.1, "L2": 1.0})
        with pytest.raises(ValueError, match="eps"):
            data_mod.register_dataset("other", loader, num_classes=3, in_channels=3,
                                      image_size=16, eps={"Linf": 0.1})
        with pytest.raises(ValueError, match="callable|function"):
            models.register_model("other", TinyNet())
        model, history = train(model="mytiny", dataset="blobs", run_dir=str(tmp_path / "run"),
                               **FAST)
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        assert cfg["eps"] == pytest.approx(4 / 255)  # the registered standard radius
        assert load_run(tmp_path / "run", which="last").model.arch == "mytiny"
        models.unregister_model("mytiny")
        with pytest.raises(ValueError, match="register_model"):
            load_run(tmp_path / "run", which="last")
        models.register_model("mytiny", lambda n, c: TinyNet(n, c))
        data_mod.unregister_dataset("blobs")
        with pytest.raises(data_mod.DataError, match="register_dataset"):
            load_run(tmp_path / "run", which="last")
        # a registered dataset whose labels exceed its num_classes
        data_mod.register_dataset("blobs", lambda s, r: (x, y + 1), num_classes=3,
                                  in_channels=3, image_size=16, eps={"Linf": 0.1, "L2": 1.0})
        with pytest.raises(ValueError, match=r"labels in \[1, 3\]"):
            train(model="mytiny", dataset="blobs", **FAST)
    finally:
        for name, forget in (("mytiny", models.unregister_model),
                             ("blobs", data_mod.unregister_dataset)):
            try:
                forget(name)
            except KeyError:
                pass


def test_errors(tmp_path):
    x, y = _tensors()
    with pytest.raises(ValueError, match=r"logits of shape.*\(32, 4\).*gave \(32, 7\)"):
        train(model=WrongShape(), dataset=(x, y), eps=EPS, run_dir=str(tmp_path / "r"), **FAST)
    assert not (tmp_path / "r" / "config.json").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"labels in \[-1, 2\]: labels must be class indices"):
        train(model=TinyNet(), dataset=(x, y - 1), eps=EPS, **FAST)
    with pytest.raises(ValueError, match=r"float pixels must lie in \[0, 1\]"):
        train(model=TinyNet(), dataset=(x * 255, y), eps=EPS, **FAST)
    with pytest.raises(ValueError, match="pass eps"):
        train(model=TinyNet(), dataset=(x, y), **FAST)
    with pytest.raises(ValueError, match="labels have dtype"):
        train(model=TinyNet(), dataset=(x, y.float()), eps=EPS, **FAST)
    with pytest.raises(ValueError, match="register_model"):
        train(model="no-such-net", dataset=(x, y), eps=EPS, **FAST)
    with pytest.raises(ValueError, match="not one of"):
        train(model="tiny", dataset="no-such-data", **FAST)


def test_train_or_load_takes_your_own_module_and_tensors(tmp_path, capsys):
    from mixlab.runs import train_or_load
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(192, 3, 16, 16, generator=g), torch.randint(0, 4, (192,), generator=g)
    net = TinyNet()
    first = train_or_load(run_dir=tmp_path / "run", model=net, dataset=(x, y), eps=EPS,
                          method="pgd_at", **FAST)
    assert capsys.readouterr().out.startswith("training ")
    assert first.model.net is net and first.config["model"] == "custom:TinyNet"
    again = train_or_load(run_dir=tmp_path / "run", model=TinyNet(), dataset=(x, y), eps=EPS,
                          method="pgd_at", **FAST)
    assert capsys.readouterr().out.startswith("loading finished run ")
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 again.model.state_dict().values()))
