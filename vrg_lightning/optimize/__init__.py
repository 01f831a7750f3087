"""The VRG optimizer: settings and the trajectory grid (:mod:`.settings`), variables and trust region
(:mod:`.variables`), the search (:mod:`.search`), grid entries for checkpoints (:mod:`.entries`) and the
discretisation-aware objective (:mod:`.discretization`)."""

from .discretization import DiscResult, optimize_disc
from .entries import (
    RESULT_KEYS,
    SETTING_KEYS,
    cache_key,
    compute_entries,
    make_entry,
    optimize_cached,
    result_fields,
    settings_fields,
)
from .search import SearchProblem, optimize_trajectory, optimize_with_profile, trajectory_loss
from .settings import GRID_BASES, MSE_MODES, TRUSTS, OptimizeResult, OptimizeSettings, TrajectoryGrid, grid_fields
from .variables import Variables, trust_bounds

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
    "Variables",
    "SearchProblem",
    "DiscResult",
    "optimize_disc",
    "SETTING_KEYS",
    "RESULT_KEYS",
    "cache_key",
    "optimize_cached",
    "settings_fields",
    "result_fields",
    "make_entry",
    "compute_entries",
]
