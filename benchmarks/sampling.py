"""Sampling speed: a VRG trajectory vs its base, and our sampler vs diffusers' own scheduler loops.

    python benchmarks/sampling.py [--device cpu|cuda] [--unet digits|cifar] [--batch 64] [--steps 10]
                                  [--repeats 5] [--json OUT]

1. ``generate`` with a base trajectory and with its VRG version (same solver, same number of model evaluations):
   the ratio of times per image should be 1 (goal <= 1.01). The VRG version here is the base moved by the VRG
   optimizer under a synthetic MSE profile (the values do not change the cost).
2. Our sampler vs diffusers on the same UNet and the same integer trajectory: ``DDIMScheduler`` (DDIM, η = 0,
   ``set_alpha_to_one``, no clipping) vs ``ddim``, and ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M), custom integer
   ``timesteps=``, ``final_sigmas_type="zero"``) vs ``dpmpp_2m`` (goal: ours not slower). "ours (loop)" is the
   solver loop alone from the same noise tensor; "ours (generate)" adds the per-index noise of :func:`generate`.
   The largest absolute difference of the final samples shows that both compute the same thing.

Weights are random (timing only). Times are medians over interleaved repeats, after one warm-up run each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from vrg_lightning.denoiser import DIGITS_UNET, Denoiser
from vrg_lightning.optimize import OptimizeSettings, optimize_trajectory
from vrg_lightning.sampling import generate
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.solvers import sample
from vrg_lightning.trajectories import make_trajectory

CIFAR_UNET = {  # the DDPM CIFAR-10 layout (35.7M parameters)
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
}
DIFFUSERS_CFG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, interleaved, after one warm-up call each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def diffusers_loop(unet: torch.nn.Module, scheduler, x: torch.Tensor) -> torch.Tensor:
    """The standard diffusers pipeline loop (``scheduler.set_timesteps`` already called)."""
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--unet", choices=("digits", "cifar"), default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**(DIGITS_UNET if args.unet == "digits" else CIFAR_UNET)).to(device).eval()
    unet.requires_grad_(False)
    den = Denoiser(unet=unet)
    sched = NoiseSchedule()
    n, b = args.steps, args.batch
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x0 = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    eps_fn = den.eps_fn()
    results: dict[str, object] = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda"
                                  else None, "cpu": platform.processor() or platform.machine(), "unet": args.unet,
                                  "batch": b, "steps": n, "repeats": args.repeats, "threads": torch.get_num_threads()}

    # 1. VRG vs base -------------------------------------------------------------------------------------------
    mse = lambda a: 0.02 + 0.3 * a * (1 - a)  # noqa: E731 - synthetic profile; the cost does not depend on it
    rows = []
    for solver, base in (("ddim", "time_uniform"), ("dpmpp_2m", "logSNR")):
        ab = make_trajectory(sched, base, n)
        vrg = optimize_trajectory(ab, mse, OptimizeSettings(lp=0.1)).alpha_bar
        with torch.inference_mode():
            t = timed({"base": lambda ab=ab, s=solver: generate(den, ab, s, b, 0, batch_size=b),
                       "vrg": lambda v=vrg, s=solver: generate(den, v, s, b, 0, batch_size=b)}, args.repeats, device)
        rows.append({"solver": solver, "base": base, "ms_per_image_base": 1e3 * t["base"] / b,
                     "ms_per_image_vrg": 1e3 * t["vrg"] / b, "ratio": t["vrg"] / t["base"]})
    results["vrg_vs_base"] = rows

    # 2. ours vs diffusers ---------------------------------------------------------------------------------------
    rows = []
    ddim = DDIMScheduler(**DIFFUSERS_CFG, set_alpha_to_one=True, clip_sample=False)
    dpm = DPMSolverMultistepScheduler(**DIFFUSERS_CFG, algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero", lower_order_final=True)
    ddim.set_timesteps(n)
    from vrg_lightning.export import export_trajectory

    ts = export_trajectory(make_trajectory(sched, "logSNR", n), sched, "timesteps").values
    dpm.set_timesteps(timesteps=ts)
    for solver, scheduler in (("ddim", ddim), ("dpmpp_2m", dpm)):
        ab = sched.alphas_cumprod[scheduler.timesteps.cpu().long()].flip(0)
        ab_dev = ab.to(device)

        def theirs(s=scheduler) -> torch.Tensor:
            s.set_timesteps(timesteps=ts) if s is dpm else s.set_timesteps(n)
            return diffusers_loop(unet, s, x0)

        fns = {"diffusers": theirs,
               "ours (loop, trajectory on device)": lambda a=ab_dev, s=solver: sample(s, eps_fn, x0, a),
               "ours (loop, trajectory on CPU)": lambda a=ab, s=solver: sample(s, eps_fn, x0, a),
               "ours (generate)": lambda a=ab, s=solver: generate(den, a, s, b, 0, batch_size=b)}
        with torch.inference_mode():
            t = timed(fns, args.repeats, device)
            diff = float((theirs() - sample(solver, eps_fn, x0, ab)).abs().max())
        rows.append({"solver": solver, "scheduler": type(scheduler).__name__, "timesteps": scheduler.timesteps.tolist(),
                     **{f"ms_per_image {k}": 1e3 * v / b for k, v in t.items()},
                     "ratio ours(loop)/diffusers": min(t["ours (loop, trajectory on device)"],
                                                       t["ours (loop, trajectory on CPU)"]) / t["diffusers"],
                     "max_abs_diff": diff})
    results["ours_vs_diffusers"] = rows
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
