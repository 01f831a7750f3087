"""Datamodules and real-image loaders. Every dataset yields ``(image, label)`` with images in ``[-1, 1]``
(``float32``, ``[C, H, W]``) and integer labels (0 where a dataset has no classes).

==================  ===================================================================  ==========
name                source                                                               offline
==================  ===================================================================  ==========
``digits``          scikit-learn ``load_digits`` (1,797 8×8 digits, 10 classes) → 16×16×1  yes
``patches``         random 16×16 RGB patches of scikit-learn's two sample photos          yes
``folder:PATH``     any directory of images (recursive; class = first sub-folder)         yes
``cifar10``         torchvision CIFAR-10 (downloads only with ``download=True``)          no
``FILE.pt``         a tensor ``[N, ...]`` of samples in model space, any shape           yes
==================  ===================================================================  ==========

:func:`load_real_images` returns a dataset's images as one tensor, e.g. for FID reference statistics;
:func:`load_samples_file` reads a ``.pt`` file of samples (a tensor, or a dict with ``samples``/``images`` and
optional ``labels``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "DigitsDataModule",
    "SampleImagePatchesDataModule",
    "ImageFolderDataModule",
    "CIFAR10DataModule",
    "digits_dataset",
    "patches_dataset",
    "ImageFolderDataset",
    "load_dataset",
    "load_real_images",
    "load_samples_file",
    "DATASET_NAMES",
]

DATASET_NAMES = ("digits", "patches", "cifar10", "folder:PATH", "FILE.pt")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --- datasets ---------------------------------------------------------------------------------------------------
def digits_dataset(resize: str = "bilinear") -> TensorDataset:
    """scikit-learn digits as 16×16×1 in [-1, 1]; ``resize``: ``bilinear``/``nearest`` (×2) or ``pad`` (4 px)."""
    from sklearn.datasets import load_digits

    if resize not in ("bilinear", "nearest", "pad"):
        raise ValueError(f"resize must be 'bilinear', 'nearest' or 'pad'; got {resize!r}.")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    if resize == "pad":
        x = F.pad(x, (4, 4, 4, 4))
    else:
        x = F.interpolate(x, scale_factor=2, mode=resize, **({"align_corners": False} if resize == "bilinear" else {}))
    return TensorDataset((x * 2 - 1).clamp(-1, 1).contiguous(), torch.as_tensor(d.target, dtype=torch.long))


def patches_dataset(
    num_patches: int = 20000, patch_size: int = 16, scale: float = 0.25, seed: int = 0
) -> TensorDataset:
    """Deterministic random RGB patches of scikit-learn's sample photos (china, flower), label = photo index.

    Each photo (427×640) is first downscaled by ``scale`` (antialiased), so a patch shows structure rather than
    flat texture; patch positions come from ``torch.Generator().manual_seed(seed)``; the same arguments always
    give the same patches.
    """
    from sklearn.datasets import load_sample_images

    for name, v, lo in (("num_patches", num_patches, 1), ("patch_size", patch_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1]; got {scale!r}.")
    photos = []
    for img in load_sample_images().images:
        t = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        if scale != 1:
            t = F.interpolate(t, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        photos.append(t[0] * 2 - 1)
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(photos), (num_patches,), generator=g)
    out = torch.empty(num_patches, 3, patch_size, patch_size)
    for i in range(num_patches):
        p = photos[int(which[i])]
        h, w = p.shape[1] - patch_size + 1, p.shape[2] - patch_size + 1
        if h < 1 or w < 1:
            raise ValueError(f"patch_size={patch_size} is larger than the scaled photo {tuple(p.shape[1:])}.")
        y0, x0 = int(torch.randint(h, (), generator=g)), int(torch.randint(w, (), generator=g))
        out[i] = p[:, y0:y0 + patch_size, x0:x0 + patch_size]
    return TensorDataset(out.clamp(-1, 1), which.long())


class ImageFolderDataset(Dataset):
    """All images under ``root`` (recursive, sorted), resized (shorter side) and centre-cropped to ``image_size``.

    Label = index of the first-level sub-folder (sorted), 0 for images directly in ``root``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 32, channels: int = 3, hflip: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Image folder {str(self.root)!r} does not exist.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"image_size must be an integer >= 2; got {image_size!r}.")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}.")
        rel = [p.relative_to(self.root).parts for p in self.files]
        classes = sorted({parts[0] for parts in rel if len(parts) > 1})
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.image_size, self.channels, self.hflip = image_size, channels, hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[i]
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w, h = im.size
            s = self.image_size / min(w, h)
            im = im.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).clone()
        x = x.view(self.image_size, self.image_size, self.channels).permute(2, 0, 1).float() / 127.5 - 1
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        parts = path.relative_to(self.root).parts
        return x, self.class_to_idx.get(parts[0], 0) if len(parts) > 1 else 0


