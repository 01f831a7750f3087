"""The optimizer's variables and trust region, shared by the VRG search (:mod:`.search`) and the
discretisation-aware objective (:mod:`.discretization`).

==============  =====================================  ===============================================
name            paper / reference code                 meaning
==============  =====================================  ===============================================
``alpha_bar``   ``ab_i``                               trajectory, strictly decreasing, inside (0, 1)
``alpha``       ``alpha_i = ab_i / ab_{i-1}``           per-step factor, ``alpha_0 = ab_0``
``y``           (the MLP's output)                     variables: ``log alpha_i`` (``alpha`` trust) or λ_i
``z``                                                  coordinates of the steps: ``log ab_i`` or λ_i
``lp``          learning portion                       trust-region size
==============  =====================================  ===============================================

Trust regions (``settings.trust``):

- ``"alpha"`` (the paper): ``alpha_i ∈ [alpha_i^o - d_i, alpha_i^o + d_i]``,
  ``d_i = min(lp, alpha_i^o, 1 - alpha_i^o)``.
- ``"logsnr"``: ``λ_i ∈ [λ_i^o - δ_i, λ_i^o + δ_i]``, ``δ_i = lp/2 ·`` (distance in λ to the nearest neighbouring step;
  ``lp/2`` nats for a single step). As ``lp < 1`` the intervals never overlap, so the order of the steps is kept.

Bounds that would reach ᾱ-ratio 0 or 1 are kept inside by a relative :data:`EDGE` of the distance (and a ratio stays
at least :data:`MIN_GAP` below 1), so every point of the box is a strictly decreasing trajectory inside (0, 1).

``settings.alpha_bar_range = (lo, hi)`` (the schedule's trained range) keeps every step in ``[lo, hi]``: the cleanest
step's bound is clipped at ``hi`` (``alpha``) and every λ box at the range (``logsnr``); in ``alpha`` trust the
noisiest step's ``log ᾱ ≥ log lo`` is a linear constraint on the sum of the variables (:attr:`Variables.z_min`,
enforced by :meth:`Variables.restore_range` and by the grid refinement). A base step already outside the range is
never moved further out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..schedule import alpha_bar_to_lambda
from ..trajectories import validate_trajectory
from .settings import OptimizeSettings

__all__ = ["EDGE", "MIN_GAP", "trust_bounds", "Variables"]

EDGE = 1e-6  # bounds touching 0 or 1 stay inside by this fraction of the distance
MIN_GAP = 1e-12  # the smallest relative gap between consecutive steps the trust region keeps


def _check_distinct(ab: np.ndarray, lp: float, trust: str) -> None:
    """Raise ValueError when the trust region could merge two steps (relative gap below :data:`MIN_GAP`)."""
    if ab.size < 2:
        return
    gap = 1 - ab[1:] / ab[:-1]
    if trust == "logsnr":
        gap = gap * (1 - lp)  # the boxes leave (1 - lp) of each λ gap between neighbours
    bad = np.flatnonzero(~(gap >= MIN_GAP))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"alpha_bar steps {i} and {i + 1} ({ab[i]:.12g}, {ab[i + 1]:.12g}) are too close for the {trust!r} trust "
            f"region to keep them distinct (relative gap {gap[i]:.3g}, at least {MIN_GAP:g} needed); use fewer steps "
            "or a trajectory with distinct values.")


def trust_bounds(alpha_bar: Tensor, settings: OptimizeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Box of the optimizer's variables: per-step ratios α_i (``trust="alpha"``) or λ_i (``"logsnr"``).

    Raises:
        ValueError: consecutive steps so close that the box could not keep them distinct.

    Example:
        >>> lo, hi = trust_bounds(torch.tensor([0.9, 0.45], dtype=torch.float64), OptimizeSettings(lp=0.05))
        >>> [round(float(v), 6) for v in lo], [round(float(v), 6) for v in hi]
        ([0.85, 0.45], [0.95, 0.55])
    """
    ab = validate_trajectory(alpha_bar).numpy()
    lp, rng = settings.lp, settings.alpha_bar_range
    _check_distinct(ab, lp, settings.trust)
    if settings.trust == "alpha":
        a0 = ab / np.concatenate([[1.0], ab[:-1]])
        d = np.minimum(lp, np.minimum(a0, 1 - a0))
        lo, hi = a0 - d, a0 + d
        lo = np.where(lo <= 0, a0 * EDGE, lo)
        hi = np.where(hi >= 1, 1 - (1 - a0) * EDGE, hi)
        hi = np.where(hi >= 1, a0, hi)
        hi[1:] = np.minimum(hi[1:], np.maximum(1 - MIN_GAP, a0[1:]))
        if rng is not None:  # the cleanest step: ᾱ_0 = α_0 ≤ hi of the range (or where the base has it)
            hi[0] = min(hi[0], max(rng[1], a0[0]))
        return np.minimum(lo, a0), np.maximum(hi, a0)
    lam = alpha_bar_to_lambda(torch.as_tensor(ab)).numpy()
    gaps = np.full(lam.size, np.inf)
    if lam.size > 1:
        g = lam[:-1] - lam[1:]
        gaps[:-1] = np.minimum(gaps[:-1], g)
        gaps[1:] = np.minimum(gaps[1:], g)
    else:
        gaps[:] = 1.0
    delta = lp / 2 * gaps
    if settings.pin_start:
        delta[-1] = 0.0
    lo, hi = lam - delta, lam + delta
    if rng is not None:
        lam_rng = alpha_bar_to_lambda(torch.tensor(rng, dtype=torch.float64)).numpy()
        lo, hi = np.maximum(lo, np.minimum(lam_rng[0], lam)), np.minimum(hi, np.maximum(lam_rng[1], lam))
    return lo, hi


