"""mixlab.models: shapes, parameter counts, normalisation inside the model, errors, bf16/channels_last."""

import pytest
import torch
import torch.nn as nn

from mixlab.models import (CIFAR10_MEAN, CIFAR10_STD, MODELS, Normalize, available_models,
                           build_model, canonical_name)

# The two big WideResNets (46M parameters each) are only run on a batch of 1.
BIG = {"wrn-32-10", "wrn-34-10"}
MNIST_NETS = {"smallcnn", "lenet5-madry"}

# Parameter counts for 10 classes. Published/reference values (rounded) the counts must match
# within 2%, and the exact counts of this implementation (to catch accidental changes).
REFERENCE_PARAMS = {
    "preactresnet18": 11.17e6,   # locuslab/fast_adversarial PreActResNet18
    "wrn-28-4": 5.85e6,          # MMA's WRN-28-4
    "wrn-32-10": 46.16e6,        # GAIRAT's Wide_ResNet_Madry(depth=32)
    "wrn-34-10": 46.16e6,        # TRADES WideResNet-34-10
    "wrn-16-8": 10.96e6,         # Zagoruyko & Komodakis, table 4 (11.0M)
    "smallcnn": 312_202,         # TRADES SmallCNN
    "lenet5-madry": 3_274_634,   # Madry et al. MNIST model (2 convs + fc 1024)
}
EXACT_PARAMS = {
    "preactresnet18": 11_172_170, "wrn-28-4": 5_849_050, "wrn-32-10": 46_160_474,
    "wrn-34-10": 46_160_474, "wrn-16-8": 10_961_370, "smallcnn": 312_202,
    "lenet5-madry": 3_274_634, "tiny": 14_746,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def natural_input(name: str, batch: int) -> torch.Tensor:
    """Pixels in [0, 1] shaped like the data each network was designed for."""
    if name in MNIST_NETS:
        return torch.rand(batch, 1, 28, 28)
    return torch.rand(batch, 3, 32, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape_and_attributes(name):
    x = natural_input(name, batch=1 if name in BIG else 3)
    model = build_model(name, num_classes=7, in_channels=x.shape[1]).eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (x.shape[0], 7)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (model.arch, model.num_classes, model.in_channels) == (name, 7, x.shape[1])
    assert isinstance(model[0], Normalize)


@pytest.mark.parametrize("name", ["tiny", "smallcnn", "lenet5-madry", "preactresnet18", "wrn-16-8"])
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32), (3, 28), (1, 32)])
def test_other_input_sizes_and_channels(name, in_channels, size):
    # MNIST-sized input through CIFAR nets and back: adaptive pooling makes both work.
    model = build_model(name, num_classes=10, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, size, size))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_parameter_counts(name):
    in_channels = 1 if name in MNIST_NETS else 3
    count = n_params(build_model(name, num_classes=10, in_channels=in_channels))
    assert count == EXACT_PARAMS[name]
    if name in REFERENCE_PARAMS:
        assert abs(count - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.02
    if name == "tiny":
        assert 10_000 <= count <= 20_000


def test_normalisation_is_the_first_layer():
    model = build_model("tiny", num_classes=10).eval()
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
    # Buffers, not parameters: saved with the weights, never trained.
    assert model.normalize.mean.shape == (1, 3, 1, 1) and model.normalize.std.shape == (1, 3, 1, 1)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    assert all(not name.startswith("normalize") for name, _ in model.named_parameters())


def test_custom_and_greyscale_normalisation():
    model = build_model("tiny", num_classes=10, in_channels=3, mean=(0.5, 0.5, 0.5), std=0.25).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.25))
    # 1 channel: the MNIST papers feed raw pixels, so the default is the identity.
    grey = build_model("smallcnn", num_classes=10, in_channels=1)
    assert grey.normalize.mean.flatten().tolist() == [0.0]
    assert grey.normalize.std.flatten().tolist() == [1.0]


def test_state_dict_round_trip_carries_normalisation():
    a = build_model("tiny", num_classes=10, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)).eval()
    b = build_model("tiny", num_classes=10).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("spelling,expected", [
    ("PreActResNet-18", "preactresnet18"),
    ("preact_resnet18", "preactresnet18"),
    ("WRN-34-10", "wrn-34-10"),
    ("wrn_28_4", "wrn-28-4"),
    ("WideResNet-16-8", "wrn-16-8"),
    ("wrn_madry", "wrn-32-10"),
    ("LeNet5-Madry", "lenet5-madry"),
    ("small_cnn", "smallcnn"),
    ("TINY", "tiny"),
])
def test_aliases(spelling, expected):
    assert canonical_name(spelling) == expected


def test_generic_wideresnet():
    model = build_model("wrn-10-1", num_classes=10).eval()  # depth 6n+4 with n=1
    assert model.arch == "wrn-10-1"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert "wrn-<depth>-<width>" in available_models()


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="resnet50", num_classes=10), "preactresnet18"),   # the error lists known names
    (dict(name="wrn-30-2", num_classes=10), "depth 30"),         # bad WRN depth
    (dict(name="tiny", num_classes=1), "num_classes"),
    (dict(name="tiny", num_classes=0), "num_classes"),
    (dict(name="tiny", num_classes=2.5), "num_classes"),
    (dict(name="tiny", num_classes=10, in_channels=2), "in_channels"),
    (dict(name="tiny", num_classes=10, in_channels=4), "in_channels"),
    (dict(name="tiny", num_classes=10, mean=(0.5, 0.5)), "mean"),
    (dict(name="tiny", num_classes=10, std=(0.2, 0.0, 0.2)), "std"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def _bf16_channels_last_forward(name: str, device: str):
    model = build_model(name, num_classes=10).to(device).eval()
    x = torch.rand(2, 3, 32, 32, device=device)
    with torch.no_grad():
        reference = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; the logits must still agree with fp32 closely.
    scale = reference.abs().max().item() + 1e-3
    assert (logits.float() - reference).abs().max().item() < 0.05 * scale
    # Attacks need the input gradient through this path.
    (grad,) = torch.autograd.grad(logits.float().sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "preactresnet18"])
def test_channels_last_bf16_autocast_cpu(name):
    _bf16_channels_last_forward(name, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["tiny", "preactresnet18", "wrn-28-4"])
def test_channels_last_bf16_autocast_cuda(name):
    _bf16_channels_last_forward(name, "cuda")
