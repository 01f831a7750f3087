"""A local diffusers folder as a :class:`~vrg_lightning.denoiser.Denoiser`: a ``UNet2DModel`` written by
``save_pretrained`` with its scheduler config, or a ``DDPMPipeline`` / ``DDIMPipeline`` folder (``model_index.json``,
``unet/``, ``scheduler/``). A ``StableDiffusionPipeline`` folder goes to :func:`.latent.load_pipeline_dir` (a
:class:`~.latent.LatentDenoiser`). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..schedule import NoisePath
from .external import read_scheduler_config

__all__ = ["PIPELINES", "load_diffusers_dir"]

PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def _check_index(d: Path) -> None:
    index = d / "model_index.json"
    if not index.is_file():
        return
    try:
        cfg = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(index)!r} is not JSON: {exc}") from exc
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    unet = cfg.get("unet") if isinstance(cfg, dict) else None
    if cls not in PIPELINES or not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
        raise ValueError(f"{str(d)!r} holds a {cls or 'pipeline'} with unet {unet!r} (model_index.json); supported: "
                         f"{', '.join(PIPELINES)} folders with a UNet2DModel, a UNet2DModel folder with its "
                         "scheduler_config.json, or a StableDiffusionPipeline folder (models.latent).")


def load_diffusers_dir(directory: str | os.PathLike, *, schedule: NoisePath | None = None,
                       prediction_type: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(denoiser, source)`` from a local diffusers folder: a ``UNet2DModel`` in ``DIR`` or ``DIR/unet`` and its
    ``scheduler_config.json`` in ``DIR/scheduler`` or ``DIR``; ``source`` records the paths.

    Args:
        directory: the folder.
        schedule, prediction_type: replace the scheduler config's (then the folder needs no scheduler config).

    Raises:
        FileNotFoundError: no such folder, UNet config or scheduler config.
        ValueError: a pipeline other than :data:`PIPELINES`, a model other than ``UNet2DModel``, a class-conditional
            UNet, a scheduler config that is not one, or a prediction type the UNet adapter does not take.
    """
    from diffusers import UNet2DModel

    from ..denoiser import PREDICTION_TYPES, Denoiser

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"The diffusers folder {str(directory)!r} does not exist or is not a folder.")
    from .latent import is_latent_pipeline_dir, load_pipeline_dir

    if is_latent_pipeline_dir(d):  # a StableDiffusionPipeline folder: the latent, text-conditioned adapter
        return load_pipeline_dir(d, schedule=schedule, prediction_type=prediction_type)
    _check_index(d)
    unet_dir = d / "unet" if (d / "unet" / "config.json").is_file() else d
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"No UNet config.json in {str(d)!r} or {str(d / 'unet')!r}.")
    kind = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
    if kind not in (None, "UNet2DModel"):
        raise ValueError(f"{str(unet_dir / 'config.json')!r} describes a {kind}; only UNet2DModel folders are "
                         "supported (bring other networks with a model SPEC).")
    sched_file = next((p for p in (d / "scheduler" / "scheduler_config.json", d / "scheduler_config.json")
                       if p.is_file()), None)
    cfg: dict[str, Any] = {}
    if sched_file is not None:
        cfg = read_scheduler_config(sched_file)
    elif schedule is None:
        raise FileNotFoundError(f"No scheduler_config.json in {str(d / 'scheduler')!r} or {str(d)!r}; give the "
                                "schedule explicitly.")
    schedule = schedule or NoisePath.from_config(cfg)
    pred = prediction_type or str(cfg.get("prediction_type", schedule.prediction_types[0]))  # FlowMatch: velocity
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {pred!r} of {str(d)!r} is not supported for UNet2DModel folders; "
                         f"supported: {', '.join(PREDICTION_TYPES)}.")
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    if getattr(unet.config, "num_class_embeds", None):
        raise ValueError(f"{str(d)!r} holds a class-conditional UNet (num_class_embeds); only unconditional "
                         "diffusers UNet2DModels are supported.")
    den = Denoiser(schedule=schedule, prediction_type=pred, unet=unet)
    source = {"diffusers_dir": str(d.resolve())}
    if sched_file is not None:
        source["scheduler_config"] = str(sched_file.resolve())
    return den, source
