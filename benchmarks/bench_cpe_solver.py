"""Time one ``cpe_solver`` evaluation plus its backward pass (what the solver-aware search pays per exact
evaluation, :class:`vrg_lightning.optimize.surrogate.SolverObjective`) against the paper cpe: the torch formula with
autograd, and its numpy twin with the analytic gradient (``paper (numpy)``: what the paper objective's search pays
per evaluation), and the closed form with its gradient of ``dpmpp_2m`` and ``deis`` (``optimize.multistep``: what
their solver-aware search pays).

Usage: ``python benchmarks/bench_cpe_solver.py [--steps 10 50 100] [--device cpu] [--threads 1]``
Prints a markdown table of milliseconds per call (best of several repeats, time_quadratic base, linear schedule).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vrg_lightning import NoiseSchedule, make_trajectory
from vrg_lightning.optimize.multistep import MULTISTEP, multistep_terms
from vrg_lightning.solvers import SOLVERS
from vrg_lightning.variance import cpe_paper, cpe_paper_numpy, cpe_solver


def mse(ab: torch.Tensor) -> torch.Tensor:
    return 0.02 + 0.3 * ab**2


def mse_np(ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 0.02 + 0.3 * ab**2, 0.6 * ab


def time_call(fn, repeats: int = 7, inner: int = 10) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    closed = [f"{s} (closed form)" for s in MULTISTEP]
    names = ["paper (numpy)", "paper", *SOLVERS]
    print("| N | " + " | ".join(names + closed) + " |")
    print("|---|" + "---|" * len(names + closed))
    for n in args.steps:
        base = make_trajectory(NoiseSchedule(), "time_quadratic", n).to(args.device)
        rows = base.cpu().numpy()[None]
        row = [f"{time_call(lambda: cpe_paper_numpy(rows, mse_np, grad=True)):.3f}"]  # noqa: B023
        for name in names[1:]:

            def step(name: str = name, base: torch.Tensor = base) -> None:
                ab = base.clone().requires_grad_(True)
                value = cpe_paper(ab, mse) if name == "paper" else cpe_solver(ab, mse, name)
                value.backward()

            row.append(f"{time_call(step):.2f}")
        for solver in MULTISTEP:
            row.append(f"{time_call(lambda s=solver, r=rows: multistep_terms(s, r, mse_np, True)):.3f}")
        print(f"| {n} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
