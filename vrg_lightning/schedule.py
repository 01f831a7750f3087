"""Noise schedules and continuous conversions between timestep, ᾱ, σ and logSNR.

Symbols (DDPM / DDIM / DPM-Solver papers):

==========  ==========================================  ===========================
name        meaning                                     relation
==========  ==========================================  ===========================
``t``       timestep, float in ``[0, T-1]`` (no rounding) diffusers' index convention
``ab``      ᾱ_t, cumulative product of ``1 - β``          ``x_t = √ᾱ x_0 + √(1-ᾱ) ε``
``sigma``   σ = √((1-ᾱ)/ᾱ), noise level of ``x / √ᾱ``    ``ᾱ = 1 / (1 + σ²)``
``lam``     λ = logSNR = log(ᾱ / (1-ᾱ))                  ``λ = -2 log σ``
==========  ==========================================  ===========================

A discrete schedule is made continuous the way DPM-Solver does it: ``log √ᾱ`` is interpolated
linearly in ``t`` between integer timesteps, so fractional timesteps are well defined and every
conversion is differentiable (autograd flows through ``t`` and ``ᾱ``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "SCHEDULE_NAMES",
    "alpha_bar_to_sigma",
    "sigma_to_alpha_bar",
    "alpha_bar_to_lambda",
    "lambda_to_alpha_bar",
    "check_alpha_bar",
    "add_noise",
]

SCHEDULE_NAMES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_ALIASES = {"cosine": "squaredcos_cap_v2"}


def check_alpha_bar(alpha_bar: Tensor, name: str = "alpha_bar") -> Tensor:
    """Raise ``ValueError`` unless every value is finite and strictly inside (0, 1)."""
    ab = torch.as_tensor(alpha_bar)
    bad = ~torch.isfinite(ab) | (ab <= 0) | (ab >= 1)
    if bool(bad.any()):
        value = ab[bad].flatten()[0].item()
        raise ValueError(f"{name} must lie strictly inside (0, 1) and be finite; got {value!r}.")
    return ab


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """σ = √((1-ᾱ)/ᾱ)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """ᾱ = 1 / (1 + σ²)."""
    return 1 / (1 + sigma**2)


