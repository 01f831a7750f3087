"""Train a diffusion model with VRG profiling: a thin LightningCLI entry point.

    python train.py fit --config configs/digits.yaml                      # offline digits, ~10 min on 2 CPU cores
    python train.py fit --config configs/digits.yaml --trainer.max_steps 200   # quick smoke run
    python train.py fit --config configs/digits.yaml --ckpt_path runs/digits/checkpoints/last.ckpt   # resume

The model is :class:`vrg_lightning.module.DiffusionModule`; the datamodule is chosen by ``data.class_path`` in the
config (``vrg_lightning.data.DigitsDataModule``, ``SampleImagePatchesDataModule``, ``ImageFolderDataModule``,
``CIFAR10DataModule``). The final ``last.ckpt`` carries the error profile and VRG trajectories (``vrg inspect``).
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from vrg_lightning.checkpoint import CheckpointMismatchError
from vrg_lightning.module import DiffusionModule


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DiffusionModule, LightningDataModule, subclass_mode_data=True, args=args,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    try:
        main()
    except CheckpointMismatchError as exc:  # e.g. resuming with another noise schedule: one line, no traceback
        sys.exit(f"train.py: error: {exc}")
