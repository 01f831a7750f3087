"""``vrg export``: a stored (VRG) trajectory as the ``sigmas=`` / ``timesteps=`` list a diffusers scheduler takes.

- ``--format sigmas``: σ = √((1-ᾱ)/ᾱ), noisiest first, followed by the final ``0.0`` (diffusers'
  ``EulerDiscreteScheduler.set_timesteps(sigmas=...)`` takes the full list including the end point and keeps the
  float values; it casts them to float32).
- ``--format timesteps``: integer timesteps, noisiest first, for schedulers whose ``set_timesteps(timesteps=...)``
  casts to integers (``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``); the scheduler adds the end
  point itself (``final_sigmas_type="zero"`` matches the toolkit's σ = 0).

What the export loses (float32 or integer rounding) is reported as the cpe of the exported trajectory next to the
cpe of the exact one, under the checkpoint's error profile.

    vrg export --ckpt model.ckpt --solver dpmpp_2m --steps 10 --base logSNR --format timesteps
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

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
    schedule: Any,
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
        ValueError: unknown format, or two steps that round to the same integer timestep.

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> import torch
        >>> r = export_trajectory(torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64), NoiseSchedule(), "timesteps")
        >>> r.values
        [673, 258, 27]
    """
    import torch

    from vrg_lightning.schedule import alpha_bar_to_sigma, sigma_to_alpha_bar
    from vrg_lightning.trajectories import validate_trajectory
    from vrg_lightning.variance import cpe

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}.")
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
                "Use --format sigmas (float sigmas) or fewer steps."
            )
        values = [int(v) for v in ti]
        exported = schedule.alphas_cumprod[ti].flip(0)
    c_exact = c_exp = None
    if mse is not None:
        kw = {"solver": solver} if objective == "solver" else {}
        c_exact, c_exp = float(cpe(ab, mse, objective, **kw)), float(cpe(exported, mse, objective, **kw))
    return ExportResult(fmt, values, ab.tolist(), exported.tolist(), c_exact, c_exp, objective, solver)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="Checkpoint with stored VRG trajectories (checkpoint['vrg']).")
    p.add_argument("--solver", required=True, help="Solver of the stored entry (e.g. ddim, dpmpp_2m).")
    p.add_argument("--steps", type=int, required=True, help="Number of steps of the stored entry.")
    p.add_argument("--base", default=None, help="Base trajectory of the stored entry (when several exist).")
    p.add_argument("--objective", default=None, choices=("paper", "solver"), help="Objective of the stored entry.")
    p.add_argument("--lp", type=float, default=None, help="Learning portion of the stored entry.")
    p.add_argument("--trajectory", default="vrg",
                   help="'vrg' (default: the stored entry), a base name or a trajectory file.")
    p.add_argument("--format", required=True, choices=FORMATS, help="sigmas (Euler, float) or timesteps (integers).")
    p.add_argument("--json", action="store_true", help="Print a JSON object (values, ᾱ before/after, cpe).")


def run(args: argparse.Namespace) -> int:
    from vrg_lightning.checkpoint import load_checkpoint_file, read_vrg
    from vrg_lightning.profile import ErrorProfile
    from vrg_lightning.sampling import resolve_trajectory
    from vrg_lightning.schedule import NoiseSchedule
    from vrg_lightning.variance import objective_for_cpe

    ckpt = load_checkpoint_file(args.ckpt)
    vrg = read_vrg(ckpt)
    schedule = NoiseSchedule.from_dict(vrg["schedule"])
    traj = resolve_trajectory(schedule, vrg, args.solver, args.steps, args.trajectory, base=args.base,
                              objective=args.objective, lp=args.lp)
    objective = args.objective or objective_for_cpe((traj.entry or {}).get("objective"))
    mse = ErrorProfile.from_dict(vrg["profile"]).mse_function("fit")
    res = export_trajectory(traj.tensor, schedule, args.format, mse=mse, objective=objective, solver=args.solver)
    if args.json:
        print(json.dumps({**res.to_dict(), "source": traj.source, "base": traj.base, "steps": len(traj.alpha_bar)},
                         indent=2))
        return 0
    print(res.literal())
    what = "float32 sigmas" if res.format == "sigmas" else "integer timesteps"
    print(f"# {traj.source} ({args.solver}, {len(traj.alpha_bar)} steps); cpe[{objective}] exact "
          f"{res.cpe_exact:.6g}, as {what} {res.cpe_exported:.6g} ({100 * res.cpe_change:+.4f}%)", file=sys.stderr)
    return 0
