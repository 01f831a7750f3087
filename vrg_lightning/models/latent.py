"""Latent, text-conditioned models: a local ``StableDiffusionPipeline`` folder as a denoiser of the protocol
(:mod:`.base`), sampled in latent space with classifier-free guidance against the empty prompt.

================================  =================================================================================
member                            meaning
================================  =================================================================================
``den(z, ᾱ, embeds)``             ε̂ of the ``UNet2DConditionModel`` at latents ``z`` ``[B, C, h, w]``, prompt
                                  embeddings ``embeds`` ``[B, L, D]`` (``encoder_hidden_states``; ``None``: the
                                  empty prompt's)
``den.eps_fn(prompts, w)``        the solver callable with CFG ε = ε_∅ + w (ε_c - ε_∅); ``prompts`` per sample: a
                                  list of ``B`` strings or their embeddings ``[B, L, D]`` (:meth:`encode_prompt`)
``den.encode_prompt(prompts)``    ``[B, L, D]`` as ``StableDiffusionPipeline.encode_prompt`` (padded to the
                                  tokenizer's ``model_max_length``, last hidden state)
``den.decode(z)`` / ``encode``    images in [-1, 1] from latents (``vae.decode(z / scaling_factor)``) and back
================================  =================================================================================

The unconditional (ε_∅) and conditional passes run as one batch, ε_∅ first, as the pipeline runs them, so
``pipe(prompt, latents=z, guidance_scale=w)`` with :class:`~vrg_lightning.scheduler.VRGScheduler` samples what
``solvers.sample(solver, den.eps_fn([prompt], w), z, ᾱ)`` samples. Nothing is downloaded: every component is read
from the folder with ``local_files_only=True``; transformers (the text encoder and tokenizer) is the optional
dependency group ``sd`` and is imported only when a folder is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..schedule import NoiseSchedule
from .base import EpsModel, check_prediction_type

__all__ = ["LATENT_PIPELINES", "COMPONENTS", "LatentDenoiser", "load_pipeline_dir", "is_latent_pipeline_dir"]

LATENT_PIPELINES = ("StableDiffusionPipeline",)
COMPONENTS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
              "text_encoder": ("transformers", None), "tokenizer": ("transformers", None),
              "scheduler": ("diffusers", None)}
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # slow BPE files, or the fast one


class LatentDenoiser(EpsModel):
    """A ``UNet2DConditionModel`` over latents, conditioned on prompt embeddings, with the VAE that decodes them.

    Args:
        unet: the ``UNet2DConditionModel`` (``encoder_hidden_states`` of width ``cross_attention_dim``).
        schedule: its training noise schedule.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        vae: the ``AutoencoderKL`` (``scaling_factor`` from its config); ``None``: :meth:`decode` is unavailable.
        text_encoder, tokenizer: the prompt encoder; ``None`` for both: only embeddings can be given, and the
            unconditional embedding is ``null_embedding``.
        null_embedding: the unconditional embedding ``[1, L, D]`` (default: the empty prompt's, from the encoder).
        family: the model family (``sd15``, ``sdxl``; :mod:`vrg_lightning.ays`), or ``None`` when unknown.
        source: where it was loaded from (recorded in :meth:`config`).

    Raises:
        ValueError: no unconditional embedding, or one of another width than the UNet's ``cross_attention_dim``.
    """

    clip_range = None  # latents are not clamped; decode() clamps the images

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon", *,
                 vae: nn.Module | None = None, text_encoder: nn.Module | None = None, tokenizer: Any = None,
                 null_embedding: Tensor | None = None, family: str | None = None,
                 source: Mapping[str, Any] | None = None) -> None:
        super().__init__(schedule, check_prediction_type(prediction_type), None)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.family, self.source = family, dict(source or {})
        if null_embedding is None:
            if text_encoder is None or tokenizer is None:
                raise ValueError("LatentDenoiser needs null_embedding=[1, L, D] (the unconditional prompt embedding) "
                                 "or a text_encoder and tokenizer to compute the empty prompt's.")
            null_embedding = self.encode_prompt([""])
        width = getattr(unet.config, "cross_attention_dim", None)
        if null_embedding.ndim != 3 or null_embedding.shape[0] != 1 or (width and null_embedding.shape[-1] != width):
            raise ValueError(f"null_embedding must be [1, L, {width}] (cross_attention_dim of the UNet); got shape "
                             f"{tuple(null_embedding.shape)}.")
        self.register_buffer("null_embedding", null_embedding.detach(), persistent=False)

    # --- the protocol ---------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """``(latent channels, h, w)`` at the UNet's ``sample_size``."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scale: latents are ``vae.encode(x) * scaling_factor``."""
        if self.vae is None:
            raise ValueError(f"{self.describe()} has no VAE (vae=None); latents cannot be decoded or encoded.")
        return float(self.vae.config.scaling_factor)

    def config(self) -> dict[str, Any]:
        """The base config, the UNet class and the pipeline folder it came from."""
        return dict(super().config(), latent=True, unet_class=type(self.unet).__name__, family=self.family,
                    source=dict(self.source))

    def describe(self) -> str:
        where = self.source.get("diffusers_dir")
        return f"the {type(self.unet).__name__}" + (f" of {where!r}" if where else "")

    def check_latents(self, x: Tensor, name: str = "latents") -> None:
        """``x`` must be ``[B, C, h, w]`` with the UNet's ``C`` and ``h, w`` divisible by its downsampling.

        Raises:
            ValueError: another rank, channel count or size, naming ``name``, the shape and what is allowed.
        """
        c = int(self.unet.config.in_channels)
        f = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be [B, {c}, h, w] with h and w multiples of {f} ({self.describe()} takes "
                             f"{c} latent channels); got {got}.")

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The UNet at ``x`` and ``t`` with ``encoder_hidden_states = class_labels`` (``None``: the empty prompt's)."""
        self.check_latents(x, "x")
        emb = self._embeddings(class_labels, x.shape[0], x)
        return self.unet(x, t, encoder_hidden_states=emb).sample

    def eps_fn(self, class_labels: Tensor | Sequence[str] | None = None,
               guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """The solver callable ``(x, ᾱ_0d) -> ε̂``; ``class_labels`` are the prompts, one per sample (strings or
        embeddings ``[B, L, D]``), ``None`` for the empty prompt. With ``guidance_scale = w != 1``,
        ε̂ = ε_∅ + w (ε_c - ε_∅), ε_∅ at :attr:`null_embedding`, both in one batch (ε_∅ first, as the pipeline).

        Raises:
            ValueError: guidance without prompts; prompts that are neither strings nor ``[B, L, D]`` embeddings.
        """
        w = float(guidance_scale)
        cond = None if class_labels is None else self._prompts(class_labels)
        if w != 1.0 and cond is None:
            raise ValueError(f"guidance_scale={w} needs prompts (class_labels: a list of B prompts or their embeddings "
                             "[B, L, D]); got None. Use guidance_scale=1 for the empty prompt alone.")

        def fn(x: Tensor, alpha_bar: Tensor) -> Tensor:
            self.check_latents(x)
            if cond is not None and cond.shape[0] != x.shape[0]:
                raise ValueError(f"prompts: {cond.shape[0]} given for {x.shape[0]} latents; give one per sample.")
            c = None if cond is None else cond.to(x.device, self.null_embedding.dtype)
            if w == 1.0:
                return self(x, alpha_bar, c)
            ab = torch.as_tensor(alpha_bar)
            ab = ab if ab.ndim == 0 else torch.cat([ab, ab])
            null = self._embeddings(None, x.shape[0], x)
            uncond, text = self(torch.cat([x, x]), ab, torch.cat([null, c])).chunk(2)
            return uncond + w * (text - uncond)

        return fn

    # --- prompts and the VAE --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompt embeddings ``[B, L, D]``: the tokenizer padded to ``model_max_length``, the text encoder's last
        hidden state (``StableDiffusionPipeline.encode_prompt`` without ``clip_skip``).

        Raises:
            ValueError: no text encoder or tokenizer, or prompts that are not strings.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{self.describe()} has no text encoder and tokenizer; give prompt embeddings [B, L, D].")
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        if not items or not all(isinstance(p, str) for p in items):
            raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r:.80}.")
        tok = self.tokenizer(items, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(dev))[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from latents ``[B, C, h, w]`` (``vae.decode(latents / scaling_factor)``, clamped)."""
        s = self.scaling_factor
        self.check_latents(latents)
        return self.vae.decode(latents / s).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents ``vae.encode(images).latent_dist.sample(generator) * scaling_factor`` of images in [-1, 1]."""
        s = self.scaling_factor
        return self.vae.encode(images).latent_dist.sample(generator) * s

    def _prompts(self, labels: Tensor | Sequence[str]) -> Tensor:
        if isinstance(labels, str) or (isinstance(labels, Sequence) and labels and isinstance(labels[0], str)):
            return self.encode_prompt(labels)
        if not torch.is_tensor(labels) or labels.ndim != 3 or labels.shape[-1] != self.null_embedding.shape[-1]:
            got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"prompts (class_labels) must be a list of strings or embeddings [B, L, "
                             f"{self.null_embedding.shape[-1]}]; got {got}.")
        return labels

    def _embeddings(self, labels: Tensor | None, batch: int, x: Tensor) -> Tensor:
        emb = self.null_embedding.expand(batch, -1, -1) if labels is None else labels
        if not torch.is_tensor(emb) or emb.ndim != 3 or emb.shape[0] != batch:
            got = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
            raise ValueError(f"prompt embeddings must be [{batch}, L, D], one per sample; got {got}.")
        return emb.to(x.device, self.null_embedding.dtype)


def _read_index(d: Path) -> dict[str, Any]:
    index = d / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(d)!r} has no model_index.json; a StableDiffusionPipeline folder "
                                "(pipe.save_pretrained) has one beside unet/, vae/, text_encoder/, tokenizer/, "
                                "scheduler/.")
    try:
        cfg = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(index)!r} is not JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(index)!r} holds a {type(cfg).__name__}, not a pipeline index.")
    return cfg


