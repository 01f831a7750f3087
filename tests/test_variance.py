"""cpe: the paper's DDIM formula and the solver-aware propagation weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.solvers import SOLVERS, num_evaluations, sample
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import (
    DDIM_LIKE,
    cpe,
    cpe_contributions,
    cpe_paper,
    cpe_paper_numpy,
    cpe_solver,
    propagation,
    propagation_weights,
)

_gen = torch.Generator().manual_seed(1)
A = torch.randn(4, 4, dtype=torch.float64, generator=_gen) / 2
B = torch.randn(4, dtype=torch.float64, generator=_gen)


def mse(ab: torch.Tensor) -> torch.Tensor:
    """A smooth positive error profile, larger at low noise like real ones."""
    return 0.02 + 0.3 * ab**2 + 0.05 * torch.sin(7 * ab) ** 2


def mse_np(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mse` in numpy with its derivative (written independently of torch)."""
    return 0.02 + 0.3 * ab**2 + 0.05 * np.sin(7 * ab) ** 2, 0.6 * ab + 0.35 * np.sin(14 * ab)


def random_trajectory(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    while True:
        ab = torch.sort(torch.rand(n, dtype=torch.float64, generator=g) * (0.9999 - 1e-4) + 1e-4, descending=True)[0]
        if n == 1 or bool((ab[:-1] - ab[1:] > 1e-6).all()):
            return ab


@pytest.mark.parametrize("n", [1, 2, 7, 30, 100])
def test_ddim_solver_cpe_equals_paper_cpe(n: int) -> None:
    """(a) = (b): the weights obtained by running the ddim code give back the published formula, value and gradient."""
    for seed in range(3):
        ab = random_trajectory(n, seed).requires_grad_(True)
        p = propagation("ddim", ab)
        generic = (p.weights**2 * mse(p.alpha_bar)).sum()
        paper = cpe_paper(ab, mse)
        assert abs(float(generic.detach() - paper.detach())) <= 1e-10 * max(1.0, abs(float(paper.detach())))
        (g1,) = torch.autograd.grad(generic, ab)
        (g2,) = torch.autograd.grad(paper, ab)
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-10)
        closed = cpe_solver(ab, mse, "ddim").detach()
        assert abs(float(closed - paper.detach())) <= 1e-10 * max(1.0, abs(float(paper.detach())))


@pytest.mark.parametrize("final", [1.0, 0.9999995])
def test_closed_form_ddim_weights_equal_generic(final: float) -> None:
    """The DDIM-like solvers' solver-aware terms (a closed form) are those of running the solver code."""
    ab = random_trajectory(20, 5)
    for solver in DDIM_LIKE:
        generic = propagation(solver, ab, final_alpha_bar=final)
        terms = cpe_contributions(ab, mse, "solver", solver, final_alpha_bar=final)
        torch.testing.assert_close(terms, generic.weights**2 * mse(generic.alpha_bar), rtol=1e-12, atol=1e-12)
        if final == 1.0:
            torch.testing.assert_close(terms, cpe_contributions(ab, mse, "paper"), rtol=1e-12, atol=1e-14)


def test_cpe_paper_is_batched_and_weighted() -> None:
    """[..., N] -> [...], each row its own cpe; weights multiply each term."""
    rows = torch.stack([random_trajectory(9, seed) for seed in range(6)]).reshape(2, 3, 9)
    got = cpe_paper(rows, mse)
    assert got.shape == (2, 3)
    want = torch.stack([cpe_contributions(r, mse).sum() for r in rows.reshape(6, 9)]).reshape(2, 3)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    w = torch.linspace(0.1, 1.0, 9, dtype=torch.float64)
    weighted = torch.stack([(cpe_contributions(r, mse) * w).sum() for r in rows.reshape(6, 9)]).reshape(2, 3)
    torch.testing.assert_close(cpe_paper(rows, mse, w), weighted, rtol=1e-14, atol=0)
    assert bool((cpe_paper(rows, mse, w) < got).all())


