"""Noise paths and continuous conversions between timestep, ᾱ, σ and logSNR.

Every Gaussian noise path is ``x = α x₀ + σ ε``; in the coordinates ``x/α`` and ``σ/α`` all of them are the same ODE,
so the toolkit labels a noise level by the VP-equivalent ``ᾱ = 1/(1 + (σ/α)²)`` and works on ``x_vp = √ᾱ x₀ +
√(1-ᾱ) ε = x / c`` with ``c = α/√ᾱ`` (:meth:`NoisePath.input_scale`). :class:`NoisePath` is the base of every path:
its T *trained levels* (a table, index 0 the cleanest) serve profile bins, the probe, the time bases and the step
bounds; ``alpha_bar_to_t`` gives the model's own time input. :class:`NoiseSchedule` is the discrete VP path
(diffusers' betas), where index and timestep coincide; the continuous paths live in :mod:`vrg_lightning.paths`.

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
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "NoisePath",
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


def config_getter(config: Mapping[str, Any] | Any):
    """``get(key, default)`` of a config dict or of an object with attributes (a diffusers ``FrozenDict``/config)."""
    return config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)


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

class NoisePath:
    """Base of the noise paths: the table of T trained levels and the conversions every path shares.

    A subclass (a frozen dataclass) sets :attr:`path`, :attr:`prediction_types`, calls :meth:`_set_table` in
    ``__post_init__`` with ``log √ᾱ`` per level (index 0 the cleanest, decreasing) and the model time per level, and
    implements ``t_to_alpha_bar`` / ``alpha_bar_to_t`` (the model's time input, continuous, differentiable),
    ``to_dict`` and, unless ``x`` is variance preserving, :meth:`input_scale`.
    """

    path: ClassVar[str] = ""
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")  # the first: the default
    strict_range: ClassVar[bool] = False  # the model is undefined outside its levels (a σ range): refuse them
    num_train_timesteps: int
    _REGISTRY: ClassVar[dict[str, type[NoisePath]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.path:
            NoisePath._REGISTRY[cls.path] = cls

    def _set_table(self, log_sqrt_ab: Tensor, timesteps: Tensor) -> None:
        if not bool((log_sqrt_ab[1:] < log_sqrt_ab[:-1]).all()) or not bool(torch.isfinite(log_sqrt_ab).all()):
            raise ValueError(f"The {self.path} levels must be distinct noise levels, cleanest first.")
        object.__setattr__(self, "_log_sqrt_ab", log_sqrt_ab.to(torch.float64))
        object.__setattr__(self, "_timesteps", timesteps.to(torch.float64))

    # --- construction -------------------------------------------------------------------------
    @staticmethod
    def from_dict(d: Mapping[str, Any] | Any) -> NoisePath:
        """The path a stored dict or a diffusers scheduler config describes: ``path`` names it (absent:
        ``vp_discrete``); a ``FlowMatchEulerDiscreteScheduler`` config gives ``rectified_flow``."""
        from .paths import NOISE_PATHS  # noqa: F401  (registers the continuous paths)

        get = config_getter(d)
        name = get("path", None)
        if name is None:  # a diffusers config: FlowMatch ones have a shift and no betas
            flow = "FlowMatch" in str(get("_class_name", "") or "") or (
                get("shift", None) is not None and get("beta_schedule", None) is None)
            name = "rectified_flow" if flow else "vp_discrete"
        if name not in NoisePath._REGISTRY:
            raise ValueError(f"Unknown noise path {name!r}; allowed: {', '.join(sorted(NoisePath._REGISTRY))}.")
        return NoisePath._REGISTRY[name].from_config(d)

    from_config = from_dict

    # --- the table of trained levels ----------------------------------------------------------
    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ at the trained levels, index 0 the cleanest (float64; diffusers' ``alphas_cumprod`` for VP)."""
        return torch.exp(2 * self._log_sqrt_ab)

    @property
    def log_sqrt_alphas_cumprod(self) -> Tensor:
        """log √ᾱ at the trained levels (float64), the table the time bases interpolate."""
        return self._log_sqrt_ab.clone()

    @property
    def timesteps(self) -> Tensor:
        """The model's time input at each trained level (float64): what training feeds the network."""
        return self._timesteps.clone()

    @property
    def alpha_bar_max(self) -> float:
        """ᾱ of the cleanest trained level."""
        return float(torch.exp(2 * self._log_sqrt_ab[0]))

    @property
    def alpha_bar_min(self) -> float:
        """ᾱ of the noisiest trained level."""
        return float(torch.exp(2 * self._log_sqrt_ab[-1]))

    def _grid(self, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.arange(self.num_train_timesteps, dtype=torch.float64, device=like.device)
        return t, self._log_sqrt_ab.to(like.device)

    def index_to_alpha_bar(self, i: Tensor) -> Tensor:
        """ᾱ at a continuous level index in [0, T-1] (log √ᾱ linear between levels)."""
        i = torch.as_tensor(i, dtype=torch.float64) if not torch.is_tensor(i) else i
        grid, log_a = self._grid(i)
        return torch.exp(2 * _interp(i, grid, log_a))

    def alpha_bar_to_index(self, alpha_bar: Tensor) -> Tensor:
        """Inverse of :meth:`index_to_alpha_bar` (continuous, differentiable)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64) if not torch.is_tensor(alpha_bar) else alpha_bar
        grid, log_a = self._grid(ab)
        return _interp(0.5 * torch.log(ab), log_a.flip(0), grid.flip(0))

    def index_to_lambda(self, i: Tensor) -> Tensor:
        return alpha_bar_to_lambda(self.index_to_alpha_bar(i))

    # --- the path's own coordinates -----------------------------------------------------------
    def input_scale(self, alpha_bar: Tensor) -> Tensor | None:
        """``c = α/√ᾱ`` with ``x = c · x_vp`` (the model's input at ᾱ); ``None``: 1 (variance preserving)."""
        return None

    def check_prediction_type(self, prediction_type: Any) -> str:
        """``prediction_type`` if this path defines it, else a ``ValueError`` naming what it allows."""
        if prediction_type not in self.prediction_types:
            raise ValueError(f"prediction_type {prediction_type!r} is not defined on the {self.path} noise path; "
                             f"allowed: {', '.join(self.prediction_types)}.")
        return str(prediction_type)

    def check_covers(self, alpha_bar: Tensor, what: str = "trajectory") -> None:
        """For a path with a hard range (:attr:`strict_range`, VE's σ range): raise unless every ᾱ is a trained level
        (to 1e-9 relative). Other paths extrapolate smoothly and accept any ᾱ."""
        if not self.strict_range:
            return
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        lo, hi = self.alpha_bar_min * (1 - 1e-9), self.alpha_bar_max * (1 + 1e-9)
        bad = (ab < lo) | (ab > hi)
        if bool(bad.any()):
            v = float(ab[bad].flatten()[0])
            raise ValueError(f"The {what} has alpha_bar={v:.6g} (sigma {math.sqrt((1 - v) / v):.4g}) outside the "
                             f"model's noise range alpha_bar [{self.alpha_bar_min:.6g}, {self.alpha_bar_max:.6g}] "
                             f"({self.describe_range()}); build it inside the range (bases do) or widen the path.")

    def describe_range(self) -> str:
        return f"{self.path}, {self.num_train_timesteps} levels"


@dataclass(frozen=True)
class NoiseSchedule(NoisePath):
    """The discrete VP path (``vp_discrete``): a DDPM noise schedule made continuous in ``t`` (DPM-Solver convention);
    its level index is diffusers' timestep.

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

    path: ClassVar[str] = "vp_discrete"
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
        self._set_table(0.5 * log_ab, torch.arange(self.num_train_timesteps, dtype=torch.float64))

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> NoiseSchedule:
        """Build from a diffusers scheduler config (object or dict); unknown keys are ignored.

        ``trained_betas`` is not supported and is rejected with a clear error.
        """
        get = config_getter(config)
        if get("path", "vp_discrete") != "vp_discrete" or "FlowMatch" in str(get("_class_name", "") or ""):
            raise ValueError(f"This config describes the {get('path', None) or 'rectified_flow'} noise path, not a "
                             "discrete beta schedule; build it with NoisePath.from_dict(config).")
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
    def from_dict(cls, d: Mapping[str, Any]) -> NoiseSchedule:  # type: ignore[override]
        return cls.from_config(d)

    # --- continuous conversions (the timestep is the level index) ------------------------------
    def t_to_alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ(t) for float t in [0, T-1]; log √ᾱ linear between integer timesteps."""
        return self.index_to_alpha_bar(t)

    def alpha_bar_to_t(self, alpha_bar: Tensor) -> Tensor:
        """Inverse of :meth:`t_to_alpha_bar` (continuous, differentiable)."""
        return self.alpha_bar_to_index(alpha_bar)

    def describe_range(self) -> str:
        return f"{self.beta_schedule} betas, T={self.num_train_timesteps}"

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return alpha_bar_to_sigma(self.t_to_alpha_bar(t))

    def t_to_lambda(self, t: Tensor) -> Tensor:
        return alpha_bar_to_lambda(self.t_to_alpha_bar(t))

    def lambda_to_t(self, lam: Tensor) -> Tensor:
        return self.alpha_bar_to_t(lambda_to_alpha_bar(lam))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return self.alpha_bar_to_t(sigma_to_alpha_bar(sigma))
