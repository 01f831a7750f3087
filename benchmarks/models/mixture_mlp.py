"""A model the toolkit never saw: an MLP noise predictor for vector data, with the feature map its FID uses.

Used by ``benchmarks/any_model.py``, which copies this file into each dataset folder next to the weights it trained
(``weights.pt``) and their sizes (``config.json``), so the folder is self-contained and the SPECs are::

    --model    DIR/mixture_mlp.py:model       # NoiseMLP(x, t): eps-prediction, t = continuous training timesteps [B]
    --features DIR/mixture_mlp.py:features    # RandomFourierFeatures: samples [B, d] -> [B, D]

This file imports nothing but torch (not the toolkit); ``model()`` and ``features()`` read the files next to it.

Features: a *fixed random Fourier projection* ``sqrt(2) cos(W x + b)`` (``W`` Gaussian with per-row bandwidths
log-uniform over ``[bw_min, bw_max]`` times the data scale, ``b`` uniform on ``[0, 2 pi)``, seed fixed in
``config.json``), not the identity. With identity features the Frechet distance compares only the mean and
covariance of the samples: a sampler that blurs the 8 modes of a mixture into one blob of the same covariance would
score 0. The mean of random Fourier features is a kernel mean embedding (the MMD's), so the Frechet distance of
these features sees where the modes are and how wide they are, at several length scales.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
NUM_TRAIN_TIMESTEPS = 1000  # the diffusers linear schedule's T (t is divided by it for the embedding)


class NoiseMLP(nn.Module):
    """ε̂(x, t) for vectors ``x [B, dim]`` and continuous timesteps ``t [B]`` (training-timestep units, 0..T-1).

    A sinusoidal embedding of ``t / T`` is concatenated to ``x``; ``depth`` SiLU layers of width ``hidden``.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, temb: int = 32) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or temb < 2 or temb % 2:
            raise ValueError(f"NoiseMLP needs dim, hidden, depth >= 1 and an even temb >= 2; got dim={dim}, "
                             f"hidden={hidden}, depth={depth}, temb={temb}.")
        self.dim, self.temb = dim, temb
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), temb // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        layers: list[nn.Module] = []
        width = dim + temb
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def embed(self, t: Tensor) -> Tensor:
        arg = (t.to(self.freqs.dtype) / NUM_TRAIN_TIMESTEPS)[:, None] * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"NoiseMLP(dim={self.dim}) takes x of shape [B, {self.dim}]; got {tuple(x.shape)}.")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.net(torch.cat([x, self.embed(t).to(x.dtype)], 1))


class RandomFourierFeatures(nn.Module):
    """Fixed features ``sqrt(2) cos(W x + b)`` ``[B, num_features]`` of vectors ``[B, dim]`` (module docstring)."""

    def __init__(self, dim: int, num_features: int = 64, scale: float = 1.0, bw_min: float = 0.1,
                 bw_max: float = 1.0, seed: int = 1234) -> None:
        super().__init__()
        if dim < 1 or num_features < 1 or not 0 < bw_min <= bw_max or scale <= 0:
            raise ValueError(f"RandomFourierFeatures needs dim, num_features >= 1, scale > 0 and 0 < bw_min <= "
                             f"bw_max; got dim={dim}, num_features={num_features}, scale={scale}, bw_min={bw_min}, "
                             f"bw_max={bw_max}.")
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(num_features, 1, generator=g, dtype=torch.float64)
        bandwidth = scale * bw_min * (bw_max / bw_min) ** u
        w = torch.randn(num_features, dim, generator=g, dtype=torch.float64) / bandwidth
        b = 2 * math.pi * torch.rand(num_features, generator=g, dtype=torch.float64)
        self.register_buffer("w", w.float())
        self.register_buffer("b", b.float())
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return math.sqrt(2.0) * torch.cos(x.to(self.w.dtype) @ self.w.T + self.b)


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; mixture_mlp.py reads config.json and weights.pt from its own "
                                "folder (benchmarks/any_model.py writes them next to a copy of this file).")
    return json.loads(path.read_text())


def model(folder: str | Path = HERE) -> NoiseMLP:
    """The trained :class:`NoiseMLP` of ``folder`` (default: this file's): ``config.json`` sizes, ``weights.pt``."""
    folder = Path(folder)
    net = NoiseMLP(**_config(folder)["model"])
    net.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return net.eval()


def features(folder: str | Path = HERE) -> RandomFourierFeatures:
    """The fixed :class:`RandomFourierFeatures` of ``folder`` (``config.json["features"]``)."""
    return RandomFourierFeatures(**_config(Path(folder))["features"]).eval()