def _cifar10(root: str | os.PathLike, train: bool, download: bool) -> Dataset:
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError("CIFAR-10 needs torchvision (pip install torchvision).") from exc
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {str(root)!r}; pass download=True (--data.download true) to fetch it, "
            f"or point root at an existing copy. ({exc})"
        ) from exc
    return _CIFAR(ds)


class _CIFAR(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.x = torch.as_tensor(ds.data).permute(0, 3, 1, 2)  # uint8 [N, 3, 32, 32]
        self.y = torch.as_tensor(ds.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i].float() / 127.5 - 1, self.y[i]


def load_samples_file(path: str | os.PathLike, what: str = "data") -> tuple[Tensor, Tensor | None]:
    """``(samples [N, ...] float32, labels [N] or None)`` of a ``.pt`` file (``weights_only=True``): a tensor, or a
    dict with ``samples`` (or ``images``) and optionally ``labels``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, no floating-point tensor with a sample axis, or labels of another length.
    """
    from .io import load_torch_file

    p = Path(path)
    obj = load_torch_file(p, f"{what} file")
    x = obj.get("samples", obj.get("images")) if isinstance(obj, dict) else obj
    y = obj.get("labels") if isinstance(obj, dict) else None
    if not torch.is_tensor(x) or x.ndim < 2 or not x.is_floating_point() or x.shape[0] < 1:
        got = f"shape {tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} file {str(p)!r} must hold a float tensor [N, ...] of samples (or a dict with "
                         f"'samples' and optional 'labels'); got {got}.")
    if y is not None and (not torch.is_tensor(y) or y.shape != (x.shape[0],)):
        raise ValueError(f"{what} file {str(p)!r}: labels must be a [{x.shape[0]}] tensor; got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}.")
    return x.float().contiguous(), None if y is None else y.long()


def load_dataset(name: str, *, root: str | os.PathLike = "data", image_size: int | None = None,
                 download: bool = False, seed: int = 0, channels: int = 3) -> Dataset:
    """The ``(sample, label)`` dataset called ``name`` (see :data:`DATASET_NAMES`; ``channels`` for folders; a
    ``.pt`` file without labels gives ``(sample,)`` items)."""
    if str(name).endswith(".pt"):
        x, y = load_samples_file(name)
        return TensorDataset(x) if y is None else TensorDataset(x, y)
    if name == "digits":
        return digits_dataset()
    if name == "patches":
        return patches_dataset(patch_size=image_size or 16, seed=seed)
    if name == "cifar10":
        return _cifar10(root, train=True, download=download)
    if name.startswith("folder:"):
        return ImageFolderDataset(name[len("folder:"):], image_size=image_size or 32, channels=channels)
    raise ValueError(f"Unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}.")


