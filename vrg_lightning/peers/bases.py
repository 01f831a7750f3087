"""Peer bases by name: the one entry point the integration (grid entries, tuning, the callback, the commands) calls
to turn ``"gits"`` or ``"dmn"`` into a base trajectory, with a cache so one GITS teacher pass serves every cell."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ..schedule import NoiseSchedule
from .common import PEERS, PeerResult
from .dmn import DMNSettings, dmn
from .gits import GITSSettings, gits_costs, gits_from_costs

__all__ = ["PEER_BASES", "peer_base", "entry_fields"]

PEER_BASES: tuple[str, ...] = PEERS


def peer_base(
    base: str,
    schedule: NoiseSchedule,
    solver: str,
    steps: int,
    *,
    model: Any = None,
    gits_settings: GITSSettings | None = None,
    dmn_settings: DMNSettings | None = None,
    cache: MutableMapping[tuple, Any] | None = None,
) -> PeerResult:
    """The peer trajectory ``base`` (:data:`PEER_BASES`) for ``solver`` and ``steps``.

    Args:
        base: ``"gits"`` (needs ``model``) or ``"dmn"`` (the schedule and solver alone).
        schedule: the model's noise schedule.
        solver, steps: the cell.
        model: a denoiser of :mod:`vrg_lightning.models` for ``gits`` (its schedule must be ``schedule``).
        gits_settings, dmn_settings: the methods' settings (their defaults: the authors').
        cache: a dict shared across calls: the GITS cost matrix is computed once per settings (it does not depend
            on the solver or the step count) and each DMN result once per cell; ``None``: no reuse.

    Raises:
        ValueError: an unknown base, ``gits`` without a model or with another schedule's model, and the methods' own
            errors (a grid coarser than the steps, a solver DMN's bound does not cover).

    Example:
        >>> r = peer_base("dmn", NoiseSchedule(), "ddim", 4)
        >>> r.method, r.steps, r.provenance["model_evaluations"]
        ('dmn', 4, 0)
    """
    if base not in PEER_BASES:
        raise ValueError(f"Unknown peer base {base!r}; allowed: {', '.join(PEER_BASES)}.")
    cache = {} if cache is None else cache
    if base == "dmn":
        s = dmn_settings or DMNSettings()
        key = ("dmn", schedule, solver, int(steps), s)
        if key not in cache:
            cache[key] = dmn(schedule, solver, steps, s)
        return cache[key]
    if model is None:
        raise ValueError("base 'gits' needs the model: its steps come from the model's own teacher paths; pass "
                         "model= (a denoiser of vrg_lightning.models), or use base 'dmn', which needs none.")
    if getattr(model, "schedule", None) != schedule:
        raise ValueError(f"base 'gits': the model's schedule {getattr(model, 'schedule', None)!r} is not the "
                         f"schedule {schedule!r} the trajectory is for.")
    s = gits_settings or GITSSettings()
    key = ("gits", id(model), s)
    if key not in cache:  # the model is kept with its costs, so its id is not reused while cached
        cache[key] = (model, gits_costs(model, s))
    return gits_from_costs(cache[key][1], solver, steps)


def entry_fields(result: PeerResult) -> dict[str, Any]:
    """What a stored entry records of its peer base: ``{"base_provenance": {method, settings, seconds,
    model_evaluations, ...}}`` (plain types), beside ``base`` = the method and ``base_alpha_bar`` = its trajectory."""
    return {"base_provenance": {"method": result.method, **result.provenance}}
