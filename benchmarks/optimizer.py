"""Benchmark of the VRG optimizer on the published CIFAR-10 error table and DPM-Solver trajectories.

Reports, on one core:

1. the headline (10-step time_quadratic, published setting: lp 0.01, λ 100, paper objective and MSE interpolation);
2. every reference trajectory (10-100 steps x 3 bases): loss, wall and CPU time, and the gap to the best of slow
   independent searches (long projected subgradient runs from the base and from random points, and an exact dynamic
   programme over a fine grid of absolute ᾱ values plus every table row, then projected subgradient from its
   minimiser): the optimizer must be within 1e-6 of it (or below);
3. some other settings for 10 steps;
4. the solver-aware objective of every solver: its time as a multiple of the paper objective's at the same N, and,
   on the headline trajectory, the same slow searches on the exact ``cpe_solver`` (projected subgradient from the
   base, random points and the paper optimum, and from the grid programme's minimiser).

Appends the run to the "Optimizer" section of the benchmark log, docs/benchmarks/log-2026.md, unless ``--no-write``.

    python benchmarks/optimizer.py [--reference ../shared/reference] [--repeats 5] [--quick] [--no-write]

``--quick`` (about a minute): 3 repeats, 3000/400 iterations and a 400-point grid for the slow searches, the solver
table at 10 and 25 steps. The full run takes several minutes.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vrg_lightning.optimize import OptimizeSettings, SearchProblem, optimize_trajectory, trust_bounds  # noqa: E402
from vrg_lightning.optimize.surrogate import SolverObjective  # noqa: E402
from vrg_lightning.profile import load_profile  # noqa: E402
from vrg_lightning.schedule import NoiseSchedule  # noqa: E402
from vrg_lightning.solvers import SOLVERS  # noqa: E402
from vrg_lightning.trajectories import load_trajectory, make_trajectory  # noqa: E402
from vrg_lightning.variance import DDIM_LIKE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASES = ("time_uniform", "time_quadratic", "logSNR")
STEPS = (10, 15, 20, 25, 50, 100)
PUBLISHED = {"cpe_before": 0.501388, "cpe_after": 0.423855, "rerun": 0.423826, "seconds": 223.0, "best": 0.41895}
AWARE = tuple(s for s in SOLVERS if s not in DDIM_LIKE)  # solvers whose solver-aware cpe is not the paper formula
Fun = Callable[[np.ndarray], tuple[float, np.ndarray]]


def timed(ab: torch.Tensor, mse, s: OptimizeSettings, repeats: int) -> tuple[object, float, float]:
    """Result, median wall seconds (the optimizer's own clock) and median CPU seconds over ``repeats`` runs."""
    walls, cpus, r = [], [], None
    for _ in range(repeats):
        c = time.process_time()
        r = optimize_trajectory(ab, mse, s)
        cpus.append(time.process_time() - c)
        walls.append(r.seconds)
    return r, statistics.median(walls), statistics.median(cpus)


# --- slow independent references ---------------------------------------------------------------------------------
def projected_subgradient(prob: SearchProblem, fun: Fun, y: np.ndarray, iters: int) -> float:
    """Projected subgradient descent with diminishing steps (scaled by each box width); best value seen."""
    width = np.maximum(prob.hi - prob.lo, 1e-300)
    pinned = prob.alpha and prob.pinned
    proj = prob.vars.project_pinned if pinned else (lambda v: np.clip(v, prob.lo, prob.hi))
    y = proj(y)
    best = math.inf
    for k in range(1, iters + 1):
        f, g = fun(y)
        best = min(best, f)
        gs = g * width
        norm = float(np.abs(gs).max())
        if not norm > 0:
            break
        y = proj(y - (0.3 / math.sqrt(k)) * width * gs / norm)
    return min(best, fun(y)[0])


def absolute_grid_dp(ab0: torch.Tensor, mse, s: OptimizeSettings, grid: int) -> tuple[float, np.ndarray]:
    """Exact minimum of the paper loss over a grid of absolute log ᾱ values per step (uniform points plus every table
    row), by dynamic programming; transitions must satisfy the ratio box exactly (``alpha`` trust)."""
    n, ab = ab0.numel(), ab0.numpy()
    mse_np = mse.value_and_grad
    lo, hi = trust_bounds(ab0, s)
    llo, lhi = np.log(lo), np.log(hi)
    zlo, zhi = np.cumsum(llo), np.cumsum(lhi)
    knots = np.log(mse.knots[mse.knots > 0])
    grids = [np.union1d(np.linspace(zlo[i], zhi[i], grid), knots[(knots >= zlo[i]) & (knots <= zhi[i])])
             for i in range(n)]
    if s.pin_start:
        grids[-1] = np.log(ab[-1:])

    def sig(z: np.ndarray) -> np.ndarray:
        return np.sqrt(np.expm1(-z))

    value = sig(grids[0]) ** 2 * mse_np(np.exp(grids[0]))[0]
    back = []
    for i in range(1, n):
        p, q = grids[i - 1][:, None], grids[i][None, :]
        cost = value[:, None] + (sig(q) - sig(p)) ** 2 * mse_np(np.exp(q))[0]
        cost = np.where((q - p >= llo[i]) & (q - p <= lhi[i]), cost, np.inf)
        j = np.argmin(cost, axis=0)
        back.append(j)
        value = cost[j, np.arange(cost.shape[1])]
    if not s.pin_start:
        value = value + s.reg_lambda * (np.exp(grids[-1]) - ab[-1]) ** 2
    idx = [int(np.argmin(value))]
    for i in range(n - 1, 0, -1):
        idx.append(int(back[i - 1][idx[-1]]))
    z = np.array([grids[i][j] for i, j in enumerate(idx[::-1])])
    return float(value.min()), z


def references(ab: torch.Tensor, mse, s: OptimizeSettings, iters: int, grid: int,
               extra_start: np.ndarray | None = None) -> dict[str, float]:
    """The slow searches on the objective of ``s`` (paper: the numpy loss; solver: the exact ``cpe_solver`` by
    autograd): PGD from the base, from 3 random points, from the grid DP's minimiser (the grid DP itself scores the
    paper loss, so it is reported for the paper objective only) and, if given, from ``extra_start``."""
    prob = SearchProblem(ab, mse, s)
    solver = s.objective == "solver" and s.solver not in DDIM_LIKE
    fun: Fun = SolverObjective(prob, closed_form=False).at if solver else prob.value_and_grad  # (independent)
    out = {"pgd_base": projected_subgradient(prob, fun, prob.y0.copy(), iters)}
    rng = np.random.default_rng(0)
    out["pgd_random3"] = min(projected_subgradient(prob, fun, prob.lo + (prob.hi - prob.lo) * rng.random(prob.n),
                                                   iters) for _ in range(3))
    dp_value, z = absolute_grid_dp(ab, mse, s, grid)
    if not solver:
        out["dp_grid"] = dp_value
    y = np.clip(np.diff(z, prepend=0.0), prob.lo, prob.hi)
    out["pgd_from_dp"] = projected_subgradient(prob, fun, y, iters)
    if extra_start is not None:
        out["pgd_from_paper"] = projected_subgradient(prob, fun, np.clip(extra_start, prob.lo, prob.hi), iters)
    return out


# --- report ------------------------------------------------------------------------------------------------------
INTRO = """## Optimizer

`benchmarks/optimizer.py`: the VRG optimizer on the published CIFAR-10 error table (`MSE_vs_alpha_bar_cifar10.txt`)
and the DPM-Solver reference trajectories. Each run is appended below."""


def append_run(path: Path, run: str) -> None:
    """Append ``run`` at the end of the Optimizer section (created if absent), leaving other sections alone."""
    from vrg_lightning.io import atomic_write_text

    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    head = "\n## Optimizer\n"
    if head not in "\n" + text:
        text = text.rstrip("\n") + "\n\n" + INTRO + "\n\n" + run
    else:
        start = ("\n" + text).index(head)
        nxt = text.find("\n## ", start + len(head) - 1)
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:end].rstrip("\n") + "\n\n" + run.rstrip("\n") + "\n\n" + text[end:]
    atomic_write_text(path, text.rstrip("\n") + "\n")


