"""Shared fixtures. Tests run on CPU with one thread each (cores are often shared), seeded."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(1)
# Notebook kernels, JupyterLab and the CLI run as child processes: one thread each too. On a
# 2-core machine two processes with two OpenMP threads each (a kernel beside Chromium, say)
# spin against each other and run 5-20x slower than with one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped on CPU with a visible reason, never silently passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root():
    """The data folder the Makefile prepared ($MIXLAB_DATA or ./data)."""
    return Path(os.environ.get("MIXLAB_DATA", REPO / "data"))
