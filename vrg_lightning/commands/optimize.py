"""``vrg optimize``: optimize a VRG trajectory from an error profile (no model needed).

Examples::

    vrg optimize --profile MSE_vs_alpha_bar_cifar10.txt --base time_quadratic --steps 10 --json
    vrg optimize --profile run.pt --trajectory base.txt --solver dpmpp_2m --objective solver --out vrg.txt
    vrg optimize --profile run.pt --base dmn --steps 10 --solver dpmpp_2m   # VRG on the DMN schedule

``--base gits`` or ``dmn`` (the peer bases, :mod:`vrg_lightning.peers`) reads the values a ``--profile``
checkpoint stores for that solver and step count (``vrg profile --bases gits,dmn``); otherwise ``dmn`` is computed
from the schedule and ``gits``, which needs the model, is refused with how to store it.

``--mse-mode`` defaults to ``paper`` (piecewise linear, as the published code) for MSE tables such as the
reference TSV (profiles holding only MSE, ``moments == 2``) and to ``fit`` (smooth PCHIP) for measured profiles.
The schedule defaults to the one stored in a measured profile, else DDPM's linear 1e-4..0.02 over 1000 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from ..optimize.settings import MSE_MODES, STORED_BASES, TRUSTS, OptimizeSettings
from ..schedule import SCHEDULE_NAMES
from ..solvers import SOLVERS
from ..variance import OBJECTIVES

_D = OptimizeSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, metavar="FILE",
                        help="error profile: reference TSV 'ts alpha_bar MSE', a .pt profile, or a checkpoint")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--trajectory", metavar="FILE", help="base trajectory file (alpha_bar per line, cleanest first)")
    src.add_argument("--base", choices=STORED_BASES,
                     help="generate the base trajectory (gits, dmn: the peers; gits from a --profile checkpoint)")
    parser.add_argument("--steps", type=int, metavar="N", help="number of steps for --base")
    parser.add_argument("--schedule", choices=SCHEDULE_NAMES,
                        help="noise schedule for --base (default: the profile's, else linear)")
    parser.add_argument("--beta-start", type=float, default=None, help="first beta of a (scaled) linear schedule")
    parser.add_argument("--beta-end", type=float, default=None, help="last beta of a (scaled) linear schedule")
    parser.add_argument("--solver", default=_D.solver, choices=SOLVERS,
                        help=f"solver the trajectory is for (default: {_D.solver})")
    parser.add_argument("--objective", choices=OBJECTIVES, default=_D.objective,
                        help=f"paper: the published DDIM cpe; solver: solver-aware propagation "
                             f"(default: {_D.objective})")
    parser.add_argument("--lp", type=float, default=_D.lp,
                        help=f"learning portion / trust-region size (default: {_D.lp:g})")
    parser.add_argument("--reg-lambda", type=float, default=_D.reg_lambda,
                        help=f"penalty weight holding the noisiest alpha_bar (default: {_D.reg_lambda:g})")
    parser.add_argument("--mse-mode", choices=MSE_MODES, default=None,
                        help="MSE interpolation (default: paper for MSE tables, fit for measured profiles)")
    parser.add_argument("--trust", choices=TRUSTS, default=_D.trust, help=f"trust region (default: {_D.trust})")
    parser.add_argument("--pin-start", action="store_true", help="hold the noisiest alpha_bar exactly")
    parser.add_argument("--extrapolate", action="store_true",
                        help="let steps leave the schedule's trained alpha_bar range (the published optimizer has no "
                             "range; the model was never trained there)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop the search after about this long and keep the best trajectory found by then "
                             "(never worse than the base; reported as stopped early)")
    parser.add_argument("--out", metavar="FILE", help="write the optimized trajectory here (atomic)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file (never an input)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _schedule(args: argparse.Namespace, profile: Any) -> Any:
    from ..schedule import NoisePath, NoiseSchedule

    stored = profile.meta.get("schedule") if isinstance(profile.meta, dict) else None
    if args.schedule is None and args.beta_start is None and args.beta_end is None and stored:
        return NoisePath.from_dict(stored)
    kw: dict[str, Any] = {"beta_schedule": args.schedule or "linear"}
    if args.beta_start is not None:
        kw["beta_start"] = args.beta_start
    if args.beta_end is not None:
        kw["beta_end"] = args.beta_end
    return NoiseSchedule(**kw)


def _peer(args: argparse.Namespace, schedule: Any) -> Any:
    """``--base gits|dmn``: the values a ``--profile`` checkpoint stores, else DMN from the schedule; GITS needs the
    model, which ``vrg optimize`` does not load."""
    from ..checkpoint import load_checkpoint_file
    from ..peers import peer_base, stored_peer_base

    try:
        vrg = load_checkpoint_file(args.profile).get("vrg")
    except (ValueError, AttributeError):
        vrg = None  # a profile table or file: nothing stored
    r = stored_peer_base(vrg if isinstance(vrg, dict) else None, args.base, args.solver, args.steps)
    if r is None and args.base == "gits":
        raise ValueError(f"--base gits needs the model (GITS picks its steps from the model's own teacher paths) and "
                         f"--profile {args.profile} stores no GITS base for --solver {args.solver} --steps "
                         f"{args.steps}; store one with `vrg profile --ckpt CKPT (or --model SPEC, --diffusers-dir "
                         "DIR) --data ... --bases gits --solvers ... --steps ... --out NEW.ckpt` and pass --profile "
                         "NEW.ckpt, or use --base dmn (the schedule alone).")
    try:
        return (r or peer_base("dmn", schedule, args.solver, args.steps)).alpha_bar
    except ValueError as exc:
        raise ValueError(f"--base {args.base} --solver {args.solver} --steps {args.steps}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_file
    from ..optimize import optimize_trajectory, schedule_range
    from ..peers import PEER_BASES
    from ..profile import load_profile
    from ..trajectories import load_trajectory, make_trajectory, save_trajectory

    def check_out() -> None:
        if args.out is not None:
            check_output_file(args.out, {"--profile": args.profile, "--trajectory": args.trajectory},
                              force=args.force, name="--out", force_hint="--force")

    check_out()  # before the work, and again just before writing
    limit = args.time_limit
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"--time-limit must be a positive number of seconds; got {limit!r}.")
    profile = load_profile(args.profile)
    if args.trajectory is not None:
        if args.steps is not None:
            raise ValueError("--steps goes with --base; a --trajectory file sets its own number of steps.")
        base = load_trajectory(args.trajectory)
        source = str(args.trajectory)
    else:
        if args.steps is None:
            raise ValueError(f"--base {args.base} needs --steps N (the number of model evaluations).")
        base = _peer(args, _schedule(args, profile)) if args.base in PEER_BASES else make_trajectory(
            _schedule(args, profile), args.base, args.steps)
        source = f"{args.base}:{args.steps}"
    mse_mode = args.mse_mode or ("paper" if profile.moments == 2 else "fit")
    span = None if args.extrapolate else schedule_range(_schedule(args, profile))  # the trained range of ᾱ
    settings = OptimizeSettings(lp=args.lp, reg_lambda=args.reg_lambda, objective=args.objective, solver=args.solver,
                                mse_mode=mse_mode, trust=args.trust, pin_start=args.pin_start, alpha_bar_range=span)
    deadline = None if limit is None else time.perf_counter() + limit
    result = optimize_trajectory(base, profile.mse_function(mse_mode), settings, deadline=deadline)
    if args.out is not None:
        check_out()
        header = {"base": source, "profile": Path(args.profile).name, "solver": settings.solver,
                  "objective": settings.objective, "mse_mode": mse_mode, "lp": settings.lp,
                  "reg_lambda": settings.reg_lambda, "trust": settings.trust, "pin_start": settings.pin_start,
                  "cpe_before": f"{result.cpe_before:.8g}", "cpe_after": f"{result.cpe_after:.8g}",
                  **({} if result.complete else {"stopped_early": f"--time-limit {limit:g}"})}
        save_trajectory(args.out, result.alpha_bar, header=header)
    if args.json:
        out = {"base": source, "profile": str(args.profile), "steps": int(base.numel()), **result.to_dict()}
        if args.out is not None:
            out["out"] = str(args.out)
        print(json.dumps(out))
        return 0
    change = 100 * (result.cpe_after / result.cpe_before - 1) if result.cpe_before > 0 else 0.0
    print(f"base {source} ({base.numel()} steps), profile {args.profile} (mse-mode {mse_mode})")
    print(f"objective {settings.objective} ({settings.solver}), lp {settings.lp:g}, "
          f"reg-lambda {settings.reg_lambda:g}, trust {settings.trust}{', start pinned' if settings.pin_start else ''}")
    print(f"cpe {result.cpe_before:.6f} -> {result.cpe_after:.6f} ({change:+.2f}%), loss {result.loss:.6f}, "
          f"{result.seconds:.3f} s" + ("" if result.complete else f" (stopped early by --time-limit {limit:g}: the "
                                       "best trajectory found by then)"))
    print(f"{'step':>4}  {'base alpha_bar':>16}  {'vrg alpha_bar':>16}")
    for i, (a, b) in enumerate(zip(result.base_alpha_bar.tolist(), result.alpha_bar.tolist(), strict=True)):
        print(f"{i:4d}  {a:16.10f}  {b:16.10f}")
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0
