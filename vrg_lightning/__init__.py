"""vrg-lightning: Variance-Reduction Guidance sampling trajectories for diffusion models.

The public names load lazily (PEP 562): ``import vrg_lightning`` imports neither Lightning nor diffusers, and each
name imports its module on first use.

Example:
    >>> import vrg_lightning as vrg
    >>> ab = vrg.make_trajectory(vrg.NoiseSchedule(), "logSNR", 10)
    >>> ab.shape
    torch.Size([10])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    # core: schedules, trajectories, profiles, solvers, cpe
    "NoiseSchedule": "schedule",
    "make_trajectory": "trajectories",
    "load_trajectory": "trajectories",
    "save_trajectory": "trajectories",
    "ErrorProfile": "profile",
    "load_profile": "profile",
    "sample": "solvers",
    "cpe": "variance",
    # optimizer
    "TrajectoryGrid": "optimize",
    "OptimizeSettings": "optimize",
    "optimize_trajectory": "optimize",
    # training and measurement
    "VRGProfiler": "callbacks",
    "probe_profile": "probe",
    # checkpoints, sampling, export
    "read_vrg": "checkpoint",
    "load_denoiser": "checkpoint",
    "select_entry": "checkpoint",
    "generate": "sampling",
    "export_trajectory": "export",
    "VRGScheduler": "scheduler",
}
_EARLIER = {  # importable as before, not part of the listed API
    "BASES": "trajectories",
    "validate_trajectory": "trajectories",
    "save_profile": "profile",
    "cpe_paper": "variance",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name) or _EARLIER.get(name)
    if module is None:
        raise AttributeError(f"module 'vrg_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .callbacks import VRGProfiler  # noqa: F401
    from .checkpoint import load_denoiser, read_vrg, select_entry  # noqa: F401
    from .export import export_trajectory  # noqa: F401
    from .optimize import OptimizeSettings, TrajectoryGrid, optimize_trajectory  # noqa: F401
    from .probe import probe_profile  # noqa: F401
    from .profile import ErrorProfile, load_profile  # noqa: F401
    from .sampling import generate  # noqa: F401
    from .schedule import NoiseSchedule  # noqa: F401
    from .scheduler import VRGScheduler  # noqa: F401
    from .solvers import sample  # noqa: F401
    from .trajectories import load_trajectory, make_trajectory, save_trajectory  # noqa: F401
    from .variance import cpe  # noqa: F401
