"""The model flags every command that takes a model shares (``--model``, ``--diffusers-dir``, ``--schedule``,
``--prediction-type``, ``--sample-shape``), :func:`model_from_args` (:func:`vrg_lightning.models.load_model` with the
flags' names in its errors) and :func:`flag_wording`."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..models.base import PREDICTION_TYPES
from ..schedule import SCHEDULE_NAMES

__all__ = ["add_model_arguments", "model_from_args", "flag_wording", "sample_shape_type"]

_FLAGS = {"model": "--model", "diffusers_dir": "--diffusers-dir", "schedule": "--schedule",
          "prediction_type": "--prediction-type", "sample_shape": "--sample-shape", "features": "--features"}
_ARG = re.compile(r"\b(" + "|".join(_FLAGS) + r")=")
_LEAD = re.compile(r"^(" + "|".join(_FLAGS) + r") ")


def flag_wording(message: str) -> str:
    """A library message with its argument names as the flags: ``model='x.py:f'`` becomes ``--model 'x.py:f'``, and
    a message that starts with an argument's name starts with its flag.

    Example:
        >>> flag_wording("pass model='mlp.py:make' and sample_shape=(8,)")
        "pass --model 'mlp.py:make' and --sample-shape (8,)"
        >>> flag_wording("schedule must be a beta-schedule name")
        '--schedule must be a beta-schedule name'
    """
    message = _LEAD.sub(lambda m: _FLAGS[m.group(1)] + " ", message)
    return _ARG.sub(lambda m: _FLAGS[m.group(1)] + " ", message)


def sample_shape_type(text: str) -> tuple[int, ...]:
    """argparse ``type`` of ``--sample-shape``: ``C,H,W`` (or any number of sizes)."""
    from ..models.external import parse_sample_shape

    try:
        return parse_sample_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(flag_wording(str(exc))) from exc


def add_model_arguments(parser: Any, diffusers_dir: bool = True) -> None:
    """The model flags, in their own group."""
    g = parser.add_argument_group("a model the toolkit did not train (docs: README, Bring your own model)")
    g.add_argument("--model", metavar="SPEC", default=None,
                   help="path/to/file.py:NAME or package.module:NAME: an nn.Module called as model(x, t) with t the "
                        "continuous training timesteps [B], its class or a function returning it; or a LightningModule "
                        "class following the VRG protocol, rebuilt from --ckpt")
    if diffusers_dir:
        g.add_argument("--diffusers-dir", metavar="DIR", default=None,
                       help="local diffusers folder: a UNet2DModel with its scheduler config, or a DDPMPipeline/"
                            "DDIMPipeline")
    g.add_argument("--schedule", metavar="NAME|FILE", default=None,
                   help=f"noise schedule of --model: {', '.join(SCHEDULE_NAMES)} (diffusers' defaults) or a "
                        "diffusers scheduler_config.json (default: the --ckpt's, else linear)")
    g.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what --model predicts (default: the schedule file's or --ckpt's, else epsilon)")
    g.add_argument("--sample-shape", metavar="C,H,W", type=sample_shape_type, default=None,
                   help="shape of one sample, any number of sizes (default: recorded in --ckpt, or the --data's)")


def model_from_args(args: argparse.Namespace, sample_shape: tuple[int, ...] | None = None, *,
                    use_ema: bool = True) -> Any:
    """:func:`~vrg_lightning.models.load_model` of the parsed flags (``--ckpt`` and the model flags); errors name the
    flags. ``sample_shape`` is used when ``--sample-shape`` is not given."""
    from ..models import load_model

    try:
        return load_model(getattr(args, "ckpt", None), model=args.model,
                          diffusers_dir=getattr(args, "diffusers_dir", None), schedule=args.schedule,
                          prediction_type=args.prediction_type, sample_shape=args.sample_shape or sample_shape,
                          use_ema=use_ema)
    except (ValueError, FileNotFoundError) as exc:
        exc.args = (flag_wording(str(exc)), *exc.args[1:])
        raise
