"""Any model: the denoiser protocol, its adapters and the one loader every command uses.

- :mod:`.base`: the protocol (``den(x, ᾱ, labels) -> ε̂``, ``eps_fn``, ``schedule``, ``prediction_type``,
  ``sample_shape``, ``num_classes``), :class:`EpsModel` and :func:`to_epsilon`, the one conversion to ε.
- :mod:`.spec`: SPECs, ``path/to/file.py:NAME`` or ``package.module:NAME``.
- :mod:`.external`: :class:`ModuleDenoiser`, any ``nn.Module`` called as ``model(x, t)``; schedules from names or
  ``scheduler_config.json``.
- :mod:`.lightning`: :class:`ProtocolDenoiser`, a LightningModule following the VRG protocol, rebuilt from its
  checkpoint.
- :mod:`.diffusers`: a ``UNet2DModel`` / ``DDPMPipeline`` / ``DDIMPipeline`` folder.
- :mod:`.latent`: :class:`LatentDenoiser`, a ``StableDiffusionPipeline`` folder (latents, prompts, guidance).
- :mod:`.guided`: guided error profiles (one per scale, every scale from one pass: :class:`GuidedMoments`) of
  latents with their captions or of a class-conditional model (:func:`probe_guided`).
- :mod:`.load`: :func:`load_model`.

The toolkit's own ``UNet2DModel`` adapter is :class:`vrg_lightning.denoiser.Denoiser`.
"""

from __future__ import annotations

from .base import PREDICTION_TYPES, EpsModel, check_output, check_prediction_type, device_dtype, to_epsilon
from .diffusers import PIPELINES, load_diffusers_dir
from .external import ModuleDenoiser, parse_sample_shape, read_scheduler_config, schedule_from
from .guided import GuidedMoments, LatentCaptions, probe_guided, probe_guided_moments
from .latent import LATENT_PIPELINES, LatentDenoiser, load_pipeline_dir
from .lightning import ModelSpecRequired, ProtocolDenoiser, load_lightning_module, module_section, stored_class_path
from .load import LoadedModel, check_model, load_diffusion_module, load_model
from .spec import build_module, import_spec, is_spec, spec_of_class, split_spec

__all__ = [
    "PREDICTION_TYPES", "EpsModel", "to_epsilon", "check_output", "check_prediction_type", "device_dtype",
    "PIPELINES", "load_diffusers_dir", "LATENT_PIPELINES", "LatentDenoiser", "load_pipeline_dir",
    "LatentCaptions", "probe_guided", "GuidedMoments", "probe_guided_moments",
    "ModuleDenoiser", "parse_sample_shape", "read_scheduler_config", "schedule_from",
    "ModelSpecRequired", "ProtocolDenoiser", "load_lightning_module", "module_section", "stored_class_path",
    "LoadedModel", "check_model", "load_diffusion_module", "load_model",
    "build_module", "import_spec", "is_spec", "spec_of_class", "split_spec",
]
