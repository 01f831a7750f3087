"""FID with named feature extractors and cached reference statistics.

Images everywhere in this module are float tensors ``[N, C, H, W]`` in the model's data range ``[-1, 1]``.

Feature extractors (each has a ``name`` that every FID number carries, e.g. ``FID[digits-classifier]``):

- ``"inception"``: InceptionV3 pool features (2048-d) of torch-fidelity, loaded from a LOCAL weights file
  (nothing is ever downloaded). Takes 3-channel images of any size (1-channel images are repeated to RGB).
- ``"digits"``: penultimate layer (64-d) of a small CNN trained on scikit-learn's 8x8 digits
  (``scripts/train_digits_classifier.py``, shipped as ``vrg_lightning/assets/digits_classifier.pt``).
  Takes 1-channel images whose side is a multiple of 8 (average-pooled to 8x8).
- ``"pixels"``: the raw pixels, flattened; fixed to one image shape.
- any ``nn.Module`` mapping images to ``[N, d]`` (torchmetrics' int-or-Module style).

Feature statistics are float64 sums (``n``, ``Σf``, ``Σffᵀ``). In a distributed job they are the states of
torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` (:func:`make_fid_metric`), summed across
ranks (:func:`synced_fake_stats`), so a DDP run gives the statistic of the union of all ranks' images. The distance
is computed in float64 from the statistics (:func:`frechet_distance`, same value as torchmetrics' formula).
Reference statistics of real data are computed once and cached on disk, keyed by dataset, extractor and a hash of
the extractor's weights.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import atomic_torch_save

__all__ = [
    "FEATURES",
    "INCEPTION_WEIGHTS_URL",
    "DigitsClassifier",
    "FeatureExtractor",
    "DigitsFeatures",
    "PixelFeatures",
    "InceptionFeatures",
    "ModuleFeatures",
    "build_features",
    "FeatureStats",
    "FIDResult",
    "make_fid_metric",
    "feature_stats",
    "reference_stats",
    "fid_from_stats",
    "frechet_distance",
    "synced_fake_stats",
    "fid_of",
    "default_cache_dir",
]

FEATURES = ("digits", "pixels", "inception")
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
DIGITS_ASSET = Path(__file__).parent / "assets" / "digits_classifier.pt"


def default_cache_dir() -> Path:
    """``$VRG_CACHE_DIR`` or ``~/.cache/vrg-lightning``."""
    return Path(os.environ.get("VRG_CACHE_DIR", Path.home() / ".cache" / "vrg-lightning"))


def reference_key(dataset: str, shape: Sequence[int], num: int | None = None) -> str:
    """Cache key of a dataset's reference statistics: the dataset (a ``folder:`` path resolved), the image shape the
    model makes (datasets are resized to it) and the number of images. Features are keyed by :func:`reference_stats`.
    """
    if dataset.startswith("folder:"):
        dataset = "folder:" + str(Path(dataset[len("folder:"):]).resolve())
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_")
    return f"{safe}-{'x'.join(str(int(d)) for d in shape)}-n{num or 'all'}"


def _hash_state_dict(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the names and bytes of all parameters and buffers."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --- feature extractors ---------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [-1, 1]) -> [N, num_features]``, with input checks.

    Attributes:
        name: label carried by every FID number (``FID[name]``).
        num_features: feature dimension.
        channels: accepted channel counts.
    """

    name: str = "features"
    num_features: int
    channels: tuple[int, ...] = (1, 3)

    def check_input(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is a float ``[N, C, H, W]`` batch this extractor accepts."""
        if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"{self.name} features need float images [N, C, H, W] in [-1, 1]; got {shape}.")
        if images.shape[1] not in self.channels:
            raise ValueError(
                f"{self.name} features accept images with {' or '.join(map(str, self.channels))} channel(s); "
                f"got {images.shape[1]} channels (shape {tuple(images.shape)})."
            )

    @property
    def weights_hash(self) -> str:
        """Hash of the extractor's weights (part of the reference-statistics cache key)."""
        return _hash_state_dict(self)

    def extract(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        self.check_input(images)
        return self.extract(images)


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits in [-1, 1]: two 3x3 convs, 2x2 pooling, a 64-d hidden layer, 10 logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations ``[N, hidden]`` of 8x8 images."""
        x = F.relu(self.conv1(x))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


class DigitsFeatures(FeatureExtractor):
    """Penultimate layer of :class:`DigitsClassifier` (loaded from the shipped asset unless given)."""

    name = "digits-classifier"
    channels = (1,)

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = Path(weights) if weights is not None else DIGITS_ASSET
        if not path.is_file():
            raise FileNotFoundError(
                f"Digits classifier weights {str(path)!r} do not exist; recreate them with "
                "`python scripts/train_digits_classifier.py`."
            )
        self.net = DigitsClassifier()
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.eval().requires_grad_(False)
        self.num_features = self.net.fc1.out_features

    def check_input(self, images: Tensor) -> None:
        super().check_input(images)
        h, w = images.shape[-2:]
        if h != w or h % 8:
            raise ValueError(
                f"digits-classifier features need square images whose side is a multiple of 8 (8x8 digits, "
                f"average-pooled down); got {h}x{w}."
            )

    def extract(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        return self.net.features(x)

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)


class PixelFeatures(FeatureExtractor):
    """Raw pixels, flattened (``C*H*W`` features) for one fixed image shape ``(C, H, W)``."""

    name = "pixels"

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes; got {tuple(image_shape)!r}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.channels = (self.image_shape[0],)
        self.num_features = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]

    @property
    def weights_hash(self) -> str:
        return "x".join(map(str, self.image_shape))

    def check_input(self, images: Tensor) -> None:
        super().check_input(images)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"pixels features were set up for images of shape {self.image_shape}; got {tuple(images.shape[1:])}."
            )

    def extract(self, images: Tensor) -> Tensor:
        return images.flatten(1).float()


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's InceptionV3 (2048-d pool features) from a local weights file; never downloads.

    Images are quantised to uint8 like saved PNGs; 1-channel images are repeated to RGB.
    """

    name = "inception-v3-2048"
    channels = (1, 3)
    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None) -> None:
        super().__init__()
        if weights is None or not Path(weights).is_file():
            what = "no weights file was given" if weights is None else f"{str(weights)!r} does not exist"
            raise FileNotFoundError(
                f"InceptionV3 features need a local weights file, and {what}. Download it once from "
                f"{INCEPTION_WEIGHTS_URL} and pass its path with --inception-weights PATH "
                "(or inception_weights=PATH); nothing is downloaded at run time."
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise ImportError(
                "InceptionV3 features need torch-fidelity: pip install 'vrg-lightning[inception]'."
            ) from exc
        self.path = Path(weights)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(
            self.path))
        self.net.eval().requires_grad_(False)
        self._hash: str | None = None

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return self._hash

    def extract(self, images: Tensor) -> Tensor:
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)[0].reshape(x.shape[0], -1)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)


