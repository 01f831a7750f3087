"""FID feature extractors: each has a ``name`` that every FID number carries (``FID[digits-classifier]``).

Images are float tensors ``[N, C, H, W]`` in the model's data range ``[-1, 1]``; ``pixels`` and modules take samples
of any shape ``[N, ...]``.

- ``"inception"``: InceptionV3 pool features (2048-d) of torch-fidelity, loaded from a LOCAL weights file
  (nothing is ever downloaded). Takes 3-channel images of any size (1-channel images are repeated to RGB).
- ``"digits"``: penultimate layer (64-d) of a small CNN trained on scikit-learn's 8x8 digits
  (``scripts/train_digits_classifier.py``, shipped as ``vrg_lightning/assets/digits_classifier.pt``).
  Takes 1-channel images whose side is a multiple of 8 (average-pooled to 8x8).
- ``"pixels"``: the raw values, flattened; fixed to one sample shape (images or any other).
- any ``nn.Module`` mapping samples to ``[N, d]`` (torchmetrics' int-or-Module style), also named by a SPEC
  (``path/to/file.py:NAME`` or ``package.module:NAME``; ``--features SPEC``): the FID numbers then carry the SPEC.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURES",
    "INCEPTION_WEIGHTS_URL",
    "DIGITS_ASSET",
    "DigitsClassifier",
    "FeatureExtractor",
    "DigitsFeatures",
    "PixelFeatures",
    "InceptionFeatures",
    "ModuleFeatures",
    "features_from_spec",
    "build_features",
    "default_features",
    "hash_state_dict",
]

FEATURES = ("digits", "pixels", "inception")
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
DIGITS_ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier.pt"


def hash_state_dict(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the names and raw bytes of all parameters and buffers (any dtype).

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> hash_state_dict(a) == hash_state_dict(b) != hash_state_dict(nn.Linear(2, 2))
        True
    """
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
        """Hash of the extractor's weights (part of every statistics cache key)."""
        return hash_state_dict(self)

    def extract(self, images: Tensor) -> Tensor:
        """Features ``[N, num_features]`` of checked images (subclasses implement this)."""
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
    """Raw values, flattened (``prod(shape)`` features), for one fixed sample shape: ``(C, H, W)`` images or any."""

    name = "pixels"

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(image_shape) < 1 or any(int(s) < 1 for s in image_shape):
            raise ValueError(f"image_shape must be a sample shape of positive sizes, e.g. (C, H, W); got "
                             f"{tuple(image_shape)!r}.")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.channels = (self.image_shape[0],)
        self.num_features = math.prod(self.image_shape)

    @property
    def weights_hash(self) -> str:
        return "x".join(map(str, self.image_shape))

    def check_input(self, images: Tensor) -> None:
        if len(self.image_shape) == 3:
            super().check_input(images)
        elif not torch.is_tensor(images) or not images.is_floating_point():
            raise ValueError(f"pixels features need a float tensor [N, {', '.join(map(str, self.image_shape))}]; got "
                             f"{type(images).__name__ if not torch.is_tensor(images) else images.dtype}.")
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
                f"InceptionV3 features need a local weights file (inception_weights), and {what}. Download it "
                f"once from {INCEPTION_WEIGHTS_URL} and pass its path; nothing is downloaded at run time."
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise ImportError(
                "InceptionV3 features need torch-fidelity: pip install 'vrg-lightning[inception]'."
            ) from exc
        self.path = Path(weights)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(self.path))
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
    """Any user ``nn.Module`` mapping samples ``[N, ...]`` (in the data range) to ``[N, d]`` features.

    Args:
        module: the extractor (put in eval mode).
        name: the label of its FID numbers (a SPEC when loaded from one; default ``module-<class>``).
        num_features: ``d`` (default: the module's ``num_features``, else measured on one zero sample).
        image_shape: the sample shape, to measure ``d`` and check what the module returns.

    Raises:
        ValueError: ``d`` cannot be found, or the module does not map a sample to ``[1, d]``.
    """

    def __init__(self, module: nn.Module, name: str | None = None, num_features: int | None = None,
                 image_shape: tuple[int, ...] | None = None) -> None:
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
                    out = module(torch.zeros(1, *image_shape))
                if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != 1:
                    got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                    raise ValueError(f"features {self.name!r} must map samples [B, ...] to features [B, D]; for one "
                                     f"sample of shape {tuple(image_shape)} it returned {got}.")
                n = out.shape[-1]
            num_features = int(n)
        self.num_features = num_features
        self.channels = tuple(range(1, 65))

    def check_input(self, images: Tensor) -> None:
        if not torch.is_tensor(images) or images.ndim < 2 or not images.is_floating_point():
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"features {self.name!r} need a float batch [N, ...] of samples; got {got}.")

    def extract(self, images: Tensor) -> Tensor:
        return self.net(images).reshape(images.shape[0], -1)


