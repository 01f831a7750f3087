"""The VRG optimizer: trust region, monotonicity, optimality against brute force, pinning, determinism, errors."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from helpers import REF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrg_lightning.optimize import (
    OptimizeResult,
    OptimizeSettings,
    SearchProblem,
    Variables,
    optimize_trajectory,
    optimize_with_profile,
    schedule_range,
    trajectory_loss,
    trust_bounds,
)
from vrg_lightning.optimize.chain import grid_pass
from vrg_lightning.profile import ErrorProfile, load_profile
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_lambda
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import cpe_paper, cpe_solver

SCHED = NoiseSchedule()


def bumpy_table(rows: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """An MSE table with kinks and wiggles (local minima for the optimizer), like a measured one."""
    ab = SCHED.alphas_cumprod[torch.linspace(0, 999, rows).round().long()]
    lam = alpha_bar_to_lambda(ab)
    mse = 0.3 * torch.sigmoid(lam - 2) + 0.02 * ab + 0.03 * torch.sin(6 * lam) ** 2 + 1e-5
    return ab, mse


@pytest.fixture(scope="module")
def profile() -> ErrorProfile:
    return ErrorProfile.from_table(*bumpy_table())


@pytest.fixture(scope="module")
def mse_paper(profile: ErrorProfile):
    return profile.mse_function("paper")


def np_loss(alpha_bar: np.ndarray, knots: tuple[np.ndarray, np.ndarray], base_end: float, reg: float) -> np.ndarray:
    """Independent loss for brute force: np.interp for the MSE, the paper formula row-wise."""
    xp, fp = knots
    s = np.sqrt((1 - alpha_bar) / alpha_bar)
    ds = np.diff(s, axis=-1, prepend=0.0)
    return (ds**2 * np.interp(alpha_bar, xp, fp)).sum(-1) + reg * (alpha_bar[..., -1] - base_end) ** 2


def brute_force(base: torch.Tensor, mse_fn, s: OptimizeSettings, grid: int) -> float:
    """Dense grid over the trust box (per-step ratios, or λ for ``logsnr``), then zooms around the best 20 points."""
    lo, hi = trust_bounds(base, s)
    knots = (mse_fn.alpha_bar.numpy(), mse_fn.mse.numpy())
    end, n = float(base[-1]), base.numel()
    reg = 0.0 if s.pin_start else s.reg_lambda
    pin_ratio = s.pin_start and s.trust == "alpha"

    def evaluate(axes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
        if pin_ratio:  # the last ratio is whatever lands exactly on the pinned end
            last = end / np.prod(mesh, -1)
            keep = (last >= lo[-1]) & (last <= hi[-1])
            mesh = np.concatenate([mesh, last[:, None]], -1)[keep]
        ab = np.cumprod(mesh, -1) if s.trust == "alpha" else 1 / (1 + np.exp(-mesh))
        if s.pin_start:
            ab[:, -1] = end
        return np_loss(ab, knots, end, reg), mesh

    free = n - 1 if pin_ratio else n
    vals, pts = evaluate([np.linspace(lo[i], hi[i], grid) for i in range(free)])
    best = float(vals.min())
    step = (hi - lo) / (grid - 1)
    for idx in np.argsort(vals)[:20]:
        centre, width = pts[idx], step.copy()
        for _ in range(4):
            axes = [np.clip(np.linspace(centre[i] - width[i], centre[i] + width[i], 9), lo[i], hi[i])
                    for i in range(free)]
            v, p = evaluate(axes)
            if v.size:
                k = int(np.argmin(v))
                best, centre = min(best, float(v[k])), p[k]
            width = width / 4
    return best


def check_valid(r: OptimizeResult, s: OptimizeSettings) -> None:
    ab = r.alpha_bar
    assert ab.dtype == torch.float64 and ab.shape == r.base_alpha_bar.shape
    assert bool(((ab > 0) & (ab < 1)).all()) and bool((ab[1:] < ab[:-1]).all())
    lo, hi = trust_bounds(r.base_alpha_bar, s)
    if s.trust == "alpha":
        x = (ab / torch.cat([ab.new_ones(1), ab[:-1]])).numpy()
    else:
        x = alpha_bar_to_lambda(ab).numpy()
    tol = 1e-12 * np.maximum(1.0, np.abs(x))
    assert (x >= lo - tol).all() and (x <= hi + tol).all(), (x, lo, hi)
    assert r.loss <= r.loss_before


CASES = [(base, n, trust, pin) for base in ("time_quadratic", "logSNR", "karras") for n in (3, 8)
         for trust in ("alpha", "logsnr") for pin in (False, True)]


@pytest.mark.parametrize("base,n,trust,pin", CASES)
def test_result_in_trust_region_and_no_worse(mse_paper, base: str, n: int, trust: str, pin: bool) -> None:
    ab = make_trajectory(SCHED, base, n)
    s = OptimizeSettings(lp=0.05, reg_lambda=100.0, mse_mode="paper", trust=trust, pin_start=pin)
    r = optimize_trajectory(ab, mse_paper, s)
    check_valid(r, s)
    assert r.loss < r.loss_before  # a bumpy profile always leaves room to improve
    if pin:
        assert float(r.alpha_bar[-1]) == float(ab[-1])  # bit-exact
    cpe, loss = trajectory_loss(r.alpha_bar, ab, mse_paper, s)
    assert cpe == pytest.approx(r.cpe_after, rel=1e-14) and loss == pytest.approx(r.loss, rel=1e-14)
    assert r.cpe_before == pytest.approx(float(cpe_paper(ab, mse_paper)), rel=1e-14)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), lp=st.floats(0.001, 0.9),
       reg=st.sampled_from([0.0, 1.0, 100.0, 1e6]), trust=st.sampled_from(["alpha", "logsnr"]), pin=st.booleans())
def test_any_trajectory_never_gets_worse(mse_paper, n: int, seed: int, lp: float, reg: float, trust: str,
                                          pin: bool) -> None:
    g = np.random.default_rng(seed)
    ab = torch.tensor(np.sort(g.uniform(1e-5, 0.9999, n))[::-1].copy(), dtype=torch.float64)
    if n > 1 and not bool((ab[1:] < ab[:-1]).all()):
        return
    s = OptimizeSettings(lp=lp, reg_lambda=reg, mse_mode="paper", trust=trust, pin_start=pin, global_grid=50)
    r = optimize_trajectory(ab, mse_paper, s)
    check_valid(r, s)


BRUTE = {3: [0.93, 0.6, 0.15], 4: [0.97, 0.8, 0.4, 0.06]}


@pytest.mark.parametrize("n,lp,grid,pin", [(3, 0.3, 90, False), (3, 0.1, 120, True), (4, 0.1, 32, False),
                                           (4, 0.3, 40, True)])
def test_matches_brute_force(mse_paper, n: int, lp: float, grid: int, pin: bool) -> None:
    """Against exhaustive search; the 4-step cases have a local minimum that a local method from the base ends in."""
    ab = torch.tensor(BRUTE[n], dtype=torch.float64)
    s = OptimizeSettings(lp=lp, reg_lambda=10.0, mse_mode="paper", pin_start=pin)
    r = optimize_trajectory(ab, mse_paper, s)
    best = brute_force(ab, mse_paper, s, grid)
    assert r.loss <= best + 1e-12 * best  # the optimizer is at least as good as the exhaustive search
    assert r.loss >= best - 1e-2 * best  # and the exhaustive search is fine enough to mean something


@pytest.mark.parametrize("pin", [False, True])
def test_logsnr_trust_matches_brute_force(mse_paper, pin: bool) -> None:
    ab = torch.tensor(BRUTE[3], dtype=torch.float64)
    s = OptimizeSettings(lp=0.5, reg_lambda=10.0, mse_mode="paper", trust="logsnr", pin_start=pin)
    r = optimize_trajectory(ab, mse_paper, s)
    best = brute_force(ab, mse_paper, s, 60)
    assert best - 1e-2 * best <= r.loss <= best + 1e-12 * best


def test_deterministic(mse_paper) -> None:
    ab = make_trajectory(SCHED, "time_quadratic", 8)
    s = OptimizeSettings(lp=0.05, mse_mode="paper")
    a, b = optimize_trajectory(ab, mse_paper, s), optimize_trajectory(ab.clone(), mse_paper, s)
    assert torch.equal(a.alpha_bar, b.alpha_bar)
    da, db = a.to_dict(), b.to_dict()
    da.pop("seconds"), db.pop("seconds")
    assert da == db


def test_fit_mode_and_profile_helper(profile: ErrorProfile) -> None:
    ab = make_trajectory(SCHED, "time_uniform", 10)
    s = OptimizeSettings(lp=0.05, mse_mode="fit")
    r = optimize_with_profile(ab, profile, s)
    check_valid(r, s)
    assert r.loss < r.loss_before
    assert r.cpe_before == pytest.approx(float(cpe_paper(ab, profile.mse_function("fit"))), rel=1e-14)


def torch_chain_loss(prob: SearchProblem, y: torch.Tensor, mse_fn) -> torch.Tensor:
    """The chain loss written independently in torch: r_i (s_i - s_{i-1})² MSE + separable part + penalty."""
    ab = prob.vars.alpha_bar(y)
    s = torch.sqrt((1 - ab) / ab)
    sp = torch.cat([s.new_zeros(1), s[:-1]])
    q = (s - sp) ** 2
    if prob.term_weights is not None:
        q = q * torch.as_tensor(prob.term_weights)
    loss = (q * mse_fn(ab)).sum() + prob.penalty * (ab[-1] - prob.end) ** 2
    if prob.lin is not None:
        loss = loss + (torch.as_tensor(prob.lin) * y).sum()
    if prob.mu:
        loss = loss + 0.5 * prob.mu * ((y - torch.as_tensor(prob.center)) ** 2).sum()
    return loss


@pytest.mark.parametrize("mode", ["paper", "fit"])
@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
@pytest.mark.parametrize("terms", ["paper", "weighted"])
def test_search_loss_equals_torch_reference(profile: ErrorProfile, mode: str, trust: str, terms: str) -> None:
    """The search's numpy loss and analytic gradient are the torch formula (autograd): the paper cpe plus the start
    penalty, and with weighted terms and separable parts; a torch-only MSE (through numpy_mse) gives the same."""
    mse_fn = profile.mse_function(mode)
    ab = make_trajectory(SCHED, "logSNR", 9)
    s = OptimizeSettings(mse_mode=mode, trust=trust)
    fast, plain = SearchProblem(ab, mse_fn, s), SearchProblem(ab, lambda a: mse_fn(a), s)  # plain: no numpy form
    g = np.random.default_rng(0)
    if terms == "weighted":
        weights, lin = 0.2 + g.random(fast.n), g.standard_normal(fast.n)
        for p in (fast, plain):
            p.term_weights, p.lin, p.mu, p.center = weights, lin, 0.3, p.y0 + 0.01
    ys = fast.lo + (fast.hi - fast.lo) * g.random((5, fast.n))
    for y in ys:
        yt = torch.tensor(y, requires_grad=True)
        want = torch_chain_loss(fast, yt, mse_fn)
        (want_g,) = torch.autograd.grad(want, yt)
        for p in (fast, plain):
            f1, g1 = p.value_and_grad(y)
            assert f1 == pytest.approx(float(want.detach()), rel=1e-12)
            np.testing.assert_allclose(g1, want_g.numpy(), rtol=1e-7, atol=1e-12)
    if terms == "paper":
        abs_ = fast.vars.alpha_bar(torch.as_tensor(ys))
        want = cpe_paper(abs_, mse_fn) + s.reg_lambda * (abs_[:, -1] - ab[-1]) ** 2
        np.testing.assert_allclose(fast.losses(ys), want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("trust,pin,terms", [("alpha", False, "paper"), ("alpha", True, "weighted"),
                                             ("logsnr", False, "weighted"), ("logsnr", True, "paper")])
def test_grid_pass_is_the_minimum_over_its_grid(mse_paper, trust: str, pin: bool, terms: str) -> None:
    """One pass of the grid refinement returns the best allowed point of the product grid z_i + h·(-k..k):
    exhaustive enumeration of the 5^4 combinations (the dynamic programme is exact on its grid)."""
    import itertools

    ab = make_trajectory(SCHED, "time_quadratic", 4)
    s = OptimizeSettings(lp=0.05, mse_mode="paper", trust=trust, pin_start=pin)
    prob = SearchProblem(ab, mse_paper, s)
    g = np.random.default_rng(3)
    if terms == "weighted":
        prob.term_weights = 1 + g.random(prob.n)
        prob.lin = 0.01 * g.standard_normal(prob.n)
    y = prob.y0 + 0.3 * (prob.hi - prob.lo) * (g.random(prob.n) - 0.5)
    y = prob.feasible(np.clip(y, prob.lo, prob.hi))
    h, k = 0.2 * float(np.max(prob.hi - prob.lo)) / 2, 2
    got = grid_pass(prob, y, h, k=k)
    best = math.inf
    z = prob.vars.coords(y)
    for offs in itertools.product(range(-k, k + 1), repeat=prob.n):
        off = h * np.array(offs, dtype=np.float64)
        if pin and offs[-1] != 0:
            continue
        cand = np.diff(off, prepend=0.0) + y if prob.alpha else y + off
        ok = (cand >= prob.lo).all() and (cand <= prob.hi).all() and (not prob.alpha or (z + off < 0).all())
        if ok:
            best = min(best, prob.loss(cand))
    assert got is not None and prob.loss(got) == pytest.approx(best, rel=1e-12)
    assert prob.loss(got) <= prob.loss(y) + 1e-15


@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_variables_round_trip_and_pinned_projection(trust: str) -> None:
    """y <-> alpha_bar in torch and numpy are inverse to each other; the pinned projection lands in the box with the
    noisiest alpha_bar held, and is the identity on points that already satisfy both."""
    ab = make_trajectory(SCHED, "time_quadratic", 7)
    v = Variables(ab, OptimizeSettings(lp=0.05, trust=trust, pin_start=True))
    y = v.from_alpha_bar(ab)
    np.testing.assert_allclose(v.from_alpha_bar_np(ab.numpy()), y, rtol=1e-12)
    torch.testing.assert_close(v.alpha_bar(torch.as_tensor(y)), ab, rtol=1e-12, atol=0)
    np.testing.assert_allclose(v.alpha_bar_np(y[None])[0], ab.numpy(), rtol=1e-12)
    np.testing.assert_allclose(v.coords(y), v.coords_of_alpha_bar(ab.numpy()), rtol=1e-12)
    if trust == "alpha":
        g = np.random.default_rng(1)
        p = v.project_pinned(y + 0.05 * g.standard_normal(y.size))
        assert (p >= v.lo - 1e-15).all() and (p <= v.hi + 1e-15).all()
        assert p.sum() == pytest.approx(v.log_end, abs=1e-12)
        np.testing.assert_allclose(v.project_pinned(v.y0), v.y0, atol=1e-15)


def test_trust_bounds_formula() -> None:
    ab = torch.tensor([0.995, 0.9, 0.3, 0.003], dtype=torch.float64)
    a0 = np.array([0.995, 0.9 / 0.995, 0.3 / 0.9, 0.01])
    lo, hi = trust_bounds(ab, OptimizeSettings(lp=0.02))
    d = np.minimum(0.02, np.minimum(a0, 1 - a0))
    np.testing.assert_allclose(lo[:-1], (a0 - d)[:-1], rtol=1e-12)
    np.testing.assert_allclose(hi[1:], (a0 + d)[1:], rtol=1e-12)
    assert a0[0] < hi[0] < 1  # would touch 1: kept a hair inside
    assert 0 < lo[-1] == pytest.approx(1e-6 * a0[-1])  # d = alpha would reach 0: kept a hair above it
    lam = alpha_bar_to_lambda(ab).numpy()
    lo, hi = trust_bounds(ab, OptimizeSettings(lp=0.2, trust="logsnr", pin_start=True))
    gaps = -np.diff(lam)
    nearest = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])
    np.testing.assert_allclose(hi[:-1] - lam[:-1], 0.1 * nearest[:-1], rtol=1e-12)
    assert lo[-1] == hi[-1] == lam[-1]


def test_settings_and_result_round_trip(mse_paper) -> None:
    s = OptimizeSettings(lp=0.2, reg_lambda=1e4, objective="paper", solver="dpmpp_2m", mse_mode="paper",
                         trust="logsnr", pin_start=True)
    d = s.to_dict()
    assert OptimizeSettings.from_dict(json.loads(json.dumps(d))) == s
    assert OptimizeSettings.from_dict({**d, "future_key": 1}) == s
    assert OptimizeSettings.from_dict({}) == OptimizeSettings()
    r = optimize_trajectory(make_trajectory(SCHED, "time_uniform", 5), mse_paper, s)
    rd = r.to_dict()
    assert json.loads(json.dumps(rd)) == rd
    assert rd["alpha_bar"] == r.alpha_bar.tolist() and rd["settings"] == d
    buf = io.BytesIO()
    torch.save(rd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == rd


@pytest.mark.parametrize(
    "kwargs,word",
    [({"lp": 0.0}, "lp"), ({"lp": 1.0}, "lp"), ({"lp": -0.1}, "lp"), ({"lp": math.nan}, "lp"), ({"lp": "0.1"}, "lp"),
     ({"reg_lambda": -1.0}, "reg_lambda"), ({"reg_lambda": math.nan}, "reg_lambda"),
     ({"reg_lambda": math.inf}, "reg_lambda"), ({"objective": "fid"}, "objective"), ({"solver": "euler"}, "solver"),
     ({"trust": "box"}, "trust"), ({"mse_mode": "spline"}, "mse_mode"), ({"pin_start": 1}, "pin_start"),
     ({"global_grid": -1}, "global_grid"), ({"max_rounds": 0}, "max_rounds")],
)
def test_bad_settings(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word) as e:
        OptimizeSettings(**kwargs)
    assert repr(next(iter(kwargs.values())))[:3] in str(e.value)  # the message shows the value received


@pytest.mark.parametrize(
    "values,word",
    [([0.5, 0.9], "decreasing"), ([1.0, 0.5], r"\(0, 1\)"), ([0.5, 0.0], r"\(0, 1\)"), ([], "non-empty"),
     ([0.9, math.nan], "finite"), ([[0.9, 0.5]], "1-D")],
)
def test_bad_trajectories(mse_paper, values: list, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        optimize_trajectory(torch.tensor(values, dtype=torch.float64), mse_paper)


def test_bad_mse_function() -> None:
    ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
    for fn in (lambda a: torch.full_like(a, math.nan), lambda a: -torch.ones_like(a), lambda a: torch.ones(3)):
        with pytest.raises(ValueError, match="mse_fn"):
            optimize_trajectory(ab, fn)
    with pytest.raises(ValueError, match="mse_fn"):
        optimize_trajectory(ab, 0.1)  # type: ignore[arg-type]


def test_solver_objective(mse_paper) -> None:
    ab = make_trajectory(SCHED, "time_uniform", 5)
    paper = optimize_trajectory(ab, mse_paper, OptimizeSettings(lp=0.05, mse_mode="paper"))
    ddim = optimize_trajectory(ab, mse_paper, OptimizeSettings(lp=0.05, mse_mode="paper", objective="solver"))
    assert ddim.loss == pytest.approx(paper.loss, rel=1e-9)  # the ddim solver-aware cpe is the paper's formula
    s = OptimizeSettings(lp=0.05, mse_mode="paper", objective="solver", solver="dpmpp_2m")
    r = optimize_trajectory(ab, mse_paper, s)
    check_valid(r, s)
    assert r.cpe_before == pytest.approx(float(cpe_solver(ab, mse_paper, "dpmpp_2m")), rel=1e-12)
    assert r.cpe_after == pytest.approx(float(cpe_solver(r.alpha_bar, mse_paper, "dpmpp_2m")), rel=1e-12)
    assert r.loss < r.loss_before


@pytest.mark.skipif(not (REF / "MSE_vs_alpha_bar_cifar10.txt").is_file(), reason="reference data not present")
def test_reference_headline_case() -> None:
    """The published setting (lp 0.01, λ 100, paper objective, 10-step time_quadratic): below the published 0.42383
    and at the best known optimum (0.41895)."""
    mse = load_profile(REF / "MSE_vs_alpha_bar_cifar10.txt").mse_function("paper")
    ab = make_trajectory(NoiseSchedule(), "time_quadratic", 10)
    r = optimize_trajectory(ab, mse, OptimizeSettings(mse_mode="paper"))
    assert r.cpe_before == pytest.approx(0.5014, abs=1e-4)
    assert r.loss <= 0.41900


def test_alpha_bar_range_keeps_the_cleanest_step_below_the_schedules_first_level() -> None:
    """15.5: with an MSE shaped like the published table (large at the clean end), the published setting moves the
    cleanest of 20 logSNR steps above ᾱ(t=0) = 0.9999; with the schedule's range it stays at or below it."""
    ab = SCHED.alphas_cumprod[::10]
    mse = ErrorProfile.from_table(ab, 0.6 * torch.sigmoid((alpha_bar_to_lambda(ab) - 2) / 2.5)).mse_function("paper")
    lo, hi = schedule_range(SCHED)
    base = make_trajectory(SCHED, "logSNR", 20)
    free = OptimizeSettings(mse_mode="paper")
    ranged = OptimizeSettings(mse_mode="paper", alpha_bar_range=[lo, hi])
    assert ranged.alpha_bar_range == (lo, hi) and ranged.to_dict()["alpha_bar_range"] == [lo, hi]
    r0, r1 = optimize_trajectory(base, mse, free), optimize_trajectory(base, mse, ranged)
    assert float(r0.alpha_bar[0]) > hi  # the problem being solved
    assert float(r1.alpha_bar[0]) <= hi and float(r1.alpha_bar[-1]) >= lo
    check_valid(r1, ranged)
    assert r0.loss <= r1.loss < r1.loss_before


