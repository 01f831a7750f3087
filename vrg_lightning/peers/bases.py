"""Peer bases by name: the one entry point the integration (grid entries, tuning, the callback, the commands) calls
to turn ``"gits"``, ``"dmn"`` or ``"ays"`` into a base trajectory, with a cache so one GITS teacher pass serves every
cell. ``ays`` (Align Your Steps, :mod:`vrg_lightning.ays`) is the published constants of the model's family: the model
must say its family (``model.family``: ``sd15`` or ``sdxl``, as ``models.latent.LatentDenoiser`` does).

When GITS is computed again: its cost matrix is cached under the model object, a digest of the model's weights
(:func:`weights_digest`: parameters and buffers; recorded as ``weights_sha256`` in the provenance) and the settings,
so the same weights never pay for a second teacher pass and changed weights get a fresh one (an older matrix of the
same model is dropped then). ``refresh=False`` reuses the model's last matrix whatever its weights (the callback's
budgeted checkpoint saves: a teacher pass at every save would cost more than the optimisations; the fit end
refreshes). DMN needs no model: its result is cached per (schedule, solver, steps, settings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from ..schedule import NoiseSchedule
from .common import PEERS, PeerResult
from .dmn import DMNSettings, check_dmn_solver, dmn
from .gits import GITSSettings, gits_costs, gits_from_costs

__all__ = ["PEER_BASES", "peer_base", "base_trajectory", "entry_fields", "weights_digest", "check_peer_grid",
           "stored_peer_base"]

PEER_BASES: tuple[str, ...] = PEERS
_NEEDS_MODEL = ("base 'gits' needs the model: its steps come from the model's own teacher paths; pass model= (a "
                "denoiser of vrg_lightning.models), or use base 'dmn', which needs none.")


def weights_digest(model: Any) -> str | None:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, bytes), or ``None`` for a model without
    ``state_dict``: what decides whether a cached GITS cost matrix still belongs to the model.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> a = weights_digest(m)
        >>> with torch.no_grad():
        ...     _ = m.weight.add_(1.0)
        >>> a == weights_digest(m), len(a)
        (False, 64)
    """
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    h = hashlib.sha256()
    for name, t in state().items():
        if torch.is_tensor(t):
            t = t.detach().reshape(-1).contiguous()
            h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
            try:
                raw = t.view(torch.uint8)
            except (RuntimeError, TypeError):  # a dtype without a byte view: its float64 values
                raw = t.to(torch.float64)
            h.update(raw.cpu().numpy().tobytes())
    return h.hexdigest()


