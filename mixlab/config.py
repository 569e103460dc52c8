"""Settings of a training run: the one place where they are defined, merged and checked.

A run has three kinds of settings, and no name travels between them:

* **engine settings** (``SETTINGS``): data, model, optimiser, schedule, evaluation, files.
  They are keywords of ``train(...)`` and ``--set KEY=VALUE`` on the command line.
* **the training threat model**: ``eps``, ``step_size``, ``steps`` and ``norm`` are engine
  settings too. They reach the method as one explicit argument, an
  :class:`~mixlab.methods.base.AttackSpec`, never by matching a name.
* **method hyperparameters** (``method_hp``): the method's own table (``Method.defaults``,
  e.g. mixup's Beta concentration ``alpha``). They are given as
  ``train(method="mixup", method_hp={"alpha": 1.0})`` or ``--set mixup.alpha=1``; a method's
  defaults never share a name with an engine setting (a test holds this for every method).

Merge order, later wins (each layer is visible in ``python -m mixlab train ... --dry-run``)::

    engine:     SETTINGS defaults < PROFILES[profile] < Method.profiles[profile] < keywords
    method_hp:  Method.defaults   < Method.hp_profiles[profile]                  < method_hp

A run's ``config.json`` holds all of them; :func:`load_config` reads it back, checked, so
``train(**load_config("runs/at"))`` trains the same run again (``python -m mixlab train
--config runs/at/config.json --run-dir runs/again`` on the command line).

Every value is checked here, where it enters, before anything is read or written: a bad one
raises one ``ValueError``/``TypeError`` that names the setting, the value and the fix (the
command line prints it as ``mixlab: error: ...`` and exits 2).

>>> cfg = resolve_config(method="mixup", profile="smoke", method_hp={"alpha": 0.4})
>>> cfg["method_hp"]["alpha"], cfg["step_size"]      # (0.4, eps / 4): unrelated settings
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any


import torch

from . import data as data_mod
from .attacks import NORMS, is_number
from .methods import METHODS, AttackSpec, get_method

PROFILE_NAMES = ("smoke", "cpu", "short", "paper")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One engine setting: its default, the type it must have and what it means."""
    default: Any
    kind: str          # int | float | bool | str | floats (a list of floats)
    help: str
    choices: tuple | None = None
    low: float | None = None          # smallest allowed value (inclusive unless low_open)
    low_open: bool = False
    high: float | None = None         # largest allowed value (inclusive unless high_open)
    high_open: bool = False
    optional: bool = False            # None is allowed (and means what ``help`` says)


