"""Cumulative prediction-error variance (cpe) of a sampling trajectory.

``cpe_paper`` is the published DDIM formula (VRG paper, eq. for DDIM)::

    cpe = Σ_i (s_i - s_{i-1})² · MSE(ᾱ_i),   s = √((1-ᾱ)/ᾱ),  s_{-1} = 0   (cleanest step first)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedule import alpha_bar_to_sigma

__all__ = ["cpe_paper", "MSEFn"]

MSEFn = Callable[[Tensor], Tensor]


def cpe_paper(alpha_bar: Tensor, mse: MSEFn) -> Tensor:
    """The paper's DDIM cpe of a trajectory (ᾱ cleanest first); differentiable in ``alpha_bar``.

    Example:
        >>> ab = torch.tensor([0.9, 0.5], dtype=torch.float64)
        >>> round(float(cpe_paper(ab, lambda a: torch.ones_like(a))), 6)
        0.555556
    """
    s = alpha_bar_to_sigma(alpha_bar)
    ds = torch.diff(s, prepend=s.new_zeros(1))
    return (ds**2 * mse(alpha_bar)).sum()
