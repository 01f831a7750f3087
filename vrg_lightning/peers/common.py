"""What the peer schedule optimisers share: their result (:class:`PeerResult`) and argument checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from ..trajectories import validate_trajectory

__all__ = ["PEERS", "PeerResult", "check_int", "check_number", "in_schedule_range"]

PEERS: tuple[str, ...] = ("gits", "dmn", "ays")


@dataclass(frozen=True)
class PeerResult:
    """A trajectory made by a peer method, with how it was made.

    Attributes:
        method: ``"gits"``, ``"dmn"`` or ``"ays"`` (:data:`PEERS`).
        solver: the solver the trajectory is for; ``steps``: its number of values (model evaluations).
        alpha_bar: the trajectory, float64, strictly decreasing (cleanest first), inside the schedule's trained range
            ``[ᾱ(t=T-1), ᾱ(t=0)]``.
        provenance: a plain dict (JSON- and checkpoint-safe): ``settings``, ``seconds``, ``model_evaluations``, the
            paper, and what each method adds (GITS: grid indices and the programme's cost; DMN: the bound before
            and after).

    Example:
        >>> r = PeerResult("dmn", "ddim", 2, torch.tensor([0.9, 0.1], dtype=torch.float64), {"seconds": 0.0})
        >>> PeerResult.from_dict(r.to_dict()).to_dict() == r.to_dict()
        True
    """

    method: str
    solver: str
    steps: int
    alpha_bar: Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in PEERS:
            raise ValueError(f"Unknown peer method {self.method!r}; allowed: {', '.join(PEERS)}.")
        ab = validate_trajectory(self.alpha_bar, f"{self.method} trajectory")
        if ab.numel() != self.steps:
            raise ValueError(f"{self.method} trajectory has {ab.numel()} values but steps={self.steps}.")
        object.__setattr__(self, "alpha_bar", ab)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (a list of floats for ``alpha_bar``)."""
        return {"method": self.method, "solver": self.solver, "steps": int(self.steps),
                "alpha_bar": [float(v) for v in self.alpha_bar], "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeerResult:
        """Inverse of :meth:`to_dict`."""
        return cls(str(d["method"]), str(d["solver"]), int(d["steps"]),
                   torch.tensor([float(v) for v in d["alpha_bar"]], dtype=torch.float64),
                   dict(d.get("provenance") or {}))


def check_int(name: str, value: Any, lo: int) -> int:
    """``value`` if it is an integer >= ``lo`` (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")
    return int(value)


def check_number(name: str, value: Any, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    """``float(value)`` if it is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``), else a
    ``ValueError`` naming ``name`` and the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}; got {value!r}.")
    return float(value)


def in_schedule_range(alpha_bar: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``alpha_bar`` clamped to the schedule's trained range ``[ᾱ(t=T-1), ᾱ(t=0)]``, for end points that a
    conversion (σ ↔ ᾱ, λ ↔ ᾱ) put a rounding error outside it; anything further out is an error.

    Raises:
        ValueError: a value outside the range by more than 1e-9 relative (a bug, not rounding).
    """
    lo, hi = schedule.alpha_bar_min, schedule.alpha_bar_max
    far = (alpha_bar < lo * (1 - 1e-9)) | (alpha_bar > hi * (1 + 1e-9))
    if bool(far.any()):
        bad = float(alpha_bar[far][0])
        raise ValueError(f"alpha_bar {bad!r} lies outside the schedule's trained range [{lo:.8g}, {hi:.8g}].")
    return alpha_bar.clamp(lo, hi)
