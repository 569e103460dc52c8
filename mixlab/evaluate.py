"""Robustness evaluation: clean, FGSM, PGD-20 (CE), CW-20 and AutoAttack accuracy.

Protocol (papers.md, shared): the model is in eval mode; PGD-k uses a uniform random start,
step eps/4 for k = 20 (as GAIRAT evaluates) and 2.5·eps/k otherwise, whichever is larger;
final predictions on the attacked inputs are taken in fp32 even where the attack ran in bf16;
AutoAttack is the authors' own package (``pyautoattack``), "standard" version by default
(APGD-CE, APGD-T, FAB-T, Square).

>>> results = evaluate(model, x_test, y_test, attacks=("clean", "pgd20", "aa"), eps=8/255)
>>> print(format_table({"pgd_at": results}))
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .attacks import check_eps, eval_mode, fgsm, pgd

ATTACKS = ("clean", "fgsm", "pgd10", "pgd20", "pgd50", "cw20", "aa")
#: AutoAttack standard reaches below PGD-20 by a few points on honest models; much more
#: than this (accuracy points, in [0, 1]) suggests gradient masking
MASKING_GAP = 0.10


def _pgd_attack(steps: int, loss: str):
    def run(model, x, y, *, eps, norm, seed):
        step_size = eps / 4 if steps == 20 else max(eps / 4, 2.5 * eps / steps)
        return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, norm=norm, loss=loss)
    return run


_BATCHED = {
    "fgsm": lambda model, x, y, *, eps, norm, seed: fgsm(model, x, y, eps=eps, norm=norm),
    "pgd10": _pgd_attack(10, "ce"),
    "pgd20": _pgd_attack(20, "ce"),
    "pgd50": _pgd_attack(50, "ce"),
    "cw20": _pgd_attack(20, "cw"),
}


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) from an fp32 forward pass in eval mode."""
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size]).float().argmax(1)
                          for i in range(0, len(x), batch_size)])


def _as_tensors(x, y):
    """Accept tensors, a TensorDataset-like object (uint8 .x, .y), or a loader of (x, y)."""
    if y is not None:
        return x, y
    if hasattr(x, "x") and hasattr(x, "y"):
        xs = x.x
        return (xs.float() / 255 if xs.dtype == torch.uint8 else xs), x.y
    xs, ys = zip(*[(b[0], b[1]) if isinstance(b, (tuple, list)) else (b.x, b.y) for b in x])
    return torch.cat(xs), torch.cat(ys)


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               norm: str = "Linf", version: str = "standard", batch_size: int = 500,
               seed: int = 0) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020, arXiv 2003.01690) through the authors' ``pyautoattack``.

    Returns x_adv (N, C, H, W). The model runs in fp32 and eval mode."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:  # a dependency of mixlab, so this means a broken install
        raise ImportError("AutoAttack needs the `pyautoattack` package: pip install "
                          "pyautoattack (it is in mixlab's dependencies)") from err
    import logging
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    with eval_mode(model):
        attack = AutoAttack(model, norm=norm, eps=float(eps), version=version, seed=seed,
                            device=x.device)
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.to(x.device)


