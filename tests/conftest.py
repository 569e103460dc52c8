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


#: MIXLAB_FIGURES as the test run was started with (``MIXLAB_FIGURES=figures pytest
#: tests/test_browser.py`` remakes a committed figure on purpose)
_FIGURES_GIVEN = "MIXLAB_FIGURES" in os.environ


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _scratch_figures(tmp_path_factory, monkeypatch):
    """Figures, tables and notebook times a test makes go to a scratch folder, never over
    the committed figures/ (unless the run was started with MIXLAB_FIGURES set)."""
    if not _FIGURES_GIVEN:
        monkeypatch.setenv("MIXLAB_FIGURES", str(tmp_path_factory.mktemp("figures")))


@pytest.fixture(scope="session")
def data_root():
    """The data folder the Makefile prepared ($MIXLAB_DATA or ./data)."""
    return Path(os.environ.get("MIXLAB_DATA", REPO / "data"))


#: the tiny batch of the method tests: B CIFAR-shaped images, labels in K classes
B, K = 8, 10


@pytest.fixture
def net():
    """A fresh tiny CIFAR-shaped classifier, build_model("tiny", K), seeded 0, in train mode."""
    from mixlab.models import build_model

    torch.manual_seed(0)
    return build_model("tiny", K).train()


@pytest.fixture
def batch_rng():
    """The torch.Generator, seeded 1, that ``batch`` draws from; a test may draw more after it."""
    return torch.Generator().manual_seed(1)


@pytest.fixture
def batch(batch_rng):
    """x (B, 3, 32, 32) float32 in [0, 1) and labels y (B,) int64 in [0, K), from ``batch_rng``."""
    x = torch.rand(B, 3, 32, 32, generator=batch_rng)
    y = torch.randint(0, K, (B,), generator=batch_rng)
    return x, y