S = Setting
#: every engine setting, with its default and meaning (units: pixels in [0, 1], epochs, steps)
SETTINGS: dict[str, Setting] = {
    "dataset": S("cifar10", "str", "dataset name (built-in or registered), or an image-folder "
                 "path", choices=data_mod.DatasetNames()),
    "model": S("preactresnet18", "str", "architecture name known to mixlab.models (built-in "
               "or registered)"),
    "method": S("pgd_at", "str", "training method, a name in mixlab.methods.METHODS"),
    "epochs": S(30, "int", "passes over the training set", low=1),
    "batch_size": S(128, "int", "examples per optimiser step", low=1),
    "optimizer": S("sgd", "str", "optimiser", choices=("sgd", "adam")),
    "lr": S(0.1, "float", "peak learning rate", low=0, low_open=True),
    "momentum": S(0.9, "float", "SGD momentum", low=0, high=1, high_open=True),
    "nesterov": S(False, "bool", "SGD Nesterov momentum"),
    "weight_decay": S(5e-4, "float", "L2 penalty on all weights", low=0),
    "schedule": S("piecewise", "str", "learning-rate schedule (per step)",
                  choices=("piecewise", "onecycle", "cosine", "constant")),
    "milestones": S([0.5, 0.75], "floats", "piecewise: fractions of training where lr drops"),
    "lr_factors": S([0.1, 0.01], "floats", "piecewise: lr multiples after each milestone"),
    "warmup": S(0.0, "float", "onecycle: fraction of training rising to the peak lr",
                low=0, high=1, high_open=True),
    "augment": S(True, "bool", "random crop (4-pixel padding) + horizontal flip, 32x32 data"),
    "ema_decay": S(None, "float", "weight averaging: decay of an exponential moving average of "
                   "the weights and BatchNorm statistics, updated after every optimiser step "
                   "(e.g. 0.999, spanning ~1/(1 - decay) steps); the average is validated "
                   "(ema_val_*), selects best.pt and is saved beside the raw weights "
                   "(mixlab.ema, docs/baselines.md); None: off", low=0, high=1,
                   high_open=True, optional=True),
    "ema_warmup": S(True, "bool", "with ema_decay: decay min(ema_decay, (1 + t)/(10 + t)) at "
                    "step t, so the average soon forgets the random initialisation; false: "
                    "ema_decay from the first step"),
    "train_subset": S(None, "int", "train on this many examples (seeded); None: all",
                      low=1, optional=True),
    "val_size": S(1000, "int", "training examples held out as the validation split; the "
                  "in-training evaluation and the best checkpoint use it; 0: none", low=0),
    "eval_subset": S(None, "int", "evaluate during training on this many validation examples; "
                     "None: the whole validation split", low=1, optional=True),
    "eval_every": S(1, "int", "evaluate every n epochs (and after the last)", low=1),
    "eval_steps": S(10, "int", "PGD steps of the in-training robust evaluation (0: clean "
                    "only)", low=0),
    "norm": S("Linf", "str", "threat model of training attacks and evaluation", choices=NORMS),
    "eps": S(None, "float", "radius, pixel units; None: the dataset's standard (8/255 Linf "
             "on CIFAR)", low=0, optional=True),
    "step_size": S(None, "float", "PGD step of the training attack, pixel units; None: eps/4",
                   low=0, low_open=True, optional=True),
    "steps": S(10, "int", "PGD iterations of the training attack", low=1),
    "seed": S(0, "int", "seeds the model init, the data order, the split and the attacks",
              low=0),
    "device": S("auto", "str", "auto | cpu | cuda | cuda:N"),
    "bf16": S(None, "bool", "bf16 autocast in training; None: on for CUDA, off for CPU",
              optional=True),
    "channels_last": S(None, "bool", "channels_last memory format; None: on for CUDA",
                       optional=True),
    "compile": S(False, "bool", "torch.compile the model"),
    "sync_bn": S(False, "bool", "under torchrun, BatchNorm statistics over the global batch "
                 "(SyncBatchNorm, CUDA); off: each process normalises its share; no effect "
                 "in one process"),
    "data_root": S(None, "str", "dataset root; None: mixlab.data.data_root()", optional=True),
    "download": S(False, "bool", "let torchvision download a missing dataset"),
    "run_dir": S(None, "str", "where config, metrics and checkpoints go; None: nothing saved",
                 optional=True),
    "resume": S(True, "bool", "continue an unfinished run found in run_dir"),
    "overwrite": S(False, "bool", "replace a run found in run_dir (finished or not)"),
    "stop_after": S(None, "int", "stop (checkpointed) after this many epochs in total; the "
                    "schedule still spans all epochs", low=1, optional=True),
    "check_every": S(50, "int", "check the loss is finite every n steps (one host sync each)",
                     low=1),
    "quiet": S(False, "bool", "no progress bar"),
    "tensorboard": S(False, "bool", "also write each epoch's scalars to <run_dir>/tensorboard/ "
                     "(needs run_dir and pip install mixlab[tensorboard])"),
    "allow_slow_cpu": S(False, "bool", "start the GPU-sized short/paper profiles on a CPU "
                        "anyway (refused otherwise, with the estimated time)"),
    "profile": S(None, "str", "smoke | cpu | short | paper (see PROFILES)", choices=PROFILE_NAMES,
                 optional=True),
}
del S

