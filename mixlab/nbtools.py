"""Small helpers the notebooks share: where runs and figures go, the device, provenance
sidecars for figures. Notebooks stay thin drivers; anything longer than a few lines that two
notebooks need lives here or in the module it belongs to.
"""
from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_bytes, atomic_write_json


def project_dir(start: str | Path | None = None) -> Path:
    """The mixlab checkout the notebook runs in (the nearest folder above ``start`` holding
    ``pyproject.toml`` and ``notebooks/``), else the current folder."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "notebooks").is_dir():
            return folder
    return here


def resolve_device(device: str = "auto") -> torch.device:
    """'auto': CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_dir(notebook: str, profile: str, *parts: str, root: str | Path | None = None) -> Path:
    """``<project>/runs/<notebook>/<profile>/<parts...>``: where a notebook keeps its runs, so
    runs of different profiles never mix and a second execution reuses finished ones.
    ``$MIXLAB_RUNS`` replaces ``<project>/runs`` (the notebook tests train afresh that way)."""
    base = Path(root or os.environ.get("MIXLAB_RUNS") or project_dir() / "runs")
    return base.joinpath(notebook, profile, *parts)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=project_dir(), timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_figure(fig, name: str, *, profile: str, extra: dict[str, Any] | None = None,
                folder: str | Path | None = None) -> Path:
    """Save a matplotlib figure as ``figures/<name>_<profile>.png`` with a JSON sidecar that
    records the profile, git commit, device and time (which code and profile made it). Both
    files are written atomically (an interrupted save leaves the previous version intact)."""
    folder = Path(folder) if folder else project_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.png"
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())
    meta = dict(figure=path.name, profile=profile, git_commit=git_commit(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path.with_suffix(".json"), meta, indent=2)
    return path


def save_table(rows: dict[str, dict[str, Any]], name: str, *, profile: str,
               extra: dict[str, Any] | None = None, folder: str | Path | None = None) -> Path:
    """Write a results table (method -> metrics) as ``figures/<name>_<profile>.json`` with the
    same provenance fields as figures, atomically."""
    folder = Path(folder) if folder else project_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{profile}.json"
    meta = dict(table=rows, profile=profile, git_commit=git_commit(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
    atomic_write_json(path, meta, indent=2, default=float)
    return path