def alpha_bar_to_lambda(alpha_bar: Tensor) -> Tensor:
    """λ = logSNR = log(ᾱ/(1-ᾱ))."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def lambda_to_alpha_bar(lam: Tensor) -> Tensor:
    """ᾱ = sigmoid(λ)."""
    return torch.sigmoid(lam)


def add_noise(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The forward process ``x_t = √ᾱ x₀ + √(1-ᾱ) ε`` per sample (``alpha_bar`` ``[B]``, any float dtype).

    Returns ``(x_t, a, s)`` with ``a = √ᾱ`` and ``s = √(1-ᾱ)`` shaped ``[B, 1, ...]`` in ``x0``'s dtype (the
    v-prediction target is ``a ε - s x₀``).

    Example:
        >>> xt, a, s = add_noise(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.25, 1.0]))
        >>> xt[:, 0].tolist(), tuple(a.shape)
        ([0.5, 1.0], (2, 1))
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    ab = alpha_bar.to(x0.device)
    a, s = ab.sqrt().to(x0.dtype).view(shape), (1 - ab).sqrt().to(x0.dtype).view(shape)
    return a * x0 + s * noise, a, s


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with linear extrapolation, differentiable in ``x``.

    ``xp`` must be increasing. Same convention as DPM-Solver's ``interpolate_fn``.
    """
    xp = xp.to(x.dtype)
    fp = fp.to(x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def _betas(name: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    T = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, as diffusers' betas_for_alpha_bar

        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"Unknown beta_schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)} (or 'cosine').")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule made continuous in ``t`` (DPM-Solver convention).

    Args:
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (alias ``cosine``).
        num_train_timesteps: T, the number of discrete training timesteps.
        beta_start, beta_end: first and last β for the (scaled) linear schedules.

    Example:
        >>> s = NoiseSchedule()
        >>> round(float(s.t_to_alpha_bar(torch.tensor(0.0))), 6)
        0.9999
        >>> round(float(s.alpha_bar_to_t(s.t_to_alpha_bar(torch.tensor(123.4, dtype=torch.float64)))), 6)
        123.4
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.beta_schedule, self.beta_schedule)
        if name not in SCHEDULE_NAMES:
            raise ValueError(
                f"Unknown beta_schedule {self.beta_schedule!r}; allowed: {', '.join(SCHEDULE_NAMES)} (or 'cosine')."
            )
        object.__setattr__(self, "beta_schedule", name)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2; got {self.num_train_timesteps!r}.")
        if not (0 < self.beta_start < 1 and 0 < self.beta_end < 1):
            raise ValueError(
                f"beta_start and beta_end must lie in (0, 1); got beta_start={self.beta_start!r}, "
                f"beta_end={self.beta_end!r}."
            )
        betas = _betas(name, self.num_train_timesteps, float(self.beta_start), float(self.beta_end))
        log_ab = torch.cumsum(torch.log1p(-betas), 0)
        object.__setattr__(self, "_log_sqrt_ab", 0.5 * log_ab)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> NoiseSchedule:
        """Build from a diffusers scheduler config (object or dict); unknown keys are ignored.

        ``trained_betas`` is not supported and is rejected with a clear error.
        """
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        if get("trained_betas", None) is not None:
            raise ValueError(
                "Scheduler configs with explicit trained_betas are not supported; use a named beta_schedule."
            )
        return cls(
            beta_schedule=str(get("beta_schedule", "linear")),
            num_train_timesteps=int(get("num_train_timesteps", 1000)),
            beta_start=float(get("beta_start", 0.0001)),
            beta_end=float(get("beta_end", 0.02)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (checkpoint- and JSON-safe); inverse of :meth:`from_dict`."""
        return {
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoiseSchedule:
        return cls.from_config(d)

    # --- discrete quantities ------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ at the integer timesteps 0..T-1 (float64), equal to diffusers' ``alphas_cumprod``."""
        return torch.exp(2 * self._log_sqrt_ab)

    @property
    def log_sqrt_alphas_cumprod(self) -> Tensor:
        """log √ᾱ at the integer timesteps 0..T-1 (float64), the table DPM-Solver interpolates."""
        return self._log_sqrt_ab.clone()

    @property
    def alpha_bar_max(self) -> float:
        """ᾱ at t = 0 (the cleanest training noise level)."""
        return float(torch.exp(2 * self._log_sqrt_ab[0]))

    @property
    def alpha_bar_min(self) -> float:
        """ᾱ at t = T-1 (the noisiest training noise level)."""
        return float(torch.exp(2 * self._log_sqrt_ab[-1]))

    # --- continuous conversions ---------------------------------------------------------------
    def _grid(self, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.arange(self.num_train_timesteps, dtype=torch.float64, device=like.device)
        return t, self._log_sqrt_ab.to(like.device)

    def t_to_alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ(t) for float t in [0, T-1]; log √ᾱ linear between integer timesteps."""
        t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
        grid, log_a = self._grid(t)
        return torch.exp(2 * _interp(t, grid, log_a))

    def alpha_bar_to_t(self, alpha_bar: Tensor) -> Tensor:
        """Inverse of :meth:`t_to_alpha_bar` (continuous, differentiable)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64) if not torch.is_tensor(alpha_bar) else alpha_bar
        grid, log_a = self._grid(ab)
        # log √ᾱ decreases with t: interpolate over the reversed (increasing) table.
        return _interp(0.5 * torch.log(ab), log_a.flip(0), grid.flip(0))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return alpha_bar_to_sigma(self.t_to_alpha_bar(t))

    def t_to_lambda(self, t: Tensor) -> Tensor:
        return alpha_bar_to_lambda(self.t_to_alpha_bar(t))

    def lambda_to_t(self, lam: Tensor) -> Tensor:
        return self.alpha_bar_to_t(lambda_to_alpha_bar(lam))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.alpha_bar_to_t(sigma_to_alpha_bar(sigma))