@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_alpha_bar_range_keeps_the_noisiest_step_above_the_schedules_last_level(trust: str) -> None:
    """An MSE that vanishes below ᾱ(t=T-1) pulls a free noisiest step out of the range (in ``alpha`` trust a linear
    constraint on the variables, kept by the search); with the range it stays at or above ᾱ(t=T-1)."""
    ab = torch.tensor([0.999, 0.5, 0.1, 5e-5, 3e-5, 1e-6], dtype=torch.float64)
    mse = ErrorProfile.from_table(ab, torch.tensor([0.1, 0.1, 0.1, 0.1, 1e-6, 1e-6])).mse_function("paper")
    lo, hi = schedule_range(SCHED)
    base = torch.tensor([0.9, 0.1, 6e-5], dtype=torch.float64)
    free = OptimizeSettings(lp=0.3, reg_lambda=0.0, mse_mode="paper", trust=trust)
    ranged = OptimizeSettings(lp=0.3, reg_lambda=0.0, mse_mode="paper", trust=trust, alpha_bar_range=(lo, hi))
    r0, r1 = optimize_trajectory(base, mse, free), optimize_trajectory(base, mse, ranged)
    assert float(r0.alpha_bar[-1]) < lo  # the problem being solved
    assert float(r1.alpha_bar[-1]) >= lo * (1 - 1e-12) and float(r1.alpha_bar[0]) <= hi
    check_valid(r1, ranged)
    assert r0.loss <= r1.loss < r1.loss_before


