"""Command line: ``python -m mixlab {train,eval,info,download,prepare} ...``.

Every bad input ends in one line ``mixlab: error: ...`` and exit status 2; a run that stops on
a non-finite loss exits with status 3 after saving its state.

>>> python -m mixlab train --method pgd_at --profile short --run-dir runs/at
>>> python -m mixlab eval --checkpoint runs/at --attacks clean,pgd20,aa --n 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def literal_value(text: str) -> Any:
    """A --set or --param value: JSON where it parses (numbers, true, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _eps(text: str) -> float:
    """Accept '0.031' or '8/255'."""
    if "/" in text:
        num, den = text.split("/")
        return float(num) / float(den)
    return float(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model with one method",
                       description="Train a model; settings not given come from the profile "
                                   "and the method's defaults (see mixlab.train.TRAIN_DEFAULTS).")
    t.add_argument("--method", default="pgd_at")
    t.add_argument("--dataset", default=None)
    t.add_argument("--model", default=None)
    t.add_argument("--profile", default=None, choices=["smoke", "short", "paper"])
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--eps", type=_eps, help="radius in pixel units, e.g. 8/255")
    t.add_argument("--norm", choices=["Linf", "L2"])
    t.add_argument("--seed", type=int)
    t.add_argument("--device", default=None)
    t.add_argument("--run-dir", required=True)
    t.add_argument("--download", action="store_true", help="let torchvision download data")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting or method hyperparameter, e.g. --set lam=-1")

    e = sub.add_parser("eval", help="evaluate a saved run under attacks")
    e.add_argument("--checkpoint", required=True, help="run directory or .pt file")
    e.add_argument("--attacks", default="clean,pgd20,aa",
                   help="comma-separated: clean,fgsm,pgd10,pgd20,pgd50,cw20,aa")
    e.add_argument("--eps", type=_eps, default=None, help="default: the run's eps")
    e.add_argument("--norm", choices=["Linf", "L2"], default=None)
    e.add_argument("--n", type=int, default=1000, help="test examples (0: all)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--which", choices=["best", "last"], default="best")

    sub.add_parser("info", help="devices, data found, versions")

    d = sub.add_parser("download", help="download a dataset through torchvision")
    d.add_argument("dataset")

    pr = sub.add_parser("prepare", help="unpack offline copies (MNIST .gz, CIFAR-10 JPEG tar) "
                                        "into the data root, once")
    pr.add_argument("--from", dest="source", required=True, help="folder holding the copies")
    return p


def cmd_train(args) -> None:
    from .train import train
    config: dict[str, Any] = {"method": args.method, "run_dir": args.run_dir}
    for key in ("dataset", "model", "profile", "epochs", "batch_size", "lr", "eps", "norm",
                "seed", "device"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.download:
        config["download"] = True
    if args.compile:
        config["compile"] = True
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        config[key.replace("-", "_")] = literal_value(value)
    _, history = train(**config)
    print(json.dumps(history[-1]))


def cmd_eval(args) -> None:
    from . import data as data_mod
    from .evaluate import evaluate, format_table
    from .train import load_run, pick_device
    device = pick_device(args.device)
    run = load_run(args.checkpoint, which=args.which, device=device)
    cfg = run.config
    test = data_mod.load_dataset(cfg["dataset"], "test", root=cfg.get("data_root"))
    if test.num_classes != run.model.num_classes:
        raise ValueError(f"the checkpoint has {run.model.num_classes} classes, "
                         f"{cfg['dataset']} has {test.num_classes}")
    if args.n:
        test = test.subset(args.n, seed=0)
    test = test.to(device)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    results = evaluate(run.model, test.x.float() / 255, test.y, attacks=attacks,
                       eps=args.eps if args.eps is not None else cfg["eps"],
                       norm=args.norm or cfg["norm"], batch_size=args.batch_size,
                       run_dir=run.path, name="eval_cli")
    print(format_table({cfg["method"]: results}))
    for w in results["warnings"]:
        print("warning:", w)
    print(f"(n={results['n']}, written to {run.path / 'eval_cli.json'})")


def cmd_info(args) -> None:
    import platform

    import torch
    import torchvision

    from . import __version__
    from . import data as data_mod
    print(f"mixlab {__version__}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, python {platform.python_version()}")
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
    from . import data as data_mod
    source, root = Path(args.source), data_mod.data_root()
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    mnist = source / "MNIST" / "raw"
    if mnist.is_dir():
        data_mod.prepare_mnist_from_gz(mnist, root)
        print(f"MNIST ready in {root / 'MNIST'}")
    tar = source / "cifar10-jpeg.tar.gz"
    if tar.exists():
        data_mod.prepare_cifar10_from_archive(tar, root)
        for split in ("train", "test"):  # decode the JPEGs once now; later loads hit the cache
            data_mod.load_dataset("cifar10", split, root=root)
        print(f"CIFAR-10 (JPEG copy) ready in {root}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "download": cmd_download,
            "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .train import CheckpointError, NonFiniteLossError
    from .data import DataError
    try:
        COMMANDS[args.command](args)
    except NonFiniteLossError as err:
        print(f"mixlab: error: {err}", file=sys.stderr)
        return 3
    except (ValueError, DataError, CheckpointError, RuntimeError) as err:
        if os.environ.get("MIXLAB_TRACEBACK"):
            raise
        print(f"mixlab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
