"""mixlab: a notebook-first research kit for robust image classification where adversarial
training meets mixup (AMP, GAIRAT, MMA, and the theory of mixup's robustness).

Pixels live in [0, 1]; every eps is in pixel units; normalisation is inside the model.
Nothing here touches a device at import time.
"""
__version__ = "0.1.0"


def load_run(path, **kwargs):
    """Load a saved run (model, config, history); see ``mixlab.train.load_run``."""
    from .train import load_run as _load_run
    return _load_run(path, **kwargs)
