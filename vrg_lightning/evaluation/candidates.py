"""The candidates of a tuning cell (:func:`make_candidates`): the cell's base first (a classic one, or a peer base
``gits``/``dmn``), then VRG on it at each lp / objective / start, the damped + discretisation-aware variants
(DDIM-like solvers), and, for each peer of ``settings.peers`` (:mod:`vrg_lightning.peers`), the peer's trajectory
and VRG on top of it."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .paired import trajectory_key

if TYPE_CHECKING:
    from .tune import TuneSettings

__all__ = ["Candidate", "make_candidates", "peer_skip_reason"]

_COSTS = ("cpe_before", "cpe_after", "loss", "seconds")
_DISC_COSTS = ("disc_mode", "cpe_before", "cpe_after", "disc_before", "disc_after", "loss", "seconds")


@dataclass(frozen=True)
class Candidate:
    """A trajectory to try in a cell: ``kind`` ``base``, ``vrg``, ``disc`` or ``peer``; ``info`` holds plain
    settings/costs (a peer's, and VRG-on-peer's, ``peer`` name and ``base_provenance``)."""

    label: str
    kind: str
    alpha_bar: tuple[float, ...]
    info: dict[str, Any]

    @property
    def tensor(self) -> Tensor:
        return torch.tensor(self.alpha_bar, dtype=torch.float64)


def peer_skip_reason(peer: str, solver: str, model: Any) -> str | None:
    """Why the peer ``peer`` gives no candidate for ``solver`` (DMN's bound does not cover it, GITS has no model),
    or ``None`` when it does."""
    from ..peers import check_dmn_solver

    if peer == "dmn":
        try:
            check_dmn_solver(solver)
        except ValueError as exc:
            return str(exc)
    if peer == "gits" and model is None:
        return "GITS needs the model (its steps come from the model's teacher paths); none was given."
    return None


def make_candidates(
    schedule: Any, profile: Any, solver: str, steps: int, base: str, settings: TuneSettings,
    curvature: Any = None, cache: dict | None = None, *, model: Any = None,
    peer_cache: MutableMapping[tuple, Any] | None = None,
) -> list[Candidate]:
    """The base of a cell first, then its distinct alternatives (identical trajectories appear once).

    Optimisations go through :func:`vrg_lightning.optimize.entries.optimize_cached`: ``cache`` (a dict) shares
    results between cells (the paper objective does not depend on the solver); every candidate keeps its steps in
    the schedule's trained range (:func:`~vrg_lightning.optimize.entries.grid_settings`).

    A cell whose ``base`` is a peer (``gits``, ``dmn``) starts from the peer's trajectory: its base candidate and
    the VRG candidates on it carry the peer's ``peer`` and ``base_provenance``.

    Peers (``settings.peers``): ``peer:<name>`` (kind ``peer``) is the peer's trajectory
    (:func:`vrg_lightning.peers.peer_base`; ``model`` for GITS, ``peer_cache`` shared across cells so one GITS
    teacher pass serves them all), and ``vrg:<objective>:lp=<lp>:<start>@<name>`` VRG on top of it with the same
    optimizer settings as on the classic base. A peer that cannot serve the cell (:func:`peer_skip_reason`) is left
    out; the base's ``info["skipped"]`` maps ``peer:<name>`` to the reason.
    """
    from ..optimize.discretization import optimize_disc
    from ..optimize.entries import cache_key, grid_settings, optimize_cached, result_fields, settings_fields
    from ..peers import base_trajectory, entry_fields, peer_base
    from ..variance import DDIM_LIKE

    cache = {} if cache is None else cache
    peer_cache = {} if peer_cache is None else peer_cache
    mse_fn = profile.mse_function(settings.mse_mode)
    base_ab, fields = base_trajectory(schedule, base, solver, int(steps), model=model, cache=peer_cache)
    base_peer = {"peer": base, **fields} if fields else {}  # the cell's base is a peer
    base_info: dict[str, Any] = {"objective": None, **base_peer}
    out = [Candidate(f"base:{base}", "base", tuple(base_ab.tolist()), base_info)]
    seen = {trajectory_key(out[0].alpha_bar)}

    def add(label: str, kind: str, alpha_bar: Sequence[float], info: dict[str, Any]) -> None:
        c = Candidate(label, kind, tuple(float(v) for v in alpha_bar), info)
        if trajectory_key(c.alpha_bar) not in seen:
            seen.add(trajectory_key(c.alpha_bar))
            out.append(c)

    starts: list[tuple[Tensor, str, dict[str, Any]]] = [(base_ab, "", base_peer)]  # (trajectory, suffix, info)
    skipped: dict[str, str] = {}
    for name in (p for p in settings.peers if p != base):  # the base's own peer is the base already
        why = peer_skip_reason(name, solver, model)
        if why is not None:
            skipped[f"peer:{name}"] = why
            continue
        r = peer_base(name, schedule, solver, int(steps), model=model, cache=peer_cache)
        peer_info = {"peer": name, **entry_fields(r)}
        add(f"peer:{name}", "peer", r.alpha_bar.tolist(), {"objective": None, **peer_info})
        starts.append((r.alpha_bar, f"@{name}", peer_info))
    if skipped:
        base_info["skipped"] = skipped

    ddim_like = solver in DDIM_LIKE
    for start_ab, suffix, peer_info in starts:
        for pin in settings.pins():
            grid, start = settings.grid.replace(pin_start=pin), "pinned" if pin else "free"
            for lp in settings.lps:
                for obj in settings.objectives:
                    st = grid_settings(grid, schedule, solver, lp, "paper" if obj == "solver" and ddim_like else obj)
                    r = optimize_cached(start_ab, mse_fn, st, cache)
                    add(f"vrg:{obj}:lp={lp:g}:{start}{suffix}", "vrg", r.alpha_bar.tolist(),
                        {**settings_fields(st, objective=obj), **result_fields(r, _COSTS), **peer_info})
                if settings.fix and ddim_like and curvature is not None and not suffix:
                    st = grid_settings(grid, schedule, solver, lp, "paper")
                    key = cache_key(base_ab, st, "disc")
                    if key not in cache:
                        cache[key] = optimize_disc(base_ab, mse_fn, curvature, st, damping=True,
                                                   data_var=curvature.data_var)
                    r = cache[key]
                    add(f"disc:lp={lp:g}:{start}", "disc", r["alpha_bar"],
                        {**settings_fields(st, objective="disc"), "damping": True, **result_fields(r, _DISC_COSTS)})
    return out
