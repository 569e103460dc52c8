"""Optional dependencies: what ``pip install mixlab`` leaves out, and the one error for it.

``pip install mixlab`` installs what training, attacks and evaluation by PGD/CW/FGSM need.
The rest comes as extras (``pyproject.toml``):

* ``mixlab[notebooks]``: JupyterLab, papermill, nbval, ipywidgets, plotly, anywidget, jupytext
  (the notebooks, ``python -m mixlab.notebooks``, the margin explorer widget);
* ``mixlab[eval]``: AutoAttack (``pyautoattack``), for ``evaluate(..., attacks=[..., "aa"])``;
* ``mixlab[tensorboard]``: ``train(tensorboard=True)``;
* ``mixlab[all]``: all of the above.

A feature whose package is missing raises :class:`MissingExtraError` from :func:`require`,
naming the feature, the package and the extra that installs it.

>>> papermill = require("papermill", feature="running the notebooks")
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: importable module -> (the extra that installs it, its name on PyPI)
EXTRAS: dict[str, tuple[str, str]] = {
    "pyautoattack": ("eval", "pyautoattack"),
    "papermill": ("notebooks", "papermill"),
    "nbval": ("notebooks", "nbval"),
    "ipywidgets": ("notebooks", "ipywidgets"),
    "plotly": ("notebooks", "plotly"),
    "anywidget": ("notebooks", "anywidget"),
    "jupytext": ("notebooks", "jupytext"),
    "jupyterlab": ("notebooks", "jupyterlab"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),  # torch's writer needs it
}


class MissingExtraError(ImportError):
    """A feature needs a package that ``pip install mixlab`` does not install; the message
    names the extra to install."""


def require(module: str, *, feature: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS`, or a submodule of one) for ``feature``, or
    raise :class:`MissingExtraError` saying which extra installs it; returns the module.

    >>> W = require("ipywidgets", feature="the margin explorer widget")
    """
    top = module.split(".")[0]
    extra, package = EXTRAS[module] if module in EXTRAS else EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs the {package} package, which is not installed: pip install "
            f"'mixlab[{extra}]' (or pip install {package}; in a checkout, make setup installs "
            f"every extra); {err}", name=module) from err
