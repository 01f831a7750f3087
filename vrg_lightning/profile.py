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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .interpolants import PchipLogMSE, PiecewiseLinearMSE
from .io import FORMAT_VERSIONS, atomic_torch_save, atomic_write_text, check_format, load_torch_file, read_text_file
from .schedule import NoisePath, alpha_bar_to_lambda

__all__ = [
    "ErrorProfile",
    "SUM_ROWS",
    "PchipLogMSE",
    "PiecewiseLinearMSE",
    "read_reference_tsv",
    "load_profile",
    "save_profile",
]

PROFILE_FORMAT = "vrg-profile"
PROFILE_VERSION = FORMAT_VERSIONS[PROFILE_FORMAT]
DUPLICATE_RTOL = 0.05  # table rows sharing an alpha_bar (printed rounded) are averaged if their MSEs agree this well
SUM_ROWS = ("count", "lam_sum", "n", "s1", "s2", "s3", "s4")  # rows of ErrorProfile.sums


class ErrorProfile:
    """Binned moment sums of the per-element noise-prediction error (float64, mergeable, on any device).

    The sums are one ``[7, bins]`` float64 tensor :attr:`sums` whose rows are :data:`SUM_ROWS`
    (``count, lam_sum, n, s1, s2, s3, s4``; each also readable as an attribute, a view of its row). As torchmetrics'
    sum states, :meth:`update` and :meth:`scale_` only change the sums, every statistic is derived from them, and
    profiles of different processes add exactly (``+``, or a ``sum`` reduce of :attr:`sums`).

    Args:
        lambda_edges: increasing bin edges in λ = logSNR (``B + 1`` values; ±inf allowed at the ends).
        count, lam_sum, n, s1, s2, s3, s4: initial sums per bin (``[B]`` each; default 0), or ``sums`` ``[7, B]``.
        moments: 4 for measured profiles; 2 for tables imported with only MSE (higher statistics unknown).
        source: where the profile comes from (``free``, ``probe``, ``table``, ...).
        paper_knots: optional ``(alpha_bar, mse)`` rows used verbatim by ``mode="paper"`` (reference table + safeguard).
        meta: plain settings recorded with the profile.

    Example:
        >>> from vrg_lightning.schedule import NoiseSchedule
        >>> p = ErrorProfile.for_schedule(NoiseSchedule(), num_bins=10)
        >>> g = torch.Generator().manual_seed(0)
        >>> int(p.update(torch.full((4,), 0.0), 0.5 * torch.randn(4, 3, 8, 8, generator=g)))
        0
        >>> round(float(p.mse[p.count > 0][0]), 2)
        0.26
    """

    def __init__(
        self,
        lambda_edges: Tensor,
        count: Tensor | None = None,
        lam_sum: Tensor | None = None,
        n: Tensor | None = None,
        s1: Tensor | None = None,
        s2: Tensor | None = None,
        s3: Tensor | None = None,
        s4: Tensor | None = None,
        *,
        sums: Tensor | None = None,
        moments: int = 4,
        source: str = "",
        paper_knots: tuple[Tensor, Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        e = torch.as_tensor(lambda_edges, dtype=torch.float64)
        if e.ndim != 1 or e.numel() < 2 or bool((e[1:] <= e[:-1]).any()) or bool(torch.isnan(e).any()):
            raise ValueError("lambda_edges must be a strictly increasing 1-D tensor with at least 2 values.")
        bins = e.numel() - 1
        rows = (count, lam_sum, n, s1, s2, s3, s4)
        if sums is not None:
            if any(r is not None for r in rows):
                raise ValueError("Give either sums=[7, bins] or the per-row sums (count, ..., s4), not both.")
            sums = torch.as_tensor(sums).to(torch.float64).clone()
            if sums.shape != (len(SUM_ROWS), bins):
                raise ValueError(f"ErrorProfile sums must have shape ({len(SUM_ROWS)}, {bins}); got "
                                 f"{tuple(sums.shape)}.")
        else:
            for k, v in zip(SUM_ROWS, rows, strict=True):
                if v is not None and torch.as_tensor(v).shape != (bins,):
                    raise ValueError(f"ErrorProfile.{k} must have {bins} entries (one per bin); got shape "
                                     f"{tuple(torch.as_tensor(v).shape)}.")
            dev = next((torch.as_tensor(v).device for v in rows if v is not None), e.device)
            sums = torch.stack([torch.zeros(bins, dtype=torch.float64, device=dev) if v is None else
                                torch.as_tensor(v).to(dev, torch.float64) for v in rows])
        self.lambda_edges = e.to(sums.device)
        self.sums = sums
        self.moments, self.source = int(moments), str(source)
        self.paper_knots = paper_knots
        self.meta: dict[str, Any] = dict(meta or {})

    count = property(lambda self: self.sums[0], doc="Samples per bin.")
    lam_sum = property(lambda self: self.sums[1], doc="Σλ of the samples per bin.")
    n = property(lambda self: self.sums[2], doc="Error elements per bin.")
    s1 = property(lambda self: self.sums[3], doc="Σe per bin.")
    s2 = property(lambda self: self.sums[4], doc="Σe² per bin.")
    s3 = property(lambda self: self.sums[5], doc="Σe³ per bin.")
    s4 = property(lambda self: self.sums[6], doc="Σe⁴ per bin.")

    def __repr__(self) -> str:
        return (f"ErrorProfile(bins={self.num_bins}, samples={float(self.count.sum()):g}, source={self.source!r}, "
                f"moments={self.moments})")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ErrorProfile) and torch.equal(self.lambda_edges.cpu(), other.lambda_edges.cpu())
                and torch.equal(self.sums.cpu(), other.sums.cpu()) and self.moments == other.moments
                and self.source == other.source)

    __hash__ = None  # type: ignore[assignment]

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def for_schedule(cls, schedule: NoisePath, num_bins: int = 100) -> ErrorProfile:
        """Bins of equal width in level index (``T/num_bins`` trained levels each; VP: timesteps), edges in λ."""
        T = schedule.num_train_timesteps
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= T:
            raise ValueError(f"num_bins must be an integer in [1, {T}]; got {num_bins!r}.")
        t_edges = torch.linspace(-0.5, T - 0.5, num_bins + 1, dtype=torch.float64)[1:-1]
        inner = schedule.index_to_lambda(t_edges).flip(0)
        inf = torch.tensor([math.inf], dtype=torch.float64)
        return cls(torch.cat([-inf, inner, inf]), source="measured", meta={"schedule": schedule.to_dict()})

    @classmethod
    def from_table(cls, alpha_bar: Tensor, mse: Tensor, source: str = "table") -> ErrorProfile:
        """One bin per table row with 0 < ᾱ < 1 (others, e.g. a safeguard row at ᾱ = 0, are kept
        only as paper-mode knots). MSE only: higher moments are unknown (``moments=2``).

        Rows sharing an ᾱ (a table printed with few digits) become one bin with their mean MSE when the MSEs agree
        within :data:`DUPLICATE_RTOL`.

        Raises:
            ValueError: non-finite or negative values, ᾱ outside [0, 1), fewer than 2 distinct noise levels with
                0 < ᾱ < 1 (MSE(ᾱ) is not determined by one), or rows sharing an ᾱ with conflicting MSE.
        """
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        m = torch.as_tensor(mse, dtype=torch.float64)
        lam, mk = _table_levels(ab, m)
        mid = (lam[1:] + lam[:-1]) / 2
        inf = torch.tensor([math.inf], dtype=torch.float64)
        ones = torch.ones_like(lam)
        return cls(torch.cat([-inf, mid, inf]), count=ones, lam_sum=lam, n=ones, s1=torch.zeros_like(lam),
                   s2=mk, s3=torch.zeros_like(lam), s4=mk**2, moments=2, source=source, paper_knots=(ab, m))

    def empty_like(self, source: str | None = None, meta: dict[str, Any] | None = None) -> ErrorProfile:
        """A profile with the same bins (and device), all sums 0."""
        return ErrorProfile(self.lambda_edges, sums=torch.zeros_like(self.sums), moments=self.moments,
                            source=self.source if source is None else source, meta=dict(meta or self.meta))

    def to(self, device: torch.device | str) -> ErrorProfile:
        """Move the sums and edges to ``device`` (in place; returns ``self``)."""
        self.sums, self.lambda_edges = self.sums.to(device), self.lambda_edges.to(device)
        return self

    def cpu(self) -> ErrorProfile:
        """A CPU copy (``self`` if already there)."""
        if self.sums.device.type == "cpu":
            return self
        return ErrorProfile(self.lambda_edges.cpu(), sums=self.sums.cpu(), moments=self.moments, source=self.source,
                            paper_knots=self.paper_knots, meta=dict(self.meta))

    # --- accumulation (the only paths that change the sums) -----------------------------------
    def bin_index(self, lam: Tensor) -> Tensor:
        """Bin of each λ (values on an edge go to the upper bin)."""
        e = self.lambda_edges.to(lam.device)
        return (torch.searchsorted(e, lam.to(torch.float64).contiguous(), right=True) - 1).clamp(0, e.numel() - 2)

    def update(self, lam: Tensor, error: Tensor, valid: Tensor | None = None) -> Tensor:
        """Add a batch of errors ``error = ε̂ - ε`` (``[B, ...]``) at noise levels ``lam`` (logSNR, ``[B]``).

        Samples with a non-finite λ or error, or ``valid == False``, are left out. Runs on the profile's device
        without a host sync. Returns the number of samples left out (a 0-d tensor).
        """
        lam = lam.detach().to(self.sums.device, torch.float64).reshape(-1)
        e = error.detach().to(self.sums.device, torch.float64).flatten(1)
        if e.shape[0] != lam.shape[0]:
            raise ValueError(f"error has {e.shape[0]} samples but lam has {lam.shape[0]}.")
        e2 = e * e
        rows = torch.stack([torch.ones_like(lam), lam, torch.full_like(lam, float(e.shape[1])), e.sum(1), e2.sum(1),
                            (e2 * e).sum(1), (e2 * e2).sum(1)])
        ok = torch.isfinite(rows).all(0)
        if valid is not None:
            ok = ok & valid.to(ok.device).reshape(-1)
        rows = torch.where(ok, rows, torch.zeros_like(rows))
        idx = torch.where(ok, self.bin_index(torch.where(ok, lam, torch.zeros_like(lam))), 0)
        self.sums.index_add_(1, idx, rows)
        return (~ok).sum()

    def __add__(self, other: ErrorProfile) -> ErrorProfile:
        if not torch.equal(self.lambda_edges.cpu(), other.lambda_edges.cpu()):
            raise ValueError("Cannot merge ErrorProfiles with different bin edges.")
        return ErrorProfile(self.lambda_edges, sums=self.sums + other.sums.to(self.sums.device),
                            moments=min(self.moments, other.moments), source=self.source, meta=dict(self.meta))

    def reset(self) -> None:
        """Set all sums to 0."""
        self.sums.zero_()

    def scale_(self, factor: float) -> None:
        """Multiply all sums by ``factor`` (exponential decay of old statistics)."""
        self.sums.mul_(factor)

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
        if lam.numel() < 2:
            raise ValueError(f"The error profile has data at one noise level only (alpha_bar="
                             f"{float(torch.sigmoid(lam[0])):.6g}); MSE(alpha_bar) needs 2 or more: measure more "
                             "samples or bins.")
        _check_mse(torch.sigmoid(lam), mse)
        if mode == "paper":
            return PiecewiseLinearMSE(torch.sigmoid(lam), mse)
        if bool((mse <= 0).any()):
            raise ValueError("The fit works on log MSE and needs MSE > 0 in every non-empty bin.")
        return PchipLogMSE(lam, mse)

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only (loads with ``torch.load(weights_only=True)``)."""
        d: dict[str, Any] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
                             "lambda_edges": self.lambda_edges.cpu(),
                             "moments": self.moments, "source": self.source, "meta": dict(self.meta)}
        d.update({k: self.sums[i].cpu().clone() for i, k in enumerate(SUM_ROWS)})
        if self.paper_knots is not None:
            d["paper_knots"] = {"alpha_bar": self.paper_knots[0], "mse": self.paper_knots[1]}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorProfile:
        """The profile of :meth:`to_dict` (format and version checked)."""
        check_format(d, PROFILE_FORMAT, "error profile")
        missing = [k for k in ("lambda_edges", *SUM_ROWS) if k not in d]
        if missing:
            raise ValueError(f"error profile: lacks {', '.join(missing)}.")
        pk = d.get("paper_knots")
        return cls(d["lambda_edges"], **{k: d[k] for k in SUM_ROWS}, moments=int(d.get("moments", 4)),
                   source=str(d.get("source", "")), meta=dict(d.get("meta", {})),
                   paper_knots=(pk["alpha_bar"], pk["mse"]) if pk else None)

    def to_tsv(self) -> str:
        """The reference's ``ts alpha_bar MSE`` text format (``ts`` = bin number), non-empty bins only."""
        k = self.nonempty
        ab, mse = self.alpha_bar[k], self.mse[k]
        order = torch.argsort(ab, descending=True)
        rows = "".join(f"{i + 1:4d}\t{float(ab[j]):.8f}\t{float(mse[j]):.8f}\n" for i, j in enumerate(order))
        return f"# vrg-lightning error profile ({self.source})\n#\n# ts\talpha_bar\tMSE\n" + rows


