"""Moved to :mod:`vrg_lightning.optimize.discretization` (this name is kept for old imports)."""

from .optimize.discretization import *  # noqa: F401,F403
from .optimize.discretization import __all__  # noqa: F401
