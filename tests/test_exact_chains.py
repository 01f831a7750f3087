"""The exact chain forms of the solver-aware loss against the one cpe implementation (``variance.cpe_solver``): the
singlestep solvers' groups and the linear multistep solvers' windows. Value and gradient equal it for every length and
group pattern and both trust regions; a grid pass is the exact minimum over its product grid (brute force, pinned
start too); the optimizer's result for these solvers is a minimum of the exact loss on grids of several scales and
below the base and the paper optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import assert_loss_and_gradient_are_cpe_solver, profile_mse

from vrg_lightning.optimize import OptimizeSettings, SearchProblem, optimize_trajectory
from vrg_lightning.optimize.chain import grid_pass
from vrg_lightning.optimize.groups import GROUPED, GroupedProblem, group_pass, group_runs
from vrg_lightning.optimize.windows import LINEAR, WINDOW_RESOLUTION, WindowProblem, linear_weights, window_pass
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.solvers import _singlestep_orders
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import cpe_solver, propagation

SCHED = NoiseSchedule()


def grouped(solver: str, ab: torch.Tensor, trust: str = "alpha", pin: bool = False, lp: float = 0.05,
            mode: str = "paper") -> GroupedProblem:
    s = OptimizeSettings(lp=lp, mse_mode=mode, objective="solver", solver=solver, trust=trust, pin_start=pin)
    return GroupedProblem(SearchProblem(ab, profile_mse(mode), s))


def assert_pass_is_the_minimum_over_its_grid(prob: SearchProblem, grid_pass_fn) -> None:
    """A pass at scale 0.02 with offsets -1, 0, 1 returns the brute-force minimum of its product grid (box and pinned
    start kept), which is below the start point (so the grid holds a better point: the pass means something)."""
    y, h, k = prob.y0 + 0.3 * (prob.hi - prob.y0), 0.02, 1
    got = grid_pass_fn(prob, y, h, k=k)
    best = np.inf
    for c in itertools.product(range(-k, k + 1), repeat=prob.n):
        step = h * np.array(c, dtype=float)
        yy = y + (np.diff(step, prepend=0.0) if prob.alpha else step)
        if (yy < prob.lo).any() or (yy > prob.hi).any() or (prob.pinned and c[-1] != 0):
            continue
        best = min(best, prob.loss(yy))
    assert prob.loss(got) == pytest.approx(best, rel=1e-14)
    assert prob.loss(got) < prob.loss(y)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 12, 13])
def test_groups_cover_the_trajectory_as_the_solver_orders_it(order: int, n: int) -> None:
    runs = group_runs(n, order)
    assert runs[0] == (-1, 1)  # the step into σ = 0 first
    assert [a for a, _ in runs[1:]] == [a + length for a, length in runs[:-1]]  # contiguous
    assert runs[-1][0] + runs[-1][1] == n - 1  # up to the noisiest value
    orders = _singlestep_orders(n, order, True, True)  # noisiest first
    for a, length in runs:  # a group's steps have the orders 1..L, from its noisiest value
        k = n - 1 - (a + length)
        assert orders[k:k + length] == list(range(1, length + 1))
    assert sum(length for _, length in runs) == n


@pytest.mark.parametrize("solver", sorted(GROUPED))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 10, 40])
@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_grouped_loss_and_gradient_are_cpe_solver(solver: str, n: int, trust: str) -> None:
    assert_loss_and_gradient_are_cpe_solver(grouped(solver, make_trajectory(SCHED, "time_quadratic", n), trust))


@pytest.mark.parametrize("solver", sorted(GROUPED))
@pytest.mark.parametrize("trust, pin", [("alpha", False), ("alpha", True), ("logsnr", False)])
def test_group_pass_is_the_minimum_over_its_grid(solver: str, trust: str, pin: bool) -> None:
    assert_pass_is_the_minimum_over_its_grid(grouped(solver, make_trajectory(SCHED, "logSNR", 6), trust, pin),
                                             group_pass)


def windowed(solver: str, ab: torch.Tensor, trust: str = "alpha", pin: bool = False) -> WindowProblem:
    s = OptimizeSettings(lp=0.05, mse_mode="paper", objective="solver", solver=solver, trust=trust, pin_start=pin)
    return WindowProblem(SearchProblem(ab, profile_mse(), s))


@pytest.mark.parametrize("solver", LINEAR)
@pytest.mark.parametrize("n", [4, 5, 9, 30])
def test_linear_weights_are_the_solver_code_on_any_trajectory(solver: str, n: int) -> None:
    jac, ends = linear_weights(solver, n)
    for base in ("time_uniform", "logSNR"):  # not the trajectory they were found on
        ab = make_trajectory(SCHED, base, n)
        p = propagation(solver, ab)
        s = ((1 - ab) / ab).sqrt().numpy()
        w = p.weights.numpy()  # (J by differences: exact but for rounding, about 1e-13 of the largest weight)
        assert np.abs(jac @ s - w).max() <= 1e-11 * np.abs(w).max()
        assert np.allclose(1 / (1 + s[ends[:, 0]] * s[ends[:, 1]]), p.alpha_bar.numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", ["deis", "dpmpp_2m"])
def test_solvers_whose_weights_are_not_linear_are_refused(solver: str) -> None:
    with pytest.raises(ValueError, match="no constant linear weights"):
        linear_weights(solver, 8)


@pytest.mark.parametrize("solver", LINEAR)
@pytest.mark.parametrize("n", [4, 6, 10, 40])
@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_window_loss_and_gradient_are_cpe_solver(solver: str, n: int, trust: str) -> None:
    assert_loss_and_gradient_are_cpe_solver(windowed(solver, make_trajectory(SCHED, "time_quadratic", n), trust))


@pytest.mark.parametrize("solver", LINEAR)
@pytest.mark.parametrize("n, trust, pin", [(6, "alpha", False), (6, "alpha", True), (6, "logsnr", False),
                                           (4, "alpha", False)])
def test_window_pass_is_the_minimum_over_its_grid(solver: str, n: int, trust: str, pin: bool) -> None:
    assert_pass_is_the_minimum_over_its_grid(windowed(solver, make_trajectory(SCHED, "logSNR", n), trust, pin),
                                             window_pass)


@pytest.mark.parametrize("solver, exact, grid_pass_fn, scales", [
    *((s, GroupedProblem, group_pass, (1e-2, 1e-4, 1e-6)) for s in sorted(GROUPED)),
    *((s, WindowProblem, window_pass, (1e-2, 1e-4, 10 * WINDOW_RESOLUTION)) for s in LINEAR)])
def test_exact_chain_result_is_a_grid_minimum_of_cpe_solver(solver: str, exact, grid_pass_fn, scales) -> None:
    """The optimizer's trajectory for a solver with an exact chain: no pass of that chain at several scales (down to
    its resolution) improves the exact loss (nor does the paper objective's chain pass applied to it), and it is below
    the base and the paper optimum."""
    base = make_trajectory(SCHED, "time_quadratic", 12)
    mse = profile_mse()
    s = OptimizeSettings(lp=0.05, mse_mode="paper", objective="solver", solver=solver)
    r = optimize_trajectory(base, mse, s)
    paper = optimize_trajectory(base, mse, OptimizeSettings(lp=0.05, mse_mode="paper"))
    prob = exact(SearchProblem(base, mse, s))
    y = prob.feasible(prob.vars.from_alpha_bar(r.alpha_bar))
    f = prob.loss(y)
    assert f == pytest.approx(r.loss, rel=1e-12)
    assert r.cpe_after == pytest.approx(float(cpe_solver(r.alpha_bar, mse, solver)), rel=1e-12)
    assert r.loss < prob.loss(prob.feasible(prob.vars.from_alpha_bar(paper.alpha_bar))) < r.loss_before
    for h in scales:
        assert prob.loss(grid_pass_fn(prob, y, h)) >= f * (1 - 1e-12)
    chain = SearchProblem(base, mse, s)  # the paper terms' pass proposes other joint moves; none helps the exact loss
    assert prob.loss(grid_pass(chain, y, 1e-4)) >= f * (1 - 1e-12)