TRAIN_DEFAULTS: dict[str, Any] = {key: s.default for key, s in SETTINGS.items()}

PROFILES: dict[str, dict[str, Any]] = {
    # CPU, seconds to a minute: a tiny CNN on a data subset, a few PGD steps
    "smoke": dict(model="tiny", epochs=2, batch_size=64, train_subset=1024, val_size=256,
                  steps=3, eval_steps=5, schedule="onecycle", warmup=0.3, lr=0.05,
                  device="cpu"),
    # CPU, about a quarter of an hour per notebook on two cores (README, Results): the
    # smallest scale at which the papers' qualitative claims have a chance to show (10k
    # training images, 8 epochs, a 1k validation split); the notebooks choose dataset, model
    # and eps per paper. A notebook trains about four PGD-sized runs (two methods, two seeds):
    # 8 epochs and a validation attack with the training's 5 PGD steps (10 cost a fifth of a
    # PGD-AT run) make each about 1.7 minutes on two cores, leaving room for the evaluations
    "cpu": dict(model="tiny", epochs=8, batch_size=128, train_subset=10_000, val_size=1000,
                steps=5, eval_steps=5, schedule="onecycle", warmup=0.3, lr=0.05,
                device="cpu"),
    # GPU, minutes: PreActResNet-18, one-cycle schedule (the fast-AT recipe)
    "short": dict(model="preactresnet18", epochs=15, batch_size=512, schedule="onecycle",
                  warmup=0.4, lr=0.2, weight_decay=5e-4, val_size=1000),
    # the papers' schedules (methods refine this in their own `profiles`)
    "paper": dict(model="preactresnet18", epochs=110, batch_size=128, lr=0.1,
                  schedule="piecewise", milestones=[100 / 110, 105 / 110],
                  lr_factors=[0.1, 0.01], weight_decay=5e-4, val_size=1000),
}

#: settings that say how a run is executed, not what it computes: they may differ when a run
#: is resumed or loaded (``sync_bn`` among them: like the number of processes, which is no
#: setting at all, it says how a run is spread over processes; docs/distributed.md)
RUN_ONLY_KEYS = frozenset({"run_dir", "resume", "overwrite", "stop_after", "quiet", "device",
                           "data_root", "download", "check_every", "compile", "sync_bn",
                           "tensorboard", "allow_slow_cpu"})


# ----------------------------------------------------------------------------- checks
def _fmt(value: Any) -> str:
    return repr(value)


def check_setting(key: str, value: Any, *, where: str = "setting") -> Any:
    """Check one engine setting; returns it normalised (tuples become lists, ints allowed for
    floats). Raises ValueError/TypeError naming the setting, the value and what is allowed."""
    spec = SETTINGS[key]
    if value is None:
        if spec.optional:
            return None
        raise TypeError(f"{where} {key}=None is not allowed; give a {spec.kind} "
                        f"({spec.help}; default {spec.default!r})")
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{where} {key}={_fmt(value)} must be true or false")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise TypeError(f"{where} {key}={_fmt(value)} must be a whole number "
                                f"({spec.help})")
        value = int(value)  # numpy integers too; config.json holds plain numbers
    elif kind == "float":
        if not is_number(value):
            raise TypeError(f"{where} {key}={_fmt(value)} must be a number ({spec.help})")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where} {key}={_fmt(value)} must be a finite number")
    elif kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{where} {key}={_fmt(value)} must be a string ({spec.help})")
    elif kind == "floats":
        if not isinstance(value, (list, tuple)) or not all(
                is_number(v) and math.isfinite(v) for v in value):
            raise TypeError(f"{where} {key}={_fmt(value)} must be a list of finite numbers, "
                            f"e.g. {spec.default}")
        value = [float(v) for v in value]
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{where} {key}={_fmt(value)} is not one of {list(spec.choices)}")
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        op = ">" if spec.low_open else ">="
        raise ValueError(f"{where} {key}={_fmt(value)} must be {op} {spec.low} ({spec.help})")
    if spec.high is not None and (value > spec.high or (spec.high_open and value == spec.high)):
        op = "<" if spec.high_open else "<="
        raise ValueError(f"{where} {key}={_fmt(value)} must be {op} {spec.high} ({spec.help})")
    return value


