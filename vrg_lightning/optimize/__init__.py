"""The VRG optimizer: settings and the trajectory grid (:mod:`.settings`), variables and trust region
(:mod:`.variables`), the loss in the variables (:mod:`.problem`), dynamic programming along the chain of steps
(:mod:`.chain`), the search (:mod:`.search`), the solver-aware loss as an exact chain of groups (:mod:`.groups`) or
windows (:mod:`.windows`) where it is one, else the solver-aware trust-region loop (:mod:`.surrogate`) on its closed
form (:mod:`.multistep`), grid entries for checkpoints (:mod:`.entries`) and the discretisation-aware objective
(:mod:`.discretization`)."""

from .discretization import DiscResult, optimize_disc
from .entries import (
    RESULT_KEYS,
    SETTING_KEYS,
    EntryCache,
    cache_key,
    compute_entries,
    grid_settings,
    make_entry,
    optimize_cached,
    result_fields,
    settings_fields,
)
from .problem import SearchProblem
from .search import optimize_trajectory, optimize_with_profile, trajectory_loss
from .settings import (
    GRID_BASES,
    MSE_MODES,
    PEER_BASES,
    STORED_BASES,
    TRUSTS,
    OptimizeResult,
    OptimizeSettings,
    TrajectoryGrid,
    grid_fields,
    schedule_range,
)
from .variables import Variables, trust_bounds

__all__ = [
    "GRID_BASES",
    "PEER_BASES",
    "STORED_BASES",
    "MSE_MODES",
    "TRUSTS",
    "OptimizeResult",
    "OptimizeSettings",
    "TrajectoryGrid",
    "grid_fields",
    "schedule_range",
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
    "grid_settings",
    "EntryCache",
]
