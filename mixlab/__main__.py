"""``python -m mixlab ...``: see mixlab.cli."""
import sys

from .cli import main

sys.exit(main())
