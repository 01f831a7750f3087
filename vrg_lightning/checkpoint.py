"""The ``checkpoint["vrg"]`` schema (docs/ARCHITECTURE.md), its version, and read/load helpers.

Everything stored is plain tensors, numbers, strings, lists and dicts, so every reader here uses
``torch.load(path, weights_only=True)``. A Lightning checkpoint of :class:`~vrg_lightning.module.DiffusionModule`
carries ``vrg["model"]`` (the denoiser's architecture and where its weights sit in ``state_dict``); the
:class:`~vrg_lightning.callbacks.VRGProfiler` callback (or ``vrg profile``) adds ``schedule``, ``profile`` and
``entries``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .io import FORMAT_VERSIONS, check_format, load_torch_file
from .profile import ErrorProfile
from .schedule import NoisePath

__all__ = [
    "VRG_KEY",
    "VRG_FORMAT",
    "VRG_VERSION",
    "HOW_TO_CREATE",
    "build_vrg_state",
    "model_section",
    "load_checkpoint_file",
    "read_vrg",
    "load_denoiser",
    "select_entry",
    "find_entry",
    "matching_entries",
    "describe_entry",
    "check_same_schedule",
    "CheckpointMismatchError",
]

VRG_KEY = "vrg"
VRG_FORMAT = "vrg-lightning"
VRG_VERSION = FORMAT_VERSIONS[VRG_FORMAT]
HOW_TO_CREATE = (
    "train with the VRGProfiler callback (e.g. `python train.py fit --config configs/digits.yaml`) "
    "or measure a trained model with `vrg profile --ckpt CKPT --data digits --out NEW.ckpt`"
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_vrg_state(
    schedule: NoisePath,
    profile: ErrorProfile,
    entries: Sequence[Mapping[str, Any]],
    *,
    prediction_type: str = "epsilon",
    model: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble ``checkpoint["vrg"]`` (version :data:`VRG_VERSION`).

    Args:
        schedule: the model's training noise schedule.
        profile: the measured error profile (stored as ``ErrorProfile.to_dict()``).
        entries: optimized trajectories, one dict per (solver, steps, base, objective, lp); see the schema.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (stored inside ``schedule``).
        model: the ``model`` section (:func:`model_section`), if the file holds weights.
        extra: further keys (e.g. ``{"profiler": {...}}`` settings), stored as given.
    """
    from . import __version__

    state: dict[str, Any] = {
        "format": VRG_FORMAT,
        "version": VRG_VERSION,
        "schedule": dict(schedule.to_dict(), prediction_type=prediction_type),
        "profile": profile.to_dict(),
        "entries": [dict(e) for e in entries],
        "created": _now(),
        "toolkit_version": __version__,
    }
    if model is not None:
        state["model"] = dict(model)
    if extra:
        state.update(dict(extra))
    return state