def test_a_base_step_outside_the_range_is_not_moved_further_out(mse_paper) -> None:
    mse = mse_paper
    lo, hi = schedule_range(SCHED)
    base = torch.tensor([0.99995, 0.9, 0.5, 0.1, 2e-5], dtype=torch.float64)  # both ends outside
    s = OptimizeSettings(lp=0.3, reg_lambda=0.0, mse_mode="paper", alpha_bar_range=(lo, hi))
    r = optimize_trajectory(base, mse, s)
    assert float(r.alpha_bar[0]) <= 0.99995 and float(r.alpha_bar[-1]) >= 2e-5 * (1 - 1e-12)
    lo_b, hi_b = trust_bounds(base, s)
    assert hi_b[0] == pytest.approx(0.99995)  # clipped at the base's own value, not at hi


@pytest.mark.parametrize("kwargs,word", [({"alpha_bar_range": (0.5, 0.1)}, "alpha_bar_range"),
                                         ({"alpha_bar_range": (0.0, 0.9)}, "alpha_bar_range"),
                                         ({"alpha_bar_range": 0.9}, "alpha_bar_range")])
def test_bad_range(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        OptimizeSettings(**kwargs)


@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_steps_the_trust_region_cannot_keep_distinct_are_refused_at_once(mse_paper, trust: str) -> None:
    import time

    base = torch.tensor([0.9, 0.5, 0.5 * (1 - 1e-14), 0.1], dtype=torch.float64)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"alpha_bar steps 1 and 2 .* too close"):
        optimize_trajectory(base, mse_paper, OptimizeSettings(trust=trust, mse_mode="paper"))
    assert time.perf_counter() - t0 < 1.0


