"""Base sampling trajectories, their validation and file I/O.

A trajectory is a float64 tensor of the ᾱ values at which a solver evaluates the model, **cleanest
step first** (strictly decreasing ᾱ), like the reference files. The end point of sampling (ᾱ → 1,
σ = 0) is not a step. ``steps`` = number of values = number of model evaluations.

Bases (names shared with DPM-Solver and diffusers):

- ``time_uniform``, ``time_quadratic``, ``logSNR``: DPM-Solver's ``skip_type`` over continuous time
  ``t_c ∈ [1/T, 1]`` (our timestep ``t = T·t_c - 1``); the N+1 grid points include the end point
  ``t_c = 1/T``, which is dropped.
- ``karras``: σ_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, Karras et al. 2022, eq. 5.
- ``trailing``, ``leading``: diffusers' integer timestep spacings.
- ``list``: explicit ᾱ values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write_text, read_text_file
from .schedule import NoiseSchedule, _interp, alpha_bar_to_sigma, check_alpha_bar, sigma_to_alpha_bar

__all__ = [
    "BASES", "make_trajectory", "validate_trajectory", "is_trajectory", "load_trajectory", "save_trajectory",
]

BASES = ("time_uniform", "time_quadratic", "logSNR", "karras", "trailing", "leading", "list")


def validate_trajectory(alpha_bar: Sequence[float] | Tensor, name: str = "trajectory") -> Tensor:
    """Return ``alpha_bar`` as float64 after checking it is a valid trajectory.

    Raises:
        ValueError: if empty, not 1-D, not finite, outside (0, 1) or not strictly decreasing
            (cleanest step first).
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).detach() if not torch.is_tensor(alpha_bar) else alpha_bar
    ab = ab.to(torch.float64)
    if ab.ndim != 1 or ab.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of alpha_bar values; got shape {tuple(ab.shape)}.")
    check_alpha_bar(ab, f"{name} alpha_bar")
    diffs = ab[1:] - ab[:-1]
    if bool((diffs >= 0).any()):
        i = int(torch.nonzero(diffs >= 0)[0])
        raise ValueError(
            f"{name} must be strictly decreasing in alpha_bar (cleanest step first); value {i + 1} "
            f"({ab[i + 1].item():.8g}) is not below value {i} ({ab[i].item():.8g}). "
            "Reverse the list if it is stored noisiest first."
        )
    return ab


def is_trajectory(alpha_bar: Any) -> bool:
    """Whether a 1-D tensor or array of ᾱ is strictly decreasing inside (0, 1) (cleanest first), without raising: the
    searches' test of the points they try (NaN fails it)."""
    ab = alpha_bar
    return bool((ab[1:] < ab[:-1]).all() and (ab > 0).all() and (ab < 1).all())


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")


