"""Cost of VRG profiling: free mode as a step-time ratio, probe mode in seconds per 1,000 samples.

    python benchmarks/profiling_overhead.py                        # digits default UNet, CPU or GPU (auto)
    python benchmarks/profiling_overhead.py --model cifar10 --steps 600 --batch-size 128

Free mode: one Lightning fit of ``DiffusionModule`` with ``VRGProfiler`` attached; the callback's per-batch work is
switched on and off in alternating blocks of ``--block`` steps (after ``--warmup`` steps), so drift in machine load
hits both alike. The step time is measured from one ``on_train_batch_start`` to the next (forward, backward,
optimizer, EMA, callbacks; CUDA synchronised at those two points in both modes). Reported: the ratio of mean step
times with/without free mode, the ratio of medians, and the callback hook's own median time (CUDA synchronised
around it) as a fraction of the median step without it, 1 + that fraction being the low-variance estimate of the
ratio on a loaded machine. Probe: :func:`vrg_lightning.probe.probe_profile` with the
EMA weights, wall time per 1,000 samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from vrg_lightning import VRGProfiler, probe_profile
from vrg_lightning.module import DiffusionModule

CIFAR_UNET = {"sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
              "dropout": 0.1, "attention_head_dim": 256}


class Switchable(VRGProfiler):
    """VRGProfiler whose free-mode batch hook runs only while ``enabled``."""

    enabled = False
    hook_s: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if self.enabled:
            cuda = pl_module.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(pl_module.device)
            t0 = time.perf_counter()
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize(pl_module.device)
            self.hook_s.append(time.perf_counter() - t0)


class StepTimer(pl.Callback):
    def __init__(self, profiler: Switchable, warmup: int, block: int) -> None:
        self.profiler, self.warmup, self.block = profiler, warmup, block
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self._last: float | None = None
        self._state = False
        self.device = torch.device("cpu")

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.device = pl_module.device
        now = self._now(pl_module)
        step = trainer.global_step
        if self._last is not None and step > self.warmup:
            self.times[self._state].append(now - self._last)
        self._state = ((step // self.block) % 2 == 1) if step >= self.warmup else False
        self.profiler.enabled = self._state
        self._last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["digits", "cifar10"], default="digits")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--probe-samples", type=int, default=4096)
    ap.add_argument("--accelerator", default="auto")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.model == "digits":
        from vrg_lightning.data import digits_dataset

        data = digits_dataset()
        module = DiffusionModule()
    else:  # random 32×32×3 images: the cost does not depend on the pixels
        data = TensorDataset(torch.rand(4096, 3, 32, 32) * 2 - 1, torch.zeros(4096, dtype=torch.long))
        module = DiffusionModule(unet=CIFAR_UNET)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    prof = Switchable(probe_at_fit_end=False, steps=[], log_every_n_epochs=0, resave_last=False)
    timer = StepTimer(prof, args.warmup, args.block)
    trainer = pl.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[prof, timer])
    trainer.fit(module, loader)
    on, off = timer.times[True], timer.times[False]
    device = timer.device  # Lightning moves the module back to the CPU after fit
    result = {"model": args.model, "device": str(device), "batch_size": args.batch_size,
              "steps_on": len(on), "steps_off": len(off), "mean_step_s_off": statistics.fmean(off),
              "mean_step_s_on": statistics.fmean(on), "ratio_mean": statistics.fmean(on) / statistics.fmean(off),
              "ratio_median": statistics.median(on) / statistics.median(off),
              "hook_ms_median": 1e3 * statistics.median(prof.hook_s),
              "hook_fraction_of_step": statistics.median(prof.hook_s) / statistics.median(off)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    den = module.vrg_denoiser().to(device).eval()
    probe_profile(den, data, module.schedule, num_samples=256, batch_size=256, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    probe_profile(den, data, module.schedule, num_samples=args.probe_samples, batch_size=256, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["probe_s_per_1000"] = (time.perf_counter() - t0) * 1000 / args.probe_samples
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