@pytest.mark.parametrize("n", [1, 2, 10, 60])
def test_numpy_twin_equals_torch_value_and_gradient(n: int) -> None:
    """cpe_paper_numpy is cpe_paper: values and the analytic gradient against autograd, unweighted and with a weight
    per term."""
    rows = torch.stack([random_trajectory(n, seed) for seed in range(4)])
    w = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    for weights in (None, w):
        x = rows.clone().requires_grad_(True)
        value = cpe_paper(x, mse, weights)
        (grad,) = torch.autograd.grad(value.sum(), x)
        f, g = cpe_paper_numpy(rows.numpy(), mse_np, grad=True, weights=None if weights is None else w.numpy())
        np.testing.assert_allclose(f, value.detach().numpy(), rtol=1e-13)
        np.testing.assert_allclose(g, grad.numpy(), rtol=1e-10, atol=1e-12)
    assert cpe_paper_numpy(rows.numpy(), mse_np)[1] is None


def _eps_fns():
    def linear(x, a):
        return x @ A * (1 - a) + B * a

    def nonlinear(x, a):
        return torch.tanh(x @ A) * a.sqrt() + torch.sin(3 * a + B)

    return [linear, nonlinear]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("final", [1.0, 0.999])
def test_weights_reproduce_solver_output(solver: str, final: float) -> None:
    """x_final = x_coef·x_start + Σ_j w_j ε̂_j with the ε̂_j the solver actually got, for any model."""
    ab = torch.tensor([0.99, 0.9, 0.7, 0.5, 0.3, 0.15, 0.05, 0.01], dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = propagation(solver, ab, final_alpha_bar=final)
    assert p.weights.shape == p.alpha_bar.shape == (num_evaluations(solver, 8),)
    for eps_fn in _eps_fns():
        seen: list[dict] = []
        out = sample(solver, eps_fn, x, ab, final_alpha_bar=final, callback=seen.append)
        eps = torch.stack([d["eps"] for d in reversed(seen)])  # cleanest evaluation first, like the weights
        torch.testing.assert_close(out, p.x_coef * x + torch.einsum("j,j...->...", p.weights, eps))
        torch.testing.assert_close(p.alpha_bar, torch.stack([d["alpha_bar"] for d in reversed(seen)]))


@pytest.mark.parametrize("solver", SOLVERS)
def test_weights_integrate_constants_exactly(solver: str) -> None:
    """Every solver is exact for a constant ε̂ (x̃ moves by (σ_end - σ_start) ε̂), so Σ w = √ᾱ_end (σ_end - σ_start)."""
    ab = random_trajectory(12, 7)
    for final in (1.0, 0.99995):
        p = propagation(solver, ab, final_alpha_bar=final)
        s_start, s_end = math.sqrt((1 - ab[-1]) / ab[-1]), math.sqrt((1 - final) / final)
        assert abs(float(p.weights.sum()) - math.sqrt(final) * (s_end - s_start)) < 1e-9 * s_start
        assert abs(float(p.x_coef) - math.sqrt(final / ab[-1])) < 1e-9 * float(p.x_coef)


@pytest.mark.parametrize("solver", SOLVERS)
def test_cpe_solver_gradient(solver: str) -> None:
    ab = torch.tensor([0.97, 0.8, 0.5, 0.3, 0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: cpe_solver(a, mse, solver), (ab,))


def test_pndm_evaluation_levels_include_midpoints() -> None:
    ab = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.05], dtype=torch.float64)
    p = propagation("pndm", ab)
    levels = p.alpha_bar.flip(0)  # evaluation order
    s = ((1 - ab.flip(0)) / ab.flip(0)).sqrt()
    mids = 1 / (1 + s[:3] * s[1:4])  # default: logSNR midpoints of the three Runge-Kutta steps
    expected = [
        ab[-1],
        mids[0],
        mids[0],
        ab[-2],
        ab[-2],
        mids[1],
        mids[1],
        ab[-3],
        ab[-3],
        mids[2],
        mids[2],
        ab[-4],
        ab[-4],
        ab[-5],
    ]
    torch.testing.assert_close(levels, torch.stack(expected))