def test_no_input_makes_the_optimizer_run_for_minutes(mse_paper) -> None:
    """The largest trajectory a 1000-step schedule holds (1000 steps) optimises in seconds, paper objective."""
    import time

    base = make_trajectory(SCHED, "logSNR", 1000)
    t0 = time.perf_counter()
    r = optimize_trajectory(base, mse_paper, OptimizeSettings(mse_mode="paper", alpha_bar_range=schedule_range(SCHED)))
    assert time.perf_counter() - t0 < 60 and r.loss <= r.loss_before


def _pgd(fun, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int) -> float:
    """Projected subgradient descent with diminishing steps scaled by the box widths: the best value seen."""
    width = np.maximum(hi - lo, 1e-300)
    y, best = np.clip(y, lo, hi), math.inf
    for k in range(1, iters + 1):
        f, g = fun(y)
        best = min(best, f)
        gs = g * width
        norm = float(np.abs(gs).max())
        if not norm > 0:
            break
        y = np.clip(y - (0.3 / math.sqrt(k)) * width * gs / norm, lo, hi)
    return min(best, fun(y)[0])


def table_like_profile() -> ErrorProfile:
    """An MSE table shaped like the published CIFAR-10 one (large at the clean end, falling over five decades)."""
    ab = SCHED.alphas_cumprod[::10]
    return ErrorProfile.from_table(ab, 0.6 * torch.sigmoid((alpha_bar_to_lambda(ab) - 2) / 1.2))


