"""The VRG optimizer: settings and the trajectory grid (:mod:`.settings`), the search (:mod:`.search`), the
discretisation-aware objective (:mod:`.discretization`) and grid entries for checkpoints (:mod:`.entries`)."""

from .search import optimize_trajectory, optimize_with_profile, trajectory_loss, trust_bounds
from .settings import GRID_BASES, MSE_MODES, TRUSTS, OptimizeResult, OptimizeSettings, TrajectoryGrid, grid_fields

__all__ = [
    "GRID_BASES",
    "MSE_MODES",
    "TRUSTS",
    "OptimizeResult",
    "OptimizeSettings",
    "TrajectoryGrid",
    "grid_fields",
    "optimize_trajectory",
    "optimize_with_profile",
    "trajectory_loss",
    "trust_bounds",
]
