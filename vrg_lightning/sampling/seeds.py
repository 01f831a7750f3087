"""Determinism by sample index: sample ``i`` of seed ``s`` starts from noise (and, for class-conditional models, a
label) drawn from its own ``torch.Generator`` seeded with a hash of ``(s, i)``, so the images do not depend on the
batch size or on the number of processes, and a base trajectory and its VRG version sampled with the same seed start
from the same noise (paired comparisons)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sample_seed", "initial_noise", "sample_labels"]

_LABEL_STREAM = 0x2545F4914F6CDD1D  # xor-ed into the seed: the labels' stream differs from the noise's


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of run ``seed``: 63 bits of sha256("seed:index").

    Example:
        >>> sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(1, 0)
        True
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()[:8], "little") >> 1


def initial_noise(
    seed: int, start: int, end: int, shape: Sequence[int], num_classes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Starting noise ``[end-start, *shape]`` (float32, CPU) of samples ``start..end-1`` and their labels
    (:func:`sample_labels`); each depends only on ``(seed, index)``.

    Example:
        >>> x, y = initial_noise(0, 2, 5, (1, 4, 4), num_classes=10)
        >>> torch.equal(x[1:], initial_noise(0, 3, 5, (1, 4, 4))[0]), tuple(x.shape), tuple(y.shape)
        (True, (3, 1, 4, 4), (3,))
    """
    xs = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)),
                      dtype=torch.float32) for i in range(start, end)]  # explicit: the default dtype may be float64
    x = torch.stack(xs) if xs else torch.empty(0, *shape, dtype=torch.float32)
    return x, sample_labels(seed, start, end, num_classes)


def sample_labels(seed: int, start: int, end: int, num_classes: int | None) -> Tensor | None:
    """Class labels of samples ``start..end-1`` (uniform, from their own per-index stream), ``None`` if
    unconditional."""
    if num_classes is None:
        return None
    gens = [torch.Generator().manual_seed(sample_seed(seed, i) ^ _LABEL_STREAM) for i in range(start, end)]
    return torch.tensor([int(torch.randint(num_classes, (), generator=g)) for g in gens], dtype=torch.long)
