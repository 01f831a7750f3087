"""The peer schedule optimisers (issue 13): GITS's programme is the true optimum, its teacher follows the exact ODE
solution, its steps beat the classic bases on the error it minimises; DMN's bound is the authors' formula over the
solver's own coefficients and goes down; bad input fails with errors that say what to do."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from vrg_lightning.peers import (
    DMN_SOLVERS,
    DMNSettings,
    GITSSettings,
    PeerResult,
    dmn,
    dmn_bound,
    gits,
    gits_costs,
    gits_from_costs,
    select_steps,
    step_weights,
    teacher_paths,
)
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_sigma
from vrg_lightning.solvers import SOLVERS, sample
from vrg_lightning.trajectories import make_trajectory

SCHEDULE = NoiseSchedule()
FAST = GITSSettings(num_noises=32)


class Gaussian(nn.Module):
    """The exact ε̂ of data x₀ ~ N(μ, s² I): its ODE paths are known, x̃(σ) = μ + (x̃_T - μ) √(s²+σ²)/√(s²+σ_T²)."""

    def __init__(self, mu: list[float], s: float) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float64))
        self.s, self.schedule, self.num_classes = s, SCHEDULE, None
        self.sample_shape = (len(mu),)

    def forward(self, x: torch.Tensor, ab: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)

    def eps_fn(self, labels: torch.Tensor | None = None, guidance_scale: float = 1.0):
        return lambda x, ab: self(x, ab)


@pytest.fixture(scope="module")
def model() -> Gaussian:
    return Gaussian([1.0, -0.5, 0.3, 2.0], 0.3)


@pytest.fixture(scope="module")
def costs(model: Gaussian):
    return gits_costs(model, FAST)


def _exact(model: Gaussian, xt_start: torch.Tensor, sigma_start: float, sigma: float) -> torch.Tensor:
    s2 = model.s**2
    return model.mu + (xt_start - model.mu) * math.sqrt(s2 + sigma**2) / math.sqrt(s2 + sigma_start**2)


def _one_step_error(model: Gaussian, alpha_bar: torch.Tensor, coeff: float = 1.15, n: int = 256) -> float:
    """Σ_k coeff^k E‖DDIM jump from the exact path at σ_k to σ_{k+1} - the exact path there‖, σ_K = 0 (closed form)."""
    sig = alpha_bar_to_sigma(alpha_bar.flip(0)).tolist() + [0.0]
    xt0 = torch.randn(n, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * math.sqrt(
        1 + sig[0] ** 2)  # x̃ at σ_max of a noise sample (x = x̃ √ᾱ ≈ N(0, 1))
    total = 0.0
    for k in range(len(sig) - 1):
        a, b = _exact(model, xt0, sig[0], sig[k]), _exact(model, xt0, sig[0], sig[k + 1])
        eps = (a - model.mu) * sig[k] / (model.s**2 + sig[k] ** 2)  # dx̃/dσ on the path
        total += coeff**k * float((a + (sig[k + 1] - sig[k]) * eps - b).norm(dim=1).mean())
    return total


# --- GITS: the dynamic programme ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_steps_is_the_brute_force_optimum(seed: int) -> None:
    g = np.random.default_rng(seed)
    m = 7
    cost = g.uniform(0.1, 2.0, (m + 1, m + 1))
    for steps, coeff in itertools.product(range(1, m + 1), (0.8, 1.0, 1.15)):
        path, value = select_steps(cost, steps, coeff)
        best = min(sum(coeff**k * cost[p[k], p[k + 1]] for k in range(steps))
                   for inner in itertools.combinations(range(1, m), steps - 1) for p in [(0, *inner, m)])
        full = [*path, m]
        assert path[0] == 0 and len(path) == steps and all(a < b for a, b in zip(full, full[1:], strict=False))
        assert value == pytest.approx(best, rel=1e-12)
        assert sum(coeff**k * cost[full[k], full[k + 1]] for k in range(steps)) == pytest.approx(value, rel=1e-12)


def test_select_steps_weights_later_jumps_more() -> None:
    # two 2-jump paths of equal plain sum: the cheap jump last wins with coeff > 1, first with coeff < 1
    cost = np.full((4, 4), 10.0)
    cost[0, 1], cost[1, 3], cost[0, 2], cost[2, 3] = 1.0, 3.0, 3.0, 1.0
    assert select_steps(cost, 2, 1.15)[0] == [0, 2] and select_steps(cost, 2, 0.8)[0] == [0, 1]


def test_select_steps_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="steps=4 needs at least 5 nodes"):
        select_steps(np.zeros((4, 4)), 4)
    with pytest.raises(ValueError, match="square"):
        select_steps(np.zeros((3, 4)), 1)


# --- GITS: teacher, costs, trajectories ---------------------------------------------------------------------------
def test_teacher_states_follow_the_exact_ode_solution(model: Gaussian) -> None:
    grid = make_trajectory(SCHEDULE, "karras", 61)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    states, eps = teacher_paths(model.eps_fn(), x, grid, "plms")
    sig = alpha_bar_to_sigma(grid.flip(0)).tolist() + [0.0]
    assert states.shape == (62, 16, 4) and eps.shape == (61, 16, 4)
    exact = torch.stack([_exact(model, states[0], sig[0], s) for s in sig])
    assert float((states - exact).abs().max()) < 2e-3  # plms on 60 steps; a predictor state would be off by >> this
    assert torch.allclose(eps[1], model(states[1] * math.sqrt(float(grid.flip(0)[1])), grid.flip(0)[1]))


def test_teacher_state_is_the_corrected_one_not_the_predictor(model: Gaussian) -> None:
    """plms evaluates its second value twice (Euler predictor, then the Heun state): the state is the Heun one."""
    grid = torch.tensor([0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)  # the curved part
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    states, _ = teacher_paths(model.eps_fn(), x, grid, "plms")
    (a0, a1), (s0, s1) = grid.flip(0)[:2], alpha_bar_to_sigma(grid.flip(0)[:2])
    e0 = model(x, a0)
    e1 = model((x / a0.sqrt() + (s1 - s0) * e0) * a1.sqrt(), a1)
    heun = x / a0.sqrt() + (s1 - s0) * (e0 + e1) / 2
    assert torch.allclose(states[1], heun, atol=1e-12) and not torch.allclose(states[1], x / a0.sqrt() + (s1 - s0) * e0)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "pndm"])
def test_one_step_of_every_solver_is_the_first_order_jump(solver: str) -> None:
    """What the GITS cost uses for every solver: one step from a fresh start is the DDIM step."""
    x, e = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    ab = torch.tensor([0.3], dtype=torch.float64)
    ours = sample(solver, lambda x, a: e, x, ab, final_alpha_bar=0.8)
    assert torch.allclose(ours, sample("ddim", lambda x, a: e, x, ab, final_alpha_bar=0.8), atol=1e-12)


@pytest.mark.parametrize("steps", [3, 5, 10])
def test_gits_beats_the_classic_bases_on_the_one_step_error(model: Gaussian, costs, steps: int) -> None:
    r = gits_from_costs(costs, "ddim", steps)
    ab = r.alpha_bar
    assert ab.dtype == torch.float64 and ab.numel() == steps and bool((ab[1:] < ab[:-1]).all())
    assert SCHEDULE.alpha_bar_min <= float(ab.min()) and float(ab.max()) <= SCHEDULE.alpha_bar_max
    assert float(ab[-1]) == SCHEDULE.alpha_bar_min  # starts from the noisiest trained level
    ours = _one_step_error(model, ab)
    for base in ("time_uniform", "logSNR", "karras"):
        assert ours < _one_step_error(model, make_trajectory(SCHEDULE, base, steps)), base
    assert r.provenance["grid_indices"][0] == 0 and r.provenance["model_evaluations"] == 32 * 62


def test_gits_is_deterministic_and_records_its_provenance(model: Gaussian) -> None:
    a, b = gits(model, "dpmpp_2m", 5, FAST), gits(model, "dpmpp_2m", 5, FAST)
    assert torch.equal(a.alpha_bar, b.alpha_bar) and a.provenance["dp_cost"] == b.provenance["dp_cost"]
    other = gits(model, "dpmpp_2m", 5, GITSSettings(num_noises=32, seed=1))
    assert other.provenance["dp_cost"] != a.provenance["dp_cost"]  # other noises, other costs
    p = a.provenance
    assert p["settings"] == FAST.to_dict() and p["seconds"] > 0 and p["model_evaluations"] == 32 * 62
    assert PeerResult.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_gits_rejects_bad_input(model: Gaussian, costs) -> None:
    with pytest.raises(ValueError, match="grid_size=8 is coarser than steps=10"):
        gits(model, "ddim", 10, GITSSettings(grid_size=8))
    with pytest.raises(ValueError, match="coarser than steps=62"):
        gits_from_costs(costs, "ddim", 62)
    with pytest.raises(ValueError, match="teacher must be one of the solvers.*'ipndm'"):
        GITSSettings(teacher="ipndm")
    with pytest.raises(ValueError, match="metric"):
        GITSSettings(metric="dev")
    with pytest.raises(ValueError, match="Unknown solver 'euler'"):
        gits(model, "euler", 5, FAST)
    assert GITSSettings.from_dict(FAST.to_dict()) == FAST


# --- DMN ----------------------------------------------------------------------------------------------------------
def _e(ab: torch.Tensor) -> torch.Tensor:
    return ((ab / (1 - ab)).sqrt())  # e^{λ/2} = 1/σ


def test_ddim_weights_are_the_exact_integrals() -> None:
    ab = make_trajectory(SCHEDULE, "logSNR", 6)
    end = SCHEDULE.alpha_bar_max
    e = _e(torch.cat([ab.flip(0), torch.tensor([end], dtype=torch.float64)]))
    assert torch.allclose(step_weights("ddim", ab, end), torch.diag(e[1:] - e[:-1]), rtol=1e-10)
    d = (1 - ab.flip(0)) / ab.flip(0).sqrt()
    assert dmn_bound("ddim", ab, end) == pytest.approx(float((d * (e[1:] - e[:-1])).sum()), rel=1e-10)


def test_dpmpp_2m_bound_is_the_authors_formula() -> None:
    ab, end = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64), 0.99
    nodes = torch.cat([ab.flip(0), torch.tensor([end], dtype=torch.float64)])
    e, sig = _e(nodes), alpha_bar_to_sigma(nodes)
    j00, j22 = e[1] - e[0], e[3] - e[2]
    rho, q = sig[2] / sig[1], math.log(sig[1] / sig[2]) / math.log(sig[0] / sig[1])  # step 1: order 2, midpoint
    j11, j10 = (1 - rho) * (1 + q / 2) / sig[2], -(1 - rho) * q / 2 / sig[2]
    J = step_weights("dpmpp_2m", ab, end)
    assert torch.allclose(J, torch.tensor([[j00, 0, 0], [j10, j11, 0], [0, 0, j22]], dtype=torch.float64))
    assert torch.allclose(J.sum(1), e[1:] - e[:-1])  # a constant data prediction is integrated exactly
    d = (1 - nodes[:3]) / nodes[:3].sqrt()
    alone = d[0] * j00 + math.hypot(d[0] * j10, d[1] * j11) + d[2] * j22  # steps 0-2 each on their own
    summed = abs(d[0] * (j00 + j10)) + abs(d[1] * j11) + d[2] * j22  # warm-up 0: steps 0-1 summed per node
    assert dmn_bound("dpmpp_2m", ab, end) == pytest.approx(float(alone), rel=1e-12)
    assert dmn_bound("dpmpp_2m", ab, end, warmup_steps=0) == pytest.approx(float(summed), rel=1e-12)


@pytest.mark.parametrize("solver", DMN_SOLVERS)
@pytest.mark.parametrize("steps", [5, 10])
def test_dmn_lowers_the_bound_and_gives_a_valid_trajectory(solver: str, steps: int) -> None:
    r = dmn(SCHEDULE, solver, steps)
    ab, p = r.alpha_bar, r.provenance
    start = make_trajectory(SCHEDULE, "logSNR", steps)
    assert p["bound_before"] == pytest.approx(dmn_bound(solver, start, SCHEDULE.alpha_bar_max), rel=1e-9)
    assert p["bound_after"] == pytest.approx(dmn_bound(solver, ab, SCHEDULE.alpha_bar_max), rel=1e-12)
    assert p["bound_after"] < 0.99 * p["bound_before"] and p["model_evaluations"] == 0
    assert ab.numel() == steps and bool((ab[1:] < ab[:-1]).all()) and float(ab[-1]) == SCHEDULE.alpha_bar_min
    assert float(ab[0]) < SCHEDULE.alpha_bar_max
    assert torch.equal(dmn(SCHEDULE, solver, steps).alpha_bar, ab)  # deterministic


def test_dmn_one_step_is_the_noisiest_level() -> None:
    r = dmn(SCHEDULE, "ddim", 1)
    assert r.alpha_bar.tolist() == [SCHEDULE.alpha_bar_min] and r.provenance["iterations"] == 0


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s not in DMN_SOLVERS])
def test_dmn_refuses_solvers_its_bound_does_not_cover(solver: str) -> None:
    with pytest.raises(ValueError, match=f"covers the data-prediction multistep solvers.*{solver!r}.*'gits'"):
        dmn(SCHEDULE, solver, 10)


def test_dmn_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="init must be one of"):
        DMNSettings(init="karras")
    with pytest.raises(ValueError, match="min_gap"):
        DMNSettings(min_gap=0.0)
    with pytest.raises(ValueError, match="no room for 10 steps"):
        dmn(SCHEDULE, "ddim", 10, DMNSettings(min_gap=5.0))
    assert DMNSettings.from_dict(DMNSettings(init="time_uniform").to_dict()) == DMNSettings(init="time_uniform")


def test_peer_result_checks_its_trajectory() -> None:
    with pytest.raises(ValueError, match="2 values but steps=3"):
        PeerResult("gits", "ddim", 3, torch.tensor([0.9, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown peer method 'vrg'"):
        PeerResult("vrg", "ddim", 2, torch.tensor([0.9, 0.1], dtype=torch.float64))


# --- peer bases by name -------------------------------------------------------------------------------------------
def test_peer_base_reuses_one_teacher_pass_across_cells(model: Gaussian) -> None:
    from vrg_lightning.peers import entry_fields, peer_base

    cache: dict = {}
    a = peer_base("gits", SCHEDULE, "ddim", 5, model=model, gits_settings=FAST, cache=cache)
    b = peer_base("gits", SCHEDULE, "dpmpp_2m", 10, model=model, gits_settings=FAST, cache=cache)
    c = peer_base("dmn", SCHEDULE, "ddim", 5, cache=cache)
    assert len(cache) == 2 and b.provenance["model_evaluations"] == a.provenance["model_evaluations"] == 32 * 62
    assert peer_base("dmn", SCHEDULE, "ddim", 5, cache=cache) is c
    assert torch.equal(a.alpha_bar, gits_from_costs(gits_costs(model, FAST), "ddim", 5).alpha_bar)
    assert entry_fields(a)["base_provenance"]["method"] == "gits"


def test_peer_base_rejects_bad_input(model: Gaussian) -> None:
    from vrg_lightning.peers import peer_base

    with pytest.raises(ValueError, match="base 'gits' needs the model"):
        peer_base("gits", SCHEDULE, "ddim", 5)
    with pytest.raises(ValueError, match="not the schedule"):
        peer_base("gits", NoiseSchedule("squaredcos_cap_v2"), "ddim", 5, model=model)
    with pytest.raises(ValueError, match="Unknown peer base 'karras'"):
        peer_base("karras", SCHEDULE, "ddim", 5)
