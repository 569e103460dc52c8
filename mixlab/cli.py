"""Command line: ``python -m mixlab {train,eval,export,info,download,prepare} ...``.

Every bad input ends in one line ``mixlab: error: ...`` and exit status 2; a run that stops on
a non-finite loss exits with status 3 after saving its state.

>>> python -m mixlab train --method pgd_at --profile short --run-dir runs/at
>>> python -m mixlab train --method mixup --set mixup.alpha=0.2 --profile smoke --run-dir x --dry-run
>>> python -m mixlab eval --checkpoint runs/at --attacks clean,pgd20,aa --n 1000
>>> python -m mixlab eval --checkpoint runs/ema --weights ema    # trained with ema_decay set
>>> python -m mixlab export --robustbench runs/at export/at --which best --weights raw
>>> python -m mixlab train --config runs/at/config.json --run-dir runs/at-again
>>> python -m mixlab --threads 4 train --profile smoke --run-dir runs/smoke

``--threads N`` (before or after the command name) sets PyTorch's CPU threads for every
command; without it, ``$MIXLAB_THREADS``, else 1 on a machine without CUDA (see
``mixlab.runtime.configure_threads``; ``python -m mixlab info`` shows the count and why).

Under torchrun, ``train`` and ``eval`` spread over the processes it starts and rank 0 alone
writes and prints (docs/distributed.md):

>>> torchrun --nproc_per_node 4 -m mixlab train --method pgd_at --profile short --run-dir runs/at
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .config import PROFILE_NAMES, parse_assignment
from .runtime import configure_threads

THREADS_HELP = ("PyTorch CPU threads for this command (default: $MIXLAB_THREADS, else 1 on a "
                "machine without CUDA, else torch's default)")


def literal_value(text: str) -> Any:
    """A --set or --param value: JSON where it parses (numbers, true, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _eps(text: str) -> float:
    """Accept '0.031' or '8/255'; a finite number >= 0."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a radius: write e.g. 8/255 or 0.031")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite radius >= 0")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


class UsageError(ValueError):
    """A command line that argparse cannot parse (unknown flag, bad choice, missing value)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`UsageError` (one line, exit 2 from
    ``main``) instead of printing the usage text and exiting; ``--help`` is unchanged."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _registered_text() -> str:
    """Models, datasets and profiles known now (names registered before main() included)."""
    from .config import PROFILES
    from .data import available_datasets
    from .models import available_models
    return (f"models: {', '.join(available_models())}\n"
            f"datasets: {', '.join(available_datasets())}, or an image-folder path\n"
            f"profiles: {', '.join(PROFILES)}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mixlab", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=_int, default=None, metavar="N", help=THREADS_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    from .config import describe_settings
    from .methods import METHODS
    method_lines = "\n".join(f"  {name:9s} method_hp: {json.dumps(cls.defaults, default=str)}"
                              for name, cls in sorted(METHODS.items()))
    t = sub.add_parser(
        "train", help="train a model with one method",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model. Settings not given come from the profile and the method's "
                    "defaults (mixlab.config); --dry-run prints the resolved config.",
        epilog=describe_settings() + "\n\nmethods and their hyperparameters "
               "(--set METHOD.KEY=VALUE):\n" + method_lines + "\n\n" + _registered_text())
    t.add_argument("--config", default=None, metavar="PATH",
                   help="replay a run: its config.json (or run directory) gives every setting; "
                        "the other flags and --set override them (--run-dir: where to write)")
    t.add_argument("--method", default=None, choices=sorted(METHODS),
                   help="training method (default: pgd_at, or the --config file's)")
    t.add_argument("--dataset", default=None)
    t.add_argument("--model", default=None)
    t.add_argument("--profile", default=None, choices=list(PROFILE_NAMES))
    t.add_argument("--epochs", type=_int)
    t.add_argument("--batch-size", type=_int)
    t.add_argument("--lr", type=_float)
    t.add_argument("--eps", type=_eps, help="radius in pixel units, e.g. 8/255")
    t.add_argument("--norm", choices=["Linf", "L2"])
    t.add_argument("--seed", type=_int)
    t.add_argument("--device", default=None)
    t.add_argument("--run-dir", default=None, help="required unless --dry-run")
    t.add_argument("--download", action="store_true", help="let torchvision download data")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's scalars to RUN_DIR/tensorboard/ (needs "
                        "pip install mixlab[tensorboard])")
    t.add_argument("--allow-slow-cpu", action="store_true",
                   help="start the GPU-sized short/paper profiles on a CPU anyway")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting (--set val_size=1000) or a hyperparameter of the "
                        "chosen method (--set mixup.alpha=1); values are JSON where they parse")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run found in --run-dir (finished or not)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the fully resolved config (what config.json will hold) and stop")

    e = sub.add_parser("eval", help="evaluate a saved run under attacks")
    e.add_argument("--checkpoint", required=True, help="run directory or .pt file")
    e.add_argument("--attacks", default="clean,pgd20,aa",
                   help="comma-separated: clean,fgsm,pgd10,pgd20,pgd50,cw20,aa")
    e.add_argument("--eps", type=_eps, default=None, help="default: the run's eps")
    e.add_argument("--norm", choices=["Linf", "L2"], default=None)
    e.add_argument("--n", type=_int, default=1000, help="test examples (0: all)")
    e.add_argument("--batch-size", type=_int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--which", choices=["best", "last"], default="best")
    e.add_argument("--weights", choices=["raw", "ema"], default="raw",
                   help="raw: the trained weights; ema: their average (runs trained with "
                        "ema_decay); the result goes to eval_cli.json / eval_cli_ema.json")

    x = sub.add_parser("export", help="write a saved run's model for another tool (RobustBench)",
                       description="Export a run's model. --robustbench writes a state dict "
                                   "that RobustBench's architecture classes load with "
                                   "strict=True, and a model card (.json and .md); see "
                                   "mixlab.models.robustbench.export_robustbench.")
    x.add_argument("run", help="run directory or .pt file")
    x.add_argument("out", help="folder to write into (created)")
    x.add_argument("--robustbench", action="store_true",
                   help="the format: RobustBench (required; the only one so far)")
    x.add_argument("--which", choices=["best", "last"], default="best")
    x.add_argument("--weights", choices=["raw", "ema"], default="raw",
                   help="raw: the trained weights; ema: their average (runs trained with "
                        "ema_decay)")
    x.add_argument("--name", default=None,
                   help="file stem of the outputs (default mixlab_<method>_<arch>)")
    x.add_argument("--result", default=None, metavar="JSON",
                   help="the evaluation to report in the card (a mixlab.evaluate JSON file); "
                        "default: the run directory's, same threat model, AutoAttack first")
    x.add_argument("--no-check", action="store_true",
                   help="skip reloading the written file and comparing its logits")

    sub.add_parser("info", help="devices, threads, data found, versions")

    d = sub.add_parser("download", help="download a dataset through torchvision")
    d.add_argument("dataset")

    pr = sub.add_parser("prepare", help="unpack offline copies (MNIST .gz, CIFAR-10 JPEG tar) "
                                        "into the data root, once")
    pr.add_argument("--from", dest="source", required=True, help="folder holding the copies")
    for command in sub.choices.values():  # --threads after the command name works too
        command.add_argument("--threads", type=_int, default=argparse.SUPPRESS, metavar="N",
                             help=THREADS_HELP)
    return p


def train_settings(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine settings, method_hp) from the train command's arguments: the --config file's
    settings (if any) as the base, then the flags, then --set."""
    from .config import SETTINGS, load_config
    config: dict[str, Any] = {}
    method_hp: dict[str, Any] = {}
    if args.config is not None:
        config = load_config(args.config)
        method_hp = config.pop("method_hp")
        if args.method is not None and args.method != config["method"]:
            method_hp = {}  # the file's hyperparameters belong to its own method
    args.method = args.method or config.get("method") or SETTINGS["method"].default
    config["method"] = args.method
    if args.run_dir is not None:
        config["run_dir"] = args.run_dir
    for key in ("dataset", "model", "profile", "epochs", "batch_size", "lr", "eps", "norm",
                "seed", "device"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    for flag in ("download", "compile", "overwrite", "tensorboard", "allow_slow_cpu"):
        if getattr(args, flag):
            config[flag] = True
    for item in args.set:
        owner, key, value = parse_assignment(item)
        if owner is None and key in ("method", "run_dir"):
            # --method also picks which METHOD.KEY names are accepted, --run-dir is required:
            # a --set of either would bypass that
            raise ValueError(f"--set {item!r}: give the {key} with --{key.replace('_', '-')}, "
                             f"not --set")
        if owner is None:
            config[key] = literal_value(value)
        elif owner != args.method:
            raise ValueError(f"--set {item!r} sets a hyperparameter of {owner!r}, but the method "
                             f"is {args.method!r}; write --set {args.method}.KEY=VALUE")
        else:
            method_hp[key] = literal_value(value)
    return config, method_hp


def cmd_train(args) -> None:
    from .config import resolve_config
    from .train import train
    config, method_hp = train_settings(args)
    if args.dry_run:
        print(json.dumps(resolve_config(method_hp=method_hp, **config), indent=2))
        return
    if config.get("run_dir") is None:
        raise ValueError("--run-dir is required to train (or pass --dry-run)")
    from .distributed import is_main
    _, history = train(method_hp=method_hp, **config)
    if is_main():   # under torchrun: rank 0 speaks for every process
        print(json.dumps(history[-1]) if history else "{}")


def cmd_eval(args) -> None:
    from . import data as data_mod
    from .attacks import check_eps
    from .evaluate import ATTACKS, evaluate, format_report, format_table
    from .runs import load_run
    from .runtime import pick_device
    if args.n < 0:
        raise ValueError(f"--n {args.n} must be >= 0 (test examples; 0: all)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        what = f"unknown attack(s) {unknown}" if unknown else "names no attack"
        raise ValueError(f"--attacks {args.attacks!r}: {what}; choose from {','.join(ATTACKS)}")
    from . import distributed
    group = distributed.setup(args.device)   # under torchrun: this process's device
    device = group.device if group is not None else pick_device(args.device)
    run = load_run(args.checkpoint, which=args.which, device=device, weights=args.weights)
    cfg = run.config
    eps = args.eps if args.eps is not None else cfg["eps"]
    norm = args.norm or cfg["norm"]
    check_eps(eps, norm)  # before the test set is read
    test = data_mod.load_dataset(cfg["dataset"], "test", root=cfg.get("data_root"))
    if test.num_classes != run.model.num_classes:
        raise ValueError(f"the checkpoint has {run.model.num_classes} classes, "
                         f"{cfg['dataset']} has {test.num_classes}")
    if args.n:
        test = test.subset(args.n, seed=0)
    test = test.to(device)
    results = evaluate(run.model, test.x.float() / 255, test.y, attacks=attacks,
                       eps=eps, norm=norm, batch_size=args.batch_size,
                       run_dir=run.path,
                       name="eval_cli" if args.weights == "raw" else "eval_cli_ema")
    if not distributed.is_main(group):   # every process evaluated its share; rank 0 reports
        return
    name = (f"{cfg['method']} ({run.which}, epoch {run.epoch}"
            f"{', averaged weights' if args.weights == 'ema' else ''})")
    print(format_table({name: results}))
    print(format_report(results))
    where = (f"written to {results['saved_to']}" if results.get("saved_to")
             else f"NOT saved: {results.get('save_error', 'unknown error')}")
    print(f"(n={results['n']} test images, {where})")


def cmd_export(args) -> None:
    from pathlib import Path

    from .models.robustbench import export_robustbench
    from .runs import load_run
    if not args.robustbench:
        raise ValueError("export needs a format: add --robustbench (the only one so far), "
                         "e.g. python -m mixlab export --robustbench RUN OUT")
    if args.result is not None and not Path(args.result).is_file():
        raise ValueError(f"--result {args.result}: no such file (give a mixlab.evaluate JSON, "
                         f"e.g. RUN/eval_cli.json)")
    run = load_run(args.run, which=args.which, weights=args.weights)
    paths = export_robustbench(run, args.out, name=args.name, result=args.result,
                               check=not args.no_check)
    for what, path in paths.items():
        print(f"{what}: {path}")


def cmd_info(args) -> None:
    import platform

    import torch
    import torchvision

    from . import __version__
    from . import data as data_mod
    from .runtime import threads_reason
    print(f"mixlab {__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()} (why: {threads_reason()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("device: cpu only (no CUDA device)")
    root = data_mod.data_root()
    print(f"data root: {root} (set MIXLAB_DATA to change)")
    for name in data_mod.DATASETS:
        if name == "synthetic":
            continue
        try:
            ds = data_mod.load_dataset(name, "test", root=root)
            print(f"  {name:9s} found: {len(ds)} test images from {ds.source}")
        except data_mod.DataError:
            print(f"  {name:9s} not found (python -m mixlab download {name})")


def cmd_download(args) -> None:
    from . import data as data_mod
    data_mod.download(args.dataset)


def cmd_prepare(args) -> None:
    from .data import prepare_offline_copies
    for what, folder in prepare_offline_copies(args.source).items():
        print(f"{what} ready in {folder}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "info": cmd_info,
            "download": cmd_download, "prepare": cmd_prepare}


def _one_line(err: BaseException) -> str:
    """The message on one line (a config difference lists one setting per line)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .extras import MissingExtraError
    from .runs import CheckpointError
    from .train import NonFiniteLossError
    try:
        args = _parser().parse_args(argv)
        configure_threads(args.threads)
        COMMANDS[args.command](args)
    except NonFiniteLossError as err:
        print(f"mixlab: error: {_one_line(err)}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, DataError, CheckpointError, RuntimeError, OSError,
            MissingExtraError) as err:
        if os.environ.get("MIXLAB_TRACEBACK"):
            raise
        print(f"mixlab: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
