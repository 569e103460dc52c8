"""Reading a benchmark result: ratios within one run, the printed table and the JSON file.

Everything here takes the result record of ``mixlab.bench.run_bench`` (a dict) and touches no
device. The table shows measurements and ratios only; what the numbers are expected to reach on
a GPU is written down in docs/benchmark.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write_text


def jsonable(obj: Any) -> Any:
    """Strict JSON: tuples to lists, one-element tensors and numpy scalars to numbers, NaN and
    inf to None (JSON has no such numbers), anything else to its str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 or isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    return str(obj)



def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of throughput within one run: each row / ceiling, each row / pgd_at,
    pgd_at / reference, and the data path's overhead. None where a row is missing or failed."""
    def speed(name):
        return rows.get(name, {}).get("img_per_s")

    def ratio(a, b):
        return a / b if a is not None and b else None

    def work(name):  # forward-equivalents per step (PassCounter)
        return rows.get(name, {}).get("passes", {}).get("forward_equivalents")

    names = [n for n in rows if n not in ("ceiling", "data_path")]
    return dict(
        vs_ceiling={n: ratio(speed(n), speed("ceiling")) for n in names},
        vs_pgd_at={n: ratio(speed(n), speed("pgd_at")) for n in names},
        # what the pass count alone predicts for vs_pgd_at (same batch, same arch)
        predicted_vs_pgd_at={n: ratio(work("pgd_at"), work(n)) for n in names if work(n)},
        pgd_at_vs_reference=ratio(speed("pgd_at"), speed("reference")),
        data_path_overhead=rows.get("data_path", {}).get("overhead"))



def format_bench_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: one line per row, then the ratio to the reference
    and the evaluation throughput. Measurements and ratios only."""
    rows, r = result["rows"], result["ratios"]
    head = (f"mixlab bench: {result['config']['arch']} on {result['device_name']}; "
            f"{result['label']}; data: {result['data']['dataset']}, "
            f"{result['date']}, commit {result['provenance'].get('git_commit', '?')[:10]}")
    lines = [head, f"{'row':<12}{'img/s':>10}{'ms/step':>10}{'batch':>7}{'/ceiling':>10}"
                   f"{'/pgd_at':>9}{'fwd-eq':>8}{'peak MiB':>10}  note"]

    def num(v, fmt):  # fmt like "10.1f": a missing value is a right-aligned "-"
        width = int(fmt.split(".")[0] or 0)
        return format(v, fmt) if v is not None else "-".rjust(width)

    for name, row in rows.items():
        if "error" in row:
            lines.append(f"{name:<12}{'FAILED':>10}  {row['error'][:80]}")
            continue
        note = ""
        if name == "data_path":
            note = (f"pgd_at; fixed batch {row['synthetic_img_per_s']:.1f} img/s, overhead "
                    f"{100 * row['overhead']:+.1f}%, loader alone "
                    f"{row['loader_only_img_per_s']:.0f} img/s "
                    f"({100 * row['loader_share']:.2f}% of a step)")
        elif name == "reference":
            note = f"fp32, DataLoader x{row['workers']} workers, kappa loop on host"
        lines.append(f"{name:<12}{num(row.get('img_per_s'), '10.1f')}"
                     f"{num(row.get('ms_per_step'), '10.1f')}"
                     f"{row.get('batch_size', ''):>7}"
                     f"{num(r['vs_ceiling'].get(name), '10.3f')}"
                     f"{num(r['vs_pgd_at'].get(name), '9.3f')}"
                     f"{num(row.get('passes', {}).get('forward_equivalents'), '8.1f')}"
                     f"{num(row.get('peak_mem_mib'), '10.0f')}  {note}")
    lines.append(f"pgd_at / reference: {num(r['pgd_at_vs_reference'], '.2f')} (x)")
    lines.append("fwd-eq: the step's work in forward passes, 3 per training pass (forward + "
                 "full backward), 2 per attack pass (input-only backward), 1 per probe")
    for attack, rec in result.get("eval", {}).items():
        if isinstance(rec, dict) and "img_per_s" in rec:
            lines.append(f"eval {attack:<6} n={rec['n']:<5} {rec['img_per_s']:10.1f} img/s "
                         f"({rec['seconds']:.1f} s, accuracy {rec['accuracy']:.3f})")
        elif isinstance(rec, dict) and "skipped" in rec:
            lines.append(f"eval {attack:<6} skipped ({rec['skipped']})")
    scaling = result.get("scaling") or {}
    if "error" in scaling:
        lines.append(f"scaling FAILED: {scaling['error'][:80]}")
    for name, rec in ({} if "error" in scaling else scaling).items():
        lines.append(f"scaling {name:<8} {rec['processes']} processes x batch "
                     f"{rec['batch_per_device']}: {rec['img_per_s']:10.1f} img/s, "
                     f"{rec['img_per_s_per_device']:.1f} per device; one device "
                     f"{rec['one_device_img_per_s']:.1f}; efficiency "
                     f"{100 * rec['efficiency']:.1f}% (wall clock)")
    return "\n".join(lines)


def output_path(result: dict[str, Any], out: str | Path) -> Path:
    """``out`` itself if it ends in .json, else ``out/bench-<device>-<date>.json`` (with
    ``-<arch>`` for another arch than preactresnet18, ``-compile`` for compiled runs,
    ``-eval`` for evaluation-only runs and ``-quick`` for quick runs, so that runs of one day
    do not overwrite each other)."""
    out = Path(out)
    if out.suffix == ".json":
        return out
    cfg = result["config"]
    name = f"bench-{result['device']}-{result['date']}"
    if cfg["arch"] != "preactresnet18" and not cfg["quick"]:
        name += f"-{cfg['arch']}"
    if cfg.get("compile"):
        name += "-compile"
    if cfg.get("methods") == ["eval"]:  # evaluation throughput alone (usually --checkpoint)
        name += "-eval"
    if cfg["quick"]:
        name += "-quick"
    return out / f"{name}.json"


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write the result as strict JSON to :func:`output_path`, atomically; returns the path."""
    path = output_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    return path
