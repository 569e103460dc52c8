"""mixlab: a notebook-first research kit for robust image classification where adversarial
training meets mixup (AMP, GAIRAT, MMA, and the theory of mixup's robustness).

Pixels live in [0, 1]; every eps is in pixel units; normalisation is inside the model.
Nothing here touches a device at import time, and ``import mixlab`` imports no torch:
``mixlab.load_run`` (:func:`mixlab.runs.load_run`) is looked up on first use.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: mixlab.load_run is mixlab.runs.load_run, imported when first asked for
    if name == "load_run":
        from .runs import load_run
        return load_run
    raise AttributeError(f"module 'mixlab' has no attribute {name!r}")
