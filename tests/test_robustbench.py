"""mixlab.models.robustbench: RobustBench checkpoints load with the same logits as RobustBench's
own architecture classes, mixlab runs export to state dicts those classes load, and mixlab's
analysis tools accept the loaded models. Tiny widths (WRN-10-1) keep it fast; no downloads.

The comparisons against RobustBench's code need its architecture files (``pip install
mixlab[robustbench]``); they are loaded straight from the installed package's folder, since
importing the ``robustbench`` package itself also imports timm and its data tools."""
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from mixlab.evaluate import evaluate
from mixlab.margins import estimate_margin
from mixlab.models import build_model
from mixlab.models.robustbench import (DM_STATS, DMWideResNet, RBPreActResNet, RBWideResNet,
                                       export_robustbench, load_robustbench,
                                       robustbench_state_dict)
from mixlab.paths import interpolation_path

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def rb_arch(module: str):
    """robustbench/model_zoo/architectures/<module>.py, imported from its file."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the robustbench package is not installed (pip install mixlab[robustbench]); "
                    "the comparison with RobustBench's own architecture code needs it")
    path = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"this robustbench version has no {path.name}")
    mod_spec = importlib.util.spec_from_file_location(f"_rb_{module}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so they must load to match."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.fixture
def x():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def with_mu_sigma(cls, mean, std):
    """A RobustBench zoo entry's pattern: the architecture plus mu/sigma buffers."""
    class Net(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("mu", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, inp):
            return super().forward((inp - self.mu) / self.sigma)
    return Net


# ----------------------------------------------------------------------------- key names
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: RobustBench's names for WRN-10-1 (one block per stage; widths 16, 16, 32, 64, so the first
#: stage keeps its width and has no shortcut conv), as wide_resnet.py builds them
WRN_10_1_KEYS = (
    ["conv1.weight"]
    + [f"block{s}.layer.0.{m}.{p}" for s in (1, 2, 3) for m, ps in [
        ("bn1", BN), ("conv1", ("weight",)), ("bn2", BN), ("conv2", ("weight",)),
        *([("convShortcut", ("weight",))] if s > 1 else [])] for p in ps]
    + [f"bn1.{p}" for p in BN]
    + ["fc.weight", "fc.bias"])
#: DeepMind's names for WRN-10-1, as dm_wide_resnet.py builds them
DM_10_1_KEYS = (
    ["init_conv.weight"]
    + [f"layer.{s}.block.0.{m}.{p}" for s in (0, 1, 2) for m, ps in [
        ("batchnorm_0", BN), ("conv_0", ("weight",)), ("batchnorm_1", BN),
        ("conv_1", ("weight",)), *([("shortcut", ("weight",))] if s > 0 else [])] for p in ps]
    + [f"batchnorm.{p}" for p in BN]
    + ["logits.weight", "logits.bias"])


def test_module_names_are_robustbench_names():
    """Checked without the package: the names read from RobustBench's source."""
    assert list(RBWideResNet(10, 1).state_dict()) == WRN_10_1_KEYS
    assert list(DMWideResNet(10, 1).state_dict()) == DM_10_1_KEYS
    keys = set(RBPreActResNet(bn_before_fc=True).state_dict())
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight",
            "bn.running_var", "linear.bias"} <= keys
    assert "layer1.0.shortcut.0.weight" not in keys  # stride 1, same width: identity
    assert "bn.weight" not in RBPreActResNet().state_dict()


def test_wrn_28_10_parameter_count_matches_the_paper_network():
    """RobustBench's WRN-34-10 is mixlab's (TRADES') WRN-34-10: 46,160,474 parameters."""
    net = RBWideResNet(34, 10)
    assert sum(p.numel() for p in net.parameters()) == 46_160_474


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("wrap", ["plain", "module.", "state_dict+module.", "model+model.",
                                  "state_dict+model.module."])