class ModuleFeatures(FeatureExtractor):
    """Any user ``nn.Module`` mapping images in [-1, 1] to ``[N, d]`` features."""

    def __init__(self, module: nn.Module, name: str | None = None, num_features: int | None = None,
                 image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.net = module.eval()
        self.name = name or f"module-{type(module).__name__}"
        if num_features is None:
            n = getattr(module, "num_features", None)
            if n is None:
                if image_shape is None:
                    raise ValueError(
                        f"Cannot tell the feature size of {type(module).__name__}: give it a num_features "
                        "attribute or pass image_shape=(C, H, W)."
                    )
                with torch.no_grad():
                    n = module(torch.zeros(1, *image_shape)).shape[-1]
            num_features = int(n)
        self.num_features = num_features
        self.channels = tuple(range(1, 65))

    def extract(self, images: Tensor) -> Tensor:
        return self.net(images).reshape(images.shape[0], -1)


def build_features(
    features: str | nn.Module | FeatureExtractor,
    *,
    image_shape: tuple[int, int, int] | None = None,
    inception_weights: str | os.PathLike | None = None,
) -> FeatureExtractor:
    """Feature extractor from a name in :data:`FEATURES` or a module.

    Args:
        features: ``"digits"``, ``"pixels"``, ``"inception"``, a :class:`FeatureExtractor` or any ``nn.Module``.
        image_shape: ``(C, H, W)``, needed by ``"pixels"`` (and modules without ``num_features``).
        inception_weights: local InceptionV3 weights file for ``"inception"``.

    Raises:
        ValueError: unknown name, or ``"pixels"`` without ``image_shape``.
        FileNotFoundError: missing weights file.

    Example:
        >>> build_features("pixels", image_shape=(1, 8, 8)).name
        'pixels'
    """
    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, nn.Module):
        return ModuleFeatures(features, image_shape=image_shape)
    if features == "digits":
        return DigitsFeatures()
    if features == "pixels":
        if image_shape is None:
            raise ValueError("features='pixels' needs image_shape=(C, H, W).")
        return PixelFeatures(image_shape)
    if features == "inception":
        return InceptionFeatures(inception_weights)
    raise ValueError(f"Unknown features {features!r}; allowed: {', '.join(FEATURES)} or an nn.Module.")


