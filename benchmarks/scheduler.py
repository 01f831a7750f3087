"""Per-step cost of ``VRGScheduler.step`` against diffusers' ``DDIMScheduler`` and ``DPMSolverMultistepScheduler``.

    OMP_NUM_THREADS=1 python benchmarks/scheduler.py                      # CPU, batch 1 and 64, run on a quiet machine
    python benchmarks/scheduler.py --device cuda --repeats 500

No model: the model output is a fixed tensor (3x32x32 per sample), so the table measures the scheduler alone. Each
repeat is one sampling loop as a pipeline runs it (``set_timesteps(n)`` with CPU timesteps, then ``step`` once per
timestep); "step" is the median over all timed ``step`` calls, "loop / call" the median over repeats of the whole
loop (``set_timesteps`` included) divided by its number of ``step`` calls (``pndm`` makes N+9 calls for N steps). On
CUDA each call is timed to a synchronize. Printed as a markdown table headed by the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.scheduler import VRGScheduler


def _schedulers(steps: int) -> dict[str, Callable[[], object]]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    ab = NoiseSchedule().alphas_cumprod[ddim.timesteps.flip(0)]  # the same noise levels, cleanest first
    return {
        "DDIMScheduler": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True),
        "VRGScheduler ddim": lambda: VRGScheduler(alpha_bar=ab, solver="ddim"),
        "DPMSolverMultistepScheduler": lambda: DPMSolverMultistepScheduler(),
        "VRGScheduler dpmpp_2m": lambda: VRGScheduler(alpha_bar=ab, solver="dpmpp_2m"),
        "VRGScheduler dpmsolver3": lambda: VRGScheduler(alpha_bar=ab, solver="dpmsolver3"),
        "VRGScheduler deis": lambda: VRGScheduler(alpha_bar=ab, solver="deis"),
        "VRGScheduler pndm": lambda: VRGScheduler(alpha_bar=ab, solver="pndm"),
    }


def _time(make: Callable[[], object], batch: int, steps: int, repeats: int, device: torch.device
          ) -> tuple[float, float]:
    """(median step seconds, median loop seconds per step call) of one scheduler."""
    sched = make()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    out = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step_times, loops = [], []
    for r in range(repeats + 3):  # 3 warm-up loops
        sync()
        start = time.perf_counter()
        sched.set_timesteps(steps)
        x, calls = x0, []
        for t in sched.timesteps:
            t0 = time.perf_counter()
            x = sched.step(out, t, x).prev_sample
            sync()
            calls.append(time.perf_counter() - t0)
        if r >= 3:
            loops.append((time.perf_counter() - start) / len(calls))
            step_times.extend(calls)
    return statistics.median(step_times), statistics.median(loops)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,64", help="comma list (default: 1,64)")
    p.add_argument("--steps", type=int, default=10, help="trajectory steps (default: 10)")
    p.add_argument("--repeats", type=int, default=200, help="timed sampling loops per row (default: 200)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    print(f"`{' '.join(['python', *sys.argv])}` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{device}, {args.steps} steps, {args.repeats} repeats)\n")
    print("| scheduler | batch | step (µs, median) | loop / call (µs, median) |")
    print("|---|---:|---:|---:|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for name, make in _schedulers(args.steps).items():
            step, loop = _time(make, batch, args.steps, args.repeats, device)
            print(f"| {name} | {batch} | {1e6 * step:.1f} | {1e6 * loop:.1f} |", flush=True)


if __name__ == "__main__":
    main()
