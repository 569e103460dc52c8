"""mixlab.config: how settings merge, and why no name can cross between the engine's settings
and a method's hyperparameters (were the PGD step size and mixup's Beta concentration both
called ``alpha``, setting one would set both)."""
import json

import numpy as np
import pytest
import torch

from mixlab import train as train_mod
from mixlab.config import PROFILE_NAMES, SETTINGS, attack_spec, resolve_config
from mixlab.data import dataset_info, synthetic_dataset
from mixlab.methods import METHODS, AttackSpec, get_method
from mixlab.methods import mma as mma_mod
from mixlab.methods.mma import MMA, PRESETS, THREATS
from mixlab.models import build_model
from mixlab.train import train

PROFILES = (None, *PROFILE_NAMES)
#: hyperparameters whose ``None`` default ``check_hp`` fills (documented in the method's
#: ``defaults`` and ``check_hp``): MMA's hinge and starting radius come from THREATS
FILLED_FROM_NONE = {"mma": ("d_max", "mineps")}
#: a valid value other than the default (and than any hp_profiles value), per method
OVERRIDES = {
    "mixup": {"alpha": 0.2, "per_example": True, "mix": "cutmix"},
    "amp": {"alpha": 0.4, "lam_opt": True, "clean_weight": 0.5},
    "mma": {"d_max": 0.1, "mineps": 0.01, "search_steps": 5, "clean_coeff": 0.0},
    "gairat": {"begin_epoch": 7, "gair_lambda": -2.0, "weight_fn": "sigmoid"},
    "gair_fat": {"begin_epoch": 7, "tau": [1, 2, 3], "omega": 0.01},
    "fat": {"tau": 1, "omega": 0.0},
    "trades": {"beta": 1.0, "mix": "cutmix", "mix_alpha": 0.5},
    "pgd_at": {"mix": "cutmix", "mix_alpha": 0.5},
}
EPS = dataset_info("cifar10")["eps"]["Linf"]  # the default dataset's radius (8/255)


def jsonable(value):
    """As config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(value))


def overrides(name):
    """The table's values for a known method; for one added later, its booleans flipped."""
    cls = METHODS[name]
    return OVERRIDES.get(name, {k: not v for k, v in cls.defaults.items() if isinstance(v, bool)})


# ----------------------------------------------------------------------------- merge order
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_hp_is_defaults_then_hp_profile(name, profile):
    cls = METHODS[name]
    cfg = resolve_config(method=name, profile=profile)
    expected = jsonable({**cls.defaults, **cls.hp_profiles.get(profile, {})})
    got = cfg["method_hp"]
    assert set(got) == set(expected)
    filled = FILLED_FROM_NONE.get(name, ())
    for key in expected:
        if key in filled and expected[key] is None:
            threat = THREATS[(cfg["dataset"], cfg["norm"])]
            assert got[key] == threat[key], key
        else:
            assert got[key] == expected[key], key
    assert all(expected[k] is None for k in filled)  # the table documents them as None


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_callers_method_hp_wins(name, profile):
    mine = overrides(name)
    cfg = resolve_config(method=name, profile=profile, method_hp=mine)
    assert {k: cfg["method_hp"][k] for k in mine} == jsonable(mine)
    # the engine settings are those of the same call without method_hp
    plain = resolve_config(method=name, profile=profile)
    assert {k: v for k, v in cfg.items() if k != "method_hp"} == \
        {k: v for k, v in plain.items() if k != "method_hp"}


# ----------------------------------------------------------------------------- no shared names
@pytest.mark.parametrize("name", sorted(METHODS))
def test_names_cannot_cross(name):
    """The structural guarantee: a method's own hyperparameters never share a name with an
    engine setting, and what a method sets per profile on the engine is engine settings only."""
    cls = METHODS[name]
    assert not set(cls.defaults) & set(SETTINGS), "a hyperparameter named like an engine setting"
    for profile, hp in cls.hp_profiles.items():
        assert profile in PROFILE_NAMES
        assert not set(hp) & set(SETTINGS), (profile, sorted(set(hp) & set(SETTINGS)))
        assert set(hp) <= set(cls.defaults), (profile, sorted(set(hp) - set(cls.defaults)))
    for profile, settings in cls.profiles.items():
        assert profile in PROFILE_NAMES
        assert set(settings) <= set(SETTINGS), (profile, sorted(set(settings) - set(SETTINGS)))
    for key in ("eps", "step_size", "steps", "norm"):  # the threat model is the attack's only
        assert key not in cls.defaults


def test_presets_hold_engine_settings_only():
    for presets in PRESETS.values():
        for kwargs in presets.values():
            assert set(kwargs) <= set(SETTINGS), sorted(set(kwargs) - set(SETTINGS))


