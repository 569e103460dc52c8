"""Training methods, one file each. ``METHODS`` maps a name to its class; every file
registers itself on import. Add a method: write ``methods/<name>.py`` and import it here."""
from .base import METHODS, AttackSpec, Method, register, soft_cross_entropy  # noqa: F401
from . import erm, mixup, pgd_at  # noqa: F401  (import registers)
from . import mma  # noqa: F401
from . import amp  # noqa: F401
from . import fat  # noqa: F401
from . import gairat  # noqa: F401
from . import trades  # noqa: F401


def get_method(name: str) -> type[Method]:
    """The method class called ``name``; a clear error lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