def is_latent_pipeline_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``model_index.json`` naming one of :data:`LATENT_PIPELINES`."""
    index = Path(directory) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") in LATENT_PIPELINES
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _component_classes(d: Path, index: Mapping[str, Any]) -> dict[str, str]:
    """The class name of each of :data:`COMPONENTS`, each present in the index and as a folder."""
    classes = {}
    for name, (library, want) in COMPONENTS.items():
        entry = index.get(name)
        folder = d / name
        listed = isinstance(entry, list) and len(entry) == 2 and bool(entry[1])
        if not listed or not folder.is_dir():
            why = f"no folder {str(folder)!r}" if listed else f"model_index.json entry {entry!r}"
            raise FileNotFoundError(
                f"{str(d)!r} lacks the {name} component ({why}); a {index.get('_class_name')} folder needs "
                f"{', '.join(COMPONENTS)} (pipe.save_pretrained writes them).")
        if entry[0] != library or (want is not None and entry[1] != want):
            raise ValueError(f"{str(d)!r}: component {name} is {entry!r}; supported: "
                             f"[{library!r}, {want or 'any'!r}].")
        classes[name] = str(entry[1])
    return classes


def _check_tokenizer_files(folder: Path) -> None:
    if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
        have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"The tokenizer folder {str(folder)!r} lacks its vocabulary: it needs vocab.json and "
                                f"merges.txt, or tokenizer.json; it has {have}.")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # the optional group
        raise ImportError("Stable Diffusion folders need transformers (the text encoder and tokenizer): "
                          "pip install 'vrg-lightning[sd]'.") from exc
    return transformers


def load_pipeline_dir(directory: str | os.PathLike, *, schedule: NoiseSchedule | None = None,
                      prediction_type: str | None = None) -> tuple[LatentDenoiser, dict[str, Any]]:
    """``(denoiser, source)`` from a local ``StableDiffusionPipeline`` folder, every component read with
    ``local_files_only=True``; ``source`` records the folder, its pipeline class and scheduler config.

    Args:
        directory: the folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
            ``scheduler/``).
        schedule, prediction_type: replace the scheduler config's.

    Raises:
        FileNotFoundError: no such folder, no index, a missing component or tokenizer vocabulary.
        ValueError: another pipeline class or component class, a tokenizer longer than the text encoder, or a
            prediction type the adapter does not take.
        ImportError: transformers is not installed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..ays import family_of_pipeline
    from .external import read_scheduler_config

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"The pipeline folder {str(directory)!r} does not exist or is not a folder.")
    index = _read_index(d)
    if index.get("_class_name") not in LATENT_PIPELINES:
        raise ValueError(f"{str(d)!r} holds a {index.get('_class_name')!r} (model_index.json); latent pipelines "
                         f"supported: {', '.join(LATENT_PIPELINES)}.")
    classes = _component_classes(d, index)
    _check_tokenizer_files(d / "tokenizer")
    cfg = read_scheduler_config(d / "scheduler" / "scheduler_config.json")
    pred = check_prediction_type(prediction_type or str(cfg.get("prediction_type", "epsilon")))
    transformers = _import_transformers()
    loaded = {}
    for name in ("text_encoder", "tokenizer"):
        cls = getattr(transformers, classes[name], None)
        if cls is None:
            raise ValueError(f"{str(d)!r}: component {name} names {classes[name]!r}, which transformers "
                             f"{transformers.__version__} does not have.")
        loaded[name] = cls.from_pretrained(str(d / name), local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(str(d / "unet"), local_files_only=True).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(d / "vae"), local_files_only=True).eval().requires_grad_(False)
    text_encoder = loaded["text_encoder"].eval().requires_grad_(False)
    tokenizer = loaded["tokenizer"]
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    if positions is not None and tokenizer.model_max_length > positions:
        raise ValueError(f"{str(d / 'tokenizer')!r}: model_max_length {tokenizer.model_max_length} exceeds the text "
                         f"encoder's max_position_embeddings {positions}; set model_max_length in "
                         "tokenizer_config.json.")
    family = family_of_pipeline(index.get("_class_name"), getattr(unet.config, "cross_attention_dim", None))
    source = {"diffusers_dir": str(d.resolve()), "pipeline": str(index["_class_name"]),
              "scheduler_config": str((d / "scheduler" / "scheduler_config.json").resolve())}
    den = LatentDenoiser(unet, schedule or NoiseSchedule.from_config(cfg), pred, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, family=family, source=source)
    return den, source
