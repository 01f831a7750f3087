"""GITS: geometry-inspired time scheduling (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
Sampling", ICML 2024, arXiv 2405.11326), from the model itself.

1. **Teacher paths.** A teacher solver (default ``plms``) integrates the probability-flow ODE over a fine grid of
   ``grid_size`` values (default 61, the authors' ``num_steps_tea``), polynomial in σ with ρ = 7 (the toolkit's
   ``karras`` base: σ_max = σ(ᾱ(t=T-1)) down to σ_min = σ(ᾱ(t=0))), from ``num_noises`` noises (default 256, the
   authors' ``num_warmup``). Node i (noisiest first) holds the teacher's state x̃ᵢ = xᵢ/√ᾱᵢ and its ε̂ᵢ; node G (after
   the G grid values) is the end point of sampling, σ = 0 (the toolkit's convention: the last step lands on x₀).
2. **Cost of a jump.** ``C[i, j]`` (i < j <= G) is the mean over the noises of ‖jump - x̃ⱼ‖ (``metric`` ``l2``, or
   ``l1``) in the scaled variable x̃ (the EDM x the authors measure in), where *jump* is one step from the teacher's
   state at i to σⱼ with the teacher's ε̂ᵢ (no new model call): :func:`vrg_lightning.solvers.sample` over the
   one-value trajectory [ᾱᵢ] with ``final_alpha_bar = ᾱⱼ``. A single step from a fresh start is the same first-order
   (DDIM) step for every solver of :data:`~vrg_lightning.solvers.SOLVERS` (their warm-up rule; tests/test_peers.py
   checks it), so it is computed once with ``ddim``; ``pndm`` cannot take a step alone (its first step is a
   4-evaluation pseudo-RK4 step) and gets the same jump, as the authors use the Euler jump for every solver. So
   ``C`` does not depend on the solver the schedule is for: one :class:`GITSCosts` serves every solver and step
   count.
3. **Dynamic programme** (:func:`select_steps`): the K-value trajectory is the path 0 = n₀ < n₁ < ... < n_K = G
   minimising ``Σ_k γ^k C[n_k, n_{k+1}]`` with γ = ``coeff`` (default 1.15, the authors' ``coeff``: in their
   recursion ``V_k(j) = min_i C[j, i] + γ V_{k-1}(i)`` each later jump's cost is multiplied by one more γ, so
   errors near the data weigh more); the trajectory is ᾱ at n₀..n_{K-1} (n₀: the noisiest grid value).

Not implemented: the authors' default metric ``dev`` (deviation from the straight line between the path's ends)
and their optional analytical first step (``afs``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import from_plain_dict
from ..models.base import device_dtype
from ..solvers import SOLVERS, EpsFn, num_evaluations, sample
from ..trajectories import make_trajectory
from .common import PeerResult, check_int, check_number, in_schedule_range

__all__ = ["METRICS", "GITSSettings", "GITSCosts", "select_steps", "teacher_paths", "jump_costs", "gits_costs",
           "gits_from_costs", "gits"]

METRICS = ("l2", "l1")
PAPER = "Chen et al., ICML 2024 (arXiv 2405.11326)"


@dataclass(frozen=True)
class GITSSettings:
    """Settings of :func:`gits` (frozen; ``to_dict``/``from_dict`` round-trip). Defaults are the authors'
    (``num_steps_tea`` 61, polynomial ρ 7, ``num_warmup`` 256, ``coeff`` 1.15) except the teacher (``plms``: the
    toolkit's iPNDM, 4th-order Adams-Bashforth on ε̂ in σ; it starts with a Heun step where iPNDM starts with Euler)
    and the metric (``l2``, the distance the paper describes; the authors' scripts use ``dev``).

    Args:
        grid_size: values of the fine grid the steps are chosen from (>= the steps asked for).
        rho: exponent of the polynomial (Karras) grid in σ.
        teacher: the solver of the teacher paths, one of :data:`~vrg_lightning.solvers.SOLVERS`.
        num_noises: teacher paths (noises), the sample the costs average over.
        coeff: γ, the factor each later jump's cost is weighted by (1 = plain sum).
        metric: ``l2`` or ``l1`` distance between a jump and the teacher's state.
        seed: noise (and label) seed (:func:`vrg_lightning.sampling.seeds.initial_noise`).
        batch_size: teacher paths integrated at once.
        guidance_scale: classifier-free guidance weight of a class-conditional model.
    """

    grid_size: int = 61
    rho: float = 7.0
    teacher: str = "plms"
    num_noises: int = 256
    coeff: float = 1.15
    metric: str = "l2"
    seed: int = 0
    batch_size: int = 256
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        check_int("grid_size", self.grid_size, 2)
        check_int("num_noises", self.num_noises, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "rho", check_number("rho", self.rho, 0.0, open_lo=True))
        object.__setattr__(self, "coeff", check_number("coeff", self.coeff, 0.0, open_lo=True))
        object.__setattr__(self, "guidance_scale", check_number("guidance_scale", self.guidance_scale, 0.0))
        if self.teacher not in SOLVERS:
            raise ValueError(f"GITS teacher must be one of the solvers {', '.join(SOLVERS)}; got {self.teacher!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"GITS metric must be one of {', '.join(METRICS)}; got {self.metric!r}.")
        num_evaluations(self.teacher, self.grid_size)  # pndm needs a grid of >= 4 values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GITSSettings:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing keys take their defaults."""
        return from_plain_dict(cls, d)


@dataclass(frozen=True)
class GITSCosts:
    """The cost matrix of one model: ``cost[i, j]`` (float64 ``[G+1, G+1]``, ``inf`` unless i < j) is the mean
    distance of the jump from grid node i to node j (node G: σ = 0); ``grid`` the G grid values noisiest first
    (float64); ``provenance`` the settings, seconds and model evaluations of the teacher pass."""

    cost: Tensor
    grid: Tensor
    provenance: dict[str, Any]


def _check_grid(grid_size: int, steps: int) -> None:
    if check_int("steps", steps, 1) > grid_size:
        raise ValueError(f"GITS grid_size={grid_size} is coarser than steps={steps}: the steps are chosen among the "
                         f"grid's values, so grid_size must be >= steps (the authors use 61).")


def select_steps(cost: np.ndarray | Tensor, steps: int, coeff: float = 1.15) -> tuple[list[int], float]:
    """The optimal path of ``steps`` jumps from node 0 to the last node M of a cost matrix (dynamic programming).

    Minimises ``Σ_{k=0}^{K-1} coeff^k · cost[n_k, n_{k+1}]`` over 0 = n₀ < n₁ < ... < n_K = M (GITS's programme;
    ties go to the smaller node).

    Args:
        cost: ``[M+1, M+1]``; only entries with i < j are read.
        steps: K, the number of jumps (1 <= K <= M).
        coeff: γ > 0.

    Returns:
        ``([n₀, ..., n_{K-1}], total)``: the nodes where the steps start (the end node M excluded) and the
        weighted cost of the path.

    Raises:
        ValueError: a matrix that is not square with >= 2 nodes, or ``steps`` outside [1, M].

    Example:
        >>> c = np.array([[0, 1, 4, 9], [0, 0, 1, 4], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=float)
        >>> select_steps(c, 3, 1.0), select_steps(c, 1, 1.0)
        (([0, 1, 2], 3.0), ([0], 9.0))
    """
    c = np.asarray(cost.detach().cpu() if torch.is_tensor(cost) else cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"cost must be a square matrix over >= 2 nodes; got shape {c.shape}.")
    end = c.shape[0] - 1
    check_int("steps", steps, 1)
    if steps > end:
        raise ValueError(f"steps={steps} needs at least {steps + 1} nodes but the cost matrix has {end + 1}; "
                         f"ask for steps <= {end} or use a finer grid.")
    gamma = check_number("coeff", coeff, 0.0, open_lo=True)
    upper = np.triu(np.ones_like(c, dtype=bool), 1)
    c = np.where(upper, c, np.inf)
    value = c[:, end].copy()  # V_1(i): one jump left, straight to the end
    choice: list[np.ndarray] = []
    for _ in range(steps - 1):  # V_k(i) = min_{i < j < M} c[i, j] + γ V_{k-1}(j)
        total = c[:, :end] + gamma * value[None, :end]
        best = np.argmin(total, axis=1)  # first minimum: the smaller node on ties
        choice.append(best)
        value = total[np.arange(end + 1), best]
    path, node = [0], 0
    for best in reversed(choice):
        node = int(best[node])
        path.append(node)
    return path, float(value[0])


def teacher_paths(eps_fn: EpsFn, x: Tensor, grid: Tensor, teacher: str) -> tuple[Tensor, Tensor]:
    """The teacher's states and ε̂ at every grid value, from noise ``x`` at the noisiest one.

    Args:
        eps_fn: the model (``eps_fn(x, ᾱ_0d) -> ε̂``).
        x: the starting samples ``[B, ...]`` at ᾱ = ``grid.min()``.
        grid: the grid, a trajectory (ᾱ float64, cleanest first).
        teacher: a solver of :data:`~vrg_lightning.solvers.SOLVERS`.

    Returns:
        ``(states, eps)``: ``states`` ``[G+1, B, ...]`` the scaled states x̃ = x/√ᾱ, noisiest first, the last the
        clean sample (σ = 0); ``eps`` ``[G, B, ...]`` ε̂ at each state. A state is the last model input the teacher
        evaluated at that grid value (``plms`` and ``pndm`` also evaluate predictors and midpoints there).
    """
    levels = grid.flip(0)
    where = {float(v): i for i, v in enumerate(levels.tolist())}
    states: list[Tensor | None] = [None] * levels.numel()
    eps: list[Tensor | None] = [None] * levels.numel()

    def record(info: dict[str, Any]) -> None:
        i = where.get(float(info["alpha_bar"]))
        if i is not None:  # overwritten by a later evaluation at the same value (the corrected state)
            states[i] = info["x"] / math.sqrt(float(info["alpha_bar"]))
            eps[i] = info["eps"]

    final = sample(teacher, eps_fn, x, grid, callback=record)
    missing = [i for i, s in enumerate(states) if s is None]
    if missing:
        raise ValueError(f"the teacher {teacher!r} never evaluated the model at grid values {missing[:5]}.")
    return torch.stack([*states, final]), torch.stack(eps)  # type: ignore[list-item]


def _distance(diff: Tensor, metric: str) -> Tensor:
    return torch.linalg.vector_norm(diff.flatten(1).double(), ord=1 if metric == "l1" else 2, dim=1)


def jump_costs(states: Tensor, eps: Tensor, grid: Tensor, metric: str = "l2") -> Tensor:
    """Summed distances ``[G+1, G+1]`` (float64, ``inf`` unless i < j) between the one-step jump from each grid
    state i to each later node j and the teacher's state there (module docstring, step 2).

    Args:
        states, eps: :func:`teacher_paths`' output.
        grid: its grid (cleanest first).
        metric: ``l2`` or ``l1``.
    """
    levels = grid.flip(0)
    g = levels.numel()
    ends = levels.tolist() + [1.0]  # node G: σ = 0
    total = torch.full((g + 1, g + 1), math.inf, dtype=torch.float64, device=states.device)
    for i in range(g):
        x_i, e_i = states[i] * math.sqrt(ends[i]), eps[i]  # the model input the teacher had at i
        for j in range(i + 1, g + 1):
            final = ends[j]
            jump = sample("ddim", lambda x, a, e=e_i: e, x_i, levels[i : i + 1], final_alpha_bar=final)
            total[i, j] = _distance(jump / math.sqrt(final) - states[j], metric).sum()  # no device sync
    return total.cpu()


def gits_costs(model: Any, settings: GITSSettings | None = None) -> GITSCosts:
    """Teacher paths of ``model`` and the GITS cost matrix (module docstring, steps 1-2).

    Args:
        model: a denoiser of :mod:`vrg_lightning.models` (``eps_fn``, ``schedule``, ``sample_shape``,
            ``num_classes``); it runs on its own device and dtype.
        settings: :class:`GITSSettings`.

    Raises:
        ValueError: a ``grid_size`` above the schedule's ``num_train_timesteps``, or a model output of the wrong
            shape.
    """
    from ..sampling.seeds import initial_noise

    s = settings or GITSSettings()
    if not isinstance(s, GITSSettings):
        raise ValueError(f"settings must be a GITSSettings; got {type(s).__name__}.")
    start = time.perf_counter()
    schedule = model.schedule
    if s.grid_size > schedule.num_train_timesteps:
        raise ValueError(f"GITS grid_size={s.grid_size} is finer than the schedule's {schedule.num_train_timesteps} "
                         "trained noise levels; use grid_size <= num_train_timesteps (the authors use 61).")
    grid = in_schedule_range(make_trajectory(schedule, "karras", s.grid_size, rho=s.rho), schedule)
    grid[0], grid[-1] = schedule.alpha_bar_max, schedule.alpha_bar_min  # the ends exactly (σ ↔ ᾱ rounds)
    device, dtype = device_dtype(model)
    shape = tuple(int(v) for v in model.sample_shape)
    total = torch.zeros(s.grid_size + 1, s.grid_size + 1, dtype=torch.float64)
    calls = [0]
    with torch.no_grad():
        for a in range(0, s.num_noises, s.batch_size):
            b = min(a + s.batch_size, s.num_noises)
            x, labels = initial_noise(s.seed, a, b, shape, getattr(model, "num_classes", None))
            fn = model.eps_fn(None if labels is None else labels.to(device), s.guidance_scale)
            states, eps = teacher_paths(_counted(fn, calls), x.to(device, dtype), grid, s.teacher)
            total += jump_costs(states, eps, grid, s.metric)
    provenance = {"settings": s.to_dict(), "seconds": time.perf_counter() - start,
                  "model_evaluations": calls[0], "paper": PAPER}
    return GITSCosts(total / s.num_noises, grid.flip(0), provenance)


def _counted(fn: EpsFn, calls: list[int]) -> Callable[[Tensor, Tensor], Tensor]:
    def counted(x: Tensor, alpha_bar: Tensor) -> Tensor:
        calls[0] += x.shape[0]
        return fn(x, alpha_bar)

    return counted


def gits_from_costs(costs: GITSCosts, solver: str, steps: int) -> PeerResult:
    """The GITS trajectory of ``steps`` values for ``solver`` from a model's :class:`GITSCosts` (module docstring,
    step 3); the provenance is the cost pass's plus the chosen grid indices and the programme's cost.

    Raises:
        ValueError: an unknown solver, or a grid coarser than the steps asked for (``grid_size < steps``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")
    _check_grid(costs.grid.numel(), steps)
    num_evaluations(solver, steps)  # e.g. pndm needs >= 4 values
    coeff = float(costs.provenance.get("settings", {}).get("coeff", GITSSettings.coeff))
    start = time.perf_counter()
    nodes, value = select_steps(costs.cost, steps, coeff)
    ab = costs.grid[nodes].flip(0).clone()
    prov = {**costs.provenance, "grid_indices": nodes, "dp_cost": value,
            "seconds": float(costs.provenance.get("seconds", 0.0)) + time.perf_counter() - start}
    return PeerResult("gits", solver, steps, ab, prov)


def gits(model: Any, solver: str, steps: int, settings: GITSSettings | None = None) -> PeerResult:
    """The GITS trajectory of ``steps`` values for ``solver``, from ``model``'s own teacher paths (module
    docstring). For several solvers or step counts, compute :func:`gits_costs` once and call
    :func:`gits_from_costs` for each (the costs do not depend on the solver).

    Args:
        model: a denoiser of :mod:`vrg_lightning.models`.
        solver: the solver the trajectory is for (:data:`~vrg_lightning.solvers.SOLVERS`).
        steps: the number of values (model evaluations of the solver's run, ``<= settings.grid_size``).
        settings: :class:`GITSSettings` (the authors' defaults).

    Returns:
        :class:`~vrg_lightning.peers.common.PeerResult` (``alpha_bar`` cleanest first, grid values only).

    Raises:
        ValueError: an unknown solver, a grid coarser than the steps, a teacher that is not a solver.
    """
    s = settings or GITSSettings()
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")
    if isinstance(s, GITSSettings):
        _check_grid(s.grid_size, steps)  # before the teacher pass
    return gits_from_costs(gits_costs(model, s), solver, steps)
