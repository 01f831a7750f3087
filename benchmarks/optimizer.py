"""Benchmark of the VRG optimizer on the published CIFAR-10 error table and DPM-Solver trajectories.

Reports, for the published setting (lp 0.01, λ 100, paper objective and MSE interpolation), the loss before and after
and the optimizer's time on one core for every reference trajectory, some other settings for 10 steps, and a
comparison with slow independent searches (long projected subgradient runs from several starts, and dynamic
programming over a fine grid of absolute ᾱ values) showing the optimum is reached. Appends the run to the "Optimizer"
section of the benchmark log, docs/benchmarks/log-2026.md (docs/BENCHMARKS.md quotes the current tables).

    python benchmarks/optimizer.py [--reference ../shared/reference] [--repeats 5] [--no-write]
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
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vrg_lightning.optimize import OptimizeSettings, SearchProblem, optimize_trajectory, trust_bounds  # noqa: E402
from vrg_lightning.profile import load_profile  # noqa: E402
from vrg_lightning.schedule import NoiseSchedule  # noqa: E402
from vrg_lightning.trajectories import load_trajectory, make_trajectory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASES = ("time_uniform", "time_quadratic", "logSNR")
STEPS = (10, 15, 20, 25, 50, 100)
PUBLISHED = {"cpe_before": 0.501388, "cpe_after": 0.423855, "rerun": 0.423826, "seconds": 223.0, "best": 0.41895}


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
def projected_subgradient(prob: SearchProblem, y: np.ndarray, iters: int) -> float:
    """Projected subgradient descent with diminishing steps (scaled by each box width); best value seen."""
    width = np.maximum(prob.hi - prob.lo, 1e-300)
    pinned = prob.alpha and prob.pinned
    proj = prob.vars.project_pinned if pinned else (lambda v: np.clip(v, prob.lo, prob.hi))
    y = proj(y)
    best = math.inf
    for k in range(1, iters + 1):
        f, g = prob.value_and_grad(y)
        best = min(best, f)
        gs = g * width
        norm = float(np.abs(gs).max())
        if norm == 0:
            break
        y = proj(y - (0.3 / math.sqrt(k)) * width * gs / norm)
    return min(best, prob.value_and_grad(y)[0])


def absolute_grid_dp(ab0: torch.Tensor, mse, s: OptimizeSettings, grid: int) -> tuple[float, np.ndarray]:
    """Exact minimum over a grid of absolute log ᾱ values per step (uniform points plus every table row), by dynamic
    programming; transitions must satisfy the ratio box exactly (``alpha`` trust)."""
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


def references(ab: torch.Tensor, mse, s: OptimizeSettings, iters: int, grid: int) -> dict[str, float]:
    prob = SearchProblem(ab, mse, s)
    out = {"pgd_base": projected_subgradient(prob, prob.y0.copy(), iters)}
    rng = np.random.default_rng(0)
    out["pgd_random3"] = min(projected_subgradient(prob, prob.lo + (prob.hi - prob.lo) * rng.random(prob.n), iters)
                             for _ in range(3))
    t = time.perf_counter()
    dp_value, z = absolute_grid_dp(ab, mse, s, grid)
    out["dp_grid"] = dp_value
    out["dp_seconds"] = time.perf_counter() - t
    y = np.clip(np.diff(z, prepend=0.0), prob.lo, prob.hi)
    out["pgd_from_dp"] = projected_subgradient(prob, y, iters)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20000, help="projected subgradient iterations per start")
    ap.add_argument("--grid", type=int, default=2000, help="points per step of the absolute-grid DP")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the benchmark log alone")
    args = ap.parse_args(argv)
    table = args.reference / "MSE_vs_alpha_bar_cifar10.txt"
    if not table.is_file():
        print(f"reference data not found under {args.reference}; nothing to do", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    mse = load_profile(table).mse_function("paper")
    paper = OptimizeSettings(mse_mode="paper")
    lines: list[str] = []
    emit = lines.append

    # headline
    base = make_trajectory(NoiseSchedule(), "time_quadratic", 10)
    r, wall, cpu = timed(base, mse, paper, args.repeats)
    cmd = " ".join(["python", "benchmarks/optimizer.py", *(argv if argv is not None else sys.argv[1:])])
    emit(f"### Run of {dt.date.today().isoformat()}: `{cmd}`\n")
    emit(f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs (load average "
         f"{os.getloadavg()[0]:.1f}), one thread. Times are medians of {args.repeats} runs: wall clock "
         "(`OptimizeResult.seconds`, the optimizer alone) and process CPU time.\n")
    emit("Published setting: reference CIFAR-10 MSE table (`mse_mode=paper`, piecewise linear in ᾱ), lp 0.01, "
         "λ 100, paper objective, `alpha` trust, start held by the penalty.\n")
    emit("#### Headline: 10-step time_quadratic (`make_trajectory(NoiseSchedule(), 'time_quadratic', 10)`)\n")
    emit("| | cpe before | loss after | seconds |")
    emit("|---|---|---|---|")
    emit(f"| published code (MLP + SGD, 3000 epochs) | {PUBLISHED['cpe_before']:.6f} | {PUBLISHED['cpe_after']:.6f} "
         f"(re-run {PUBLISHED['rerun']:.6f}) | {PUBLISHED['seconds']:.0f} |")
    emit(f"| vrg_lightning | {r.cpe_before:.6f} | **{r.loss:.6f}** (cpe {r.cpe_after:.6f}) | {wall:.3f} wall, "
         f"{cpu:.3f} CPU |")
    emit(f"\nBest value known before (long projected gradient): {PUBLISHED['best']}. Rounds: {r.iterations}, "
         f"loss evaluations: {r.evaluations}. The published cpe before (0.501388) is that of the reference file's "
         "float32 trajectory; the float64 base differs in the 5th digit (the file itself is in the next table).\n")
    print("\n".join(lines), flush=True)

    # every reference trajectory
    emit("#### All reference trajectories (files `dpm_alphaBar_1-NNN-BASE.txt`, end point dropped)\n")
    emit("| base | steps | cpe before | loss after | change | wall s | CPU s |")
    emit("|---|---|---|---|---|---|---|")
    for b in BASES:
        for n in STEPS:
            f = args.reference / "trajectories" / f"dpm_alphaBar_1-{n:03d}-{b}.txt"
            if not f.is_file():
                continue
            r, wall, cpu = timed(load_trajectory(f), mse, paper, max(1, args.repeats // 2))
            emit(f"| {b} | {n} | {r.cpe_before:.6f} | {r.loss:.6f} | {100 * (r.loss / r.cpe_before - 1):+.1f}% | "
                 f"{wall:.2f} | {cpu:.2f} |")
            print(lines[-1], flush=True)

    # other settings, 10 steps
    emit("\n#### Other settings, 10-step time_quadratic\n")
    emit("| setting | cpe before | loss after | wall s |")
    emit("|---|---|---|---|")
    variants = {
        "pin_start": OptimizeSettings(mse_mode="paper", pin_start=True),
        "trust=logsnr": OptimizeSettings(mse_mode="paper", trust="logsnr"),
        "lp 0.2, λ 1e4 (authors' tuned range)": OptimizeSettings(lp=0.2, reg_lambda=1e4, mse_mode="paper"),
        "mse_mode=fit (PCHIP)": OptimizeSettings(mse_mode="fit"),
        "objective=solver, dpmpp_2m": OptimizeSettings(mse_mode="paper", objective="solver", solver="dpmpp_2m"),
        "global_grid=0 (local search from the base only)": OptimizeSettings(mse_mode="paper", global_grid=0),
    }
    profile = load_profile(table)
    for name, s in variants.items():
        try:
            r, wall, _ = timed(base, profile.mse_function(s.mse_mode), s, 1)
        except (ImportError, ValueError) as exc:  # e.g. the solver-aware objective not available
            emit(f"| {name} | n/a ({exc}) | | |")
            continue
        emit(f"| {name} | {r.cpe_before:.6f} | {r.loss:.6f} | {wall:.2f} |")
        print(lines[-1], flush=True)

    # optimality against slow independent searches
    emit("\n#### Is it the optimum? Slow independent searches\n")
    emit(f"Projected subgradient descent with diminishing steps ({args.iters} iterations per start) from the base, "
         f"from 3 random points in the trust box, and from the minimiser of an exact dynamic program over a grid of "
         f"{args.grid} absolute log ᾱ values per step plus every table row (ratio box satisfied exactly). Loss values; "
         "the optimizer's is never above the best reference (beyond float rounding, ~1e-16).\n")
    emit("| case | optimizer | PGD from base | PGD, 3 random starts | grid DP | PGD from grid DP | gap to best |")
    emit("|---|---|---|---|---|---|---|")
    cases = [("time_quadratic", 10, "make_trajectory", paper), ("logSNR", 10, "file", paper),
             ("time_uniform", 10, "file", paper), ("time_quadratic", 15, "file", paper),
             ("logSNR", 10, "file", OptimizeSettings(mse_mode="paper", pin_start=True))]
    for b, n, src, s in cases:
        ab = make_trajectory(NoiseSchedule(), b, n) if src == "make_trajectory" else load_trajectory(
            args.reference / "trajectories" / f"dpm_alphaBar_1-{n:03d}-{b}.txt")
        r = optimize_trajectory(ab, mse, s)
        ref = references(ab, mse, s, args.iters, args.grid)
        best = min(ref["pgd_base"], ref["pgd_random3"], ref["dp_grid"], ref["pgd_from_dp"])
        label = f"{b} {n} ({src}{', pinned' if s.pin_start else ''})"
        emit(f"| {label} | **{r.loss:.8f}** | {ref['pgd_base']:.8f} | {ref['pgd_random3']:.8f} | {ref['dp_grid']:.8f} "
             f"| {ref['pgd_from_dp']:.8f} | {r.loss - best:+.1e} |")
        print(lines[-1], flush=True)
    emit("")
    body = "\n".join(lines)
    if not args.no_write:
        append_run(ROOT / "docs" / "benchmarks" / "log-2026.md", body)
        print(f"updated {ROOT / 'docs' / 'benchmarks' / 'log-2026.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