def check_peer_grid(bases: Sequence[str], solvers: Sequence[str], steps: Sequence[int],
                    gits_settings: GITSSettings | None = None) -> None:
    """Refuse a grid whose peer bases cannot serve all of its cells, before any work: ``dmn`` with a solver its
    bound does not cover, ``gits`` with more steps than its grid has values.

    Raises:
        ValueError: naming the base, the value and what is allowed.
    """
    if "dmn" in bases:
        for solver in solvers:
            try:
                check_dmn_solver(solver)
            except ValueError as exc:
                raise ValueError(f"base 'dmn' cannot serve solver {solver!r}: {exc}") from exc
    size = (gits_settings or GITSSettings()).grid_size
    if "gits" in bases and steps and max(steps) > size:
        raise ValueError(f"base 'gits' cannot serve steps={max(steps)}: its grid has grid_size={size} values and "
                         f"the steps are chosen among them; use steps <= {size}.")


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
    refresh: bool = True,
) -> PeerResult:
    """The peer trajectory ``base`` (:data:`PEER_BASES`) for ``solver`` and ``steps``.

    Args:
        base: ``"gits"`` (needs ``model``) or ``"dmn"`` (the schedule and solver alone).
        schedule: the model's noise schedule.
        solver, steps: the cell.
        model: a denoiser of :mod:`vrg_lightning.models` for ``gits`` (its schedule must be ``schedule``); its
            teacher paths run in eval mode (its training flag is restored) without gradients.
        gits_settings, dmn_settings: the methods' settings (their defaults: the authors').
        cache: a dict shared across calls: the GITS cost matrix is computed once per model weights and settings (it
            does not depend on the solver or the step count; module docstring) and each DMN result once per cell;
            ``None``: no reuse.
        refresh: ``False``: reuse a cached GITS matrix of this model computed with other weights (module docstring).

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
    if base == "ays":
        return _ays(schedule, solver, int(steps), model)
    if base == "dmn":
        s = dmn_settings or DMNSettings()
        key = ("dmn", schedule, solver, int(steps), s)
        if key not in cache:
            cache[key] = dmn(schedule, solver, steps, s)
        return cache[key]
    if model is None:
        raise ValueError(_NEEDS_MODEL)
    if getattr(model, "schedule", None) != schedule:
        raise ValueError(f"base 'gits': the model's schedule {getattr(model, 'schedule', None)!r} is not the "
                         f"schedule {schedule!r} the trajectory is for.")
    s = gits_settings or GITSSettings()
    mine = [k for k in cache if k[0] == "gits" and k[1] == id(model) and k[3] == s]
    key = mine[-1] if mine and not refresh else ("gits", id(model), weights_digest(model), s)
    if key not in cache:  # the model is kept with its costs, so its id is not reused while cached
        for old in mine:
            del cache[old]  # the same model with other weights: that cost matrix is stale
        was = bool(getattr(model, "training", False))
        if hasattr(model, "eval"):
            model.eval()
        try:
            costs = gits_costs(model, s)
            costs.provenance["weights_sha256"] = key[2]
            cache[key] = (model, costs)
        finally:
            if was:
                model.train()
    return gits_from_costs(cache[key][1], solver, steps)


def _ays(schedule: NoiseSchedule, solver: str, steps: int, model: Any) -> PeerResult:
    import time

    from ..ays import ays_trajectory

    family = getattr(model, "family", None)
    if family is None:
        raise ValueError("base 'ays' needs a model of the Stable Diffusion family (sd15 or sdxl): its published "
                         "constants are for those models; load the pipeline folder (models.latent sets the family) "
                         "or use another base.")
    t0 = time.perf_counter()
    ab = ays_trajectory(schedule, family, steps)
    return PeerResult("ays", solver, steps, ab, {"settings": {"family": family, "kind": "sigmas"},
                                                 "seconds": time.perf_counter() - t0, "model_evaluations": 0,
                                                 "source": "diffusers AysSchedules (Sabour et al. 2024)"})


def base_trajectory(schedule: NoiseSchedule, base: str, solver: str, steps: int, *, model: Any = None,
                    cache: MutableMapping[tuple, Any] | None = None, refresh: bool = True
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(ᾱ, entry fields)`` of any stored base: a classic one
    (:func:`~vrg_lightning.trajectories.make_trajectory`, no fields) or a peer (:func:`peer_base`, with its
    :func:`entry_fields`); the one place a grid, a tuning cell or a command turns a base name into values.

    Example:
        >>> ab, extra = base_trajectory(NoiseSchedule(), "dmn", "ddim", 3)
        >>> ab.numel(), extra["base_provenance"]["method"]
        (3, 'dmn')
    """
    if base not in PEER_BASES:
        from ..trajectories import make_trajectory

        return make_trajectory(schedule, base, int(steps)), {}
    r = peer_base(base, schedule, solver, int(steps), model=model, cache=cache, refresh=refresh)
    return r.alpha_bar, entry_fields(r)


def entry_fields(result: PeerResult) -> dict[str, Any]:
    """What a stored entry records of its peer base: ``{"base_provenance": {method, settings, seconds,
    model_evaluations, ...}}`` (plain types), beside ``base`` = the method and ``base_alpha_bar`` = its trajectory."""
    return {"base_provenance": {"method": result.method, **result.provenance}}


def stored_peer_base(vrg: Mapping[str, Any] | None, base: str, solver: str, steps: int) -> PeerResult | None:
    """The peer base ``base`` a checkpoint's ``vrg`` section stores for ``(solver, steps)``: the ``base_alpha_bar``
    (and ``base_provenance``) of an entry with that base, or ``None`` when no entry has them.

    Example:
        >>> e = {"solver": "ddim", "steps": 2, "base": "dmn", "base_alpha_bar": [0.9, 0.1], "base_provenance": {}}
        >>> stored_peer_base({"entries": [e]}, "dmn", "ddim", 2).alpha_bar.tolist()
        [0.9, 0.1]
    """
    if base not in PEER_BASES:
        raise ValueError(f"Unknown peer base {base!r}; allowed: {', '.join(PEER_BASES)}.")
    for e in (vrg or {}).get("entries", []) or []:
        if (e.get("solver"), e.get("base")) == (solver, base) and int(e.get("steps", 0)) == int(steps) \
                and e.get("base_alpha_bar") is not None:
            prov = {k: v for k, v in dict(e.get("base_provenance") or {}).items() if k != "method"}
            ab = torch.tensor([float(v) for v in e["base_alpha_bar"]], dtype=torch.float64)
            return PeerResult(base, solver, int(steps), ab, prov)
    return None