def check_device_name(name: Any) -> None:
    """A device setting must be auto, cpu, cuda or cuda:N (a torch.device passes too); whether
    CUDA is present is checked when the run starts (``mixlab.train.pick_device``)."""
    if isinstance(name, str) and (name in ("auto", "cpu", "cuda") or (
            name.startswith("cuda:") and name[5:].isdigit())):
        return
    if not isinstance(name, torch.device):
        raise ValueError(f"device={name!r} is not one of auto, cpu, cuda, cuda:N")


def _check_combination(cfg: dict[str, Any]) -> None:
    """Rules that involve several settings."""
    ms, fs = cfg["milestones"], cfg["lr_factors"]
    if len(ms) != len(fs):
        raise ValueError(f"milestones {ms} and lr_factors {fs} must have the same length")
    if any(not 0 < m < 1 for m in ms) or ms != sorted(ms):
        raise ValueError(f"milestones {ms} must be increasing fractions of training in (0, 1)")
    if any(f <= 0 for f in fs):
        raise ValueError(f"lr_factors {fs} must be > 0")
    if cfg["norm"] == "Linf" and cfg["eps"] > 1:
        raise ValueError(f"eps={cfg['eps']} is outside [0, 1] for Linf: mixlab works in "
                         f"pixel space, write 8/255 (= {8 / 255:.4f}) rather than 8")
    if cfg["eval_subset"] is not None and cfg["val_size"] == 0:
        raise ValueError(f"eval_subset={cfg['eval_subset']} needs a validation split to draw "
                         f"from; set val_size > 0 or eval_subset=None")
    if cfg["tensorboard"] and cfg["run_dir"] is None:
        raise ValueError("tensorboard=True writes to <run_dir>/tensorboard/; give a run_dir "
                         "(command line: --run-dir DIR) or leave tensorboard off")
    for key in ("run_dir", "data_root"):
        if cfg[key] is not None and not cfg[key].strip():
            raise ValueError(f"{key}={cfg[key]!r} is empty; give a folder (or None)")
    if cfg["stop_after"] is not None and cfg["stop_after"] > cfg["epochs"]:
        raise ValueError(f"stop_after={cfg['stop_after']} is beyond epochs={cfg['epochs']}")
    from .models import canonical_name
    cfg["model"] = canonical_name(cfg["model"])  # one spelling per architecture, or an error
    check_device_name(cfg["device"])


def _unknown_message(unknown: list[str], method_name: str) -> str:
    method_keys = sorted(METHODS[method_name].defaults) if method_name in METHODS else []
    hint = ""
    owners = sorted((m for m, cls in METHODS.items() if set(unknown) & set(cls.defaults)),
                    key=lambda m: (m != method_name, m))  # the chosen method first
    if owners:
        key = next(k for k in unknown if any(k in METHODS[m].defaults for m in owners))
        hint = (f"; {key!r} is a hyperparameter of {owners}: pass it as "
                f"method_hp={{{key!r}: ...}} (command line: --set {owners[0]}.{key}=VALUE)")
    return (f"unknown setting(s) {unknown}{hint}. Engine settings are {sorted(SETTINGS)}; "
            f"method {method_name!r} takes method_hp keys {method_keys}")