# --- statistics and FID ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStats:
    """Float64 sufficient statistics of a feature set: ``n``, ``Σf`` and ``Σ f fᵀ`` (they add across shards)."""

    n: int
    sum: Tensor
    cov_sum: Tensor
    features: str
    weights_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sum": self.sum, "cov_sum": self.cov_sum, "features": self.features,
                "weights_hash": self.weights_hash}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        return cls(int(d["n"]), torch.as_tensor(d["sum"], dtype=torch.float64),
                   torch.as_tensor(d["cov_sum"], dtype=torch.float64), str(d["features"]),
                   str(d.get("weights_hash", "")))

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set; got {self.n}.")
        mu = self.sum / self.n
        cov = (self.cov_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    @cached_property
    def cov_root(self) -> Tensor:
        """``Σ^½`` (symmetric PSD square root), computed once per (frozen) statistics object: reference statistics
        are compared with many generated sets."""
        return _sqrtm_psd(self.mean_cov()[1])


@dataclass(frozen=True)
class FIDResult:
    """An FID value and the features that produced it; ``str()`` gives ``FID[features]=value``."""

    value: float
    features: str
    num_images: int
    num_reference: int

    @property
    def label(self) -> str:
        return f"FID[{self.features}]"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.label, "value": self.value, "features": self.features,
                "num_images": self.num_images, "num_reference": self.num_reference}

    def __str__(self) -> str:
        return f"{self.label}={self.value:.4f}"