@pytest.mark.parametrize("call, named", [
    (dict(method="mixup", no_such_setting=1), "no_such_setting"),
    (dict(method="mixup", method_hp={"no_such_hp": 1}), "no_such_hp"),
    # a name in the wrong layer is unknown there, and the message says where it belongs
    (dict(method="mixup", alpha=0.2), "method_hp={'alpha'"),
    (dict(method="mixup", method_hp={"step_size": 0.1}), "step_size"),
    (dict(method="mma", method_hp={"steps": 40}), "steps"),
    (dict(method="gairat", lam=-1.0), "lam"),
    (dict(method="pgd_at", method_hp={"eps": 0.1}), "eps"),
])
def test_a_setting_no_layer_knows_is_an_error_naming_it(call, named):
    with pytest.raises(ValueError, match="unknown setting|no hyperparameter") as err:
        resolve_config(**call)
    assert named in str(err.value)
    with pytest.raises(ValueError) as err:  # train refuses it before reading any data
        train(**call, dataset="cifar100", data_root="/nonexistent")
    assert named in str(err.value)


# ----------------------------------------------------------------------------- mixup's alpha
def test_engine_step_size_and_mixup_alpha_are_unrelated():
    """The original crossed-wire bug, both directions."""
    assert resolve_config(method="mixup", step_size=0.2)["method_hp"]["alpha"] == 1.0
    cfg = resolve_config(method="mixup", method_hp={"alpha": 0.2})
    assert cfg["step_size"] == cfg["eps"] / 4 == EPS / 4
    assert cfg["method_hp"]["alpha"] == 0.2
    assert resolve_config(method="mixup")["method_hp"]["alpha"] == 1.0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="mixup.alpha"):
            resolve_config(method="mixup", method_hp={"alpha": bad})


def test_mixup_trains_with_uniform_lambda_by_default(tmp_path):
    """train(method="mixup") uses Beta(1, 1): about 80% of the λ drawn lie in [0.1, 0.9]
    (with the PGD step 2/255 as alpha, as the crossed wires gave, nearly none would)."""
    train(method="mixup", dataset="synthetic", model="tiny", epochs=1, batch_size=4,
          train_subset=1024, val_size=64, eval_steps=0, lr=0.01, schedule="constant",
          device="cpu", quiet=True, run_dir=str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["method_hp"]["alpha"] == 1.0
    lam = np.load(tmp_path / "method" / "epoch_001.npz")["lam"]
    assert lam.shape == (256,)  # one λ per batch, every batch logged
    share = np.mean((lam >= 0.1) & (lam <= 0.9))
    assert share == pytest.approx(0.8, abs=0.1), share  # binomial sd 0.025


# ----------------------------------------------------------------------------- MMA's steps
class _Built(Exception):
    """Raised by the spy once train() has built the method: nothing else needs to run."""


@pytest.mark.parametrize("preset", ["mnist-linf", "mnist-l2"])
@pytest.mark.parametrize("profile", ["smoke", "short", "paper"])
def test_mma_mnist_steps_reach_the_method_only_as_attack_steps(preset, profile, monkeypatch):
    kwargs = PRESETS[preset][profile]
    cfg = resolve_config(**kwargs)
    assert "steps" not in cfg["method_hp"] and cfg["steps"] == kwargs["steps"]

    # what train() hands the method (MNIST-shaped synthetic data: no MNIST files read)
    built = {}

    def spy_init(self, **kw):
        built.update(kw)
        raise _Built
    monkeypatch.setattr(MMA, "__init__", spy_init)
    monkeypatch.setattr(train_mod, "prepare_data", lambda cfg, device: (
        synthetic_dataset(64, channels=1, image_size=28), None))
    with pytest.raises(_Built):
        train(**kwargs, device="cpu", quiet=True)
    monkeypatch.undo()
    assert built["attack"] == AttackSpec(eps=cfg["eps"], step_size=cfg["step_size"],
                                         steps=kwargs["steps"], norm=cfg["norm"])
    assert built["attack"] == attack_spec(cfg)
    assert set(built) == {"num_train", "num_classes", "epochs", "attack", *MMA.defaults}

    # and attack.steps PGD iterations run in training (AN-PGD) and in the margin evaluation
    calls = []
    real_anpgd = mma_mod.anpgd

    def spy_anpgd(*args, **kw):
        calls.append(kw["steps"])
        return real_anpgd(*args, **kw)
    monkeypatch.setattr(mma_mod, "anpgd", spy_anpgd)
    real_estimate = mma_mod.estimate_margin

    def spy_estimate(*args, **kw):
        calls.append(kw["steps"])
        return real_estimate(*args, **kw)
    monkeypatch.setattr(mma_mod, "estimate_margin", spy_estimate)
    method = MMA(**{**built, "num_train": 4})
    model = build_model("tiny", 10, 1)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    method.loss(model, x, y, torch.arange(4), epoch=0)
    method.evaluate_extra(model.eval(), x, y)
    assert calls == [kwargs["steps"]] * 2
    assert method.hp["d_max"] == THREATS[("mnist", kwargs["norm"])]["d_max"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_per_profile_hyperparameters_cover_every_profile(name):
    """A method that sets a hyperparameter per profile sets it for every profile: a profile
    it forgets silently falls back to the default, which is sized for another scale (GAIRAT's
    begin_epoch = 60 in a 10-epoch run would never start reweighting)."""
    cls = get_method(name)
    if cls.hp_profiles:
        assert sorted(cls.hp_profiles) == sorted(PROFILE_NAMES), name
