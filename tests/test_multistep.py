"""The closed form of the solver-aware loss of ``dpmpp_2m`` and ``deis`` (``optimize.multistep``) against the one
cpe implementation (``variance.propagation`` / ``cpe_solver``, the solver code run on a one-hot basis): the weights
for every length and warm-up pattern, batched; the loss and gradient in both trust regions, pinned too; and the
trust-region search's exact objective, which uses it, against its torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_loss_and_gradient_are_cpe_solver, profile_mse

from vrg_lightning.optimize import OptimizeSettings, SearchProblem
from vrg_lightning.optimize.multistep import MULTISTEP, MultistepProblem, multistep_terms, multistep_weights
from vrg_lightning.optimize.surrogate import SolverObjective
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import propagation

SCHED = NoiseSchedule()


def problem(solver: str, n: int, trust: str = "alpha", pin: bool = False, base: str = "time_quadratic"):
    s = OptimizeSettings(lp=0.05, mse_mode="paper", objective="solver", solver=solver, trust=trust, pin_start=pin)
    return SearchProblem(make_trajectory(SCHED, base, n), profile_mse(), s)


@pytest.mark.parametrize("solver", sorted(MULTISTEP))
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 14, 15, 16, 40, 130])
def test_weights_are_the_solver_code_on_any_trajectory(solver: str, n: int) -> None:
    """Orders 1..3, the lower-order final steps below 15 values, the doubling recurrences past 128 values; rows of a
    batch are independent trajectories (random ones too)."""
    rng = np.random.default_rng(n)
    rows = [make_trajectory(SCHED, b, n).numpy() for b in ("time_uniform", "logSNR")]
    rows.append(np.sort(rng.uniform(1e-3, 0.999, n))[::-1])
    ab = np.stack(rows)
    w = multistep_weights(solver, ab)
    ref = propagation(solver, torch.tensor(ab)).weights.numpy()
    err = np.abs(w - ref).max(1) / np.abs(ref).max(1)
    assert (err[:2] <= 1e-12).all() and err[2] <= 1e-9  # (random values: close nodes amplify the rounding)
    assert np.abs(w[0] - propagation(solver, torch.tensor(ab[0])).weights.numpy()).max() <= 1e-12 * np.abs(w[0]).max()


@pytest.mark.parametrize("solver", sorted(MULTISTEP))
@pytest.mark.parametrize("n", [1, 2, 3, 5, 14, 15, 16, 40])
@pytest.mark.parametrize("trust, pin", [("alpha", False), ("alpha", True), ("logsnr", False)])
def test_multistep_loss_and_gradient_are_cpe_solver(solver: str, n: int, trust: str, pin: bool) -> None:
    assert_loss_and_gradient_are_cpe_solver(MultistepProblem(problem(solver, n, trust, pin)))


@pytest.mark.parametrize("solver", sorted(MULTISTEP))
def test_terms_of_many_rows_are_each_rows_terms(solver: str) -> None:
    prob = MultistepProblem(problem(solver, 12))
    ab = np.stack([make_trajectory(SCHED, b, 12).numpy() for b in ("time_uniform", "logSNR", "time_quadratic")])
    f, g = multistep_terms(solver, ab, prob.np_mse, True)
    for k in range(3):
        fk, gk = multistep_terms(solver, ab[k:k + 1], prob.np_mse, True)
        assert f[k] == pytest.approx(fk[0], rel=1e-14) and np.allclose(g[k], gk[0], rtol=1e-13, atol=0)
    assert np.allclose(multistep_terms(solver, ab, prob.np_mse, False)[0], f, rtol=1e-14, atol=0)


@pytest.mark.parametrize("solver", sorted(MULTISTEP))
@pytest.mark.parametrize("trust", ["alpha", "logsnr"])
def test_solver_objective_takes_the_closed_form_and_agrees_with_its_torch_path(solver: str, trust: str) -> None:
    """The search's exact loss, gradient, weights and weight model (Jacobians by differences, one batched run) are
    those of the solver code, to rounding; a point outside the valid trajectories is infinite on both paths."""
    prob = problem(solver, 24, trust)
    fast, slow = SolverObjective(prob), SolverObjective(prob, closed_form=False)  # slow: the solver code by torch
    assert fast.fast is not None and slow.fast is None
    y = prob.y0 + 0.4 * (prob.hi - prob.y0)
    (f, g), (f_ref, g_ref) = fast.at(y), slow.at(y)
    assert f == pytest.approx(f_ref, rel=1e-12) and np.allclose(g, g_ref, rtol=1e-9, atol=1e-12 * np.abs(g).max())
    assert fast.value(y) == pytest.approx(f_ref, rel=1e-12)
    assert np.allclose(fast._weights(y)[0], slow._weights(y)[0], rtol=1e-12, atol=0)
    m_fast, m_slow = fast.model(y, g), slow.model(y, g_ref)
    # (both by differences of 1e-8 in log ᾱ: their rounding, about 1e-15 / 1e-8 of the weights, is what differs)
    assert np.abs(m_fast.jacobian() - m_slow.jacobian()).max() <= 1e-5 * np.abs(m_slow.jacobian()).max()
    z = y + 0.1 * (prob.hi - prob.lo)
    assert m_fast.loss(z) == pytest.approx(m_slow.loss(z), rel=1e-6)
    bad = y.copy()
    bad[3] = 0.5 if prob.alpha else bad[4] - 1.0  # a value noisier than its noisier neighbour (log-ratio > 0 / λ)
    assert fast.at(bad)[0] == slow.at(bad)[0] == fast.value(bad) == np.inf
