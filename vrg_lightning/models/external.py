"""A network the toolkit did not build: any ``nn.Module`` called as ``model(x, t)``, with its noise schedule, prediction
type and sample shape given by the user (``--model SPEC --schedule NAME|FILE --prediction-type ... --sample-shape``).

``t`` is a float tensor ``[B]`` of continuous timesteps in training-timestep units, in ``x``'s dtype: ``t =
schedule.alpha_bar_to_t(ᾱ)``, log ᾱ interpolated linearly between integer timesteps, so an integer ``t`` is exactly
the training timestep of that ᾱ (the diffusers ``UNet2DModel`` convention). The module returns a tensor, or an
object with ``.sample``, read according to ``prediction_type``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..schedule import SCHEDULE_NAMES, NoisePath, NoiseSchedule
from .base import EpsModel

__all__ = ["ModuleDenoiser", "parse_sample_shape", "read_scheduler_config", "schedule_from"]

_SCHEDULER_KEYS = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end")


def parse_sample_shape(value: str | Sequence[int]) -> tuple[int, ...]:
    """A sample shape from ``"C,H,W"`` (any number of sizes) or a sequence of positive integers.

    Raises:
        ValueError: empty, not integers, or a size < 1.

    Example:
        >>> parse_sample_shape("1,16,16"), parse_sample_shape([8])
        ((1, 16, 16), (8,))
    """
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    try:
        shape = tuple(int(v) for v in items if v != "")
        ok = len(shape) > 0 and all(s >= 1 for s in shape) and all(not isinstance(v, (bool, float)) for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sample_shape must be positive integers, e.g. 1,16,16 (C,H,W) or 8 (a vector); got "
                         f"{value!r}.")
    return shape


def read_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """A diffusers ``scheduler_config.json`` as a dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a scheduler config (no ``_class_name`` ending in ``Scheduler``, no noise
            ``path`` and none of ``beta_schedule``, ``num_train_timesteps``, ``beta_start``, ``beta_end``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Scheduler config {str(p)!r} does not exist.")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"schedule file {str(p)!r} is not JSON ({exc}); give a diffusers scheduler_config.json or a "
                         f"beta-schedule name ({', '.join(SCHEDULE_NAMES)}).") from exc
    is_sched = isinstance(cfg, dict) and (str(cfg.get("_class_name", "")).endswith("Scheduler") or "path" in cfg
                                          or any(k in cfg for k in _SCHEDULER_KEYS))  # "path": a stored noise path
    if not is_sched:
        keys = sorted(cfg)[:8] if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"schedule file {str(p)!r} is not a diffusers scheduler config (it has no _class_name "
                         f"'...Scheduler' and none of {', '.join(_SCHEDULER_KEYS)}; got {keys}); give the "
                         "scheduler_config.json of the model's scheduler or a beta-schedule name.")
    return cfg


def schedule_from(value: NoiseSchedule | str | os.PathLike) -> tuple[NoiseSchedule, str | None]:
    """``(schedule, prediction_type or None)`` from a :class:`NoiseSchedule`, a diffusers beta-schedule name (with
    diffusers' ``DDPMScheduler`` defaults: T = 1000, β 1e-4..0.02) or a ``scheduler_config.json`` file (whose
    ``prediction_type`` is returned).

    Raises:
        ValueError: neither a known name nor an existing file, or a file that is not a scheduler config.

    Example:
        >>> schedule_from("squaredcos_cap_v2")[0].beta_schedule, schedule_from("linear")[1]
        ('squaredcos_cap_v2', None)
    """
    if isinstance(value, NoisePath):
        return value, None
    text = os.fspath(value)
    if text in SCHEDULE_NAMES or text == "cosine":
        return NoiseSchedule(text), None
    if not Path(text).is_file():
        raise ValueError(f"schedule must be a beta-schedule name ({', '.join(SCHEDULE_NAMES)}) or a diffusers "
                         f"scheduler_config.json file; got {text!r} (no such file).")
    cfg = read_scheduler_config(text)
    try:
        schedule = NoisePath.from_config(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule file {text!r}: {exc}") from exc
    pred = cfg.get("prediction_type")
    return schedule, None if pred is None else str(pred)


class ModuleDenoiser(EpsModel):
    """An ``nn.Module`` called as ``net(x, t)`` (module docstring) as a denoiser.

    Args:
        net: the network; its output is a tensor or has ``.sample``.
        schedule: its training noise schedule.
        prediction_type: what it predicts (``epsilon``, ``v_prediction``, ``sample``).
        sample_shape: the shape of one sample.
        spec: the SPEC it was loaded from (recorded in :meth:`config` and in error messages).

    Example:
        >>> import torch
        >>> class Copy(nn.Module):  # predicts x0_hat = x
        ...     def forward(self, x, t):
        ...         return x
        >>> den = ModuleDenoiser(Copy(), NoiseSchedule(), "sample", (3,))
        >>> [round(v, 6) for v in den(torch.ones(2, 3), torch.tensor(0.25))[0].tolist()]  # (1 - 0.5) / sqrt(0.75)
        [0.57735, 0.57735, 0.57735]
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 sample_shape: Sequence[int] = (), spec: str | None = None) -> None:
        super().__init__(schedule, prediction_type, None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be an nn.Module; got {type(net).__name__}.")
        self.net = net
        self._shape = parse_sample_shape(sample_shape)
        self.spec = spec

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def describe(self) -> str:
        return f"the model {self.spec!r}" if self.spec else f"the model {type(self.net).__name__}"

    def config(self) -> dict[str, Any]:
        return {"spec": self.spec, **super().config()}

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Any:
        if class_labels is not None:
            raise ValueError(f"class_labels were given but {self.describe()} is called as model(x, t) (unconditional).")
        t = t.to(x.device, x.dtype)
        return self.net(x, t.expand(x.shape[0]) if t.ndim == 0 else t)


def stored_spec_section(den: ModuleDenoiser) -> dict[str, Any]:
    """``vrg["model"]`` of a file profiled with ``--model SPEC``: the SPEC, sample shape, prediction type and classes
    (no weights; the schedule is ``vrg["schedule"]``)."""
    return {"spec": den.spec, "sample_shape": list(den.sample_shape), "prediction_type": den.prediction_type,
            "num_classes": den.num_classes}


def spec_settings(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``sample_shape`` / ``prediction_type`` a stored SPEC section records (empty without one)."""
    if not isinstance(section, Mapping) or "spec" not in section:
        return {}
    return {k: section[k] for k in ("sample_shape", "prediction_type") if section.get(k) is not None}