class Variables:
    """The variables ``y`` of a base trajectory and their box: ``log α_i`` (``alpha`` trust) or λ_i (``logsnr``).

    Attributes:
        alpha: ratio variables (``trust="alpha"``).
        lo, hi: the box in ``y`` (:func:`trust_bounds`, logged for ``alpha``).
        y0: the base trajectory's variables, clipped into the box.
        log_end: log of the base's noisiest ᾱ (a pinned start holds ``Σ y = log_end`` in ``alpha`` trust).
        z_min: lower bound of the noisiest ``log ᾱ = Σ y`` from ``alpha_bar_range`` (``alpha`` trust, free start;
            ``-inf`` otherwise).

    Example:
        >>> v = Variables(torch.tensor([0.9, 0.45], dtype=torch.float64), OptimizeSettings(lp=0.05))
        >>> [round(float(a), 6) for a in v.alpha_bar(torch.as_tensor(v.y0))]
        [0.9, 0.45]
    """

    def __init__(self, base_alpha_bar: Tensor, settings: OptimizeSettings) -> None:
        self.alpha = settings.trust == "alpha"
        lo, hi = trust_bounds(base_alpha_bar, settings)
        self.lo, self.hi = (np.log(lo), np.log(hi)) if self.alpha else (lo, hi)
        self.log_end = math.log(float(base_alpha_bar[-1]))
        rng = settings.alpha_bar_range
        self.z_min = -math.inf
        if self.alpha and rng is not None and not settings.pin_start:
            self.z_min = min(math.log(rng[0]), self.log_end)
        self.y0 = np.clip(self.from_alpha_bar(base_alpha_bar), self.lo, self.hi)

    def from_alpha_bar(self, alpha_bar: Tensor) -> np.ndarray:
        """``y`` of a trajectory (not clipped into the box)."""
        if self.alpha:
            return np.log((alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])).numpy())
        return alpha_bar_to_lambda(alpha_bar).numpy()

    def from_alpha_bar_np(self, alpha_bar: np.ndarray) -> np.ndarray:
        """``y`` of a trajectory given as a numpy array (not clipped into the box)."""
        if self.alpha:
            return np.diff(np.log(alpha_bar), prepend=0.0)
        return np.log(alpha_bar) - np.log1p(-alpha_bar)

    def alpha_bar(self, y: Tensor) -> Tensor:
        """ᾱ of ``y`` ``[..., N]`` (differentiable)."""
        return torch.exp(torch.cumsum(y, -1)) if self.alpha else torch.sigmoid(y)

    def alpha_bar_np(self, ys: np.ndarray) -> np.ndarray:
        """ᾱ of ``ys`` ``[..., N]`` in numpy."""
        return np.exp(np.cumsum(ys, -1)) if self.alpha else 1 / (1 + np.exp(-ys))

    def coords(self, y: np.ndarray) -> np.ndarray:
        """``z`` of ``y``: log ᾱ (``alpha``) or λ (``logsnr``); a block move shifts a run of them equally."""
        return np.cumsum(y, axis=-1) if self.alpha else y

    def coords_of_alpha_bar(self, alpha_bar: np.ndarray) -> np.ndarray:
        """``z`` of ᾱ values (e.g. the MSE function's knots)."""
        return np.log(alpha_bar) if self.alpha else np.log(alpha_bar) - np.log1p(-alpha_bar)

    def chain_rule(self, grad_ab: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """``d/dy`` from ``d/dᾱ`` (rows ``[K, N]``) at ``ab = alpha_bar_np(y)``."""
        return self.chain_rule_log(grad_ab * ab, ab)

    def chain_rule_log(self, grad_log_ab: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """``d/dy`` from ``d/dlog ᾱ`` (rows ``[K, N]``) at ``ab``: log ᾱ = cumsum(y) (``alpha``), d log ᾱ / dλ = 1 - ᾱ
        (``logsnr``)."""
        if self.alpha:
            return np.cumsum(grad_log_ab[:, ::-1], -1)[:, ::-1]
        return grad_log_ab * (1 - ab)

    def log_alpha_step(self, dy: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """The move of log ᾱ (rows ``[K, N]``) of a move ``dy`` of the variables at ``ab``, to first order (the
        transpose of :meth:`chain_rule_log`)."""
        return np.cumsum(dy, -1) if self.alpha else dy * (1 - ab)

    def project_pinned(self, y: np.ndarray, target: float | None = None, lo: np.ndarray | None = None,
                       hi: np.ndarray | None = None) -> np.ndarray:
        """Euclidean projection onto {box ``[lo, hi]`` (default the trust box), Σ y = target} (default ``log_end``: a
        pinned start in ``alpha`` trust): ``clip(y + μ)``, μ exact from the sorted breakpoints."""
        target = self.log_end if target is None else target
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        bp = np.sort(np.concatenate([lo - y, hi - y]))
        sums = np.clip(y[None, :] + bp[:, None], lo, hi).sum(1)  # non-decreasing in μ
        k = int(np.clip(np.searchsorted(sums, target), 1, bp.size - 1))
        s0, s1 = sums[k - 1], sums[k]
        mu = bp[k] if s1 == s0 else bp[k - 1] + (target - s0) * (bp[k] - bp[k - 1]) / (s1 - s0)
        return np.clip(y + mu, lo, hi)

    def restore_range(self, y: np.ndarray) -> np.ndarray:
        """``y`` in the box with the noisiest ``log ᾱ ≥ z_min`` (projected onto ``Σ y = z_min`` when below)."""
        y = np.clip(y, self.lo, self.hi)
        if self.alpha and y.sum() < self.z_min:
            y = self.project_pinned(y, self.z_min)
            y[-1] += max(0.0, self.z_min - y.sum())  # rounding of the sum
            y = np.clip(y, self.lo, self.hi)
        return y