def test_wideresnet_checkpoint_gives_robustbench_logits_exactly(tmp_path, x, wrap):
    wr = rb_arch("wide_resnet")
    torch.manual_seed(0)
    ref = randomise_bn(wr.WideResNet(depth=10, widen_factor=1, sub_block1=True))
    sd = ref.state_dict()
    prefix = wrap.split("+")[-1] if wrap != "plain" else ""
    sd = {prefix + k: v for k, v in sd.items()}
    if wrap.startswith("state_dict"):
        sd = {"state_dict": sd, "epoch": 99}
    elif wrap.startswith("model"):
        sd = {"model": sd, "optimizer_steps": 7}
    torch.save(sd, tmp_path / "m.pt")
    model = load_robustbench(tmp_path / "m.pt", arch="wrn-10-1")
    assert model.arch == "robustbench:wrn-10-1" and not model.training
    assert model.robustbench["normalization"]["from"].startswith("none")
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_zoo_entry_with_mu_sigma_buffers(tmp_path, x):
    wr = rb_arch("wide_resnet")
    torch.manual_seed(0)
    ref = randomise_bn(with_mu_sigma(wr.WideResNet, CIFAR10_MEAN, CIFAR10_STD)(
        depth=10, widen_factor=2, num_classes=100))
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model = load_robustbench(tmp_path / "m.pt")  # arch read from the weights
    assert model.arch == "robustbench:wrn-10-2" and model.num_classes == 100
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("num_classes,dataset", [(10, "cifar10"), (100, "cifar100")])
def test_deepmind_wideresnet_gives_robustbench_logits_exactly(tmp_path, x, num_classes,
                                                              dataset):
    dm = rb_arch("dm_wide_resnet")
    mean, std = DM_STATS[dataset]
    assert (tuple(dm.CIFAR10_MEAN), tuple(dm.CIFAR10_STD)) == DM_STATS["cifar10"]
    assert (tuple(dm.CIFAR100_MEAN), tuple(dm.CIFAR100_STD)) == DM_STATS["cifar100"]
    torch.manual_seed(0)
    ref = randomise_bn(dm.DMWideResNet(num_classes=num_classes, depth=10, width=1,
                                       activation_fn=dm.Swish, mean=mean, std=std))
    torch.save({"model": ref.state_dict()}, tmp_path / "dm.pt")
    model = load_robustbench(tmp_path / "dm.pt", arch="wrn-10-1")
    assert model.robustbench["family"] == "dm-wrn"
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        # torch's fused SiLU is the same function up to rounding
        silu = load_robustbench(tmp_path / "dm.pt", activation="silu")
        assert torch.allclose(silu(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("variant", ["v1", "v2+bn", "v1+out_shortcut+bn"])
def test_preactresnet18_variants_give_robustbench_logits_exactly(tmp_path, x, variant):
    rn = rb_arch("resnet")
    torch.manual_seed(0)
    if variant == "v1":  # Wong2020Fast / Andriushchenko2020Understanding
        ref = rn.PreActResNet(rn.PreActBlock, [2, 2, 2, 2])
    elif variant == "v2+bn":  # Rice2020OverfittingNetL2 / Kireev2021
        ref = with_mu_sigma(rn.PreActResNet, CIFAR10_MEAN, CIFAR10_STD)(
            rn.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
    else:  # Rice2020OverfittingNet (CIFAR-100)
        ref = rn.PreActResNet(rn.PreActBlock, [2, 2, 2, 2], num_classes=100,
                              bn_before_fc=True, out_shortcut=True)
    ref = randomise_bn(ref)
    torch.save({"last": ref.state_dict()}, tmp_path / "p.pt")
    model = load_robustbench(tmp_path / "p.pt", arch="PreActResNet-18")
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_normalisation_arguments_for_entries_that_do_not_save_it(tmp_path, x):
    """Wong2020Fast normalises with CIFAR-10 statistics its checkpoint does not hold."""
    rn = rb_arch("resnet")
    torch.manual_seed(0)
    ref = randomise_bn(with_mu_sigma(rn.PreActResNet, CIFAR10_MEAN, CIFAR10_STD)(
        rn.PreActBlock, [2, 2, 2, 2]))
    torch.save({k: v for k, v in ref.state_dict().items() if k not in ("mu", "sigma")},
               tmp_path / "w.pt")
    model = load_robustbench(tmp_path / "w.pt", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_bad_files_are_refused_with_a_clear_reason(tmp_path):
    net = RBWideResNet(10, 1)
    torch.save(net.state_dict(), tmp_path / "wrn.pt")
    with pytest.raises(ValueError, match=r"holds a RobustBench WideResNet wrn-10-1.*"
                                         r"arch='wrn-10-1'"):
        load_robustbench(tmp_path / "wrn.pt", arch="wrn-28-10")
    with pytest.raises(ValueError, match="arch='preactresnet18'.*WideResNet"):
        load_robustbench(tmp_path / "wrn.pt", arch="preactresnet18")
    # a pickle that needs code to load is refused, not run
    torch.save({"state_dict": net.state_dict(), "args": types.SimpleNamespace(lr=0.1)},
               tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_robustbench(tmp_path / "pickled.pt")
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_robustbench(tmp_path / "other.pt")
    sd = net.state_dict()
    del sd["block2.layer.0.conv2.weight"]
    torch.save(sd, tmp_path / "truncated.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_robustbench(tmp_path / "truncated.pt")
    torch.save(build_model("wrn-10-1", 10).state_dict(), tmp_path / "mixlab.pt")
    with pytest.raises(ValueError, match="mixlab"):
        load_robustbench(tmp_path / "mixlab.pt")
    with pytest.raises(FileNotFoundError):
        load_robustbench(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- analysis tools
def test_analysis_tools_accept_a_loaded_model(tmp_path):
    torch.manual_seed(0)
    torch.save(randomise_bn(RBWideResNet(10, 1)).state_dict(), tmp_path / "m.pt")
    model = load_robustbench(tmp_path / "m.pt", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    result = evaluate(model, xs, ys, attacks=("clean", "pgd10"), eps=8 / 255, batch_size=3)
    assert 0 <= result["pgd10"] <= result["clean"] <= 1 and result["n"] == 6
    margins = estimate_margin(model, xs, ys, norm="Linf", max_eps=16 / 255, steps=3,
                              search_steps=3)
    assert margins.shape == (6,) and (margins >= 0).all() and (margins <= 16 / 255).all()
    path = interpolation_path(model, xs[:2], xs[2:4], lams=5, eps=4 / 255, steps=2)
    assert path["probs"].shape == (2, 5, 10)


# ----------------------------------------------------------------------------- export
def fake_run(tmp_path, arch, *, source="/data/cifar10", evals=(), dataset="cifar10"):
    """A saved run as mixlab.load_run returns it, without training one."""
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, 10))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "provenance.json").write_text(json.dumps({"data_source": source,
                                                         "git_commit": "abc"}))
    for name, result in evals:
        (run_dir / f"{name}.json").write_text(json.dumps(result))
    config = {"method": "trades", "method_hp": {"beta": 6.0}, "dataset": dataset,
              "eps": 8 / 255, "norm": "Linf", "epochs": 76, "model": arch, "profile": None}
    return types.SimpleNamespace(model=model, config=config, history=[], path=run_dir,
                                 which="best", epoch=70)


EVAL = {"attacks": ["clean", "pgd20", "aa"], "n": 1000, "eps": 8 / 255, "norm": "Linf",
        "clean": 0.84, "pgd20": 0.55, "aa": 0.51, "robust": 0.5, "aa_version": "standard"}


@pytest.mark.parametrize("arch", ["wrn-10-1", "wrn-8-1", "preactresnet18"])
def test_export_loads_into_robustbench_and_back(tmp_path, x, arch):
    """wrn-8-1 is Madry's depth convention (6n+2): RobustBench's WideResNet(depth=10)."""
    run = fake_run(tmp_path, arch, evals=[("eval_cli", EVAL)])
    paths = export_robustbench(run, tmp_path / "out")
    sd = torch.load(paths["state_dict"], weights_only=True)
    assert {"mu", "sigma"} <= set(sd) and sd["mu"].shape == (1, 3, 1, 1)
    with torch.no_grad():
        want = run.model(x)
        back = load_robustbench(paths["state_dict"])
        # mixlab's adaptive pooling and RobustBench's avg_pool2d differ by rounding only
        assert torch.allclose(back(x), want, atol=1e-5)
    card = json.loads(paths["card_json"].read_text())
    assert card["architecture"]["arch"] == ("preactresnet18" if arch == "preactresnet18"
                                            else "wrn-10-1")
    assert card["state_dict"]["reload_max_logit_diff"] < 1e-5


@pytest.mark.parametrize("arch", ["wrn-10-1", "preactresnet18"])
def test_exported_state_dict_loads_strictly_into_robustbench_classes(tmp_path, x, arch):
    run = fake_run(tmp_path, arch)
    paths = export_robustbench(run, tmp_path / "out")
    if arch == "preactresnet18":  # Rice2020OverfittingNetL2's class
        rn = rb_arch("resnet")
        ref = with_mu_sigma(rn.PreActResNet, (0, 0, 0), (1, 1, 1))(
            rn.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)
    else:
        wr = rb_arch("wide_resnet")
        ref = with_mu_sigma(wr.WideResNet, (0, 0, 0), (1, 1, 1))(depth=10, widen_factor=1)
    ref.load_state_dict(torch.load(paths["state_dict"], weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.allclose(ref.eval()(x), run.model(x), atol=1e-5)


def test_model_card_reports_the_evaluation_and_the_data_caveat(tmp_path):
    other_eps = dict(EVAL, eps=4 / 255, aa=0.7, n=10000)  # more images, other threat model
    no_aa = dict(EVAL, attacks=["clean", "pgd20"], n=5000)
    del no_aa["aa"]
    run = fake_run(tmp_path, "wrn-10-1", source="/work/data/cifar10",
                   evals=[("eval_small", other_eps), ("eval_cli", EVAL), ("eval_pgd", no_aa)])
    paths = export_robustbench(run, tmp_path / "out", name="mine")
    assert sorted(p.name for p in paths.values()) == ["mine.json", "mine.md", "mine.pt"]
    card = json.loads(paths["card_json"].read_text())
    assert card["dataset"] == "cifar10" and card["threat_model"] == "Linf"
    assert card["eps_255"] == pytest.approx(8)
    acc = card["accuracy"]  # the AutoAttack evaluation at the run's eps, not the others
    assert (acc["clean"], acc["autoattack"], acc["n"]) == (0.84, 0.51, 1000)
    assert acc["file"].endswith("eval_cli.json")
    assert "JPEG re-encoding" in card["data_caveat"]
    assert card["training"]["method"] == "trades" and card["training"]["epoch"] == 70
    md = paths["card_md"].read_text()
    for text in ("84.00%", "51.00%", "JPEG", "WideResNet(depth=10, widen_factor=1",
                 "load_state_dict", "Linf, eps = 8/255"):
        assert text in md, text


def test_card_without_evaluation_and_from_the_original_data(tmp_path):
    run = fake_run(tmp_path, "preactresnet18", source="/data/cifar-10-batches-py")
    card = json.loads(export_robustbench(run, tmp_path / "o")["card_json"].read_text())
    assert card["accuracy"] is None and "original CIFAR-10" in card["data_caveat"]
    assert "JPEG" not in card["data_caveat"]


def test_export_refuses_models_without_a_robustbench_twin(tmp_path):
    with pytest.raises(ValueError, match="no RobustBench twin"):
        robustbench_state_dict(build_model("tiny", 10))
    with pytest.raises(ValueError, match="3 channels"):
        robustbench_state_dict(build_model("preactresnet18", 10, 1))
    with pytest.raises(ValueError, match="mixlab model"):
        robustbench_state_dict(RBWideResNet(10, 1))


def test_a_loaded_model_exports_back_unchanged(tmp_path, x):
    torch.manual_seed(0)
    net = randomise_bn(DMWideResNet(10, 1))
    torch.save(net.state_dict(), tmp_path / "dm.pt")
    model = load_robustbench(tmp_path / "dm.pt")
    sd, info = robustbench_state_dict(model)
    assert info["family"] == "dm-wrn"
    for key, value in net.state_dict().items():
        assert torch.equal(sd[key], value), key