@pytest.mark.parametrize("solver", ["dpmsolver2", "dpmsolver3", "dpmpp_2m", "deis", "plms", "pndm"])
@pytest.mark.parametrize("mode", ["paper", "fit"])
def test_solver_objective_never_worse_than_slow_searches(solver: str, mode: str) -> None:
    """For every solver whose solver-aware cpe is not the paper formula: the optimizer's loss is at most that of
    independent slow searches (projected subgradient on cpe_solver by autograd from the base, two random points and
    the paper optimum), which come within 5% of it (so they mean something)."""
    mse_paper = table_like_profile().mse_function(mode)
    base = make_trajectory(SCHED, "logSNR", 6)
    s = OptimizeSettings(lp=0.05, mse_mode=mode, objective="solver", solver=solver)
    r = optimize_trajectory(base, mse_paper, s)
    prob = SearchProblem(base, mse_paper, s)

    def fun(y: np.ndarray) -> tuple[float, np.ndarray]:
        yt = torch.tensor(y, requires_grad=True)
        ab = prob.vars.alpha_bar(yt)
        if not bool((ab[1:] < ab[:-1]).all()):
            return math.inf, np.zeros_like(y)
        loss = cpe_solver(ab, mse_paper, solver) + s.reg_lambda * (ab[-1] - base[-1]) ** 2
        (g,) = torch.autograd.grad(loss, yt)
        return float(loss.detach()), g.numpy()

    paper = optimize_trajectory(base, mse_paper, OptimizeSettings(lp=0.05, mse_mode=mode))
    rng = np.random.default_rng(0)
    starts = [prob.y0, prob.vars.from_alpha_bar(paper.alpha_bar)] + [
        prob.lo + (prob.hi - prob.lo) * rng.random(prob.n) for _ in range(2)]
    best = min(_pgd(fun, y, prob.lo, prob.hi, 200) for y in starts)
    assert r.loss <= best * (1 + 1e-9), (r.loss, best)
    assert r.loss >= best * (1 - 0.05)
    assert r.cpe_after == pytest.approx(float(cpe_solver(r.alpha_bar, mse_paper, solver)), rel=1e-12)


