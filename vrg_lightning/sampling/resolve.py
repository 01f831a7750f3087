"""Which trajectory to sample: a base name (a peer base ``gits``/``dmn`` from the checkpoint's stored values, else
computed), the checkpoint's stored VRG entry (``checkpoint.select_entry``, the one
lookup rule) or a trajectory file, resolved to ᾱ values; and the cpe of a trajectory under the checkpoint's profile.

Errors are Python errors naming the argument (``trajectory``, ``steps``); ``vrg sample``/``vrg export`` add the flag
wording. Nothing is printed: a stored entry for which validated tuning kept the base says so in
:attr:`Trajectory.note`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import check_same_schedule, select_entry
from ..peers import PEER_BASES, peer_base, stored_peer_base
from ..trajectories import BASES, load_trajectory, make_trajectory, validate_trajectory

__all__ = ["Trajectory", "TRAJECTORY_NAMES", "resolve_trajectory", "trajectory_cpe"]

TRAJECTORY_NAMES = (*(b for b in BASES if b != "list"), *PEER_BASES, "vrg")
"""Names ``resolve_trajectory`` takes besides a file: the bases that need only a step count, the peer bases, and
``vrg``."""

_SUMMARY = ("solver", "steps", "base", "objective", "lp", "reg_lambda", "trust", "cpe_before", "cpe_after",
            "validated")


@dataclass(frozen=True)
class Trajectory:
    """A resolved sampling trajectory and where it came from (``base:NAME``, ``vrg`` or ``file:PATH``).

    ``entry`` summarises the stored entry of a ``vrg`` trajectory; ``note`` is set when that entry's trajectory is
    its base (validated tuning kept the base); ``provenance`` is a peer base's (settings, seconds, model
    evaluations, and ``stored``: read from the checkpoint or computed now).
    """

    alpha_bar: tuple[float, ...]
    source: str
    base: str | None = None
    entry: dict[str, Any] | None = None
    note: str | None = None
    provenance: dict[str, Any] | None = None

    @property
    def tensor(self) -> Tensor:
        return torch.tensor(self.alpha_bar, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        out = {"source": self.source, "base": self.base, "steps": len(self.alpha_bar),
               "alpha_bar": list(self.alpha_bar), "entry": self.entry}
        return out if self.provenance is None else {**out, "provenance": self.provenance}


def _peer(schedule: Any, vrg: Mapping[str, Any] | None, solver: str, steps: int, name: str, model: Any) -> Trajectory:
    """The peer base ``name``: the values stored in the checkpoint's entries when present (what its VRG entries
    were optimised from), else computed (``dmn`` from the schedule, ``gits`` from ``model``)."""
    r = stored_peer_base(vrg, name, solver, steps)
    stored = r is not None
    if r is not None and vrg is not None and "schedule" in vrg:
        check_same_schedule(vrg["schedule"], schedule, "checkpoint's vrg section")
    if r is None and name == "gits" and model is None:
        raise ValueError(f"trajectory 'gits' for {solver}/{steps} needs the model or GITS values stored in the "
                         "checkpoint; none are stored (store them with `vrg profile --ckpt CKPT --bases gits` or the "
                         "callback's bases), or use 'dmn', computed from the schedule alone.")
    r = r or peer_base(name, schedule, solver, int(steps), model=model)
    return Trajectory(tuple(r.alpha_bar.tolist()), f"base:{name}", name,
                      provenance={"method": name, "stored": stored, **r.provenance})


def _stored(schedule: Any, vrg: Mapping[str, Any] | None, solver: str, steps: int, base: str | None,
            objective: str | None, lp: float | None, guidance_scale: float | None = None) -> Trajectory:
    scaled = any("guidance_scale" in e for e in (vrg or {}).get("entries", []) if isinstance(e, Mapping))
    e = select_entry(vrg, solver, steps, base=base, objective=objective, lp=lp,
                     guidance_scale=guidance_scale if scaled else None)  # entries per scale: the sampled one
    if vrg is not None and "schedule" in vrg:
        check_same_schedule(vrg["schedule"], schedule, "checkpoint's vrg section")
    ab = validate_trajectory(e["alpha_bar"], "stored VRG trajectory")
    val, note = e.get("validated"), None
    if isinstance(val, Mapping) and val.get("selected") is False:  # vrg tune kept the base: alpha_bar is the base
        note = (f"validated tuning kept the base {e.get('base')} for {solver}/{steps} ({val.get('reason')}); "
                "sampling the base trajectory.")
    return Trajectory(tuple(ab.tolist()), "vrg", e.get("base"), {k: e.get(k) for k in _SUMMARY if k in e}, note)


def resolve_trajectory(
    schedule: Any,
    vrg: Mapping[str, Any] | None,
    solver: str,
    steps: int | None,
    trajectory: str,
    *,
    base: str | None = None,
    objective: str | None = None,
    lp: float | None = None,
    model: Any = None,
    guidance_scale: float | None = None,
) -> Trajectory:
    """Turn ``trajectory`` (a base name, ``"vrg"`` or a trajectory file) into ᾱ values.

    Args:
        schedule: the model's :class:`~vrg_lightning.schedule.NoiseSchedule`.
        vrg: the checkpoint's ``vrg`` section (needed for ``"vrg"``).
        solver, steps: the stored entry's solver and step count; ``steps`` also checks a file's length.
        trajectory: one of :data:`TRAJECTORY_NAMES` or a file (:func:`~vrg_lightning.trajectories.load_trajectory`).
        base, objective, lp: narrow the stored entry (``None`` = any).
        model: the denoiser a ``gits`` trajectory is computed from when the checkpoint stores none.
        guidance_scale: the scale sampling uses; where stored entries record the scale they were optimised for
            (guided profiles), the entry of this scale (an entry without one counts as 1).

    Raises:
        ValueError: unknown name and no such file, no ``steps`` for a name, a file whose length differs from
            ``steps``, no (or no unique) stored entry, ``gits`` with neither stored values nor a model, or a peer
            base that cannot serve the solver or steps (:mod:`vrg_lightning.peers`).

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> resolve_trajectory(NoiseSchedule(), None, "ddim", 3, "logSNR").source
        'base:logSNR'
    """
    if trajectory in TRAJECTORY_NAMES:
        if steps is None:
            raise ValueError(f"trajectory {trajectory!r} needs steps (the number of steps); got steps=None.")
        if trajectory == "vrg":
            return _stored(schedule, vrg, solver, int(steps), base, objective, lp, guidance_scale)
        if trajectory in PEER_BASES:
            return _peer(schedule, vrg, solver, int(steps), trajectory, model)
        ab = make_trajectory(schedule, trajectory, int(steps))
        return Trajectory(tuple(ab.tolist()), f"base:{trajectory}", trajectory)
    p = Path(trajectory)
    if not p.is_file():
        raise ValueError(f"trajectory must be a base name ({', '.join(TRAJECTORY_NAMES[:-1])}), 'vrg' or a "
                         f"trajectory file; got {trajectory!r} (no such file).")
    ab = load_trajectory(p)
    if steps is not None and ab.numel() != steps:
        raise ValueError(f"Trajectory file {trajectory!r} holds {ab.numel()} values but steps is {steps}.")
    return Trajectory(tuple(ab.tolist()), f"file:{p}", None)


def trajectory_cpe(alpha_bar: Tensor, vrg: Mapping[str, Any] | None, solver: str) -> dict[str, Any] | None:
    """cpe of a trajectory under the checkpoint's error profile: ``{"mse": "fit", "paper": .., "solver": ..}``
    (``solver`` is ``None`` for a solver without propagation weights); ``None`` without a profile."""
    if not vrg or "profile" not in vrg:
        return None
    from ..profile import ErrorProfile
    from ..variance import cpe

    mse = ErrorProfile.from_dict(vrg["profile"]).mse_function("fit")
    ab = validate_trajectory(alpha_bar)
    out: dict[str, Any] = {"mse": "fit", "paper": float(cpe(ab, mse, "paper"))}
    try:
        out["solver"] = float(cpe(ab, mse, "solver", solver))
    except ValueError:
        out["solver"] = None
    return out