def model_section(denoiser_config: Mapping[str, Any], weights: str = "model.",
                  ema_weights: str | None = "ema.module.") -> dict[str, Any]:
    """``vrg["model"]``: the denoiser config and the ``state_dict`` key prefixes of its raw and EMA weights."""
    return {"denoiser": dict(denoiser_config), "weights": weights, "ema_weights": ema_weights}


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` (:func:`vrg_lightning.io.load_torch_file`) of a checkpoint dict whose
    ``vrg`` section, if any, has a format and version this toolkit reads.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing, empty, truncated or corrupt, not a torch file, not a dict, or a ``vrg`` section of
            another format or a newer version (the message names the file).
    """
    obj = load_torch_file(path, "Checkpoint")
    name = str(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{name!r} holds a {type(obj).__name__}, not a checkpoint dict.")
    vrg = obj if obj.get("format") == VRG_FORMAT else obj.get(VRG_KEY)
    if isinstance(vrg, Mapping):
        check_format(vrg, VRG_FORMAT, f"{name} (vrg section)", required=False)
    return obj


def _vrg_of(obj: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any] | None:
    if isinstance(obj, (str, os.PathLike)):
        obj = load_checkpoint_file(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"Expected a checkpoint dict or path; got {type(obj).__name__}.")
    if obj.get("format") == VRG_FORMAT:
        return obj
    vrg = obj.get(VRG_KEY)
    return vrg if isinstance(vrg, Mapping) else None


def read_vrg(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Return the validated ``vrg`` section of a checkpoint (path, checkpoint dict or the section itself).

    Raises:
        ValueError: no ``vrg`` section, no profile/entries yet, unknown format or a newer version.
    """
    name = str(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else "the checkpoint"
    vrg = _vrg_of(path_or_dict)
    if vrg is None:
        raise ValueError(f"{name} has no '{VRG_KEY}' section (no error profile, no VRG trajectories). "
                         f"To create them, {HOW_TO_CREATE}.")
    check_format(vrg, VRG_FORMAT, f"{name} (vrg section)")
    missing = [k for k in ("schedule", "profile", "entries") if k not in vrg]
    if missing:
        raise ValueError(f"{name} holds a model but no VRG statistics (missing vrg.{', vrg.'.join(missing)}). "
                         f"To create them, {HOW_TO_CREATE}.")
    if not isinstance(vrg["entries"], list):
        raise ValueError(f"{name}: vrg.entries must be a list; got {type(vrg['entries']).__name__}.")
    for i, e in enumerate(vrg["entries"]):
        lacks = [k for k in ("solver", "steps", "base", "alpha_bar") if not isinstance(e, Mapping) or k not in e]
        if lacks:
            raise ValueError(f"{name}: vrg.entries[{i}] lacks {lacks}.")
    return dict(vrg)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the run loading it (e.g. a model trained with another noise schedule); entry
    points report it as one line (``train.py`` catches it)."""


def check_same_schedule(stored: Mapping[str, Any], schedule: NoisePath, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` unless a stored schedule dict describes ``schedule`` (prediction_type ignored)."""
    try:
        other = NoisePath.from_dict(stored)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"The {what} holds an invalid noise schedule {dict(stored)!r}: {exc}") from exc
    if other != schedule:
        raise ValueError(f"The {what} was made with noise schedule {other.to_dict()} but the model uses "
                         f"{schedule.to_dict()}; its error profile and trajectories do not apply. Start a fresh "
                         "profile (drop the vrg statistics) or use the matching schedule.")


def load_denoiser(path: str | os.PathLike | Mapping[str, Any], use_ema: bool = True):
    """Rebuild the trained model of a checkpoint (``weights_only=True``): :func:`vrg_lightning.models.load_model`
    with nothing but the checkpoint (a model SPEC or a diffusers folder are given to ``load_model``).

    Args:
        path: a Lightning checkpoint of ``DiffusionModule`` (or a file written by ``vrg profile --ckpt``), of a
            LightningModule following the VRG protocol whose class path it records, or a loaded checkpoint dict.
        use_ema: load the EMA weights when the checkpoint has them (a warning falls back to the raw weights).

    Returns:
        ``(denoiser, vrg)``: the model in eval mode on CPU, and the validated ``vrg`` section or ``None`` when
        the checkpoint holds no profile/trajectories yet.
    """
    from .models import load_model

    loaded = load_model(path, use_ema=use_ema)
    return loaded.denoiser, loaded.vrg


def describe_entry(e: Mapping[str, Any]) -> str:
    """One-line description: ``ddim/10/time_uniform/paper lp=0.1``."""
    return f"{e.get('solver')}/{e.get('steps')}/{e.get('base')}/{e.get('objective', '?')} lp={e.get('lp', '?')}"


def matching_entries(vrg: Mapping[str, Any], solver: str, steps: int, base: str | None = None,
                     objective: str | None = None, lp: float | None = None,
                     guidance_scale: float | None = None) -> list[dict[str, Any]]:
    """Stored entries whose fields equal the given ones (``None`` = any; ``lp`` compared to 1e-12;
    ``guidance_scale`` to 1e-9, an entry without one counting as optimised for w = 1)."""
    want = {"solver": solver, "steps": int(steps), "base": base, "objective": objective}

    def ok(e: Mapping[str, Any]) -> bool:
        if any(v is not None and e.get(k) != v for k, v in want.items()):
            return False
        if guidance_scale is not None and abs(float(e.get("guidance_scale", 1.0)) - float(guidance_scale)) > 1e-9:
            return False
        return lp is None or (e.get("lp") is not None and abs(float(e["lp"]) - float(lp)) <= 1e-12)

    return [dict(e) for e in vrg.get("entries", []) if ok(e)]


def select_entry(vrg: Mapping[str, Any] | None, solver: str, steps: int, base: str | None = None,
                 objective: str | None = None, lp: float | None = None,
                 guidance_scale: float | None = None) -> dict[str, Any]:
    """The stored entry for ``(solver, steps)`` and the optional fields (``None`` = any): the one lookup rule.
    ``guidance_scale`` picks among entries optimised for different guidance scales (the entry's
    ``guidance_scale``; an entry without one was optimised for w = 1).

    Among the matches, an entry that validated tuning selected (``validated.selected is True``) wins; otherwise the
    match must be unique.

    Raises:
        ValueError: no ``vrg`` section, no match (the message lists the stored ``(solver, steps, base)``), or
            several matches (the message lists them and the fields that pick one).

    Example:
        >>> vrg = {"entries": [{"solver": "ddim", "steps": 10, "base": "logSNR", "lp": 0.1, "alpha_bar": [0.9]}]}
        >>> select_entry(vrg, "ddim", 10)["base"]
        'logSNR'
    """
    if not vrg:
        raise ValueError(f"The checkpoint has no stored VRG trajectories (checkpoint['vrg']). To create them, "
                         f"{HOW_TO_CREATE}; or sample a base trajectory.")
    found = matching_entries(vrg, solver, steps, base, objective, lp, guidance_scale)
    asked = ", ".join(f"{k}={v}" for k, v in
                      {"solver": solver, "steps": int(steps), "base": base, "objective": objective, "lp": lp,
                       "guidance_scale": guidance_scale}.items() if v is not None)
    if not found:
        stored = sorted({(str(e.get("solver")), int(e.get("steps", 0)), str(e.get("base")))
                         for e in vrg.get("entries", [])})
        listing = ", ".join(f"({s}, {n}, {b})" for s, n, b in stored) or "none"
        raise ValueError(f"No stored VRG trajectory for {asked}. Stored (solver, steps, base): {listing}. "
                         "Optimize one with `vrg profile` or `vrg optimize`, or sample a base trajectory.")
    selected = [e for e in found if isinstance(e.get("validated"), Mapping) and e["validated"].get("selected") is True]
    pick = selected or found
    if len(pick) > 1:
        raise ValueError(f"{len(pick)} stored VRG trajectories match {asked}: "
                         f"{'; '.join(describe_entry(e) for e in pick)}. Pick one by base, objective, lp or "
                         "guidance_scale.")
    return dict(pick[0])


find_entry = select_entry  # the earlier name
