"""``load_model``: the one entry point from what a command is given (a checkpoint, a model SPEC, a diffusers folder)
to a denoiser (:mod:`.base`) and the checkpoint's ``vrg`` section.

==========================================  ======================================================================
given                                       model
==========================================  ======================================================================
checkpoint with ``vrg["model"]["denoiser"]``  ``DiffusionModule`` (or ``vrg profile``) weights: :class:`Denoiser`
checkpoint of a protocol LightningModule    its class (``vrg["module"]``, LightningCLI, or ``model=`` a class SPEC)
                                            rebuilt by ``load_from_checkpoint``: :class:`ProtocolDenoiser`
``model=SPEC`` (an ``nn.Module`` factory)   ``model(x, t)`` with ``schedule``, ``prediction_type``,
                                            ``sample_shape`` (given, or recorded by ``vrg profile``):
                                            :class:`ModuleDenoiser`
``diffusers_dir=DIR``                       a ``UNet2DModel`` / ``DDPMPipeline`` / ``DDIMPipeline`` folder, or a
                                            ``StableDiffusionPipeline`` folder: :class:`LatentDenoiser`
==========================================  ======================================================================

A file written by ``vrg profile --model SPEC`` records the SPEC (not the code or the weights): loading it without
``model`` raises :class:`ModelSpecRequired` naming the SPEC. A model that is not the toolkit's own UNet is called
once on two noisy samples when loaded, so a wrong output shape, dtype or a NaN shows at once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint import VRG_KEY, check_same_schedule, load_checkpoint_file, read_vrg
from ..schedule import NoisePath, NoiseSchedule
from .base import check_prediction_type, device_dtype
from .external import ModuleDenoiser, parse_sample_shape, schedule_from, stored_spec_section
from .lightning import ModelSpecRequired, ProtocolDenoiser, load_lightning_module, stored_class_path
from .spec import build_module, import_spec

__all__ = ["LoadedModel", "load_model", "check_model", "load_diffusion_module", "ModelSpecRequired"]


@dataclass
class LoadedModel:
    """What :func:`load_model` found.

    Attributes:
        denoiser: the model, in eval mode on CPU (the denoiser protocol).
        vrg: the validated ``vrg`` section of the checkpoint, or ``None`` (no checkpoint, or no statistics yet).
        kind: ``diffusion_module``, ``lightning``, ``spec``, ``diffusers`` or ``latent`` (a Stable Diffusion folder).
        checkpoint: the checkpoint dict a new file copies (its weights; ``{}`` for a SPEC model).
        sections: the ``vrg`` keys that let a new file rebuild the model (``model`` and/or ``module``).
    """

    denoiser: Any
    vrg: dict[str, Any] | None
    kind: str
    checkpoint: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)


def check_model(denoiser: Any, what: str | None = None) -> None:
    """Call ``denoiser`` once on two noisy samples (ᾱ at 10% and 90% of the schedule) and check the result.

    Raises:
        ValueError: the call fails, a wrong output shape or dtype (from the adapter), or non-finite values.
    """
    device, dtype = device_dtype(denoiser)
    shape = tuple(denoiser.sample_shape)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float32).to(device, dtype)
    ac = denoiser.schedule.alphas_cumprod
    ab = ac[torch.tensor([len(ac) // 10, (9 * len(ac)) // 10])]
    name = what or denoiser.describe()
    try:
        with torch.no_grad():
            eps = denoiser(x, ab, None)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's network failed on a batch of its own sample shape
        raise ValueError(f"{name} failed on input of shape {tuple(x.shape)} (called as model(x, t), t a float [B] "
                         f"tensor): {type(exc).__name__}: {exc}") from exc
    if not bool(torch.isfinite(eps).all()):
        raise ValueError(f"{name} returned non-finite values (NaN or inf) for finite input of shape {tuple(x.shape)} "
                         f"at alpha_bar {[round(float(v), 4) for v in ab]}; check the network and its weights.")


def load_diffusion_module(ckpt: Mapping[str, Any], name: str, use_ema: bool = True) -> Any:
    """The :class:`~vrg_lightning.denoiser.Denoiser` of a ``DiffusionModule`` checkpoint (``vrg["model"]``:
    ``denoiser`` config and the ``weights`` / ``ema_weights`` key prefixes), in eval mode.

    Raises:
        ValueError: no ``vrg.model`` section, no ``state_dict``, or weights that do not fit the config.
    """
    from ..denoiser import Denoiser

    vrg = ckpt.get(VRG_KEY)
    model = vrg.get("model") if isinstance(vrg, Mapping) else None
    if not isinstance(model, Mapping) or "denoiser" not in model:
        raise ValueError(f"{name} holds no vrg.model section (no denoiser config): it was not written by "
                         "vrg_lightning.module.DiffusionModule or `vrg profile --ckpt`.")
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"{name} has no state_dict (model weights); a profile-only file cannot be sampled from.")
    prefix = str(model.get("weights", "model."))
    ema_prefix = model.get("ema_weights")
    if use_ema:
        if ema_prefix and any(k.startswith(str(ema_prefix)) for k in state):
            prefix = str(ema_prefix)
        else:
            warnings.warn(f"{name} has no EMA weights; using the raw training weights.", stacklevel=3)
    denoiser = Denoiser.from_config(model["denoiser"])
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        denoiser.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{name}: the weights under {prefix!r} do not fit the stored denoiser config: "
                         f"{str(exc).splitlines()[0]}") from exc
    return denoiser.eval().requires_grad_(False)


def _check_given(den: Any, what: str, schedule: NoisePath | None, prediction_type: str | None,
                 sample_shape: tuple[int, ...] | None) -> None:
    """A model that brings its own settings must agree with the ones given."""
    for arg, given, own in (("schedule", schedule, den.schedule), ("prediction_type", prediction_type,
                            den.prediction_type), ("sample_shape", sample_shape, tuple(den.sample_shape))):
        if given is not None and given != own:
            shown = given.to_dict() if isinstance(given, NoisePath) else given
            mine = own.to_dict() if isinstance(own, NoisePath) else own
            raise ValueError(f"{arg}={shown!r} does not match {what}'s own {mine!r}; leave it out, or give another "
                             "model.")


def _from_spec(obj: Any, spec: str, vrg: Mapping[str, Any] | None, schedule: NoisePath | None,
               prediction_type: str | None, sample_shape: tuple[int, ...] | None) -> ModuleDenoiser:
    stored = vrg.get("model") if isinstance(vrg, Mapping) else None
    stored = stored if isinstance(stored, Mapping) and "spec" in stored else {}
    stored_schedule = vrg.get("schedule") if isinstance(vrg, Mapping) else None
    if schedule is None and isinstance(stored_schedule, Mapping):
        schedule = NoisePath.from_dict(stored_schedule)
    recorded = {"prediction_type": stored.get("prediction_type"),
                "sample_shape": None if stored.get("sample_shape") is None else tuple(stored["sample_shape"])}
    for arg, given in (("prediction_type", prediction_type), ("sample_shape", sample_shape)):
        if given is not None and recorded[arg] is not None and given != recorded[arg]:
            raise ValueError(f"{arg}={given!r} does not match the {recorded[arg]!r} the checkpoint was profiled with; "
                             "leave it out, or profile the model again.")
    pred = prediction_type or stored.get("prediction_type") or (stored_schedule or {}).get("prediction_type")
    shape = sample_shape or stored.get("sample_shape")
    if shape is None:
        raise ValueError(f"model {spec!r} needs sample_shape=..., the shape of one sample (e.g. 1,16,16 or 8).")
    net = build_module(obj, spec, "model")
    return ModuleDenoiser(net.eval().requires_grad_(False), schedule or NoiseSchedule(),
                          check_prediction_type(pred or "epsilon"), shape, spec)


def _stored_shape(ckpt: Mapping[str, Any] | None) -> list[int] | None:
    vrg = (ckpt or {}).get(VRG_KEY)
    section = vrg.get("module") if isinstance(vrg, Mapping) else None
    return section.get("sample_shape") if isinstance(section, Mapping) else None


def _from_lightning(cls: Any, class_spec: str, ckpt: Mapping[str, Any] | None, source: Any, name: str,
                    sample_shape: tuple[int, ...] | None) -> ProtocolDenoiser:
    if ckpt is None:
        raise ValueError(f"model {class_spec!r} is a LightningModule class; give the checkpoint to rebuild it from.")
    module = load_lightning_module(cls, source, name)
    stored = _stored_shape(ckpt)
    return ProtocolDenoiser(module, sample_shape or (None if stored is None else tuple(stored)), class_spec)


def _stored_model(ckpt: Mapping[str, Any], source: Any, name: str, use_ema: bool,
                  sample_shape: tuple[int, ...] | None) -> tuple[Any, str]:
    vrg = ckpt.get(VRG_KEY)
    model = vrg.get("model") if isinstance(vrg, Mapping) else None
    if isinstance(model, Mapping) and "spec" in model:
        spec = str(model["spec"])
        raise ModelSpecRequired(f"{name} records the model SPEC {spec!r} (its profile and trajectories, not its code "
                                f"or weights); pass model={spec!r}.", spec)
    if isinstance(model, Mapping) and isinstance(model.get("latent_pipeline"), Mapping):
        where = model["latent_pipeline"].get("diffusers_dir")
        raise ValueError(f"{name} records the Stable Diffusion pipeline folder {where!r} (its profile and "
                         f"trajectories, not its weights); pass diffusers_dir={where!r}.")
    if isinstance(model, Mapping) and "denoiser" in model:
        return load_diffusion_module(ckpt, name, use_ema), "diffusion_module"
    class_path = stored_class_path(ckpt)
    if class_path is not None:
        return _from_lightning(class_path, class_path, ckpt, source, name, sample_shape), "lightning"
    if isinstance(ckpt.get("hyper_parameters"), Mapping):
        raise ValueError(f"{name} is a LightningModule checkpoint that records no class path (vrg.module); pass "
                         "model='package.module:ClassName' (or 'path/file.py:ClassName'), the LightningModule class "
                         "to rebuild it with.")
    return load_diffusion_module(ckpt, name, use_ema), "diffusion_module"  # raises: "no vrg.model section"


def _sections(den: Any, kind: str, ckpt: Mapping[str, Any] | None, source: Mapping[str, Any] | None) -> dict:
    from ..checkpoint import model_section

    if kind == "spec":
        return {"model": stored_spec_section(den)}
    if kind == "lightning":
        return {"module": {"class_path": den.class_path, "sample_shape": list(den.sample_shape)}}
    if kind == "diffusers":
        return {"model": dict(model_section(den.config(), "model.", None), source=dict(source or {}))}
    if kind == "latent":  # the folder, not its weights (gigabytes): a file records where to load them again
        return {"model": {"latent_pipeline": dict(source or {}), "sample_shape": list(den.sample_shape)}}
    vrg = (ckpt or {}).get(VRG_KEY) or {}
    return {"model": dict(vrg.get("model") or {})}


def load_model(
    checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
    diffusers_dir: str | os.PathLike | None = None,
    schedule: NoisePath | str | os.PathLike | None = None,
    prediction_type: str | None = None,
    sample_shape: Sequence[int] | str | None = None,
    use_ema: bool = True,
) -> LoadedModel:
    """The model and ``vrg`` section of what a command is given (module docstring).

    Args:
        checkpoint: a checkpoint file or dict (its ``vrg`` section, and its weights unless ``model`` or
            ``diffusers_dir`` bring them).
        model: a SPEC (``path/to/file.py:NAME`` or ``package.module:NAME``): an ``nn.Module`` called as
            ``model(x, t)``, its class or factory, or a LightningModule class (rebuilt from ``checkpoint``).
        diffusers_dir: a local diffusers folder (:func:`~.diffusers.load_diffusers_dir`).
        schedule: a :class:`NoiseSchedule`, beta-schedule name or ``scheduler_config.json`` (default: the
            checkpoint's, else diffusers' ``linear``).
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample`` (default: the schedule file's or checkpoint's,
            else ``epsilon``).
        sample_shape: the shape of one sample (default: recorded in the checkpoint or by the model).
        use_ema: EMA weights of a ``DiffusionModule`` checkpoint.

    Raises:
        ModelSpecRequired: the checkpoint records a SPEC that ``model`` must give.
        ValueError, FileNotFoundError: what cannot be loaded, named with the value and the fix.
    """
    if model is not None and diffusers_dir is not None:
        raise ValueError(f"give model or diffusers_dir, not both; got model={model!r}, diffusers_dir="
                         f"{os.fspath(diffusers_dir)!r}.")
    if checkpoint is None and model is None and diffusers_dir is None:
        raise ValueError("load_model needs a checkpoint, model=SPEC or diffusers_dir=DIR.")
    name = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
    ckpt = None if checkpoint is None else (load_checkpoint_file(checkpoint) if isinstance(
        checkpoint, (str, os.PathLike)) else dict(checkpoint))
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else ckpt
    pred = None if prediction_type is None else check_prediction_type(prediction_type)
    shape = None if sample_shape is None else parse_sample_shape(sample_shape)
    sched, file_pred = (None, None) if schedule is None else schedule_from(schedule)
    pred = pred or file_pred
    raw_vrg = (ckpt or {}).get(VRG_KEY) if ckpt is not None else None
    raw_vrg = raw_vrg if isinstance(raw_vrg, Mapping) else None
    where = {}
    if diffusers_dir is not None:
        from .diffusers import load_diffusers_dir

        den, where = load_diffusers_dir(diffusers_dir, schedule=sched, prediction_type=pred)
        kind = "latent" if "pipeline" in where else "diffusers"  # a Stable Diffusion folder (models.latent)
        _check_given(den, f"the UNet of {os.fspath(diffusers_dir)!r}", None, None, shape)
    elif model is not None:
        obj = import_spec(model, "model")
        if _is_lightning_class(obj):
            den, kind = _from_lightning(obj, model, ckpt, source, name, shape), "lightning"
            _check_given(den, model, sched, None, None)
        else:
            den, kind = _from_spec(obj, model, raw_vrg, sched, pred, shape), "spec"
    else:
        den, kind = _stored_model(ckpt, source, name, use_ema, shape)
        _check_given(den, f"the model of {name}", sched, pred if kind == "diffusion_module" else None,
                     shape if kind == "diffusion_module" else None)
    if raw_vrg is not None and isinstance(raw_vrg.get("schedule"), Mapping):
        check_same_schedule(raw_vrg["schedule"], den.schedule, f"vrg section of {name}")
    if kind != "diffusion_module":
        check_model(den)
    # a model without statistics yet (no profile/entries) has vrg None; any other problem of the section (a newer
    # version, another format, broken entries) is an error, not "no statistics"
    stats = raw_vrg is not None and any(k in raw_vrg for k in ("profile", "entries"))
    vrg = read_vrg(raw_vrg) if stats else None
    if kind == "diffusers":
        ckpt = {"state_dict": {f"model.{k}": v.detach().cpu() for k, v in den.state_dict().items()}}
    return LoadedModel(den, vrg, kind, dict(ckpt or {}), _sections(den, kind, ckpt, where))


def _is_lightning_class(obj: Any) -> bool:
    if not isinstance(obj, type) or not any(c.__name__ == "LightningModule" for c in obj.__mro__):
        return False
    import lightning.pytorch as pl

    return issubclass(obj, pl.LightningModule)

