"""ErrorProfile: exact merging, moments against numpy/scipy, (de)serialisation, fits, clear errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from vrg_lightning.profile import (
    ErrorProfile,
    PchipLogMSE,
    PiecewiseLinearMSE,
    load_profile,
    read_reference_tsv,
    save_profile,
)
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_lambda
from vrg_lightning.trajectories import load_trajectory
from vrg_lightning.variance import cpe_paper

SCHED = NoiseSchedule()


def batch(seed: int, b: int = 6, shape: tuple[int, ...] = (3, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels and skewed, heavy-ish tailed errors (so every moment matters)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (b,), generator=g).double()
    e = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return SCHED.t_to_lambda(t), 0.3 * e + 0.1 * e**2 - 0.05


def filled(seeds: range, num_bins: int = 20) -> ErrorProfile:
    p = ErrorProfile.for_schedule(SCHED, num_bins=num_bins)
    for s in seeds:
        p.update(*batch(s))
    return p


def test_merge_equals_one_pass() -> None:
    a, b, both = filled(range(0, 5)), filled(range(5, 9)), filled(range(0, 9))
    merged = a + b
    for k in ("count", "lam_sum", "n", "s1", "s2", "s3", "s4"):
        torch.testing.assert_close(getattr(merged, k), getattr(both, k), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.mse, both.mse, equal_nan=True)
    assert a.count.sum() == 30  # the operands are untouched
    with pytest.raises(ValueError, match="bin edges"):
        _ = a + ErrorProfile.for_schedule(SCHED, num_bins=10)


def test_moments_match_numpy_and_scipy() -> None:
    p = ErrorProfile.for_schedule(SCHED, num_bins=10)
    g = torch.Generator().manual_seed(3)
    e = torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
    e = 0.5 * e + 0.2 * e**2 + 0.1 * e**3  # skewed and heavy tailed
    lam = torch.full((5,), float(SCHED.t_to_lambda(torch.tensor(500.0))), dtype=torch.float64)
    p.update(lam, e)
    k = int(torch.nonzero(p.nonempty)[0])
    assert int(p.nonempty.sum()) == 1
    x = e.flatten().numpy()
    assert float(p.mse[k]) == pytest.approx(float(np.mean(x**2)), rel=1e-12)
    assert float(p.mean[k]) == pytest.approx(float(np.mean(x)), rel=1e-12)
    assert float(p.std[k]) == pytest.approx(float(np.std(x)), rel=1e-10)
    assert float(p.skewness[k]) == pytest.approx(float(stats.skew(x)), rel=1e-9)
    assert float(p.excess_kurtosis[k]) == pytest.approx(float(stats.kurtosis(x)), rel=1e-9)
    assert float(p.lam[k]) == pytest.approx(float(lam[0]), rel=1e-12)
    g_ = p.gaussianity()
    assert set(g_) >= {"alpha_bar", "mse", "skewness", "excess_kurtosis"} and len(g_["mse"]) == 1


def test_update_skips_non_finite_rows() -> None:
    p = ErrorProfile.for_schedule(SCHED, num_bins=5)
    lam, e = batch(1, b=4)
    e[1] = math.nan
    lam[2] = math.nan
    p.update(lam, e)
    assert float(p.count.sum()) == 2 and bool(torch.isfinite(p.s2).all())


def test_dict_round_trip_through_torch_save() -> None:
    p = filled(range(4))
    p.meta["note"] = "x"
    buf = io.BytesIO()
    torch.save(p.to_dict(), buf)
    buf.seek(0)
    q = ErrorProfile.from_dict(torch.load(buf, weights_only=True))
    for k in ("lambda_edges", "count", "lam_sum", "n", "s1", "s2", "s3", "s4"):
        assert torch.equal(getattr(p, k), getattr(q, k))
    assert (q.moments, q.source, q.meta) == (p.moments, p.source, p.meta)
    t = ErrorProfile.from_table(torch.tensor([0.9, 0.5, 0.0]), torch.tensor([0.3, 0.2, 0.0]))
    buf = io.BytesIO()
    torch.save(t.to_dict(), buf)
    buf.seek(0)
    u = ErrorProfile.from_dict(torch.load(buf, weights_only=True))
    assert u.moments == 2 and torch.equal(u.paper_knots[0], t.paper_knots[0])
    x = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    torch.testing.assert_close(u.mse_function("paper")(x), t.mse_function("paper")(x))


def test_file_round_trips(tmp_path: Path) -> None:
    p = filled(range(6))
    save_profile(tmp_path / "p.pt", p)
    q = load_profile(tmp_path / "p.pt")
    assert torch.equal(q.s2, p.s2) and q.moments == 4
    torch.save({"state_dict": {}, "vrg": {"profile": p.to_dict()}}, tmp_path / "c.ckpt")  # a checkpoint holding one
    assert torch.equal(load_profile(tmp_path / "c.ckpt").s4, p.s4)
    save_profile(tmp_path / "p.tsv", p)
    ab, mse = read_reference_tsv(tmp_path / "p.tsv")
    k = p.nonempty
    order = torch.argsort(p.alpha_bar[k], descending=True)
    torch.testing.assert_close(ab, p.alpha_bar[k][order], rtol=0, atol=5e-9)
    torch.testing.assert_close(mse, p.mse[k][order], rtol=0, atol=5e-9)
    t = load_profile(tmp_path / "p.tsv")
    assert t.moments == 2 and t.num_bins == int(k.sum())
    torch.testing.assert_close(t.mse[t.nonempty].sort().values, mse.sort().values)


@pytest.mark.parametrize("mode", ["fit", "paper"])
def test_fits_positive_finite_everywhere(mode: str) -> None:
    p = ErrorProfile.for_schedule(SCHED, num_bins=50)
    for s in range(3):  # leaves many bins empty
        p.update(*batch(s, b=3))
    assert 0 < int(p.nonempty.sum()) < 50
    f = p.mse_function(mode)
    x = torch.cat([torch.tensor([1e-300, 1e-12, 1e-6]), torch.linspace(0.001, 0.999, 999),
                   torch.tensor([1 - 1e-9, 1 - 1e-15])]).double()
    y = f(x)
    assert bool(torch.isfinite(y).all()) and bool((y > 0).all())
    k = p.nonempty  # it interpolates: the bin values are reproduced at the bin centres
    torch.testing.assert_close(f(p.alpha_bar[k]), p.mse[k], rtol=1e-9, atol=0)
    xg = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    (gr,) = torch.autograd.grad(f(xg).sum(), xg)
    assert bool(torch.isfinite(gr).all())


def test_pchip_does_not_overshoot() -> None:
    lam = torch.tensor([-6.0, -2.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    mse = torch.tensor([0.01, 0.02, 0.5, 0.51, 0.9], dtype=torch.float64)
    f = PchipLogMSE(lam, mse)
    y = f(torch.sigmoid(torch.linspace(-8, 7, 2001, dtype=torch.float64)))
    assert bool((torch.diff(y) >= -1e-15).all())  # monotone data, monotone fit
    assert float(y.min()) >= 0.01 - 1e-15 and float(y.max()) <= 0.9 + 1e-15


def test_paper_mode_is_the_reference_interpolation() -> None:
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
    mse = torch.tensor([0.5, 0.3, 0.1, 0.02, 0.0], dtype=torch.float64)
    f = ErrorProfile.from_table(ab, mse).mse_function("paper")
    assert isinstance(f, PiecewiseLinearMSE)
    x = np.linspace(0, 0.9999, 301)
    np.testing.assert_allclose(f(torch.from_numpy(x)).numpy(), np.interp(x, ab.numpy()[::-1], mse.numpy()[::-1]),
                               rtol=1e-12, atol=1e-15)


def test_duplicate_rows_are_merged_when_they_agree_and_refused_when_they_conflict() -> None:
    ab = torch.tensor([0.9, 0.5, 0.5, 0.1], dtype=torch.float64)
    mse = torch.tensor([0.3, 0.2, 0.198, 0.05], dtype=torch.float64)  # one alpha_bar printed twice (rounding)
    p = ErrorProfile.from_table(ab, mse)
    assert p.num_bins == 3
    assert float(p.mse[torch.argmin((p.alpha_bar - 0.5).abs())]) == pytest.approx(0.199)
    assert bool(torch.isfinite(p.mse_function("paper")(torch.tensor([0.5, 0.5 + 1e-12]).double())).all())
    with pytest.raises(ValueError, match=r"alpha_bar=0.5 with conflicting MSE \(0.1 and 0.2\)"):
        ErrorProfile.from_table(ab, torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64))


@pytest.mark.parametrize(
    "ab,mse,word",
    [([0.9, 0.5], [0.1, math.nan], "finite"), ([0.9, 0.5], [0.1, -0.2], "non-negative"),
     ([0.9, 1.5], [0.1, 0.2], r"\[0, 1\)"), ([0.0], [0.0], "no row"),
     ([0.0, 0.5], [0.0, 0.1], "2 or more noise levels")],
)
def test_bad_tables(ab: list, mse: list, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        ErrorProfile.from_table(torch.tensor(ab), torch.tensor(mse))


def test_clear_errors(tmp_path: Path) -> None:
    empty = ErrorProfile.for_schedule(SCHED, num_bins=10)
    for mode in ("fit", "paper"):
        with pytest.raises(ValueError, match="empty"):
            empty.mse_function(mode)
    with pytest.raises(ValueError, match="mode"):
        filled(range(2)).mse_function("spline")
    with pytest.raises(ValueError, match="skewness"):
        _ = ErrorProfile.from_table(torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.2])).skewness
    with pytest.raises(ValueError, match="format"):
        ErrorProfile.from_dict({"format": "something-else"})
    with pytest.raises(ValueError, match="newer"):
        ErrorProfile.from_dict({**filled(range(1)).to_dict(), "version": 99})
    with pytest.raises(ValueError, match="num_bins"):
        ErrorProfile.for_schedule(SCHED, num_bins=0)
    with pytest.raises(ValueError, match="lambda_edges"):
        ErrorProfile(torch.tensor([1.0, 0.0]))
    bad = tmp_path / "bad.tsv"
    bad.write_text("# header\n1\t0.9\t0.1\n2\t0.5\n")
    with pytest.raises(ValueError, match=":3:"):
        load_profile(bad)
    bad.write_text("# only comments\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_profile(bad)
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="torch file"):
        load_profile(tmp_path / "x.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="no vrg profile"):
        load_profile(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "missing.tsv")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.sampled_from("0123456789.e-# \t\nnai"), max_size=100))
def test_tsv_parser_gives_a_profile_or_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.tsv"
    path.write_text(text)
    try:
        p = load_profile(path)
    except ValueError:
        return
    assert p.moments == 2 and p.num_bins >= 1
    f = p.mse_function("paper")
    assert bool(torch.isfinite(f(torch.tensor([0.3, 0.9], dtype=torch.float64))).all())


@pytest.mark.skipif(not (REF / "MSE_vs_alpha_bar_cifar10.txt").is_file(), reason="reference data not present")
def test_reference_table() -> None:
    p = load_profile(REF / "MSE_vs_alpha_bar_cifar10.txt")
    assert p.moments == 2 and p.paper_knots[0].numel() == 1001
    assert p.num_bins == 999  # 1001 rows - the safeguard row - one pair printed with the same alpha_bar
    ab = load_trajectory(REF / "trajectories" / "dpm_alphaBar_1-010-time_quadratic.txt")
    assert float(cpe_paper(ab, p.mse_function("paper"))) == pytest.approx(0.501388, abs=2e-6)  # README figure
    fit = p.mse_function("fit")
    x = torch.tensor(SCHED.alphas_cumprod[::37].tolist(), dtype=torch.float64)
    torch.testing.assert_close(fit(x), p.mse_function("paper")(x), rtol=0.05, atol=1e-6)
    assert bool((alpha_bar_to_lambda(p.alpha_bar)[1:] > alpha_bar_to_lambda(p.alpha_bar)[:-1]).all())