def evaluate(model: torch.nn.Module, x, y=None, *, attacks: Sequence[str] = ("clean", "pgd20",
             "aa"), eps: float = 8 / 255, norm: str = "Linf", batch_size: int = 500,
             aa_version: str = "standard", seed: int = 0, run_dir: str | Path | None = None,
             name: str = "eval") -> dict[str, Any]:
    """Accuracy of ``model`` under each attack, as fractions in [0, 1].

    Args:
        x, y: test inputs (N, C, H, W) in [0, 1] and labels (N,); or a TensorDataset / loader
            as ``x`` with ``y=None``. Evaluate on a subset by slicing: the result records n.
        attacks: names from ``ATTACKS``.
        eps, norm: threat model, pixel units. aa_version: AutoAttack version.
        run_dir: if given, the results are written to ``run_dir/<name>.json``.
    Returns:
        {"clean": 0.93, "pgd20": 0.51, ..., "n": N, "eps": eps, "norm": norm,
         "seconds": {...}, "img_per_s": {...}, "warnings": [...]}
    """
    check_eps(eps, norm)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    x, y = _as_tensors(x, y)
    torch.manual_seed(seed)
    results: dict[str, Any] = {"n": len(x), "eps": eps, "norm": norm, "seconds": {},
                               "img_per_s": {}}
    for name_ in attacks:
        t0 = time.perf_counter()
        if name_ == "clean":
            x_eval = x
        elif name_ == "aa":
            x_eval = autoattack(model, x, y, eps=eps, norm=norm, version=aa_version,
                                batch_size=batch_size, seed=seed)
        else:
            run = _BATCHED[name_]
            x_eval = torch.cat([run(model, x[i:i + batch_size], y[i:i + batch_size], eps=eps,
                                    norm=norm, seed=seed)
                                for i in range(0, len(x), batch_size)])
        results[name_] = (predict(model, x_eval, batch_size) == y).float().mean().item()
        seconds = time.perf_counter() - t0
        results["seconds"][name_] = seconds
        results["img_per_s"][name_] = len(x) / max(seconds, 1e-9)
    results["warnings"] = sanity_report(results)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, f"{name}.json").write_text(json.dumps(results, indent=2))
    return results


def sanity_report(results: dict[str, Any], curve: Sequence[float] | None = None) -> list[str]:
    """Warnings that point at gradient masking or a broken evaluation (Carlini et al. 2019,
    "On Evaluating Adversarial Robustness", arXiv 1902.06705; RobustBench's checks)."""
    warnings = []
    clean = results.get("clean")
    for key in ("fgsm", "pgd20", "cw20", "aa"):
        if clean is not None and key in results and results[key] > clean + 1e-9:
            warnings.append(f"{key} accuracy {results[key]:.3f} is above clean accuracy "
                            f"{clean:.3f}: the attack is broken")
    if "aa" in results and "pgd20" in results and results["pgd20"] - results["aa"] > MASKING_GAP:
        warnings.append(f"AutoAttack ({results['aa']:.3f}) is far below PGD-20 "
                        f"({results['pgd20']:.3f}): PGD is likely fooled by gradient masking")
    if "fgsm" in results and "pgd20" in results and results["fgsm"] < results["pgd20"] - 0.02:
        warnings.append(f"FGSM ({results['fgsm']:.3f}) is stronger than PGD-20 "
                        f"({results['pgd20']:.3f}): a sign of gradient masking")
    if curve is not None:
        rises = [i for i in range(1, len(curve)) if curve[i] > curve[i - 1] + 0.02]
        if rises:
            warnings.append("robust accuracy rises with eps in the curve: gradient masking or "
                            "too few attack steps")
    return warnings


def robust_accuracy_curve(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          eps_list: Iterable[float], attack: str = "pgd20",
                          norm: str = "Linf", batch_size: int = 500) -> list[float]:
    """Accuracy under ``attack`` ("fgsm", "pgd10", "pgd20", "cw20") for each eps; eps = 0
    gives the clean accuracy."""
    if attack not in _BATCHED:
        raise ValueError(f"curve attack must be one of {sorted(_BATCHED)}")
    accs = []
    for eps in eps_list:
        if eps == 0:
            accs.append((predict(model, x, batch_size) == y).float().mean().item())
        else:
            accs.append(evaluate(model, x, y, attacks=(attack,), eps=eps, norm=norm,
                                 batch_size=batch_size)[attack])
    return accs


def format_table(rows: dict[str, dict[str, Any]],
                 columns: Sequence[str] = ("clean", "fgsm", "pgd20", "cw20", "aa")) -> str:
    """A Markdown table of accuracies (percent), one row per model/method."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| model | " + " | ".join(present) + " |",
             "|---|" + "---:|" * len(present)]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:.2f}" if c in r else "–" for c in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