def test_dispatcher_and_contributions() -> None:
    ab = random_trajectory(10, 3)
    assert float(cpe(ab, mse)) == float(cpe_paper(ab, mse))
    assert float(cpe(ab, mse, "paper", "dpmpp_2m")) == float(cpe_paper(ab, mse))
    for solver in SOLVERS:
        value = cpe(ab, mse, "solver", solver)
        assert float(value) == float(cpe_solver(ab, mse, solver))
        terms = cpe_contributions(ab, mse, "solver", solver)
        assert terms.shape == (num_evaluations(solver, 10),) and bool((terms >= 0).all())
        torch.testing.assert_close(terms.sum(), value)
    paper_terms = cpe_contributions(ab, mse, "paper")
    assert paper_terms.shape == (10,)
    torch.testing.assert_close(paper_terms.sum(), cpe_paper(ab, mse))
    # the solver-aware objective is a different function of the trajectory for higher-order solvers
    assert abs(float(cpe(ab, mse, "solver", "dpmpp_2m") - cpe_paper(ab, mse))) > 1e-3 * float(cpe_paper(ab, mse))


def test_options_reach_the_solver() -> None:
    ab = random_trajectory(10, 4)
    w2 = propagation_weights("deis", ab, order=2)
    w3 = propagation_weights("deis", ab, order=3)
    assert (w2 - w3).abs().max() > 1e-6
    torch.testing.assert_close(cpe_solver(ab, mse, "deis", order=2), (w2**2 * mse(ab)).sum())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda ab: cpe(ab, mse, "ddim"), "Unknown objective 'ddim'; allowed: paper, solver"),
        (lambda ab: cpe(ab, mse, "solver"), "objective='solver' needs solver=<name>; allowed: ddim"),
        (lambda ab: cpe(ab, mse, "solver", "heun"), "Unknown solver 'heun'"),
        (lambda ab: cpe_contributions(ab, mse, "paper", "heun"), "Unknown solver 'heun'"),
        (lambda ab: cpe_solver(ab, mse, "ddim", order=2), "unknown option"),
        (lambda ab: cpe_solver(ab, mse, "ddim", final_alpha_bar=0.5), "final_alpha_bar must be"),
        (lambda ab: cpe_solver(ab.flip(0), mse, "dpmpp_2m"), "strictly decreasing"),
        (lambda ab: propagation("pndm", ab[:3]), "at least 4 values"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(random_trajectory(6, 0))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_batch_of_trajectories_is_each_trajectory_run_alone(solver: str) -> None:
    """``propagation`` of ``[B, n]`` (one solver run, every coefficient ``[B]``) equals B separate runs: weights,
    levels and the start's coefficient; a bad row is refused like a bad trajectory."""
    sched = NoiseSchedule()
    batch = torch.stack([make_trajectory(sched, base, 9) for base in ("time_uniform", "time_quadratic", "logSNR")])
    p = propagation(solver, batch)
    assert p.weights.shape == p.alpha_bar.shape == (3, num_evaluations(solver, 9)) and p.x_coef.shape == (3,)
    for k in range(3):
        one = propagation(solver, batch[k])
        assert torch.allclose(p.weights[k], one.weights, rtol=1e-13, atol=1e-15)
        assert torch.allclose(p.alpha_bar[k], one.alpha_bar, rtol=1e-15, atol=0)
        assert torch.allclose(p.x_coef[k], one.x_coef, rtol=1e-13)
    bad = batch.clone()
    bad[1] = bad[1].flip(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        propagation(solver, bad)
