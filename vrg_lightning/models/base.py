"""The denoiser protocol: what every command needs of a model, and the one conversion of a network's output to ε.

A *denoiser* is an ``nn.Module`` ``den`` with

===============================  ==================================================================================
member                           meaning
===============================  ==================================================================================
``den(x, alpha_bar, labels)``    ε̂ for ``x`` ``[B, *sample_shape]`` at ᾱ (0-d or ``[B]``), ``labels`` ``[B]``/``None``
``den.eps_fn(labels, w)``        the solver callable ``(x, alpha_bar_0d) -> ε̂``, classifier-free guidance weight ``w``
``den.schedule``                 its training noise path (:class:`~vrg_lightning.schedule.NoisePath`)
``den.prediction_type``          what the network outputs: ``epsilon``, ``v_prediction``, ``sample`` (x̂₀), ``flow``
``den.sample_shape``             the shape of one sample: ``(C, H, W)`` images, ``(D,)`` vectors, any shape
``den.num_classes``              the class count of a class-conditional model, or ``None``
``den.config()``                 a plain dict naming the model (statistics caches, stored files)
``den.clip_range``               samples are clamped to ``[-r, r]`` after sampling (``None``: not clamped)
===============================  ==================================================================================

and its device and dtype are those of its parameters (:func:`device_dtype`). :class:`EpsModel` implements the
protocol for a network that takes its path's time ``t = schedule.alpha_bar_to_t(ᾱ)`` (discrete VP: training-timestep
units, log ᾱ linear between integer timesteps, the diffusers UNet convention; rectified flow: σ·T) and its path's
input ``c · x`` (:meth:`~vrg_lightning.schedule.NoisePath.input_scale`): a subclass gives ``model_output(x, t,
labels)``, the raw output, and :func:`to_epsilon` turns it into ε̂, the one place where v̂, x̂₀ or a velocity become
ε̂ (:func:`training_target` is its inverse, what a network is trained to output).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..schedule import NoisePath

__all__ = ["PREDICTION_TYPES", "EpsModel", "to_epsilon", "training_target", "check_prediction_type", "check_output",
           "device_dtype"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction_type(value: Any) -> str:
    """``value`` if it is one of :data:`PREDICTION_TYPES`, else a ``ValueError`` naming it."""
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {value!r}.")
    return str(value)


def to_epsilon(output: Tensor, x: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """ε̂ from a network output at ``x = √ᾱ x₀ + √(1-ᾱ) ε`` (float64 arithmetic, returned in ``x``'s dtype).

    =================  ================================================================
    ``prediction_type``  ε̂
    =================  ================================================================
    ``epsilon``          the output
    ``v_prediction``     √ᾱ v̂ + √(1-ᾱ) x   (v = √ᾱ ε - √(1-ᾱ) x₀; Salimans & Ho 2022)
    ``sample``           (x - √ᾱ x̂₀) / √(1-ᾱ)
    ``flow``             (x + √ᾱ v̂) / (√ᾱ + √(1-ᾱ))   (v = ε - x₀, rectified flow's velocity)
    =================  ================================================================

    Every quantity is a property of (x₀, ε), so the same formulas serve every noise path once its input is brought
    to the VP coordinates ``x_vp = x / c``.

    Args:
        output: the network output, shape of ``x``.
        x: the noisy input in VP coordinates.
        alpha_bar: ᾱ, 0-d or ``[B]``.
        prediction_type: one of :data:`PREDICTION_TYPES`.

    Example:
        >>> x0, eps, ab = torch.ones(2, 3), torch.full((2, 3), 0.5), torch.tensor([0.36, 0.64])
        >>> x = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
        >>> v = ab.sqrt()[:, None] * eps - (1 - ab).sqrt()[:, None] * x0
        >>> [round(float(to_epsilon(o, x, ab, p)[1, 0]), 6) for o, p in ((v, "v_prediction"), (x0, "sample"))]
        [0.5, 0.5]
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return output.to(x.dtype)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64).to(x.device, non_blocking=True)
    a = ab.reshape((-1,) + (1,) * (x.ndim - 1)) if ab.ndim else ab
    out, xd, ra, rs = output.double(), x.double(), a.sqrt(), (1 - a).sqrt()
    if prediction_type == "v_prediction":
        eps = ra * out + rs * xd
    elif prediction_type == "sample":
        eps = (xd - ra * out) / rs
    else:
        eps = (xd + ra * out) / (ra + rs)
    return eps.to(x.dtype)


def training_target(prediction_type: str, x0: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """What a network of ``prediction_type`` is trained to output for ``x_vp = a x₀ + s ε`` (``a = √ᾱ``, ``s =
    √(1-ᾱ)``, broadcastable): the inverse of :func:`to_epsilon`.

    Example:
        >>> x0, eps, a, s = torch.ones(1, 2), torch.zeros(1, 2), torch.tensor(0.8), torch.tensor(0.6)
        >>> [training_target(p, x0, eps, a, s)[0, 0].item() for p in PREDICTION_TYPES]
        [0.0, -0.6000000238418579, 1.0, -1.0]
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return x0 if prediction_type == "sample" else eps - x0


def check_output(output: Any, x: Tensor, where: str) -> Tensor:
    """The tensor of a model's output (a tensor or an object with ``.sample``), checked to be a floating-point
    tensor of ``x``'s shape.

    Raises:
        ValueError: not a tensor (nor ``.sample``), another shape, or an integer/bool dtype; the message names
            ``where`` (the model) and what it returned.
    """
    out = output if torch.is_tensor(output) else getattr(output, "sample", output)
    if not torch.is_tensor(out):
        raise ValueError(f"{where} must return a tensor or an object with a .sample tensor; got "
                         f"{type(output).__name__}.")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{where} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; it must "
                         "return its prediction (epsilon, v or x0) in the input's shape [B, *sample_shape].")
    if not out.is_floating_point():
        raise ValueError(f"{where} returned dtype {out.dtype}; it must return a floating-point tensor.")
    return out


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` of a module's first floating-point parameter or buffer (CPU, float32 without any).

    Example:
        >>> device_dtype(nn.Linear(2, 2).double()), device_dtype(nn.Identity())
        ((device(type='cpu'), torch.float64), (device(type='cpu'), torch.float32))
    """
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


class EpsModel(nn.Module):
    """Base of the denoiser adapters: the protocol over a network that takes continuous timesteps.

    Subclasses implement :meth:`model_output` (and :attr:`sample_shape`, :meth:`config`); :meth:`forward` maps ᾱ
    to ``t``, checks the output and converts it with :func:`to_epsilon`; :meth:`eps_fn` adds classifier-free
    guidance (Ho & Salimans 2022): ε = ε_∅ + w (ε_c - ε_∅).

    Args:
        schedule: the training noise path (:class:`~vrg_lightning.schedule.NoisePath`, e.g. a ``NoiseSchedule``).
        prediction_type: what :meth:`model_output` returns (:data:`PREDICTION_TYPES`, those the path defines).
        num_classes: class count of a conditional model, or ``None``.

    Attributes:
        clip_range: samples are clamped to ``[-clip_range, clip_range]`` after sampling; ``None`` (the default for
            models from outside, whose data range the toolkit does not know): not clamped.
    """

    clip_range: float | None = None

    def __init__(self, schedule: NoisePath, prediction_type: str = "epsilon",
                 num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(schedule, NoisePath):
            raise ValueError(f"schedule must be a noise path (NoiseSchedule, VPContinuous, VEPath, RectifiedFlow); got "
                             f"{type(schedule).__name__}.")
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None; got {num_classes!r}.")
        self.schedule = schedule
        self.prediction_type = schedule.check_prediction_type(check_prediction_type(prediction_type))
        self.num_classes = num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """A plain dict naming the model (subclasses add what rebuilds it)."""
        return {"schedule": self.schedule.to_dict(), "prediction_type": self.prediction_type,
                "num_classes": self.num_classes, "sample_shape": list(self.sample_shape)}

    def describe(self) -> str:
        """How error messages name the model."""
        return f"the model {type(self).__name__}"

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The network's raw output (ε, v or x₀ per ``prediction_type``) at float timesteps ``t`` (0-d or ``[B]``)."""
        raise NotImplementedError

    def null_labels(self, batch: int, device: torch.device | str) -> Tensor | None:
        """The labels of the unconditional prediction (``None``: the model takes ``class_labels=None``)."""
        return None

    def forward(self, x: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """ε̂(x, ᾱ): the noise prediction, same shape and dtype as ``x``.

        Args:
            x: noisy samples ``[B, *sample_shape]`` in VP coordinates (``x_vp``; the model gets ``c · x``).
            alpha_bar: ᾱ, a 0-d tensor (whole batch) or ``[B]``.
            class_labels: ``[B]`` integer labels, or ``None``.
        """
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)  # t is computed where ᾱ lives (CPU: no GPU sync)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.numel() != x.shape[0]):
            raise ValueError(f"alpha_bar must be 0-d or of shape [{x.shape[0]}]; got shape {tuple(ab.shape)}.")
        t = self.schedule.alpha_bar_to_t(ab.reshape(-1)).reshape(ab.shape).to(x.device, non_blocking=True)
        c = self.schedule.input_scale(ab)
        x_in = x if c is None else x * (c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim else c).to(x)
        out = check_output(self.model_output(x_in, t, class_labels), x, self.describe())
        return to_epsilon(out, x, ab, self.prediction_type)

    def eps_fn(self, class_labels: Tensor | None = None,
               guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """The solver callable ``(x, alpha_bar_0d) -> ε̂`` (docs/ARCHITECTURE.md), with CFG if ``guidance_scale != 1``.

        Guidance needs a conditional model and ``class_labels``; with null labels the conditional and unconditional
        passes run as one batch.
        """
        w = float(guidance_scale)
        if w != 1.0 and (self.num_classes is None or class_labels is None):
            raise ValueError(f"guidance_scale={w} needs a class-conditional model and class_labels.")

        def fn(x: Tensor, alpha_bar: Tensor) -> Tensor:
            if w == 1.0:
                return self(x, alpha_bar, class_labels)
            labels = class_labels.to(x.device)
            null = self.null_labels(x.shape[0], x.device)
            if null is None:
                cond, uncond = self(x, alpha_bar, labels), self(x, alpha_bar, None)
            else:
                ab = torch.as_tensor(alpha_bar)
                ab = ab if ab.ndim == 0 else torch.cat([ab, ab])
                cond, uncond = self(torch.cat([x, x]), ab, torch.cat([labels, null])).chunk(2)
            return uncond + w * (cond - uncond)

        return fn