def _dpm_solver_steps(schedule: NoiseSchedule, base: str, steps: int, dtype: torch.dtype) -> Tensor:
    """DPM-Solver's ``get_time_steps`` over continuous time t_c ∈ [1/T, 1], as ᾱ cleanest first, end point dropped."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}.")
    T = schedule.num_train_timesteps
    t_grid = torch.linspace(0.0, 1.0, T + 1, dtype=dtype)[1:]
    log_a = schedule.log_sqrt_alphas_cumprod.to(dtype)

    def log_alpha(tc: Tensor) -> Tensor:
        return _interp(tc, t_grid, log_a)

    t_T, t_0 = 1.0, 1.0 / T
    if base == "time_uniform":
        tc = torch.linspace(t_T, t_0, steps + 1, dtype=dtype)
    elif base == "time_quadratic":
        tc = torch.linspace(math.sqrt(t_T), math.sqrt(t_0), steps + 1, dtype=dtype) ** 2
    else:  # logSNR: uniform in λ/2 = log α - log σ, inverted through log α (DPM-Solver's inverse_lambda)
        la = log_alpha(torch.tensor([t_T, t_0], dtype=dtype))
        half_lam = la - 0.5 * torch.log(1 - torch.exp(2 * la))
        lams = torch.linspace(float(half_lam[0]), float(half_lam[1]), steps + 1, dtype=dtype)
        la_steps = -0.5 * torch.logaddexp(torch.zeros(1, dtype=dtype), -2 * lams)
        tc = _interp(la_steps, log_a.flip(0), t_grid.flip(0))
    ab = torch.exp(2 * log_alpha(tc)).to(torch.float64)
    return ab[:-1].flip(0)  # drop the end point t_c = 1/T; cleanest first


def make_trajectory(
    schedule: NoiseSchedule,
    base: str,
    steps: int,
    *,
    rho: float = 7.0,
    values: Sequence[float] | Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Build a base trajectory of ``steps`` ᾱ values, cleanest first.

    Args:
        schedule: the model's noise schedule.
        base: one of :data:`BASES`.
        steps: number of model evaluations N, at most the schedule's ``num_train_timesteps`` (every base's values
            lie in its trained range ``[ᾱ(t=T-1), ᾱ(t=0)]``).
        rho: Karras ρ.
        values: the ᾱ values for ``base="list"``.
        dtype: arithmetic precision of the DPM-Solver bases. ``torch.float32`` reproduces DPM-Solver's
            default float32 arithmetic (and the published reference files to 1e-6); the default float64
            is exact (the float32 values differ from it by up to ~6e-5 relative for ``logSNR``).

    Example:
        >>> ab = make_trajectory(NoiseSchedule(), "time_quadratic", 10)
        >>> round(float(ab[0]), 8), round(float(ab[-1]), 8)
        (0.99580757, 4.036e-05)
    """
    if base == "list":
        if values is None:
            raise ValueError("base='list' needs values=[alpha_bar, ...] (cleanest first) or a trajectory file.")
        ab = validate_trajectory(values)
        if ab.numel() != steps and steps is not None:
            raise ValueError(f"base='list' got {ab.numel()} values but steps={steps}.")
        return ab
    _check_steps(steps)
    T = schedule.num_train_timesteps
    if steps > T:
        raise ValueError(f"steps={steps} is more than the schedule can hold: base={base!r} on a schedule of "
                         f"num_train_timesteps={T} (its trained noise levels) allows steps <= {T}.")
    if base in ("time_uniform", "time_quadratic", "logSNR"):
        return validate_trajectory(_dpm_solver_steps(schedule, base, steps, dtype), base)
    if base == "karras":
        if not rho > 0:
            raise ValueError(f"rho must be positive; got {rho!r}.")
        s_min = float(alpha_bar_to_sigma(torch.tensor(schedule.alpha_bar_max, dtype=torch.float64)))
        s_max = float(alpha_bar_to_sigma(torch.tensor(schedule.alpha_bar_min, dtype=torch.float64)))
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ab = sigma_to_alpha_bar(sig).flip(0)  # the ends are the schedule's own (not one rounding step beyond)
        return validate_trajectory(ab.clamp(schedule.alpha_bar_min, schedule.alpha_bar_max), base)
    if base in ("trailing", "leading"):
        if base == "leading":
            ts = torch.arange(0, steps, dtype=torch.float64) * (T // steps)
        else:
            # diffusers' own arithmetic (np.arange), whose rounding ties we match; it can yield steps+1 values
            # (a last one ~0, i.e. timestep -1), so keep the first `steps`
            ts = torch.from_numpy(np.round(np.arange(T, 0, -T / steps))[:steps].copy()).flip(0) - 1
        return validate_trajectory(schedule.alphas_cumprod[ts.long()], base)
    raise ValueError(f"Unknown base trajectory {base!r}; allowed: {', '.join(BASES)}.")


def _parse_header(lines: list[str]) -> dict[str, str]:
    header: dict[str, str] = {}
    for line in lines:
        s = line.strip()
        if s.startswith("#") and ":" in s:
            k, v = s[1:].split(":", 1)
            header[k.strip().lower()] = v.strip()
    return header


def load_trajectory(path: str | os.PathLike) -> Tensor:
    """Read a trajectory file: one ᾱ per line, cleanest first, ``#`` comment lines.

    Reads the reference format (``# steps : N`` header with N+1 values whose first is the end
    point of sampling, which is dropped) and the toolkit's own files (N values).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Trajectory file {str(p)!r} does not exist.")
    lines = read_text_file(p, "Trajectory file", "alpha_bar values (one per line)").splitlines()
    vals: list[float] = []
    for n, line in enumerate(lines, 1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            vals.append(float(s.split()[-1]))
        except ValueError:
            raise ValueError(
                f"{p}:{n}: expected one alpha_bar number per line (and '#' comments); got {line.strip()!r}."
            ) from None
    if not vals:
        raise ValueError(f"Trajectory file {str(p)!r} holds no values; expected one alpha_bar per line.")
    header = _parse_header(lines)
    if "data_type" in header and header["data_type"] != "alpha_bar":
        raise ValueError(f"{p}: data_type is {header['data_type']!r}; only alpha_bar trajectories are supported.")
    if "steps" in header:
        try:
            steps = int(header["steps"])
        except ValueError:
            raise ValueError(f"{p}: header 'steps' must be an integer; got {header['steps']!r}.") from None
        if len(vals) == steps + 1:
            vals = vals[1:]  # reference format: first value is the end point of sampling
        elif len(vals) != steps:
            raise ValueError(f"{p}: header says steps={steps} but the file holds {len(vals)} values.")
    return validate_trajectory(vals, f"trajectory in {p}")


def save_trajectory(path: str | os.PathLike, alpha_bar: Tensor, header: Mapping[str, Any] | None = None) -> None:
    """Write a trajectory (N values, cleanest first) with a ``# key : value`` header, atomically."""
    ab = validate_trajectory(alpha_bar)
    head = {"format": "vrg-trajectory v1", "steps": ab.numel(), "data_type": "alpha_bar", **(header or {})}
    text = "".join(f"# {k} : {v}\n" for k, v in head.items()) + "".join(f"{float(v):.10g}\n" for v in ab)
    atomic_write_text(path, text)