def load_real_images(name: str, num: int | None = None, *, seed: int = 0, root: str | os.PathLike = "data",
                     image_size: int | None = None, download: bool = False, channels: int = 3) -> Tensor:
    """Real images of a dataset as one float32 tensor ``[N, C, H, W]`` in ``[-1, 1]`` (FID reference statistics).

    Args:
        name: ``digits``, ``patches``, ``cifar10`` or ``folder:PATH`` (the training images of that dataset;
            ``patches`` with the default seed are exactly the training patches).
        num: how many (``None``: all); a subset is a seeded random choice without replacement.
        seed: subset choice (and patch positions for ``patches``).
        root, image_size, download, channels: as for :func:`load_dataset` (``channels`` for ``folder:``).

    Example:
        >>> load_real_images("digits", 5).shape
        torch.Size([5, 1, 16, 16])
    """
    ds = load_dataset(name, root=root, image_size=image_size, download=download, seed=seed, channels=channels)
    n = len(ds)
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ValueError(f"num must be a positive integer or None; got {num!r}.")
    idx: Sequence[int] = range(n)
    if num is not None and num < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num].tolist()
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][torch.as_tensor(list(idx))].clone()
    return torch.stack([ds[i][0] for i in idx])


# --- datamodules --------------------------------------------------------------------------------------------------
class _Base(pl.LightningDataModule):
    """Shared loader settings: a shuffled training loader (drop_last) and no validation set."""

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        self.batch_size, self.num_workers, self.shuffle, self.drop_last = batch_size, num_workers, shuffle, drop_last
        self.train_set: Dataset | None = None

    def make_dataset(self) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.make_dataset()

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class DigitsDataModule(_Base):
    """scikit-learn digits, 16×16×1 in [-1, 1], labels 0-9 (offline; 1,797 images)."""

    def __init__(self, batch_size: int = 128, resize: str = "bilinear", num_workers: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(batch_size, num_workers, shuffle, drop_last)
        if resize not in ("bilinear", "nearest", "pad"):
            raise ValueError(f"resize must be 'bilinear', 'nearest' or 'pad'; got {resize!r}.")
        self.resize = resize
        self.save_hyperparameters()

    def make_dataset(self) -> Dataset:
        return digits_dataset(self.resize)


class SampleImagePatchesDataModule(_Base):
    """Random RGB patches of scikit-learn's two sample photos (offline), labels = photo (0 china, 1 flower)."""

    def __init__(self, batch_size: int = 128, num_patches: int = 20000, patch_size: int = 16, scale: float = 0.25,
                 seed: int = 0, num_workers: int = 0, shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(batch_size, num_workers, shuffle, drop_last)
        self.num_patches, self.patch_size, self.scale, self.seed = num_patches, patch_size, scale, seed
        self.save_hyperparameters()

    def make_dataset(self) -> Dataset:
        return patches_dataset(self.num_patches, self.patch_size, self.scale, self.seed)


class ImageFolderDataModule(_Base):
    """Any directory of images (recursive), resized and centre-cropped to ``image_size``; optional random h-flip."""

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, hflip: bool = True, batch_size: int = 128,
                 num_workers: int = 2, shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(batch_size, num_workers, shuffle, drop_last)
        self.root, self.image_size, self.channels, self.hflip = root, image_size, channels, hflip
        self.save_hyperparameters()

    def make_dataset(self) -> Dataset:
        return ImageFolderDataset(self.root, self.image_size, self.channels, self.hflip)


class CIFAR10DataModule(_Base):
    """CIFAR-10 training set via torchvision (32×32×3, labels 0-9); random h-flip; downloads only if asked."""

    def __init__(self, root: str = "data", download: bool = False, hflip: bool = True, batch_size: int = 128,
                 num_workers: int = 2, shuffle: bool = True, drop_last: bool = True) -> None:
        super().__init__(batch_size, num_workers, shuffle, drop_last)
        self.root, self.download, self.hflip = root, download, hflip
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        if self.download:
            _cifar10(self.root, train=True, download=True)

    def make_dataset(self) -> Dataset:
        ds = _cifar10(self.root, train=True, download=False)
        return _Flip(ds) if self.hflip else ds


class _Flip(Dataset):
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.ds[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y
