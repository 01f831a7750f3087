"""Speed of UNet sizes for the digits default: training step (batch 128, AdamW) and sampling throughput (batch 256).

    python benchmarks/model_speed.py            # random weights; run on a quiet machine

Prints, per configuration, parameters, seconds per training step (mean of 10 after 3 warm-up) and image evaluations
per second in inference mode (5 repeats after one warm-up).
"""

from __future__ import annotations

import time

import torch
from diffusers import UNet2DModel

from vrg_lightning.denoiser import DIGITS_UNET

CONFIGS = {
    "[16, 32, 64] (previous default)": {**DIGITS_UNET, "block_out_channels": [16, 32, 64], "norm_num_groups": 8,
                                        "attention_head_dim": 32},
    "[8, 16, 32] (DIGITS_UNET)": DIGITS_UNET,
}


def main() -> None:
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    for name, cfg in CONFIGS.items():
        m = UNet2DModel(**cfg)
        opt = torch.optim.AdamW(m.parameters())
        x, t = torch.randn(128, 1, 16, 16), torch.randint(0, 1000, (128,))
        for i in range(13):
            if i == 3:
                t0 = time.perf_counter()
            loss = (m(x, t).sample - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        step = (time.perf_counter() - t0) / 10
        m.eval()
        xx, tt = torch.randn(256, 1, 16, 16), torch.full((256,), 500)
        with torch.inference_mode():
            m(xx, tt)
            t0 = time.perf_counter()
            for _ in range(5):
                m(xx, tt)
        rate = 256 * 5 / (time.perf_counter() - t0)
        params = sum(p.numel() for p in m.parameters())
        print(f"{name}: {params / 1e6:.3f} M parameters, {step:.3f} s per training step, "
              f"{rate:.0f} image evaluations/s",
              flush=True)


if __name__ == "__main__":
    main()