def features_from_spec(spec: str, image_shape: tuple[int, ...] | None = None) -> ModuleFeatures:
    """The :class:`ModuleFeatures` named by a SPEC (an ``nn.Module``, its class, or a callable returning one),
    named by the SPEC.

    Raises:
        FileNotFoundError, ValueError: the SPEC does not load (:func:`vrg_lightning.models.import_spec`), or what it
            gives does not map samples to ``[B, D]``.
    """
    from ..models.spec import build_module, import_spec

    module = build_module(import_spec(spec, "features"), spec, "features")
    return ModuleFeatures(module.requires_grad_(False), name=spec, image_shape=image_shape)


def build_features(
    features: str | nn.Module | FeatureExtractor,
    *,
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | os.PathLike | None = None,
) -> FeatureExtractor:
    """Feature extractor from a name in :data:`FEATURES`, a SPEC or a module.

    Args:
        features: ``"digits"``, ``"pixels"``, ``"inception"``, a SPEC (``path/to/file.py:NAME`` or
            ``package.module:NAME``), a :class:`FeatureExtractor` or any ``nn.Module``.
        image_shape: the sample shape, ``(C, H, W)`` for images; needed by ``"pixels"`` (and modules without
            ``num_features``); ``digits`` and ``inception`` refuse samples that are not images.
        inception_weights: local InceptionV3 weights file for ``"inception"``.

    Raises:
        ValueError: unknown name, ``"pixels"`` without ``image_shape``, image features for non-image samples, or a
            SPEC that does not load.
        FileNotFoundError: missing weights file (or SPEC file).

    Example:
        >>> build_features("pixels", image_shape=(1, 8, 8)).name, build_features("pixels", image_shape=(5,)).name
        ('pixels', 'pixels')
    """
    from ..models.spec import is_spec

    if isinstance(features, FeatureExtractor):
        return features
    if isinstance(features, nn.Module):
        return ModuleFeatures(features, image_shape=image_shape)
    if features in ("digits", "inception") and image_shape is not None and len(image_shape) != 3:
        raise ValueError(f"features {features!r} take images (C, H, W) but the samples have shape "
                         f"{tuple(image_shape)}; use 'pixels' or a features SPEC (path/to/file.py:NAME, an nn.Module "
                         "mapping samples [B, ...] to [B, D]).")
    if features == "digits":
        return DigitsFeatures()
    if features == "pixels":
        if image_shape is None:
            raise ValueError("features='pixels' needs image_shape=(C, H, W).")
        return PixelFeatures(image_shape)
    if features == "inception":
        return InceptionFeatures(inception_weights)
    if is_spec(features):
        return features_from_spec(features, image_shape)
    raise ValueError(f"Unknown features {features!r}; allowed: {', '.join(FEATURES)}, a SPEC (path/to/file.py:NAME "
                     "or package.module:NAME) or an nn.Module.")


def default_features(features: str, channels: int | tuple[int, ...]) -> str:
    """Resolve ``auto`` FID features: the digits classifier for 1-channel images, raw pixels otherwise (``channels``:
    the channel count, or the whole sample shape, where a shape that is not ``(C, H, W)`` means pixels).

    Example:
        >>> default_features("auto", 1), default_features("auto", 3), default_features("inception", 1)
        ('digits', 'pixels', 'inception')
        >>> default_features("auto", (1, 16, 16)), default_features("auto", (1,))
        ('digits', 'pixels')
    """
    if features != "auto":
        return features
    if not isinstance(channels, int):
        channels = int(channels[0]) if len(channels) == 3 else 0
    return "digits" if channels == 1 else "pixels"
