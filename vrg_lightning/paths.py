"""The continuous Gaussian noise paths: continuous VP, VE (EDM σ) and rectified flow.

Each is ``x = α(t) x₀ + σ(t) ε`` with its own time variable; the toolkit sees it through the VP-equivalent
``ᾱ = α²/(α² + σ²)`` and ``x_vp = x / c`` with ``c = α/√ᾱ = √(α² + σ²)`` (see :mod:`vrg_lightning.schedule`). Each
path tabulates ``num_train_timesteps`` trained levels (index 0 the cleanest) and maps ᾱ to the model's time input
exactly (closed forms, differentiable):

==================  ==============================  ==========================  ================================
path                α, σ                            levels                      model time input
==================  ==============================  ==========================  ================================
``vp_continuous``   α = exp(log α(t)), σ = √(1-α²)  t uniform in [t_min, t_max]  ``time_scale · t``
``ve``              α = 1, σ                        σ log-uniform in [σ_min,    σ (``sigma``) or ¼ ln σ (``edm``)
                                                    σ_max]
``rectified_flow``  α = 1 - σ, σ                    u uniform in [1/T, 1-1/T],  σ · T (diffusers' FlowMatch
                                                    σ = shift·u/(1+(shift-1)u)  timestep)
==================  ==============================  ==========================  ================================

Rectified flow's σ = 1 (pure noise) has ᾱ = 0, which no trajectory can hold: its noisiest level is u = 1 - 1/T
(the start differs from σ = 1 by 1/T of x₀ in the model input).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .schedule import NoisePath, NoiseSchedule, config_getter

__all__ = ["NOISE_PATHS", "VPContinuous", "VEPath", "RectifiedFlow", "noise_path"]

NOISE_PATHS = ("vp_discrete", "vp_continuous", "ve", "rectified_flow")


def _check_levels(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2 (the number of trained levels); got {n!r}.")


def _f64(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x


def _reject_betas(get: Any, path: str) -> None:
    given = [k for k in ("beta_schedule", "beta_start", "beta_end", "trained_betas") if get(k, None) is not None]
    if given:
        raise ValueError(f"The {path} noise path has no beta schedule, but {', '.join(given)} was given; drop it, or "
                         "use the discrete VP path (path vp_discrete) for a beta schedule.")


@dataclass(frozen=True)
class VPContinuous(NoisePath):
    """Continuous-time VP (Song et al. 2021; DPM-Solver's ``NoiseScheduleVP`` continuous forms).

    Args:
        kind: ``linear`` (log α(t) = -(β₁-β₀) t²/4 - β₀ t/2) or ``cosine`` (Nichol & Dhariwal, s = 0.008).
        beta_min, beta_max: β₀, β₁ of ``linear``.
        t_min, t_max: the trained range of t (``None``: 1e-3 and 1, cosine 0.9946 as DPM-Solver).
        time_scale: the model's time input is ``time_scale · t``.
        num_train_timesteps: the number of tabulated levels.
    """

    path: ClassVar[str] = "vp_continuous"
    kind: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float | None = None
    t_max: float | None = None
    time_scale: float = 1000.0
    num_train_timesteps: int = 1000
    _S: ClassVar[float] = 0.008

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine'; got {self.kind!r}.")
        _check_levels(self.num_train_timesteps)
        if not 0 <= self.beta_min < self.beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max; got {self.beta_min!r}, {self.beta_max!r}.")
        t_min = 1e-3 if self.t_min is None else float(self.t_min)
        t_max = (0.9946 if self.kind == "cosine" else 1.0) if self.t_max is None else float(self.t_max)
        if not 0 < t_min < t_max <= (0.9946 if self.kind == "cosine" else 1.0):
            raise ValueError(f"need 0 < t_min < t_max <= 1 (cosine: <= 0.9946, where α reaches 0); got t_min={t_min}, "
                             f"t_max={t_max}.")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive; got {self.time_scale!r}.")
        object.__setattr__(self, "t_min", t_min)
        object.__setattr__(self, "t_max", t_max)
        t = torch.linspace(t_min, t_max, self.num_train_timesteps, dtype=torch.float64)
        self._set_table(self._log_alpha(t), self.time_scale * t)

    def _log_alpha(self, t: Tensor) -> Tensor:
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self._S
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - math.log(math.cos(s / (1 + s) * math.pi / 2))

    def t_to_alpha_bar(self, t: Tensor) -> Tensor:
        return torch.exp(2 * self._log_alpha(_f64(t) / self.time_scale))

    def alpha_bar_to_t(self, alpha_bar: Tensor) -> Tensor:
        log_a = 0.5 * torch.log(_f64(alpha_bar))
        if self.kind == "linear":  # DPM-Solver's inverse: a t² + b t + log α = 0
            a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
            t = 2 * (-log_a) / (b + torch.sqrt(b**2 - 4 * a * log_a))
        else:
            s = self._S
            t = 2 * (1 + s) / math.pi * torch.arccos(torch.exp(log_a + math.log(math.cos(s / (1 + s) * math.pi / 2))))
            t = t - s
        return self.time_scale * t

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> VPContinuous:
        get = config_getter(config)
        _reject_betas(get, cls.path)
        return cls(kind=str(get("kind", "linear")), beta_min=float(get("beta_min", 0.1)),
                   beta_max=float(get("beta_max", 20.0)), t_min=get("t_min", None), t_max=get("t_max", None),
                   time_scale=float(get("time_scale", 1000.0)),
                   num_train_timesteps=int(get("num_train_timesteps", 1000)))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min, "t_max": self.t_max, "time_scale": self.time_scale,
                "num_train_timesteps": self.num_train_timesteps}

    def describe_range(self) -> str:
        return f"continuous VP {self.kind}, t in [{self.t_min}, {self.t_max}]"


@dataclass(frozen=True)
class VEPath(NoisePath):
    """Variance exploding / EDM: ``x = x₀ + σ ε`` (Karras et al. 2022), σ in ``[sigma_min, sigma_max]``.

    Args:
        sigma_min, sigma_max: the trained σ range (EDM: 0.002, 80); outside it the model is undefined, so
            trajectories there are refused (:meth:`~vrg_lightning.schedule.NoisePath.check_covers`).
        conditioning: the model's time input: ``sigma`` (σ itself) or ``edm`` (c_noise = ¼ ln σ).
        num_train_timesteps: the number of tabulated levels (log-uniform in σ).

    A VE network usually predicts x₀ (EDM's D(x; σ), prediction type ``sample``) or ε; ``v_prediction`` is a VP
    quantity and is refused.
    """

    path: ClassVar[str] = "ve"
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "sample")
    strict_range: ClassVar[bool] = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    conditioning: str = "sigma"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max or not math.isfinite(self.sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf; got sigma_min={self.sigma_min!r}, "
                             f"sigma_max={self.sigma_max!r}.")
        if self.conditioning not in ("sigma", "edm"):
            raise ValueError(f"conditioning must be 'sigma' or 'edm'; got {self.conditioning!r}.")
        _check_levels(self.num_train_timesteps)
        sig = torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.num_train_timesteps,
                                       dtype=torch.float64))
        self._set_table(-0.5 * torch.log1p(sig**2), self._time(sig))

    def _time(self, sigma: Tensor) -> Tensor:
        return sigma if self.conditioning == "sigma" else 0.25 * torch.log(sigma)

    def t_to_alpha_bar(self, t: Tensor) -> Tensor:
        t = _f64(t)
        sig = t if self.conditioning == "sigma" else torch.exp(4 * t)
        return 1 / (1 + sig**2)

    def alpha_bar_to_t(self, alpha_bar: Tensor) -> Tensor:
        ab = _f64(alpha_bar)
        return self._time(((1 - ab) / ab).sqrt())

    def input_scale(self, alpha_bar: Tensor) -> Tensor:
        return _f64(alpha_bar).rsqrt()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> VEPath:
        get = config_getter(config)
        _reject_betas(get, cls.path)
        return cls(sigma_min=float(get("sigma_min", 0.002)), sigma_max=float(get("sigma_max", 80.0)),
                   conditioning=str(get("conditioning", "sigma")),
                   num_train_timesteps=int(get("num_train_timesteps", 1000)))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "conditioning": self.conditioning, "num_train_timesteps": self.num_train_timesteps}

    def describe_range(self) -> str:
        return f"VE sigma in [{self.sigma_min:g}, {self.sigma_max:g}]"


@dataclass(frozen=True)
class RectifiedFlow(NoisePath):
    """Rectified flow / flow matching: ``x = (1-σ) x₀ + σ ε`` (SD3, Flux; diffusers' FlowMatchEulerDiscreteScheduler).

    Args:
        num_train_timesteps: T; the model's time input is ``σ · T``.
        shift: diffusers' ``shift``: the levels are σ = shift·u/(1+(shift-1)u) of u uniform in [1/T, 1-1/T]; it moves
            the levels (and so the ``time_*`` bases, as diffusers' sampling), not the model's time input.

    Prediction types: ``flow`` (the velocity v = ε - x₀, diffusers' convention), ``epsilon``, ``sample``.
    """

    path: ClassVar[str] = "rectified_flow"
    prediction_types: ClassVar[tuple[str, ...]] = ("flow", "epsilon", "sample")
    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self) -> None:
        _check_levels(self.num_train_timesteps)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not self.shift > 0 \
                or not math.isfinite(self.shift):
            raise ValueError(f"shift must be a positive number (diffusers' FlowMatch shift; 1 = none); got "
                             f"{self.shift!r}.")
        object.__setattr__(self, "shift", float(self.shift))
        T = self.num_train_timesteps
        u = torch.linspace(1 / T, 1 - 1 / T, T, dtype=torch.float64)
        sig = self.shift * u / (1 + (self.shift - 1) * u)
        self._set_table(torch.log1p(-sig) - 0.5 * torch.log((1 - sig) ** 2 + sig**2), sig * T)

    def t_to_alpha_bar(self, t: Tensor) -> Tensor:
        sig = _f64(t) / self.num_train_timesteps
        return (1 - sig) ** 2 / ((1 - sig) ** 2 + sig**2)

    def alpha_bar_to_t(self, alpha_bar: Tensor) -> Tensor:
        ab = _f64(alpha_bar)
        s = ((1 - ab) / ab).sqrt()  # σ/α = σ/(1-σ)
        return s / (1 + s) * self.num_train_timesteps

    def input_scale(self, alpha_bar: Tensor) -> Tensor:
        ab = _f64(alpha_bar)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return 1 / (a + s)  # c = α/√ᾱ with α = 1 - σ = √ᾱ/(√ᾱ + √(1-ᾱ))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> RectifiedFlow:
        """From a stored dict or a ``FlowMatchEulerDiscreteScheduler`` config (``shift``, ``num_train_timesteps``).

        Raises:
            ValueError: a beta schedule, ``use_dynamic_shifting`` (its shift depends on the image size: give the
                shift, exp(mu), explicitly), or a bad shift.
        """
        get = config_getter(config)
        _reject_betas(get, cls.path)
        if get("use_dynamic_shifting", False):
            raise ValueError("use_dynamic_shifting=True: the shift depends on the image size (mu); give the shift "
                             "for your resolution explicitly (shift = exp(mu)) and use_dynamic_shifting=False.")
        return cls(num_train_timesteps=int(get("num_train_timesteps", 1000)), shift=get("shift", 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}

    def describe_range(self) -> str:
        return f"rectified flow, shift {self.shift:g}, T={self.num_train_timesteps}"


def noise_path(name: str = "vp_discrete", **options: Any) -> NoisePath:
    """The noise path ``name`` (:data:`NOISE_PATHS`) with its options (the fields of its class).

    Example:
        >>> p = noise_path("rectified_flow", shift=3.0)
        >>> round(float(p.alpha_bar_to_t(p.t_to_alpha_bar(torch.tensor(500.0)))), 6)
        500.0
    """
    if name not in NOISE_PATHS:
        raise ValueError(f"Unknown noise path {name!r}; allowed: {', '.join(NOISE_PATHS)}.")
    if name == "vp_discrete":
        return NoiseSchedule(**options)
    return NoisePath.from_dict({"path": name, **options})