def test_a_deadline_stops_the_search_early_and_says_so(mse_paper) -> None:
    """A deadline already past stops every search at its first check: the result is flagged incomplete, took fewer
    evaluations than the full search, and is still a valid trajectory no worse than the base (paper and
    solver-aware objectives); no deadline, or one far off, gives the full result."""
    import time

    base = make_trajectory(NoiseSchedule(), "time_quadratic", 10)
    for s in (OptimizeSettings(mse_mode="paper"), *(OptimizeSettings(mse_mode="paper", objective="solver",
                                                                    solver=solver)
                                                   for solver in ("dpmpp_2m", "dpmsolver2"))):
        full = optimize_trajectory(base, mse_paper, s)
        late = optimize_trajectory(base, mse_paper, s, deadline=time.perf_counter() + 3600.0)
        cut = optimize_trajectory(base, mse_paper, s, deadline=time.perf_counter())
        assert full.complete and late.complete and late.loss == full.loss
        assert not cut.complete and cut.evaluations < full.evaluations
        assert full.loss <= cut.loss <= cut.loss_before and bool((cut.alpha_bar[1:] < cut.alpha_bar[:-1]).all())
        assert cut.to_dict()["complete"] is False
        resumed = optimize_trajectory(base, mse_paper, s, resume=cut.alpha_bar)  # continues from the cut's best
        assert resumed.complete and resumed.loss <= cut.loss and resumed.loss == pytest.approx(full.loss, rel=1e-6)
    with pytest.raises(ValueError, match="resume"):
        optimize_trajectory(base, mse_paper, s, resume=base[:-1])
