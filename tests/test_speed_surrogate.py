"""The solver-aware search's fast paths against the one cpe implementation (``variance.cpe_solver``/``propagation``):
the banded finite-difference Jacobians of the weights and levels equal autograd's, for every solver, both trust
regions and a long trajectory (so the band, not a full differencing, is what is tested); the exact objective of the
search is ``cpe_solver`` plus the penalty, value and gradient; the weight model has the exact value and gradient at
its centre."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import profile_mse
from scipy import sparse

from vrg_lightning.optimize import OptimizeSettings, SearchProblem
from vrg_lightning.optimize.surrogate import COLORS, SPARSE_FROM, SolverObjective, WeightModel
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.solvers import SOLVERS
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import DDIM_LIKE, cpe_solver, propagation

SCHED = NoiseSchedule()
AWARE = [s for s in SOLVERS if s not in DDIM_LIKE]


def problem(solver: str, n: int, trust: str, mode: str = "paper", pin: bool = False) -> SearchProblem:
    s = OptimizeSettings(lp=0.05, mse_mode=mode, objective="solver", solver=solver, trust=trust, pin_start=pin)
    return SearchProblem(make_trajectory(SCHED, "logSNR", n), profile_mse(mode), s)


def moved(prob: SearchProblem) -> np.ndarray:
    """A point inside the box away from the base (every step moved)."""
    return prob.y0 + 0.3 * (prob.hi - prob.y0) * np.sin(np.arange(prob.n) + 1.0)


@pytest.mark.parametrize("solver", AWARE)
@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_banded_jacobians_equal_autograd(solver: str, trust: str) -> None:
    n = 3 * COLORS + 4  # long enough that values COLORS apart are moved together
    prob = problem(solver, n, trust)
    y = moved(prob)
    w, levels, jac, jac_levels = SolverObjective(prob).jacobians(y)

    def weights_and_levels(yt: torch.Tensor) -> torch.Tensor:
        p = propagation(solver, prob.vars.alpha_bar(yt))
        return torch.cat([p.weights, p.alpha_bar])

    ref = torch.autograd.functional.jacobian(weights_and_levels, torch.tensor(y)).numpy()
    with torch.no_grad():
        p = propagation(solver, prob.vars.alpha_bar(torch.tensor(y)))
    assert np.allclose(w, p.weights.numpy(), rtol=1e-12, atol=0)  # (dpmpp_2m, deis: the closed form, to rounding)
    assert np.allclose(levels, p.alpha_bar.numpy(), rtol=1e-14, atol=0)
    m = w.size
    scale = np.abs(ref[:m]).max()
    tol = 1e-3 if trust == "alpha" else 1e-5  # alpha: a column sums the differences of every later value
    assert np.abs(jac - ref[:m]).max() <= tol * scale, solver
    assert np.abs(jac_levels - ref[m:]).max() <= 1e-5 * max(np.abs(ref[m:]).max(), 1e-12)


@pytest.mark.parametrize("solver", AWARE)
@pytest.mark.parametrize("mode", ["paper", "fit"])
def test_exact_objective_is_cpe_solver_and_models_agree_at_their_centre(solver: str, mode: str) -> None:
    prob = problem(solver, 8, "alpha", mode)
    y = moved(prob)
    exact = SolverObjective(prob)
    f, g = exact.at(y)
    yt = torch.tensor(y, requires_grad=True)
    ab = prob.vars.alpha_bar(yt)
    loss = cpe_solver(ab, prob.mse_fn, solver) + prob.penalty * (ab[-1] - prob.end) ** 2
    (ref,) = torch.autograd.grad(loss, yt)
    assert f == pytest.approx(float(loss.detach()), rel=1e-13) and exact.value(y) == pytest.approx(f, rel=1e-13)
    assert np.allclose(g, ref.numpy(), rtol=1e-10, atol=1e-12 * np.abs(ref.numpy()).max())
    weight_model = exact.model(y, g)
    assert weight_model.value_and_grad(y)[0] == pytest.approx(f, rel=1e-9)
    for model in (weight_model, exact.chain_model(y, g)):  # the chain model: the gradient (pndm's midpoints aside)
        assert np.allclose(model.value_and_grad(y)[1], g, rtol=1e-7, atol=1e-9 * np.abs(g).max())


def test_pinned_start_has_no_jacobian_column_for_the_noisiest_step() -> None:
    prob = problem("dpmpp_2m", 6, "alpha", pin=True)
    exact = SolverObjective(prob)
    y = prob.feasible(moved(prob))
    f, g = exact.at(y)
    model = exact.model(y, g)
    assert not model.jacobian()[:, -1].any() and np.abs(model.jacobian()[:, :-1]).max() > 0


@pytest.mark.parametrize("n", [6, 3 * COLORS + 4])
def test_weight_model_jacobian_is_autograd_in_the_variables_that_can_move(n: int) -> None:
    """Short trajectories difference one free variable at a time, long ones use the banded Jacobians; either way the
    weight model's columns are autograd's where a variable can move and zero where a bound holds it."""
    prob = problem("deis", n, "alpha")
    y = moved(prob)
    y[1] = prob.lo[1]  # held by its lower bound when the gradient points outwards
    exact = SolverObjective(prob)
    f, g = exact.at(y)
    g[1] = abs(g[1]) + 1.0
    model = exact.model(y, g)
    ref = torch.autograd.functional.jacobian(
        lambda yt: propagation("deis", prob.vars.alpha_bar(yt)).weights, torch.tensor(y)).numpy()
    free = np.ones(n, dtype=bool)
    free[1] = False
    jac = model.jacobian()
    assert not jac[:, 1].any()
    assert np.abs(jac[:, free] - ref[:, free]).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("solver, trust", [("deis", "alpha"), ("dpmpp_2m", "logsnr"), ("pndm", "alpha")])
def test_long_trajectories_keep_the_weight_model_sparse_and_equal_to_dense(solver: str, trust: str) -> None:
    """From :data:`SPARSE_FROM` values the banded Jacobian stays sparse: the model's value and gradient are the
    dense model's (pndm: midpoint levels off the trajectory too) and exact at the centre."""
    prob = problem(solver, SPARSE_FROM + 4, trust)
    y = moved(prob)
    exact = SolverObjective(prob)
    f, g = exact.at(y)
    model = exact.model(y, g)
    assert sparse.issparse(model.jac) and model.in_log
    dense = WeightModel(prob, model.w, model.jac.toarray(), model.center, model.step, model.on, model.levels,
                        model.jac_levels.toarray(), model.free, True)
    dense.lin = model.lin
    fm, gm = model.value_and_grad(y)
    assert fm == pytest.approx(f, rel=1e-9) and np.allclose(gm, g, rtol=1e-7, atol=1e-9 * np.abs(g).max())
    z = y + 0.05 * (prob.hi - prob.y0) * np.cos(np.arange(prob.n))
    (fs, gs), (fd, gd) = model.value_and_grad(z), dense.value_and_grad(z)
    assert fs == pytest.approx(fd, rel=1e-12) and np.allclose(gs, gd, rtol=1e-10, atol=1e-12 * np.abs(gd).max())
    assert fs != pytest.approx(fm, rel=1e-6)  # (the point moved the model)
