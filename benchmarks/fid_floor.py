"""The FID floor at a sample count, and the pixel spread of base vs VRG samples (docs/BENCHMARKS.md, full grid).

    python benchmarks/fid_floor.py --ckpt runs/digits/checkpoints/last.ckpt --dataset digits
    python benchmarks/fid_floor.py --ckpt runs/patches/checkpoints/last.ckpt --dataset patches \\
        --candidates runs/quality/patches-full/candidates/ddim-10-logSNR.json

Prints the FID of seeded random subsets of the real images against all of them, and of a many-step
DPM-Solver++(2M) logSNR sample of the model, both at ``--num-samples`` images; with ``--candidates`` (a file that
``benchmarks/quality.py`` wrote), the overall and per-image pixel std of DDIM samples of each stored candidate.
"""

from __future__ import annotations

import argparse
import json

import torch

from vrg_lightning.checkpoint import load_denoiser
from vrg_lightning.data import load_real_images
from vrg_lightning.evaluation import build_features, default_features, feature_stats, fid_from_stats
from vrg_lightning.sampling import generate, image_shape
from vrg_lightning.trajectories import make_trajectory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--candidates", default=None)
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    den, _ = load_denoiser(a.ckpt)
    den.eval()
    shape = image_shape(den)
    ext = build_features(default_features("auto", shape[0]), image_shape=shape)
    real = load_real_images(a.dataset, None, image_size=shape[-1], channels=shape[0])
    ref = feature_stats(real, ext)
    for s in seeds:
        idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(s))[:a.num_samples]
        print(f"real subset seed {s}: FID[{ext.name}] {fid_from_stats(feature_stats(real[idx], ext), ref):.2f}")
    ab = make_trajectory(den.schedule, "logSNR", a.steps)
    with torch.no_grad():
        for s in seeds:
            x = generate(den, ab, "dpmpp_2m", a.num_samples, s, batch_size=256)
            print(f"{a.steps}-step dpmpp_2m logSNR seed {s}: FID[{ext.name}] "
                  f"{fid_from_stats(feature_stats(x, ext), ref):.2f}", flush=True)
        if a.candidates:
            print(f"real: pixel std {real.std():.3f}, per-image std {real.flatten(1).std(1).mean():.3f}")
            for c in json.loads(open(a.candidates).read())["candidates"]:
                x = generate(den, torch.tensor(c["alpha_bar"], dtype=torch.float64), "ddim", a.num_samples, seeds[0],
                             batch_size=256)
                print(f"{c['label']}: pixel std {x.std():.3f}, per-image std {x.flatten(1).std(1).mean():.3f}")


if __name__ == "__main__":
    main()
