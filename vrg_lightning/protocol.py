"""The VRG protocol: what a LightningModule offers so :class:`~vrg_lightning.callbacks.VRGProfiler` can measure it.

``training_step`` returns a dict with

==================  ============================================================================================
key                 value
==================  ============================================================================================
``loss``            the scalar training loss (as usual)
``vrg_alpha_bar``   ``[B]`` float tensor: ᾱ of each sample's noise level
``vrg_error``       ``[B, ...]`` float tensor, **detached**: ε̂ - ε, the noise-prediction error *in ε-space*
                    (a v-prediction model converts: ε̂ = √ᾱ v̂ + √(1-ᾱ) x_t), from the forward pass that made the loss
==================  ============================================================================================

and the module exposes ``vrg_schedule`` (a :class:`~vrg_lightning.schedule.NoisePath`), for probe mode
``vrg_denoiser() -> callable(x, alpha_bar[B], class_labels) -> ε̂`` (the weights to profile, e.g. EMA), and
optionally ``vrg_prediction_type`` (stored with the schedule). :class:`~vrg_lightning.module.DiffusionModule`
follows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["PROTOCOL_KEYS", "protocol_schedule", "protocol_fields", "eval_mode"]

PROTOCOL_KEYS = ("vrg_alpha_bar", "vrg_error")


def protocol_schedule(module: Any, probe: bool = False) -> Any:
    """The module's ``vrg_schedule``, after checking the protocol (and ``vrg_denoiser`` when ``probe``).

    Raises:
        ValueError: no ``vrg_schedule`` noise path, or no callable ``vrg_denoiser`` in probe mode.
    """
    from .schedule import NoisePath

    schedule = getattr(module, "vrg_schedule", None)
    if not isinstance(schedule, NoisePath):
        raise ValueError(f"VRGProfiler needs {type(module).__name__}.vrg_schedule (a noise path: NoiseSchedule, "
                         f"RectifiedFlow, ...); got "
                         f"{type(schedule).__name__}. See the protocol in vrg_lightning.protocol.")
    if probe and not callable(getattr(module, "vrg_denoiser", None)):
        raise ValueError(f"Probe mode needs {type(module).__name__}.vrg_denoiser() returning a callable "
                         "(x, alpha_bar[B], class_labels) -> eps; set probe_at_fit_end=False, "
                         "probe_every_n_epochs=0 otherwise.")
    return schedule


def protocol_fields(outputs: Any) -> tuple[Tensor, Tensor]:
    """``(vrg_alpha_bar [B], vrg_error [B, ...])`` of a ``training_step`` output.

    Raises:
        ValueError: not a dict, a missing key, or shapes that do not fit (the message names which).
    """
    if not isinstance(outputs, Mapping):
        raise ValueError(f"VRGProfiler (free mode) needs training_step to return a dict with 'loss', "
                         f"{', '.join(repr(k) for k in PROTOCOL_KEYS)}; got {type(outputs).__name__}. "
                         "See the protocol in vrg_lightning.protocol, or use free=False (probe only).")
    missing = [k for k in PROTOCOL_KEYS if k not in outputs]
    if missing:
        raise ValueError(f"training_step output lacks {', '.join(repr(k) for k in missing)} (VRG protocol: "
                         "vrg_alpha_bar [B] = noise level, vrg_error [B, ...] = eps_hat - eps, detached); "
                         f"got keys {sorted(outputs)}.")
    ab, err = outputs["vrg_alpha_bar"], outputs["vrg_error"]
    if not torch.is_tensor(ab) or not torch.is_tensor(err) or ab.ndim != 1 or err.ndim < 2 \
            or err.shape[0] != ab.shape[0]:
        raise ValueError(f"vrg_alpha_bar must be a [B] tensor and vrg_error a [B, ...] tensor; got shapes "
                         f"{tuple(getattr(ab, 'shape', ()))} and {tuple(getattr(err, 'shape', ()))}.")
    return ab, err


class eval_mode:  # noqa: N801 - used like torch.no_grad
    """``with eval_mode(module) as m:`` runs ``m`` in eval mode and restores its training flag afterwards."""

    def __init__(self, module: Any) -> None:
        self.module, self.was = module, bool(getattr(module, "training", False))

    def __enter__(self) -> Any:
        if hasattr(self.module, "eval"):
            self.module.eval()
        return self.module

    def __exit__(self, *exc: Any) -> None:
        if self.was:
            self.module.train()