def reference_file(reference: Path, base: str, n: int) -> Path:
    return reference / "trajectories" / f"dpm_alphaBar_1-{n:03d}-{base}.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5; 3 with --quick)")
    ap.add_argument("--iters", type=int, default=None, help="projected subgradient iterations per start, paper "
                    "objective (default 20000; 3000 with --quick)")
    ap.add_argument("--solver-iters", type=int, default=None, help="the same for the solver-aware objective "
                    "(default 2000; 400 with --quick)")
    ap.add_argument("--grid", type=int, default=None, help="points per step of the absolute-grid DP (default 2000; "
                    "400 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and iterations, solver table at 10, 25 steps")
    ap.add_argument("--solver-steps", default=None, help="step counts of the solver-aware timing table, comma "
                    "separated (default 10,25,50,100; 10,25 with --quick)")
    ap.add_argument("--solver-bases", default="time_quadratic", help="bases of the solver-aware timing table, comma "
                    "separated (default time_quadratic; e.g. time_uniform,time_quadratic,logSNR)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the benchmark log alone")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    iters = args.iters or (3000 if args.quick else 20000)
    solver_iters = args.solver_iters or (400 if args.quick else 2000)
    grid = args.grid or (400 if args.quick else 2000)
    table = args.reference / "MSE_vs_alpha_bar_cifar10.txt"
    if not table.is_file():
        print(f"reference data not found under {args.reference}; nothing to do", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    profile = load_profile(table)
    mse = profile.mse_function("paper")
    paper = OptimizeSettings(mse_mode="paper")
    lines: list[str] = []

    def emit(line: str, show: bool = False) -> None:
        lines.append(line)
        if show:
            print(line, flush=True)

    # headline
    base = make_trajectory(NoiseSchedule(), "time_quadratic", 10)
    r, wall, cpu = timed(base, mse, paper, repeats)
    cmd = " ".join(["python", "benchmarks/optimizer.py", *(argv if argv is not None else sys.argv[1:])])
    emit(f"### Run of {dt.date.today().isoformat()}: `{cmd}`\n")
    emit(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs (load average "
         f"{os.getloadavg()[0]:.1f}), one thread. Times are medians of {repeats} runs: wall clock "
         "(`OptimizeResult.seconds`, the optimizer alone) and process CPU time, in milliseconds.\n")
    emit("Published setting: reference CIFAR-10 MSE table (`mse_mode=paper`, piecewise linear in ᾱ), lp 0.01, "
         "λ 100, paper objective, `alpha` trust, start held by the penalty.\n")
    emit("#### Headline: 10-step time_quadratic (`make_trajectory(NoiseSchedule(), 'time_quadratic', 10)`)\n")
    emit("| | cpe before | loss after | ms |")
    emit("|---|---|---|---|")
    emit(f"| published code (MLP + SGD, 3000 epochs) | {PUBLISHED['cpe_before']:.6f} | {PUBLISHED['cpe_after']:.6f} "
         f"(re-run {PUBLISHED['rerun']:.6f}) | {1000 * PUBLISHED['seconds']:.0f} |")
    emit(f"| vrg_lightning | {r.cpe_before:.6f} | **{r.loss:.8f}** (cpe {r.cpe_after:.6f}) | {1e3 * wall:.1f} wall, "
         f"{1e3 * cpu:.1f} CPU |", show=True)
    emit(f"\nBest value known before (long projected gradient): {PUBLISHED['best']}. Rounds: {r.iterations}, "
         f"loss evaluations: {r.evaluations}.\n")

    # every reference trajectory, with the slow searches
    emit(f"#### All reference trajectories (files `dpm_alphaBar_1-NNN-BASE.txt`, end point dropped), against slow "
         f"searches: PGD {iters} iterations from the base, from 3 random points and from the minimiser of a DP over "
         f"{grid} absolute log ᾱ per step plus every table row; gap = (optimizer - best search) / best search\n")
    emit("| base | steps | cpe before | loss after | best slow search | gap | wall ms | CPU ms |")
    emit("|---|---|---|---|---|---|---|---|")
    paper_ms: dict[int, list[float]] = {}
    for b in BASES:
        for n in STEPS:
            f = reference_file(args.reference, b, n)
            if not f.is_file():
                continue
            ab = load_trajectory(f)
            r, wall, cpu = timed(ab, mse, paper, repeats)
            paper_ms.setdefault(n, []).append(1e3 * wall)
            best = min(references(ab, mse, paper, iters, grid).values())
            emit(f"| {b} | {n} | {r.cpe_before:.6f} | {r.loss:.8f} | {best:.8f} | {(r.loss - best) / best:+.1e} | "
                 f"{1e3 * wall:.1f} | {1e3 * cpu:.1f} |", show=True)

    # other settings, 10 steps
    emit("\n#### Other settings, 10-step time_quadratic\n")
    emit("| setting | cpe before | loss after | wall ms |")
    emit("|---|---|---|---|")
    variants = {
        "pin_start": OptimizeSettings(mse_mode="paper", pin_start=True),
        "trust=logsnr": OptimizeSettings(mse_mode="paper", trust="logsnr"),
        "lp 0.2, λ 1e4 (authors' tuned range)": OptimizeSettings(lp=0.2, reg_lambda=1e4, mse_mode="paper"),
        "mse_mode=fit (PCHIP)": OptimizeSettings(mse_mode="fit"),
        "objective=solver, dpmpp_2m": OptimizeSettings(mse_mode="paper", objective="solver", solver="dpmpp_2m"),
        "global_grid=0 (local search from the base only)": OptimizeSettings(mse_mode="paper", global_grid=0),
        "alpha_bar_range = the schedule's trained range": OptimizeSettings(
            mse_mode="paper", alpha_bar_range=(NoiseSchedule().alpha_bar_min, NoiseSchedule().alpha_bar_max)),
    }
    for name, s in variants.items():
        r, wall, _ = timed(base, profile.mse_function(s.mse_mode), s, 1)
        emit(f"| {name} | {r.cpe_before:.6f} | {r.loss:.8f} | {1e3 * wall:.1f} |", show=True)

    # solver-aware objective: time as a multiple of the paper objective's, every solver
    solver_steps = tuple(int(v) for v in args.solver_steps.split(",")) if args.solver_steps else (
        (10, 25) if args.quick else (10, 25, 50, 100))
    solver_bases = args.solver_bases.split(",")
    emit("\n#### Solver-aware objective: optimizer time / paper objective's time at the same N "
         f"({', '.join(solver_bases)} files; DDIM-like solvers optimise the paper formula itself)\n")
    emit("| base | N | paper ms | " + " | ".join(AWARE) + " |")
    emit("|---|---|---|" + "---|" * len(AWARE))
    for base_name in solver_bases:
        for n in solver_steps:
            ab = load_trajectory(reference_file(args.reference, base_name, n))
            _, pwall, _ = timed(ab, mse, paper, repeats)
            cells = []
            for solver in AWARE:
                _, wall, _ = timed(ab, mse, OptimizeSettings(mse_mode="paper", objective="solver", solver=solver),
                                   min(repeats, 3))
                cells.append(f"{wall / pwall:.1f}x")
            emit(f"| {base_name} | {n} | {1e3 * pwall:.1f} | " + " | ".join(cells) + " |", show=True)

    # solver-aware optimality: slow searches on the exact cpe_solver, every solver
    emit(f"\n#### Solver-aware objective, 10-step time_quadratic file: the optimizer against slow searches on the "
         f"exact `cpe_solver` (PGD {solver_iters} iterations from the base, 3 random points, the paper optimum and "
         f"the paper grid DP's minimiser)\n")
    emit("| solver | optimizer | PGD from base | PGD, 3 random | PGD from paper optimum | PGD from grid DP | gap |")
    emit("|---|---|---|---|---|---|---|")
    ab = load_trajectory(reference_file(args.reference, "time_quadratic", 10))
    paper_opt = optimize_trajectory(ab, mse, paper)
    for solver in AWARE:
        s = OptimizeSettings(mse_mode="paper", objective="solver", solver=solver)
        r = optimize_trajectory(ab, mse, s)
        start = SearchProblem(ab, mse, s).vars.from_alpha_bar(paper_opt.alpha_bar)
        ref = references(ab, mse, s, solver_iters, grid, extra_start=start)
        best = min(ref.values())
        emit(f"| {solver} | **{r.loss:.8f}** | {ref['pgd_base']:.8f} | {ref['pgd_random3']:.8f} | "
             f"{ref['pgd_from_paper']:.8f} | {ref['pgd_from_dp']:.8f} | {(r.loss - best) / best:+.1e} |", show=True)
    emit("")
    body = "\n".join(lines)
    if not args.no_write:
        append_run(ROOT / "docs" / "benchmarks" / "log-2026.md", body)
        print(f"updated {ROOT / 'docs' / 'benchmarks' / 'log-2026.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