def make_fid_metric(extractor: FeatureExtractor, reference: FeatureStats | None = None, **kwargs: Any):
    """torchmetrics ``FrechetInceptionDistance`` on ``extractor`` (float64 sum states, summed across ranks).

    With ``reference`` the real-image states are preloaded and kept across ``reset()``; update it with
    ``metric.update(images, real=False)`` (images in [-1, 1]).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=reference is None, normalize=True,
                                      **kwargs)
    if reference is not None:
        _check_stats(reference, extractor)
        metric.real_features_sum = reference.sum.clone()
        metric.real_features_cov_sum = reference.cov_sum.clone()
        metric.real_features_num_samples = torch.tensor(reference.n)
    return metric


def _check_stats(stats: FeatureStats, extractor: FeatureExtractor) -> None:
    if stats.features != extractor.name or stats.sum.numel() != extractor.num_features:
        raise ValueError(
            f"Reference statistics were computed with {stats.features!r} ({stats.sum.numel()} features); "
            f"they cannot be compared with {extractor.name!r} ({extractor.num_features} features)."
        )


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if torch.is_tensor(images):
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


@torch.no_grad()
def feature_stats(
    images: Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "features",
) -> FeatureStats:
    """Float64 statistics of ``extractor`` features over ``images`` (a tensor or an iterable of batches)."""
    from tqdm.auto import tqdm

    total = -(-images.shape[0] // batch_size) if torch.is_tensor(images) else None
    n, s, c = 0, None, None
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    for batch in tqdm(_batches(images, batch_size), total=total, desc=desc, disable=not progress, leave=False):
        f = extractor(batch.to(device)).double().cpu()
        s = f.sum(0) if s is None else s + f.sum(0)
        c = f.T @ f if c is None else c + f.T @ f
        n += f.shape[0]
    if s is None or c is None:
        raise ValueError("feature_stats got no images.")
    return FeatureStats(n, s, c, extractor.name, extractor.weights_hash)


def _sqrtm_psd(cov: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((cov + cov.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, root2: Tensor | None = None) -> float:
    """``‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2(Σ₁Σ₂)^½)`` in float64.

    ``tr (Σ₁Σ₂)^½`` is computed as ``Σ √eig(R Σ₁ R)`` with ``R = Σ₂^½``: two symmetric eigen-decompositions,
    several times faster and more accurate than the general eigenvalues of ``Σ₁Σ₂`` (same value). ``root2``: ``R``
    computed before (the reference's, reused across many FIDs).
    """
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    root = _sqrtm_psd(cov2) if root2 is None else root2
    m = root @ cov1 @ root
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def fid_from_stats(fake: FeatureStats, real: FeatureStats) -> float:
    """FID between two sets of feature statistics (see :func:`frechet_distance`)."""
    if fake.features != real.features:
        raise ValueError(f"Cannot compare {fake.features!r} features with {real.features!r} features.")
    mu1, c1 = fake.mean_cov()
    mu2, c2 = real.mean_cov()
    return frechet_distance(mu1, c1, mu2, c2, real.cov_root)


def synced_fake_stats(metric: Any, extractor: FeatureExtractor) -> FeatureStats:
    """The generated-image statistics of a torchmetrics FID ``metric``, summed over all ranks."""
    with metric.sync_context(should_sync=True):
        return FeatureStats(int(metric.fake_features_num_samples), metric.fake_features_sum.detach().cpu().clone(),
                            metric.fake_features_cov_sum.detach().cpu().clone(), extractor.name,
                            extractor.weights_hash)


def fid_of(
    images: Tensor | Iterable[Tensor],
    features: FeatureExtractor,
    reference: FeatureStats,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> FIDResult:
    """FID of ``images`` (in [-1, 1]) against precomputed reference statistics.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ext = build_features("pixels", image_shape=(1, 2, 2))
        >>> ref = feature_stats(torch.rand(64, 1, 2, 2, generator=g) * 2 - 1, ext)
        >>> str(fid_of(torch.rand(64, 1, 2, 2, generator=g) * 2 - 1, ext, ref)).startswith("FID[pixels]=")
        True
    """
    _check_stats(reference, features)
    stats = feature_stats(images, features, batch_size=batch_size, progress=progress, desc="FID features")
    return FIDResult(fid_from_stats(stats, reference), features.name, stats.n, reference.n)


def reference_stats(
    dataset: str,
    extractor: FeatureExtractor,
    images: Callable[[], Tensor | Iterable[Tensor]],
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> FeatureStats:
    """Reference statistics of real data, computed once and cached (atomically) on disk.

    The cache file is ``<cache_dir>/fid-stats/<dataset>--<features>--<weights hash>.pt``; ``images`` is called
    only on a cache miss.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset)
    name = f"{safe}--{extractor.name}--{extractor.weights_hash}.pt"
    path = Path(cache_dir or default_cache_dir()) / "fid-stats" / name
    if path.is_file():
        try:
            stats = FeatureStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))
            _check_stats(stats, extractor)
            return stats
        except (ValueError, KeyError, RuntimeError):
            pass  # unreadable or stale entry: recompute and replace it
    stats = feature_stats(images(), extractor, batch_size=batch_size, progress=progress,
                          desc=f"reference stats ({dataset})")
    atomic_torch_save(path, stats.to_dict())
    return stats
