"""A stored (VRG) trajectory as the ``sigmas=`` / ``timesteps=`` list a diffusers scheduler takes.

- ``"sigmas"``: σ = √((1-ᾱ)/ᾱ), noisiest first, followed by the final ``0.0`` (diffusers'
  ``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes the full list including the end point and keeps the
  float values; it casts them to float32).
- ``"timesteps"``: integer timesteps, noisiest first, for schedulers whose ``set_timesteps(timesteps=...)``
  casts to integers (``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``); the scheduler adds the end
  point itself (``final_sigmas_type="zero"`` matches the toolkit's σ = 0).

What the export loses (float32 or integer rounding) is reported as the cpe of the exported trajectory next to the
cpe of the exact one, under the checkpoint's error profile. ``vrg export`` is the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .schedule import NoiseSchedule, alpha_bar_to_sigma, sigma_to_alpha_bar
from .trajectories import validate_trajectory
from .variance import cpe

__all__ = ["FORMATS", "ExportResult", "export_trajectory"]

FORMATS = ("sigmas", "timesteps")


@dataclass(frozen=True)
class ExportResult:
    """An exported trajectory: ``values`` for the scheduler and the cpe before / after rounding."""

    format: str
    values: list[float] | list[int]
    alpha_bar: list[float]
    alpha_bar_exported: list[float]
    cpe_exact: float | None
    cpe_exported: float | None
    objective: str
    solver: str

    @property
    def cpe_change(self) -> float | None:
        """Relative cpe change caused by the rounding (``cpe_exported / cpe_exact - 1``)."""
        if self.cpe_exact is None or self.cpe_exported is None:
            return None
        return self.cpe_exported / self.cpe_exact - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpe_change": self.cpe_change}

    def literal(self) -> str:
        """``sigmas=[...]`` or ``timesteps=[...]`` as Python source."""
        vals = ", ".join(repr(v) for v in self.values)
        return f"{self.format}=[{vals}]"


def export_trajectory(
    alpha_bar: Any,
    schedule: NoiseSchedule,
    fmt: str,
    *,
    mse: Callable[[Any], Any] | None = None,
    objective: str = "paper",
    solver: str = "ddim",
) -> ExportResult:
    """Convert a trajectory (ᾱ, cleanest first) to a diffusers ``sigmas``/``timesteps`` list.

    Args:
        alpha_bar: the trajectory.
        schedule: the model's :class:`~vrg_lightning.schedule.NoiseSchedule`.
        fmt: ``"sigmas"`` or ``"timesteps"``.
        mse: MSE(ᾱ) of the model's error profile; without it no cpe is reported.
        objective, solver: the cpe (:func:`vrg_lightning.variance.cpe`) used to measure the rounding loss.

    Raises:
        ValueError: ``fmt`` not in :data:`FORMATS`, an invalid trajectory, or two steps that round to the same
            integer timestep.

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> r = export_trajectory(torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64), NoiseSchedule(), "timesteps")
        >>> r.values
        [673, 258, 27]
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}.")
    ab = validate_trajectory(torch.as_tensor(alpha_bar, dtype=torch.float64), "trajectory")
    if fmt == "sigmas":
        sig = alpha_bar_to_sigma(ab).flip(0)
        values: list[Any] = [float(s) for s in sig] + [0.0]
        exported = sigma_to_alpha_bar(sig.to(torch.float32).to(torch.float64)).flip(0)
    else:
        t = schedule.alpha_bar_to_t(ab).flip(0)  # continuous, noisiest first
        ti = torch.round(t).clamp(0, schedule.num_train_timesteps - 1).long()
        dup = torch.nonzero(ti[1:] >= ti[:-1])
        if dup.numel():
            i = int(dup[0])
            raise ValueError(
                f"Steps {i} and {i + 1} (noisiest first; timesteps {float(t[i]):.3f} and {float(t[i + 1]):.3f}) round "
                f"to the same integer timestep {int(ti[i])}; integer timesteps cannot represent this trajectory. "
                "Export as sigmas (float values) or use fewer steps."
            )
        values = [int(v) for v in ti]
        exported = schedule.alphas_cumprod[ti].flip(0)
    c_exact = c_exp = None
    if mse is not None:
        kw = {"solver": solver} if objective == "solver" else {}
        c_exact, c_exp = float(cpe(ab, mse, objective, **kw)), float(cpe(exported, mse, objective, **kw))
    return ExportResult(fmt, values, ab.tolist(), exported.tolist(), c_exact, c_exp, objective, solver)
