"""Fit a tiny DiffusionModule with VRGProfiler on 1 or 2 CPU processes and save each rank's profiles.

    python tests/scripts/ddp_profile.py --devices 2 --out DIR    # DDP (gloo), Lightning relaunches this script

Every sample's timestep and noise come from its dataset index and the epoch, and the global batch is the same
(16 images), so 1 and 2 processes see identical (image, t, noise) sets: their profiles must agree.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vrg_lightning.callbacks import VRGProfiler
from vrg_lightning.data import digits_dataset
from vrg_lightning.denoiser import DIGITS_UNET
from vrg_lightning.module import DiffusionModule

TINY = dict(DIGITS_UNET, block_out_channels=[8, 8, 8], norm_num_groups=4, attention_head_dim=8)
GLOBAL_BATCH = 16


class IndexedNoise(DiffusionModule):
    """Timestep and noise of each sample fixed by (dataset index, epoch)."""

    def draw_noise(self, x0, batch):
        ts, es = [], []
        for i in batch[2].tolist():
            g = torch.Generator().manual_seed(1000 * i + self.current_epoch)
            ts.append(int(torch.randint(0, self.schedule.num_train_timesteps, (), generator=g)))
            es.append(torch.randn(x0.shape[1:], generator=g))
        return torch.tensor(ts, device=x0.device), torch.stack(es).to(x0.device)


class Shards(pl.LightningDataModule):
    """Rank r of W takes samples r, r+W, … in order (Lightning's own distributed sampler always shuffles)."""

    def __init__(self, data: TensorDataset, world: int) -> None:
        super().__init__()
        self.data, self.world = data, world

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=self.world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=GLOBAL_BATCH // self.world, sampler=sampler, drop_last=True)


class Recorder(pl.Callback):
    def __init__(self, profiler: VRGProfiler, out: str) -> None:
        self.profiler, self.out = profiler, out

    def on_train_end(self, trainer, pl_module) -> None:  # runs after VRGProfiler's fit-end probe
        free = self.profiler.free_profile(trainer)  # collective: every rank
        torch.save({"free": free.to_dict(), "probe": self.profiler.probe.to_dict(), "world": trainer.world_size,
                    "step": trainer.global_step}, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    x, y = digits_dataset().tensors
    data = TensorDataset(x[:64], y[:64], torch.arange(64))
    module = IndexedNoise(unet=TINY, lr=1e-4, warmup_steps=0, ema_decay=0.5)
    profiler = VRGProfiler(num_bins=20, half_life_samples=40, probe_samples=256, probe_batch_size=64, probe_seed=3,
                           probe_dataset=data, steps=[], resave_last=False, log_every_n_epochs=0)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[profiler, Recorder(profiler, args.out)],
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=Shards(data, args.devices))


if __name__ == "__main__":
    main()
