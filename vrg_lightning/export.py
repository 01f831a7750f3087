"""A stored (VRG) trajectory as the ``sigmas=`` / ``timesteps=`` list a diffusers scheduler takes, or as a
``VRGScheduler`` folder.

- ``"sigmas"``: σ = √((1-ᾱ)/ᾱ), noisiest first, followed by the final ``0.0`` (diffusers'
  ``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes the full list including the end point and keeps the
  float values; it casts them to float32). On rectified flow: the path's own σ = σ_vp/(1 + σ_vp), noisiest first,
  without the end point (``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` appends 0 itself).
- ``"timesteps"``: integer timesteps, noisiest first, for schedulers whose ``set_timesteps(timesteps=...)``
  casts to integers (``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``); the scheduler adds the end
  point itself (``final_sigmas_type="zero"`` matches the toolkit's σ = 0). On a continuous path: the model's float
  time inputs (``alpha_bar_to_t``), nothing rounded.
- ``"scheduler"``: the exact ᾱ values, cleanest first, for :class:`~vrg_lightning.scheduler.VRGScheduler` (continuous
  timesteps, any of the toolkit's solvers, nothing rounded); :func:`write_scheduler` writes its folder.

What the export loses (float32 or integer rounding) is reported as the cpe of the exported trajectory next to the
cpe of the exact one, under the checkpoint's error profile. ``vrg export`` is the command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_text
from .schedule import NoisePath, NoiseSchedule, alpha_bar_to_sigma, sigma_to_alpha_bar
from .trajectories import validate_trajectory
from .variance import cpe

__all__ = ["FORMATS", "ExportResult", "export_trajectory", "write_scheduler"]

FORMATS = ("sigmas", "timesteps", "scheduler")


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
        """``sigmas=[...]``, ``timesteps=[...]`` or ``alpha_bar=[...]`` (scheduler) as Python source."""
        vals = ", ".join(repr(v) for v in self.values)
        return f"{'alpha_bar' if self.format == 'scheduler' else self.format}=[{vals}]"


def export_trajectory(
    alpha_bar: Any,
    schedule: NoisePath,
    fmt: str,
    *,
    mse: Callable[[Any], Any] | None = None,
    objective: str = "paper",
    solver: str = "ddim",
) -> ExportResult:
    """Convert a trajectory (ᾱ, cleanest first) to a diffusers ``sigmas``/``timesteps`` list or ``VRGScheduler`` ᾱ.

    Args:
        alpha_bar: the trajectory.
        schedule: the model's noise path (:class:`~vrg_lightning.schedule.NoisePath`).
        fmt: one of :data:`FORMATS` (``"scheduler"``: the exact values, cleanest first; nothing is lost).
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
    if fmt == "scheduler":
        values, exported = ab.tolist(), ab
    elif fmt == "sigmas" and schedule.path == "rectified_flow":
        sv = alpha_bar_to_sigma(ab).flip(0)
        flow = (sv / (1 + sv)).to(torch.float32).to(torch.float64)  # FlowMatch keeps float32 sigmas
        values = [float(v) for v in flow]
        exported = ((1 - flow) ** 2 / ((1 - flow) ** 2 + flow**2)).flip(0)
    elif fmt == "sigmas":
        sig = alpha_bar_to_sigma(ab).flip(0)
        values: list[Any] = [float(s) for s in sig] + [0.0]
        exported = sigma_to_alpha_bar(sig.to(torch.float32).to(torch.float64)).flip(0)
    elif not isinstance(schedule, NoiseSchedule):  # a continuous path: its float model times
        values, exported = [float(v) for v in schedule.alpha_bar_to_t(ab).flip(0)], ab
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


def write_scheduler(
    out_dir: str | os.PathLike,
    alpha_bar: Any,
    schedule: NoisePath,
    solver: str,
    *,
    prediction_type: str = "epsilon",
    source: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a :class:`~vrg_lightning.scheduler.VRGScheduler` folder (its ``scheduler_config.json``, what
    ``save_pretrained`` writes, written atomically), loadable by ``VRGScheduler.from_pretrained(out_dir)``.

    Returns:
        The path of the written config file.

    Raises:
        FileExistsError: ``out_dir`` is a file, or already holds a scheduler config and ``force`` is False.
        ValueError: an invalid trajectory, solver or prediction type (nothing is written).
    """
    from .scheduler import VRGScheduler, path_kwargs

    out = Path(out_dir)
    target = out / VRGScheduler.config_name
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} is a file, not a folder for the scheduler config.")
    if target.exists() and not force:
        raise FileExistsError(f"{str(target)!r} exists; choose a new folder or pass force=True to replace it.")
    sched = VRGScheduler(alpha_bar=validate_trajectory(torch.as_tensor(alpha_bar, dtype=torch.float64), "trajectory"),
                         solver=solver, **path_kwargs(schedule), prediction_type=prediction_type,
                         source=dict(source) if source else None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, sched.to_json_string())
    return target
