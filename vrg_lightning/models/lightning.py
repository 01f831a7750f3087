"""A LightningModule that follows the VRG protocol (:mod:`vrg_lightning.protocol`: ``vrg_schedule``,
``vrg_denoiser()``) as a denoiser, rebuilt from its checkpoint the way ``load_from_checkpoint`` does.

The class comes from, in order: a class given as a SPEC; ``vrg["module"]["class_path"]`` (written by
:func:`module_section`); LightningCLI's ``hyper_parameters["_class_path"]``. A stored class path is imported by
itself only when it names an importable module (``package.module:Class``); a class defined in a file (a script,
``/path/file.py:Class``) must be passed as a SPEC, so reading a checkpoint never runs a file it names.
The weights load with ``weights_only=True``. Optional module attributes: ``vrg_sample_shape`` (else the stored or
given sample shape), ``vrg_num_classes`` (else ``vrg_denoiser().num_classes``), ``vrg_prediction_type``,
``vrg_clip_range`` (samples are clamped to ``[-r, r]``; default: not clamped).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..schedule import NoisePath
from .base import EpsModel, check_output
from .external import parse_sample_shape
from .spec import import_spec, is_file_location, spec_of_class, split_spec

__all__ = ["ProtocolDenoiser", "module_section", "stored_class_path", "load_lightning_module", "ModelSpecRequired"]


class ModelSpecRequired(ValueError):
    """A file records a model (or LightningModule class) SPEC that must be passed to load it; ``spec`` holds it."""

    def __init__(self, message: str, spec: str) -> None:
        super().__init__(message)
        self.spec = spec


def _protocol_check(module: Any) -> NoisePath:
    name = type(module).__name__
    schedule = getattr(module, "vrg_schedule", None)
    lacks = [k for k, ok in (("vrg_schedule (a noise path, e.g. NoiseSchedule)", isinstance(schedule, NoisePath)),
                             ("vrg_denoiser() returning (x, alpha_bar[B], class_labels) -> eps",
                              callable(getattr(module, "vrg_denoiser", None)))) if not ok]
    if lacks:
        raise ValueError(f"{name} does not follow the VRG protocol: it lacks {' and '.join(lacks)} (see "
                         "vrg_lightning.protocol); add them, or load the network with a model SPEC instead.")
    return schedule


class ProtocolDenoiser(EpsModel):
    """ε̂ = ``module.vrg_denoiser()(x, ᾱ [B], class_labels)`` of a protocol LightningModule (held as a submodule, so
    ``.to()``, ``parameters()`` and ``state_dict()`` reach its weights).

    Args:
        module: the LightningModule (put in eval mode, gradients off).
        sample_shape: the shape of one sample, if the module has no ``vrg_sample_shape``.
        class_path: the SPEC of its class (recorded in :meth:`config`).

    Raises:
        ValueError: the module lacks the protocol, or no (or a conflicting) sample shape.
    """

    def __init__(self, module: nn.Module, sample_shape: Sequence[int] | None = None,
                 class_path: str | None = None) -> None:
        schedule = _protocol_check(module)
        inner = module.vrg_denoiser()
        classes = getattr(module, "vrg_num_classes", getattr(inner, "num_classes", None))
        super().__init__(schedule, str(getattr(module, "vrg_prediction_type", "epsilon")), classes)
        self.module = module.eval().requires_grad_(False)
        self.clip_range = getattr(module, "vrg_clip_range", None)
        self.class_path = class_path or spec_of_class(type(module))
        own = getattr(module, "vrg_sample_shape", None) or getattr(inner, "sample_shape", None)
        if own is not None and sample_shape is not None and tuple(own) != tuple(sample_shape):
            raise ValueError(f"sample_shape {tuple(sample_shape)} does not match {type(module).__name__}'s "
                             f"vrg_sample_shape {tuple(own)}.")
        shape = own if own is not None else sample_shape
        if shape is None:
            raise ValueError(f"The sample shape of {type(module).__name__} is unknown: give sample_shape=... (e.g. "
                             "1,16,16) or a vrg_sample_shape attribute on the module.")
        self._shape = parse_sample_shape(shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def describe(self) -> str:
        return f"{type(self.module).__name__}.vrg_denoiser()"

    def config(self) -> dict[str, Any]:
        return {"class_path": self.class_path, **super().config()}

    def null_labels(self, batch: int, device: torch.device | str) -> Tensor | None:
        inner = self.module.vrg_denoiser()
        return inner.null_labels(batch, device) if callable(getattr(inner, "null_labels", None)) else None

    def forward(self, x: Tensor, alpha_bar: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """ε̂ from the protocol callable, ᾱ given to it as ``[B]`` float64 (as the probe does)."""
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if ab.ndim > 1 or (ab.ndim == 1 and ab.numel() != x.shape[0]):
            raise ValueError(f"alpha_bar must be 0-d or of shape [{x.shape[0]}]; got shape {tuple(ab.shape)}.")
        ab = ab.expand(x.shape[0]).to(x.device, non_blocking=True)
        out = check_output(self.module.vrg_denoiser()(x, ab, class_labels), x, self.describe())
        return out.to(x.dtype)


def module_section(module: nn.Module | type, sample_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """``vrg["module"]``: the class path of a LightningModule (:func:`~.spec.spec_of_class`) and its sample shape, so
    a checkpoint of it can be rebuilt by ``load_model`` with nothing else.

    Example:
        >>> module_section(nn.Linear, (4,))
        {'class_path': 'torch.nn.modules.linear:Linear', 'sample_shape': [4]}
    """
    cls = module if isinstance(module, type) else type(module)
    shape = sample_shape if sample_shape is not None else getattr(module, "vrg_sample_shape", None)
    return {"class_path": spec_of_class(cls), "sample_shape": None if shape is None else list(shape)}


def stored_class_path(checkpoint: Mapping[str, Any]) -> str | None:
    """The class SPEC a checkpoint records: ``vrg["module"]["class_path"]``, else LightningCLI's ``_class_path``
    (``a.b.Class`` becomes ``a.b:Class``), else ``None``."""
    vrg = checkpoint.get("vrg")
    section = vrg.get("module") if isinstance(vrg, Mapping) else None
    if isinstance(section, Mapping) and isinstance(section.get("class_path"), str):
        return section["class_path"]
    hp = checkpoint.get("hyper_parameters")
    path = hp.get("_class_path") if isinstance(hp, Mapping) else None
    if isinstance(path, str) and "." in path:
        return path if ":" in path else ":".join(path.rsplit(".", 1))
    return None


def load_lightning_module(class_spec: str | type, checkpoint: str | os.PathLike | Mapping[str, Any],
                          name: str = "the checkpoint") -> nn.Module:
    """``cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)``.

    Args:
        class_spec: the LightningModule class, or its SPEC. A stored file SPEC is refused (module docstring).
        checkpoint: the checkpoint file or its dict (saved to memory for ``load_from_checkpoint``).
        name: how messages call the checkpoint.

    Raises:
        ModelSpecRequired: a class SPEC that names a file (pass it explicitly).
        ValueError: the class does not import, is not a LightningModule, or rebuilding it fails.
    """
    import lightning.pytorch as pl

    if isinstance(class_spec, str):
        where, _ = split_spec(class_spec, "LightningModule class")
        if is_file_location(where):
            raise ModelSpecRequired(f"{name} records its LightningModule class as {class_spec!r}, defined in a file; "
                                    f"pass model={class_spec!r} to import it.", class_spec)
        cls = import_spec(class_spec, "LightningModule class")
    else:
        cls = class_spec
    label = class_spec if isinstance(class_spec, str) else spec_of_class(cls)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"{label!r} is not a LightningModule class; got {cls!r}.")
    src: Any = checkpoint
    if isinstance(checkpoint, Mapping):
        src = io.BytesIO()
        torch.save(dict(checkpoint), src)
        src.seek(0)
    try:
        module = cls.load_from_checkpoint(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the user's class failed to rebuild: say which and why
        raise ValueError(f"{name}: {label}.load_from_checkpoint failed (rebuilt from the saved hyper_parameters, "
                         f"weights with weights_only=True): {type(exc).__name__}: {exc}") from exc
    return module