# ----------------------------------------------------------------------------- resolve
def resolve_config(*, method_hp: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """The fully resolved, checked settings of a run as a JSON-able dict: every engine setting,
    then ``method_hp`` (the method's hyperparameters). This dict is what ``--dry-run`` prints
    and what ``config.json`` of the run directory holds."""
    method_name = settings.get("method", SETTINGS["method"].default)
    if not isinstance(method_name, str):
        raise TypeError(f"method={method_name!r} must be a string, one of {sorted(METHODS)}")
    method_cls = get_method(method_name)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(_unknown_message(unknown, method_name))
    profile = check_setting("profile", settings.get("profile"))
    cfg = dict(TRAIN_DEFAULTS)
    if profile:
        cfg.update(PROFILES[profile])
        cfg.update(method_cls.profiles.get(profile, {}))
    cfg.update(settings)
    for key in SETTINGS:
        cfg[key] = check_setting(key, cfg[key])
    if cfg["eps"] is None:
        cfg["eps"] = float(data_mod.dataset_info(cfg["dataset"])["eps"][cfg["norm"]])
    if cfg["step_size"] is None:
        cfg["step_size"] = cfg["eps"] / 4
    if cfg["eps"] == 0:
        raise ValueError("eps=0 is no threat model; give a radius > 0 (e.g. 8/255), or train "
                         "with method='erm' for no attack")
    _check_combination(cfg)
    cfg["method_hp"] = resolve_method_hp(method_cls, profile, method_hp, cfg)
    return cfg


def resolve_method_hp(method_cls, profile: str | None, method_hp: dict[str, Any] | None,
                      cfg: dict[str, Any]) -> dict[str, Any]:
    """``Method.defaults`` < ``Method.hp_profiles[profile]`` < the caller's ``method_hp``,
    checked by the method (types from its defaults, ranges in ``Method.check_hp``)."""
    if method_hp is None:
        method_hp = {}
    if not isinstance(method_hp, dict):
        raise TypeError(f"method_hp={method_hp!r} must be a dict of {method_cls.name!r}'s "
                        f"hyperparameters {sorted(method_cls.defaults)}")
    unknown = sorted(set(method_hp) - set(method_cls.defaults))
    if unknown:
        engine = [k for k in unknown if k in SETTINGS]
        hint = (f"; {engine} {'is an engine setting' if len(engine) == 1 else 'are engine settings'}"
                f": pass {'it' if len(engine) == 1 else 'them'} as a keyword of train() "
                f"(command line: --set {engine[0]}=VALUE)") if engine else ""
        raise ValueError(f"method {method_cls.name!r} has no hyperparameter(s) {unknown}{hint}; "
                         f"it takes {sorted(method_cls.defaults)}")
    hp = {**method_cls.defaults, **method_cls.hp_profiles.get(profile or "", {}), **method_hp}
    hp = method_cls.check_hp(hp, dataset=cfg["dataset"], attack=attack_spec(cfg))
    return json.loads(json.dumps(hp))  # tuples become lists, as config.json stores them


def attack_spec(cfg: dict[str, Any]) -> AttackSpec:
    """The training threat model of a resolved config, handed to the method as one argument."""
    return AttackSpec(eps=cfg["eps"], step_size=cfg["step_size"], steps=cfg["steps"],
                      norm=cfg["norm"])


def parse_assignment(item: str) -> tuple[str | None, str, str]:
    """``--set`` syntax: 'KEY=VALUE' (engine setting) or 'METHOD.KEY=VALUE' (a method's
    hyperparameter). Returns (method or None, key, raw value)."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE or METHOD.KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip().replace("-", "_")
    if "." in key:
        method, key = key.split(".", 1)
        return method, key, value
    return None, key, value


def config_difference(old: dict[str, Any], new: dict[str, Any],
                      ignore: frozenset[str] = RUN_ONLY_KEYS) -> list[str]:
    """Human-readable lines 'key: old -> new' for settings that differ (method_hp by key),
    ignoring run-only settings. A setting or hyperparameter that a config lacks counts as its
    default: a run written before mixlab had it ran as its default does (e.g. ``ema_decay``:
    None, no weight averaging)."""
    def engine(cfg: dict[str, Any], key: str) -> Any:
        return cfg.get(key, SETTINGS[key].default if key in SETTINGS else "<absent>")

    def hyper(cfg: dict[str, Any], hp: dict[str, Any], key: str) -> Any:
        defaults = METHODS[cfg["method"]].defaults if cfg.get("method") in METHODS else {}
        return hp.get(key, defaults.get(key, "<absent>"))

    lines = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = engine(old, key), engine(new, key)
        if key == "method_hp" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if hyper(old, a, k) != hyper(new, b, k):
                    lines.append(f"method_hp.{k}: {hyper(old, a, k)!r} -> "
                                 f"{hyper(new, b, k)!r}")
        elif a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def load_config(path: str | Path) -> dict[str, Any]:
    """The settings of a saved run, checked, ready to train again: ``train(**load_config(p))``
    gives the same run (the same weights, bit for bit, on the same machine).

    path: a run's ``config.json``, or the run directory holding it. The file's engine settings
    and ``method_hp`` go through :func:`resolve_config`, so a file with an unknown key or a bad
    value is refused as a keyword would be; settings added to mixlab after the file was
    written take their defaults. Replay into another folder with
    ``train(**{**load_config(p), "run_dir": "runs/again"})``.

    Values the file holds only because mixlab derived them from other settings come back as
    None (their "derive it" default), so a replay that changes the setting they derive from
    derives them again: ``step_size`` (eps/4), MMA's ``d_max`` and ``mineps`` (from dataset
    and norm). ``{**load_config(p), "eps": 4/255}`` thus trains with step 1/255, not with the
    file's 2/255. A value that differs from the derived one was chosen, and is kept.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no config file at {path}: give a run's config.json (or its run "
                         f"directory), as written by train(run_dir=...)")
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as a config ({err.__class__.__name__}: "
                         f"{err}); it is corrupt or not a mixlab config.json") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path} holds a {type(settings).__name__}, not a mixlab config "
                         f"(a JSON object of settings)")
    method_hp = settings.pop("method_hp", None)
    try:
        cfg = resolve_config(method_hp=method_hp, **settings)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from err
    return _undo_derived(cfg)


