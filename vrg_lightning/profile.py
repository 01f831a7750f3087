"""``ErrorProfile``: per-noise-level statistics of a model's noise-prediction error, and MSE(ᾱ) fits.

The profile holds, per bin of logSNR λ, float64 running sums over the per-element error
``e = ε̂ - ε``: the number of elements ``n`` and ``Σe, Σe², Σe³, Σe⁴``, plus the number of samples and
``Σλ`` of those samples (the bin's centre). Sums add exactly across batches and processes
(torchmetrics-style ``sum`` states), so profiles from different ranks merge with ``+``.

Two MSE(ᾱ) functions are derived (both differentiable torch callables, float64):

- :class:`PchipLogMSE` (``mode="fit"``, default): shape-preserving cubic (PCHIP) interpolation of
  ``log MSE`` against λ over the non-empty bins. Working in ``log`` keeps it positive; PCHIP neither
  overshoots between noisy bins nor oscillates like a spline, and is C¹ so gradient-based optimizers see
  no kinks. Beyond the outermost bins it is constant (the value of the nearest bin). Empty bins are
  skipped.
- :class:`PiecewiseLinearMSE` (``mode="paper"``): linear in ᾱ between table rows, as the published code
  does, so figures compare with the paper; constant beyond the table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator
from torch import Tensor

from .io import atomic_torch_save, atomic_write_text
from .schedule import NoiseSchedule, alpha_bar_to_lambda

__all__ = [
    "ErrorProfile",
    "PchipLogMSE",
    "PiecewiseLinearMSE",
    "read_reference_tsv",
    "load_profile",
    "save_profile",
]

PROFILE_FORMAT = "vrg-profile"
PROFILE_VERSION = 1
_SUMS = ("count", "lam_sum", "n", "s1", "s2", "s3", "s4")


class PiecewiseLinearMSE:
    """MSE(ᾱ) linear in ᾱ between knots (the reference's interpolation), constant outside."""

    def __init__(self, alpha_bar: Tensor, mse: Tensor) -> None:
        order = torch.argsort(alpha_bar)
        self.alpha_bar = alpha_bar[order].to(torch.float64)
        self.mse = mse[order].to(torch.float64)
        if self.alpha_bar.numel() < 1:
            raise ValueError("PiecewiseLinearMSE needs at least one knot.")

    def __call__(self, alpha_bar: Tensor) -> Tensor:
        xp, fp = self.alpha_bar.to(alpha_bar.device), self.mse.to(alpha_bar.device)
        if xp.numel() == 1:
            return fp.expand_as(alpha_bar).to(alpha_bar.dtype) + 0 * alpha_bar
        x = alpha_bar.clamp(float(xp[0]), float(xp[-1]))
        idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        width = x1 - x0  # rows printed with the same alpha_bar give zero-width segments: take the left value
        return y0 + (x - x0) * torch.where(width > 0, (y1 - y0) / torch.where(width > 0, width, 1.0), 0.0)


class PchipLogMSE:
    """MSE(ᾱ) = exp(PCHIP of log MSE in λ), constant beyond the outermost knots."""

    def __init__(self, lam: Tensor, mse: Tensor) -> None:
        order = torch.argsort(lam)
        x = lam[order].to(torch.float64)
        y = torch.log(mse[order].to(torch.float64))
        self.lam, self.log_mse = x, y
        if x.numel() >= 2:
            d = PchipInterpolator(x.numpy(), y.numpy()).derivative()(x.numpy())
            self.slopes = torch.as_tensor(np.asarray(d), dtype=torch.float64)
        else:
            self.slopes = torch.zeros_like(x)

    def __call__(self, alpha_bar: Tensor) -> Tensor:
        dev = alpha_bar.device
        xp, yp, dp = self.lam.to(dev), self.log_mse.to(dev), self.slopes.to(dev)
        lam = alpha_bar_to_lambda(alpha_bar.to(torch.float64))
        if xp.numel() == 1:
            return torch.exp(yp[0] + 0 * lam)
        x = lam.clamp(float(xp[0]), float(xp[-1]))
        i = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
        x0, x1 = xp[i - 1], xp[i]
        h = x1 - x0
        u = (x - x0) / h
        h00, h10 = (1 + 2 * u) * (1 - u) ** 2, u * (1 - u) ** 2
        h01, h11 = u**2 * (3 - 2 * u), u**2 * (u - 1)
        return torch.exp(h00 * yp[i - 1] + h10 * h * dp[i - 1] + h01 * yp[i] + h11 * h * dp[i])


@dataclass
class ErrorProfile:
    """Binned moment sums of the per-element noise-prediction error (float64, mergeable).

    Args:
        lambda_edges: increasing bin edges in λ = logSNR (``B + 1`` values; ±inf allowed at the ends).
        moments: 4 for measured profiles; 2 for tables imported with only MSE (higher statistics unknown).
        paper_knots: optional ``(alpha_bar, mse)`` rows used verbatim by ``mode="paper"`` (the reference
            table including its safeguard row).

    Example:
        >>> p = ErrorProfile.for_schedule(NoiseSchedule(), num_bins=10)
        >>> g = torch.Generator().manual_seed(0)
        >>> p.update(torch.full((4,), 0.0), 0.5 * torch.randn(4, 3, 8, 8, generator=g))
        >>> round(float(p.mse[p.count > 0][0]), 2)
        0.26
    """

    lambda_edges: Tensor
    count: Tensor = None  # type: ignore[assignment]
    lam_sum: Tensor = None  # type: ignore[assignment]
    n: Tensor = None  # type: ignore[assignment]
    s1: Tensor = None  # type: ignore[assignment]
    s2: Tensor = None  # type: ignore[assignment]
    s3: Tensor = None  # type: ignore[assignment]
    s4: Tensor = None  # type: ignore[assignment]
    moments: int = 4
    source: str = ""
    paper_knots: tuple[Tensor, Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = torch.as_tensor(self.lambda_edges, dtype=torch.float64)
        if e.ndim != 1 or e.numel() < 2 or bool((e[1:] <= e[:-1]).any()) or bool(torch.isnan(e).any()):
            raise ValueError("lambda_edges must be a strictly increasing 1-D tensor with at least 2 values.")
        self.lambda_edges = e
        for k in _SUMS:
            v = getattr(self, k)
            setattr(self, k, torch.zeros(e.numel() - 1, dtype=torch.float64) if v is None else
                    torch.as_tensor(v, dtype=torch.float64).clone())
            if getattr(self, k).shape != (e.numel() - 1,):
                raise ValueError(f"ErrorProfile.{k} must have {e.numel() - 1} entries (one per bin).")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def for_schedule(cls, schedule: NoiseSchedule, num_bins: int = 100) -> ErrorProfile:
        """Bins of equal width in timestep (``T/num_bins`` integer timesteps each), edges in λ."""
        T = schedule.num_train_timesteps
        if not isinstance(num_bins, int) or not 1 <= num_bins <= T:
            raise ValueError(f"num_bins must be an integer in [1, {T}]; got {num_bins!r}.")
        t_edges = torch.linspace(-0.5, T - 0.5, num_bins + 1, dtype=torch.float64)[1:-1]
        inner = schedule.t_to_lambda(t_edges).flip(0)
        inf = torch.tensor([math.inf], dtype=torch.float64)
        return cls(torch.cat([-inf, inner, inf]), source="measured", meta={"schedule": schedule.to_dict()})

    @classmethod
    def from_table(cls, alpha_bar: Tensor, mse: Tensor, source: str = "table") -> ErrorProfile:
        """One bin per table row with 0 < ᾱ < 1 (others, e.g. a safeguard row at ᾱ = 0, are kept
        only as paper-mode knots). MSE only: higher moments are unknown (``moments=2``)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        m = torch.as_tensor(mse, dtype=torch.float64)
        _check_mse(ab, m)
        keep = (ab > 0) & (ab < 1)
        if not bool(keep.any()):
            raise ValueError("The MSE table has no row with 0 < alpha_bar < 1.")
        lam = alpha_bar_to_lambda(ab[keep])
        order = torch.argsort(lam)
        lam, inverse = torch.unique(lam[order], return_inverse=True)  # rows sharing an alpha_bar: one bin, mean MSE
        rows = torch.zeros_like(lam).index_add_(0, inverse, torch.ones_like(inverse, dtype=torch.float64))
        mk = torch.zeros_like(lam).index_add_(0, inverse, m[keep][order]) / rows
        mid = (lam[1:] + lam[:-1]) / 2
        inf = torch.tensor([math.inf], dtype=torch.float64)
        ones = torch.ones_like(lam)
        return cls(torch.cat([-inf, mid, inf]), count=ones, lam_sum=lam, n=ones, s1=torch.zeros_like(lam),
                   s2=mk, s3=torch.zeros_like(lam), s4=mk**2, moments=2, source=source, paper_knots=(ab, m))

    # --- accumulation -------------------------------------------------------------------------
    def bin_index(self, lam: Tensor) -> Tensor:
        """Bin of each λ (values on an edge go to the upper bin)."""
        e = self.lambda_edges.to(lam.device)
        return (torch.searchsorted(e, lam.to(torch.float64).contiguous(), right=True) - 1).clamp(0, e.numel() - 2)

    def update_from_sums(self, lam: Tensor, n: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor) -> None:
        """Add per-sample sums (each of shape ``[B]``) at noise levels ``lam`` (logSNR, ``[B]``)."""
        lam = lam.detach().to(torch.float64).flatten().cpu()
        ok = torch.isfinite(lam)
        vals = [v.detach().to(torch.float64).flatten().cpu() for v in (n, s1, s2, s3, s4)]
        for v in vals:
            ok &= torch.isfinite(v)
        idx = self.bin_index(lam[ok])
        self.count.index_add_(0, idx, torch.ones_like(lam[ok]))
        self.lam_sum.index_add_(0, idx, lam[ok])
        for k, v in zip(("n", "s1", "s2", "s3", "s4"), vals, strict=True):
            getattr(self, k).index_add_(0, idx, v[ok])

    def update(self, lam: Tensor, error: Tensor) -> None:
        """Add a batch of errors ``error = ε̂ - ε`` (shape ``[B, ...]``) at noise levels ``lam`` (``[B]``)."""
        e = error.detach().to(torch.float64).flatten(1)
        e2 = e * e
        n = torch.full((e.shape[0],), float(e.shape[1]), dtype=torch.float64, device=e.device)
        self.update_from_sums(lam, n, e.sum(1), e2.sum(1), (e2 * e).sum(1), (e2 * e2).sum(1))

    def __add__(self, other: ErrorProfile) -> ErrorProfile:
        if not torch.equal(self.lambda_edges, other.lambda_edges):
            raise ValueError("Cannot merge ErrorProfiles with different bin edges.")
        sums = {k: getattr(self, k) + getattr(other, k) for k in _SUMS}
        return ErrorProfile(self.lambda_edges, **sums, moments=min(self.moments, other.moments), source=self.source,
                            meta=dict(self.meta))

    def reset(self) -> None:
        for k in _SUMS:
            getattr(self, k).zero_()

    def scale_(self, factor: float) -> None:
        """Multiply all sums by ``factor`` (exponential decay of old statistics)."""
        for k in _SUMS:
            getattr(self, k).mul_(factor)

    # --- derived statistics -------------------------------------------------------------------
    @property
    def num_bins(self) -> int:
        return self.count.numel()

    @property
    def nonempty(self) -> Tensor:
        return self.n > 0

    def _div(self, a: Tensor) -> Tensor:
        return torch.where(self.nonempty, a / self.n.clamp_min(1e-300), torch.full_like(a, math.nan))

    @property
    def lam(self) -> Tensor:
        """Mean λ of the samples in each bin (NaN for empty bins)."""
        return torch.where(self.count > 0, self.lam_sum / self.count.clamp_min(1e-300), torch.nan)

    @property
    def alpha_bar(self) -> Tensor:
        return torch.sigmoid(self.lam)

    @property
    def mse(self) -> Tensor:
        return self._div(self.s2)

    @property
    def mean(self) -> Tensor:
        return self._div(self.s1)

    @property
    def std(self) -> Tensor:
        return (self.mse - self.mean**2).clamp_min(0).sqrt()

    def _central(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.moments < 4:
            raise ValueError(f"Profile {self.source!r} holds only MSE; skewness/kurtosis need a measured profile.")
        mu, m2, m3, m4 = self.mean, self.mse, self._div(self.s3), self._div(self.s4)
        var = (m2 - mu**2).clamp_min(1e-300)
        c3 = m3 - 3 * mu * m2 + 2 * mu**3
        c4 = m4 - 4 * mu * m3 + 6 * mu**2 * m2 - 3 * mu**4
        return var, c3, c4

    @property
    def skewness(self) -> Tensor:
        var, c3, _ = self._central()
        return c3 / var**1.5

    @property
    def excess_kurtosis(self) -> Tensor:
        var, _, c4 = self._central()
        return c4 / var**2 - 3

    def gaussianity(self) -> dict[str, list[float]]:
        """Per non-empty bin: ᾱ, λ, MSE, mean, std, skewness, excess kurtosis (lists, JSON-safe)."""
        k = self.nonempty
        out = {"alpha_bar": self.alpha_bar[k], "lambda": self.lam[k], "mse": self.mse[k], "mean": self.mean[k],
               "std": self.std[k], "count": self.count[k]}
        if self.moments >= 4:
            out["skewness"] = self.skewness[k]
            out["excess_kurtosis"] = self.excess_kurtosis[k]
        return {key: [float(x) for x in v] for key, v in out.items()}

    # --- fits ---------------------------------------------------------------------------------
    def mse_function(self, mode: str = "fit", min_count: float = 1.0):
        """A differentiable ``MSE(ᾱ)`` callable: ``"fit"`` (PCHIP of log MSE in λ) or ``"paper"``.

        Raises:
            ValueError: unknown mode, empty profile, or non-finite / non-positive MSE.
        """
        if mode not in ("fit", "paper"):
            raise ValueError(f"Unknown MSE mode {mode!r}; allowed: 'fit', 'paper'.")
        if mode == "paper" and self.paper_knots is not None:
            return PiecewiseLinearMSE(*self.paper_knots)
        keep = self.nonempty & (self.count >= min_count)
        if not bool(keep.any()):
            raise ValueError(
                "The error profile is empty (no bin has data): record errors during training "
                "(VRGProfiler) or run `vrg profile` before optimizing trajectories."
            )
        lam, mse = self.lam[keep], self.mse[keep]
        _check_mse(torch.sigmoid(lam), mse)
        if mode == "paper":
            return PiecewiseLinearMSE(torch.sigmoid(lam), mse)
        if bool((mse <= 0).any()):
            raise ValueError("The fit works on log MSE and needs MSE > 0 in every non-empty bin.")
        return PchipLogMSE(lam, mse)

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only (loads with ``torch.load(weights_only=True)``)."""
        d: dict[str, Any] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "lambda_edges": self.lambda_edges,
                             "moments": self.moments, "source": self.source, "meta": dict(self.meta)}
        d.update({k: getattr(self, k) for k in _SUMS})
        if self.paper_knots is not None:
            d["paper_knots"] = {"alpha_bar": self.paper_knots[0], "mse": self.paper_knots[1]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorProfile:
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"Not a vrg error profile (format={d.get('format')!r}, expected {PROFILE_FORMAT!r}).")
        if int(d.get("version", 0)) > PROFILE_VERSION:
            raise ValueError(f"Profile version {d['version']} is newer than this toolkit ({PROFILE_VERSION}); upgrade.")
        pk = d.get("paper_knots")
        return cls(d["lambda_edges"], **{k: d[k] for k in _SUMS}, moments=int(d.get("moments", 4)),
                   source=str(d.get("source", "")), meta=dict(d.get("meta", {})),
                   paper_knots=(pk["alpha_bar"], pk["mse"]) if pk else None)

    def to_tsv(self) -> str:
        """The reference's ``ts alpha_bar MSE`` text format (``ts`` = bin number), non-empty bins only."""
        k = self.nonempty
        ab, mse = self.alpha_bar[k], self.mse[k]
        order = torch.argsort(ab, descending=True)
        rows = "".join(f"{i + 1:4d}\t{float(ab[j]):.8f}\t{float(mse[j]):.8f}\n" for i, j in enumerate(order))
        return f"# vrg-lightning error profile ({self.source})\n#\n# ts\talpha_bar\tMSE\n" + rows


def _check_mse(alpha_bar: Tensor, mse: Tensor) -> None:
    if bool((~torch.isfinite(mse)).any()):
        raise ValueError(f"MSE values must be finite; got {mse[~torch.isfinite(mse)][0].item()!r}.")
    if bool((mse < 0).any()):
        raise ValueError(f"MSE values must be non-negative; got {mse[mse < 0][0].item()!r}.")
    if bool((~torch.isfinite(alpha_bar) | (alpha_bar < 0) | (alpha_bar >= 1)).any()):
        raise ValueError("alpha_bar values of an MSE table must lie in [0, 1).")


def read_reference_tsv(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Read the reference ``ts alpha_bar MSE`` table (``#`` comments, whitespace-separated)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Profile file {str(p)!r} does not exist.")
    ab, mse = [], []
    for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        parts = s.split()
        try:
            if len(parts) != 3:
                raise ValueError
            ab.append(float(parts[1]))
            mse.append(float(parts[2]))
        except ValueError:
            raise ValueError(f"{p}:{i}: expected three columns 'ts alpha_bar MSE'; got {line.strip()!r}.") from None
    if not ab:
        raise ValueError(f"Profile file {str(p)!r} has no data rows (expected 'ts alpha_bar MSE' lines).")
    a, m = torch.tensor(ab, dtype=torch.float64), torch.tensor(mse, dtype=torch.float64)
    _check_mse(a, m)
    return a, m


def load_profile(path: str | os.PathLike) -> ErrorProfile:
    """Load a profile: the toolkit's ``.pt`` files, checkpoints holding ``vrg.profile``, or a reference TSV."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Profile file {str(p)!r} does not exist.")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - report any unpickling failure the same way
            raise ValueError(f"Could not read {str(p)!r} as a torch file: {exc}") from exc
        if isinstance(obj, Mapping) and "vrg" in obj and isinstance(obj["vrg"], Mapping):
            obj = obj["vrg"].get("profile", obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{str(p)!r} holds no vrg profile.")
        return ErrorProfile.from_dict(obj)
    ab, mse = read_reference_tsv(p)
    return ErrorProfile.from_table(ab, mse, source=f"table:{p.name}")


def save_profile(path: str | os.PathLike, profile: ErrorProfile) -> None:
    """Save as ``.pt`` (plain dict) or, for ``.tsv``/``.txt`` paths, the reference text format; atomic."""
    p = Path(path)
    if p.suffix in (".tsv", ".txt"):
        atomic_write_text(p, profile.to_tsv())
    else:
        atomic_torch_save(p, profile.to_dict())
