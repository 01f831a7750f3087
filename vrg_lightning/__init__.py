"""vrg-lightning: Variance-Reduction Guidance sampling trajectories for diffusion models."""

from .profile import ErrorProfile, load_profile, save_profile
from .schedule import NoiseSchedule
from .trajectories import BASES, load_trajectory, make_trajectory, save_trajectory, validate_trajectory
from .variance import cpe_paper

__version__ = "0.1.0"

__all__ = [
    "BASES",
    "ErrorProfile",
    "NoiseSchedule",
    "cpe_paper",
    "load_profile",
    "load_trajectory",
    "make_trajectory",
    "save_profile",
    "save_trajectory",
    "validate_trajectory",
]