def _undo_derived(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (resolved) with each value that resolving would derive again set back to None:
    an engine setting or method hyperparameter whose default is None and whose value equals
    what :func:`resolve_config` fills in when it is None."""
    cfg = {**cfg, "method_hp": dict(cfg["method_hp"])}
    method_defaults = get_method(cfg["method"]).defaults

    def resolved_without(key: str, in_hp: bool) -> Any:
        settings = {k: v for k, v in cfg.items() if k != "method_hp"}
        method_hp = dict(cfg["method_hp"])
        if in_hp:
            method_hp[key] = None
            return resolve_config(method_hp=method_hp, **settings)["method_hp"][key]
        settings[key] = None
        return resolve_config(method_hp=method_hp, **settings)[key]

    for key, setting in SETTINGS.items():
        if setting.default is None and cfg.get(key) is not None \
                and key not in RUN_ONLY_KEYS and resolved_without(key, False) == cfg[key]:
            cfg[key] = None
    for key, default in method_defaults.items():
        if default is None and cfg["method_hp"].get(key) is not None \
                and resolved_without(key, True) == cfg["method_hp"][key]:
            cfg["method_hp"][key] = None
    return cfg


def describe_settings() -> str:
    """A text table of the engine settings (for ``--help`` and the docs)."""
    rows = [f"  {k:14s} {json.dumps(s.default):>16s}  {s.help}" for k, s in SETTINGS.items()]
    return "engine settings (train keywords, --set KEY=VALUE):\n" + "\n".join(rows)