def _table_levels(ab: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct λ (increasing) of an MSE table's rows with 0 < ᾱ < 1 and their MSE (the mean of rows sharing an
    ᾱ, which must agree within :data:`DUPLICATE_RTOL`); see :meth:`ErrorProfile.from_table`."""
    _check_mse(ab, m)
    keep = (ab > 0) & (ab < 1)
    if not bool(keep.any()):
        raise ValueError("The MSE table has no row with 0 < alpha_bar < 1.")
    lam = alpha_bar_to_lambda(ab[keep])
    order = torch.argsort(lam)
    lam, inverse = torch.unique(lam[order], return_inverse=True)
    if lam.numel() < 2:
        raise ValueError(f"An MSE table needs rows at 2 or more noise levels with 0 < alpha_bar < 1; got only "
                         f"alpha_bar={float(ab[keep][0]):.8g}. One row does not determine MSE(alpha_bar).")
    mk = m[keep][order]
    rows = torch.zeros_like(lam).index_add_(0, inverse, torch.ones_like(mk))
    hi = torch.zeros_like(lam).scatter_reduce_(0, inverse, mk, "amax", include_self=False)
    lo = torch.zeros_like(lam).scatter_reduce_(0, inverse, mk, "amin", include_self=False)
    bad = torch.nonzero(hi - lo > DUPLICATE_RTOL * hi).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"The MSE table has rows at alpha_bar={float(torch.sigmoid(lam[i])):.8g} with conflicting "
                         f"MSE ({float(lo[i]):.6g} and {float(hi[i]):.6g}); give one MSE per noise level (rows that "
                         f"agree within {DUPLICATE_RTOL:.0%} are averaged).")
    return lam, torch.zeros_like(lam).index_add_(0, inverse, mk) / rows


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
    ab, mse = [], []
    text = read_text_file(p, "Profile file", "'ts alpha_bar MSE' rows (or a torch profile/checkpoint)")
    for i, line in enumerate(text.splitlines(), 1):
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
    """Load a profile: the toolkit's ``.pt`` files, checkpoints holding ``vrg.profile`` (their ``vrg`` format and
    version checked), or a reference TSV.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is unreadable or holds no (valid) profile; the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Profile file {str(p)!r} does not exist.")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        obj = load_torch_file(p, "Profile file")
        name = f"profile file {str(p)!r}"
        if isinstance(obj, Mapping) and isinstance(obj.get("vrg"), Mapping):  # a checkpoint: its vrg section
            check_format(obj["vrg"], "vrg-lightning", f"{name} (vrg section)", required=False)
            obj = obj["vrg"].get("profile")
            name += " (vrg.profile)"
        if not isinstance(obj, Mapping):
            raise ValueError(f"{str(p)!r} holds no vrg profile.")
        try:
            return ErrorProfile.from_dict(obj)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: {exc}") from exc
    ab, mse = read_reference_tsv(p)
    try:
        return ErrorProfile.from_table(ab, mse, source=f"table:{p.name}")
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc


def save_profile(path: str | os.PathLike, profile: ErrorProfile) -> None:
    """Save as ``.pt`` (plain dict) or, for ``.tsv``/``.txt`` paths, the reference text format; atomic."""
    p = Path(path)
    if p.suffix in (".tsv", ".txt"):
        atomic_write_text(p, profile.to_tsv())
    else:
        atomic_torch_save(p, profile.to_dict())
