"""Real samples for FID: :func:`reference_for` gives the cached reference statistics of a dataset's images or of a
``FILE.pt`` of samples of any shape (``vrg tune``, ``vrg sample``: ``--reference NAME|FILE.pt``)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from .features import FeatureExtractor
from .fid import FeatureStats

__all__ = ["reference_for"]


def reference_for(dataset: str, extractor: FeatureExtractor, shape: tuple[int, ...], *, num: int | None = None,
                  cache_dir: str | os.PathLike | None = None, root: str | os.PathLike = "data",
                  progress: bool = False) -> FeatureStats:
    """Cached reference statistics of real samples: a dataset's images (``digits``, ``patches``, ``cifar10``,
    ``folder:..``, resized to ``shape``) or a ``FILE.pt`` of samples ``[N, *shape]`` (its first ``num``; cached by
    content).

    Raises:
        ValueError: the real samples do not have the model's sample ``shape`` (or the file holds no samples).
    """
    from ..data import load_real_images, load_samples_file
    from .fid import reference_key, reference_stats

    path = Path(dataset)
    is_file = path.suffix == ".pt"

    def images() -> Tensor:
        if is_file:
            x = load_samples_file(path, "reference")[0][:num]
        else:
            x = load_real_images(dataset, num, image_size=shape[-1], channels=shape[0], root=root)
        if tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"reference {dataset!r} holds samples of shape {tuple(x.shape[1:])} but the model makes "
                             f"{tuple(shape)}; give real samples of the model's shape (a FILE.pt holding a tensor "
                             f"[N, {', '.join(map(str, shape))}]).")
        return x

    name = dataset
    if not is_file and len(shape) != 3:
        raise ValueError(f"reference {dataset!r} is a dataset of images but the model makes samples of shape "
                         f"{tuple(shape)}; give a FILE.pt holding real samples [N, {', '.join(map(str, shape))}].")
    if is_file:
        from ..sampling import file_sha256

        if not path.is_file():
            raise FileNotFoundError(f"reference file {dataset!r} does not exist.")
        name = f"file-{file_sha256(path)[:16]}"  # keyed by content: another file under the same name is another key
    return reference_stats(reference_key(name, shape, num), extractor, images, cache_dir=cache_dir, progress=progress)
