"""``vrg export``: a stored (VRG) trajectory as the ``sigmas=`` / ``timesteps=`` list a diffusers scheduler takes
(:func:`vrg_lightning.export.export_trajectory`), or as a ``VRGScheduler`` folder (``--format scheduler --out DIR``,
:func:`vrg_lightning.export.write_scheduler`: exact, any solver); the cpe cost of the rounding goes to stderr.

    vrg export --ckpt model.ckpt --solver dpmpp_2m --steps 10 --base logSNR --format timesteps
    vrg export --ckpt model.ckpt --solver dpmpp_2m --steps 10 --format scheduler --out vrg_scheduler
"""

from __future__ import annotations

import argparse
import json
import sys

from ..export import FORMATS, export_trajectory, write_scheduler
from ..solvers import SOLVERS
from ..variance import OBJECTIVES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="Checkpoint with stored VRG trajectories (checkpoint['vrg']).")
    p.add_argument("--solver", required=True, choices=SOLVERS, help="Solver of the stored entry.")
    p.add_argument("--steps", type=int, required=True, help="Number of steps of the stored entry.")
    p.add_argument("--base", default=None, help="Base trajectory of the stored entry (when several exist).")
    p.add_argument("--objective", default=None, choices=OBJECTIVES, help="Objective of the stored entry.")
    p.add_argument("--lp", type=float, default=None, help="Learning portion of the stored entry.")
    p.add_argument("--trajectory", default="vrg",
                   help="'vrg' (default: the stored entry), a base name or a trajectory file.")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="sigmas (Euler, float), timesteps (integers) or scheduler (a VRGScheduler folder, exact).")
    p.add_argument("--out", metavar="DIR", help="--format scheduler: the folder to write (VRGScheduler folder).")
    p.add_argument("--force", action="store_true", help="--format scheduler: replace a scheduler config in --out.")
    p.add_argument("--json", action="store_true", help="Print a JSON object (values, ᾱ before/after, cpe).")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint_file, read_vrg
    from ..profile import ErrorProfile
    from ..schedule import NoisePath
    from ..variance import objective_for_cpe
    from .sample import resolve_from_args

    if (args.format == "scheduler") != (args.out is not None):
        raise ValueError(f"--format {args.format}: " + ("needs --out DIR (the scheduler folder to write)."
                                                         if args.out is None else "--out is for --format scheduler."))
    vrg = read_vrg(load_checkpoint_file(args.ckpt))
    schedule = NoisePath.from_dict(vrg["schedule"])
    traj = resolve_from_args(args, schedule, vrg, args.solver, args.steps, args.trajectory)
    objective = args.objective or objective_for_cpe((traj.entry or {}).get("objective"))
    mse = ErrorProfile.from_dict(vrg["profile"]).mse_function("fit")
    try:
        res = export_trajectory(traj.tensor, schedule, args.format, mse=mse, objective=objective, solver=args.solver)
    except ValueError as exc:
        raise ValueError(f"--format {args.format}: {exc}") from exc
    extra: dict = {}
    if args.format == "scheduler":
        source = {"checkpoint": args.ckpt, "trajectory": traj.source, "steps": len(traj.alpha_bar), "base": traj.base,
                  **{k: (traj.entry or {}).get(k) for k in ("objective", "lp")}}
        try:
            path = write_scheduler(args.out, traj.tensor, schedule, args.solver, source=source, force=args.force,
                                   prediction_type=str(vrg["schedule"].get("prediction_type", "epsilon")))
        except FileExistsError as exc:
            raise FileExistsError(f"--out {args.out}: {str(exc).replace('force=True', '--force')}") from exc
        extra = {"out": str(path.parent)}
        print(f"vrg: wrote {path} (VRGScheduler, {args.solver}, {len(traj.alpha_bar)} steps)", file=sys.stderr)
    if args.json:
        print(json.dumps({**res.to_dict(), "source": traj.source, "base": traj.base, "steps": len(traj.alpha_bar),
                          **extra}, indent=2))
        return 0
    print(f"VRGScheduler.from_pretrained({extra['out']!r})" if extra else res.literal())
    what = {"sigmas": "float32 sigmas", "timesteps": "integer timesteps"}.get(res.format, "VRGScheduler (exact)")
    print(f"# {traj.source} ({args.solver}, {len(traj.alpha_bar)} steps); cpe[{objective}] exact "
          f"{res.cpe_exact:.6g}, as {what} {res.cpe_exported:.6g} ({100 * res.cpe_change:+.4f}%)", file=sys.stderr)
    return 0
