"""Train the small digits classifier whose penultimate layer gives the ``digits`` FID features.

Trains :class:`vrg_lightning.evaluation.DigitsClassifier` on scikit-learn's 8x8 digits (pixels 0..16 mapped to
[-1, 1], the models' data range) with a fixed seed on the CPU, in well under a minute, and writes a plain
``state_dict`` (``torch.load(weights_only=True)`` loads it) to ``vrg_lightning/assets/digits_classifier.pt``.

    python scripts/train_digits_classifier.py [--out PATH] [--seed 0] [--epochs 40]

The training images get random shifts of up to one pixel, and half of them the blur of a 2x bilinear upsampling
followed by 2x2 average pooling (what the features see of ``data.digits_dataset``'s 16x16 images), so the features
stay stable on generated digits that are slightly off-centre or smooth. Prints the held-out accuracy (the last
297 images of a seeded permutation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from vrg_lightning.evaluation import DIGITS_ASSET, DigitsClassifier
from vrg_lightning.io import atomic_torch_save


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as ``[N, 1, 8, 8]`` float32 in [-1, 1] and their labels."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixels in each direction (background -1 fills in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(x.shape[0])])


def pooled_upsample(x: torch.Tensor) -> torch.Tensor:
    """8x8 -> 16x16 bilinear -> 8x8 average pooling: the round trip of the 16x16 digits data."""
    return F.avg_pool2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), 2)


def train(seed: int = 0, epochs: int = 40, batch_size: int = 64) -> tuple[DigitsClassifier, float]:
    """Train with Adam; returns the model and its held-out accuracy."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_tensors()
    perm = torch.randperm(x.shape[0], generator=g)
    train_idx, test_idx = perm[:1500], perm[1500:]
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        model.train()
        order = train_idx[torch.randperm(train_idx.numel(), generator=g)]
        for i in range(0, order.numel(), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx]
            blur = torch.rand(idx.numel(), generator=g) < 0.5
            xb = torch.where(blur[:, None, None, None], pooled_upsample(xb), xb)
            loss = F.cross_entropy(model(random_shift(xb, g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[test_idx]).argmax(1) == y[test_idx]).float().mean())
        acc_blur = float((model(pooled_upsample(x[test_idx])).argmax(1) == y[test_idx]).float().mean())
    return model, min(acc, acc_blur)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DIGITS_ASSET)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, acc = train(args.seed, args.epochs)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(args.out, state)
    print(f"held-out accuracy (worse of sharp / blurred) {acc:.4f}; wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
