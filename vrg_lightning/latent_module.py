"""``LatentDiffusionModule``: a small latent, class-conditional diffusion model trained here (the Stable Diffusion
recipe at digits scale), following the VRG protocol (:mod:`vrg_lightning.protocol`) so
:class:`~vrg_lightning.callbacks.VRGProfiler` measures it.

==============================  ===================================================================================
part                            what
==============================  ===================================================================================
``vae``                         an ``AutoencoderKL`` (default :data:`DIGITS_VAE`: 16×16×1 images → 2×8×8 latents),
                                trained first, at the start of ``fit`` (:func:`fit_autoencoder`, ``vae_steps``),
                                then frozen; latents are ``vae.encode(x).sample() · latent_scale`` with
                                ``latent_scale`` = 1 / std of the training latents (SD's ``scaling_factor``)
``model``                       :class:`ClassLatentDenoiser`: a ``UNet2DConditionModel`` over the latents whose
                                ``encoder_hidden_states`` is one learned token per class (an embedding table with a
                                null row, index ``num_classes``: the unconditional prediction); labels are dropped
                                to the null row with probability ``label_dropout`` (classifier-free guidance)
``ema``                         EMA of ``model`` (what ``vrg_denoiser()`` gives, what sampling uses)
==============================  ===================================================================================

The denoiser is an ordinary class-conditional model of the protocol (``num_classes``, ``null_labels``), so
:func:`vrg_lightning.sampling.generate`, :class:`~vrg_lightning.evaluation.FIDEvaluator` and guided probes
(:func:`vrg_lightning.models.guided.probe_guided`) take it as they are; FID is measured on decoded images by
:class:`DecodedFeatures` (latents → ``vae.decode`` → image features), against the features of real images.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from .evaluation.features import FeatureExtractor
from .evaluation.fid import FeatureStats, feature_stats
from .models.base import EpsModel, to_epsilon, training_target
from .module import split_batch
from .schedule import NoiseSchedule, add_noise

__all__ = ["DIGITS_VAE", "DIGITS_LATENT_UNET", "ClassLatentDenoiser", "LatentDecoder", "DecodedFeatures",
           "LatentDataset", "LatentDiffusionModule", "fit_autoencoder"]

DIGITS_VAE: dict[str, Any] = {
    "in_channels": 1, "out_channels": 1, "latent_channels": 2, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4, "sample_size": 16}
DIGITS_LATENT_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 2, "out_channels": 2, "block_out_channels": [16, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 16, "attention_head_dim": 8, "norm_num_groups": 8}


class ClassLatentDenoiser(EpsModel):
    """A ``UNet2DConditionModel`` over latents conditioned on a class: ``encoder_hidden_states`` = the learned
    embedding ``[B, 1, D]`` of the label (row ``num_classes``: the null class, for ``class_labels=None`` too).

    Args:
        unet: ``UNet2DConditionModel`` keyword arguments (``cross_attention_dim`` = the embedding width D).
        schedule: the training noise schedule; prediction_type: what the UNet outputs.
        num_classes: the class count (the table has ``num_classes + 1`` rows).
    """

    clip_range = None  # latents are not clamped; the decoder clamps images

    def __init__(self, unet: dict[str, Any], schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 num_classes: int = 10) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__(schedule, prediction_type, num_classes)
        self.unet_config = dict(unet)
        self.unet = UNet2DConditionModel(**self.unet_config)
        self.class_embedding = nn.Embedding(num_classes + 1, int(self.unet.config.cross_attention_dim))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    def config(self) -> dict[str, Any]:
        return dict(super().config(), latent=True, unet=dict(self.unet_config))

    def describe(self) -> str:
        return "the class-conditional latent UNet2DConditionModel"

    def null_labels(self, batch: int, device: torch.device | str) -> Tensor:
        return torch.full((batch,), int(self.num_classes), dtype=torch.long, device=device)

    def model_output(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        labels = self.null_labels(x.shape[0], x.device) if class_labels is None else class_labels.to(x.device).long()
        if labels.shape != (x.shape[0],) or bool(((labels < 0) | (labels > self.num_classes)).any()):
            raise ValueError(f"class_labels must be [{x.shape[0]}] integers in [0, {self.num_classes}] "
                             f"({self.num_classes} = the null class); got {labels.tolist()!r:.80}.")
        emb = self.class_embedding(labels)[:, None, :].to(x.dtype)
        return self.unet(x, t, encoder_hidden_states=emb).sample


class LatentDecoder(nn.Module):
    """The VAE's decoder and encoder with the latent scale: images in [-1, 1] ↔ latents ``z = s · sample``."""

    def __init__(self, vae: nn.Module, latent_scale: Tensor) -> None:
        super().__init__()
        self.vae = vae
        self.register_buffer("latent_scale", latent_scale.detach().reshape(()).float().clone())

    @torch.no_grad()
    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.latent_scale).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.vae.encode(images).latent_dist.sample(generator) * self.latent_scale


class DecodedFeatures(FeatureExtractor):
    """FID features of latents: decoded by ``decoder`` (:class:`LatentDecoder`), then ``inner`` (image features).

    :meth:`real_stats` gives the reference: ``inner`` features of real images under this extractor's name, so a FID
    of decoded samples is measured against the data itself (the VAE's reconstruction error is part of it).
    """

    def __init__(self, decoder: LatentDecoder, inner: FeatureExtractor) -> None:
        super().__init__()
        self.decoder, self.inner = decoder.eval(), inner.eval()
        self.name, self.num_features = f"{inner.name}@decoded", int(inner.num_features)
        self.channels = (int(decoder.vae.config.latent_channels),)

    def extract(self, images: Tensor) -> Tensor:
        return self.inner(self.decoder(images))

    def real_stats(self, images: Tensor, batch_size: int = 256) -> FeatureStats:
        """Statistics of ``inner`` features of real images ``[N, C, H, W]`` in [-1, 1], named as this extractor's."""
        s = feature_stats(images, self.inner, batch_size=batch_size)
        return FeatureStats(s.n, s.sum, s.cov_sum, self.name, self.weights_hash)

    def train(self, mode: bool = True) -> DecodedFeatures:
        return super().train(False)


def fit_autoencoder(vae: nn.Module, images: Tensor, *, steps: int, batch_size: int = 128, lr: float = 2e-3,
                    kl_weight: float = 1e-4, seed: int = 0) -> list[float]:
    """Train an ``AutoencoderKL`` on ``images`` (``[N, C, H, W]`` in [-1, 1]): MSE reconstruction of a posterior
    sample + ``kl_weight`` · KL to N(0, I), AdamW, seeded batches and samples. Returns the losses.

    Raises:
        ValueError: ``steps`` not an integer >= 0, or no images.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a tensor [N, C, H, W] with N >= 1; got {getattr(images, 'shape', images)}.")
    g = torch.Generator().manual_seed(seed)
    dev = next(vae.parameters()).device
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = images[torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=g)].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        loss = F.mse_loss(vae.decode(z).sample, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vae.eval().requires_grad_(False)
    return losses


class LatentDataset(Dataset):
    """``(latent, label)`` items of an image dataset, encoded once (seeded posterior samples) on first use by the
    module's trained VAE: probe data for a :class:`LatentDiffusionModule` (``VRGProfiler(probe_dataset=...)``)."""

    def __init__(self, module: LatentDiffusionModule, dataset: Dataset, seed: int = 0, batch_size: int = 256) -> None:
        self.module, self.dataset, self.seed, self.batch_size = module, dataset, seed, batch_size
        self._items: tuple[Tensor, Tensor] | None = None

    def _encoded(self) -> tuple[Tensor, Tensor]:
        if self._items is None:
            items = [self.dataset[i] for i in range(len(self.dataset))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
            y = torch.as_tensor([int(it[1]) for it in items])
            dec, g = self.module.decoder(), torch.Generator().manual_seed(self.seed)
            dev = dec.latent_scale.device
            z = torch.cat([dec.encode(x[a:a + self.batch_size].to(dev), g if dev.type == "cpu" else None).cpu()
                           for a in range(0, x.shape[0], self.batch_size)])
            self._items = (z, y)
        return self._items

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        z, y = self._encoded()
        return z[i], int(y[i])


class LatentDiffusionModule(pl.LightningModule):
    """Latent diffusion with class conditioning: the VAE first (``vae_steps`` at the start of ``fit``), then DDPM
    training of :class:`ClassLatentDenoiser` on its latents, AdamW with linear warm-up, EMA.

    Args:
        vae: ``AutoencoderKL`` keyword arguments (default :data:`DIGITS_VAE`).
        unet: ``UNet2DConditionModel`` keyword arguments (default :data:`DIGITS_LATENT_UNET`; its channels must be
            the VAE's ``latent_channels``).
        num_classes: classes of the labels; label_dropout: probability of the null class in training.
        beta_schedule, beta_start, beta_end, num_train_timesteps: the noise schedule (default SD's scaled_linear
            0.00085-0.012, 1000 steps).
        prediction_type: ``epsilon`` or ``v_prediction``.
        lr, warmup_steps, ema_decay: the UNet's optimizer and EMA.
        vae_steps, vae_lr, vae_kl_weight, vae_batch_size, vae_images: the autoencoder's training
            (:func:`fit_autoencoder` on the first ``vae_images`` training images; 0 steps: keep the VAE as it is).

    Raises:
        ValueError: latent channels of the VAE and the UNet differ, or a setting out of range.
    """

    def __init__(self, vae: dict[str, Any] | None = None, unet: dict[str, Any] | None = None, num_classes: int = 10,
                 label_dropout: float = 0.1, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                 beta_end: float = 0.012, num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                 lr: float = 1e-3, warmup_steps: int = 100, ema_decay: float = 0.995, vae_steps: int = 600,
                 vae_lr: float = 2e-3, vae_kl_weight: float = 1e-4, vae_batch_size: int = 128,
                 vae_images: int = 4096) -> None:
        from diffusers import AutoencoderKL

        super().__init__()
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout!r}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay!r}.")
        self.save_hyperparameters()
        vae_cfg, unet_cfg = dict(DIGITS_VAE if vae is None else vae), dict(DIGITS_LATENT_UNET if unet is None else unet)
        if int(vae_cfg.get("latent_channels", 4)) != int(unet_cfg.get("in_channels", 4)):
            raise ValueError(f"unet in_channels ({unet_cfg.get('in_channels', 4)}) must equal the vae's "
                             f"latent_channels ({vae_cfg.get('latent_channels', 4)}).")
        self.schedule = NoiseSchedule(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                                      num_train_timesteps=num_train_timesteps)
        self.vae = AutoencoderKL(**vae_cfg).requires_grad_(False)
        self.model = ClassLatentDenoiser(unet_cfg, self.schedule, prediction_type, num_classes)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("vae_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod, persistent=False)
        self.vae_losses: list[float] = []
        self._ema_step = -1

    # --- VRG protocol ---------------------------------------------------------------------------------------------
    @property
    def vrg_schedule(self) -> NoiseSchedule:
        return self.schedule

    @property
    def vrg_prediction_type(self) -> str:
        return self.model.prediction_type

    @property
    def vrg_sample_shape(self) -> tuple[int, ...]:
        return self.model.sample_shape

    @property
    def vrg_num_classes(self) -> int:
        return int(self.model.num_classes)

    def vrg_denoiser(self) -> ClassLatentDenoiser:
        """The EMA denoiser (what sampling uses), for probe-mode profiling (on latents: :class:`LatentDataset`)."""
        return self.ema.module

    def decoder(self) -> LatentDecoder:
        """The trained VAE with the latent scale (shares its weights)."""
        return LatentDecoder(self.vae, self.latent_scale)

    # --- the autoencoder ------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        """Train the VAE once (a resumed run finds ``vae_ready``), set the latent scale, share both across ranks."""
        hp = self.hparams
        if bool(self.vae_ready) or hp.vae_steps == 0:
            self.vae_ready.fill_(True)
            return
        if self.trainer.is_global_zero:
            ds = self.trainer.train_dataloader.dataset
            n = min(len(ds), int(hp.vae_images))
            x = torch.stack([torch.as_tensor(split_batch(tuple(ds[i]))[0]) for i in range(n)]).float()
            self.vae_losses = fit_autoencoder(self.vae, x, steps=int(hp.vae_steps), batch_size=hp.vae_batch_size,
                                              lr=hp.vae_lr, kl_weight=hp.vae_kl_weight, seed=0)
            with torch.no_grad():
                z = torch.cat([self.vae.encode(x[a:a + 256].to(self.device)).latent_dist.mean
                               for a in range(0, min(n, 1024), 256)])
            self.latent_scale.fill_(1.0 / float(z.std()))
        state = self.trainer.strategy.broadcast({"vae": self.vae.state_dict(), "scale": self.latent_scale}, src=0)
        self.vae.load_state_dict(state["vae"])
        self.latent_scale.copy_(state["scale"])
        self.vae.eval().requires_grad_(False)
        self.vae_ready.fill_(True)

    # --- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = split_batch(batch)
        if y is None:
            raise ValueError("LatentDiffusionModule is class-conditional; the batches carry no labels (use a labelled "
                             "datamodule such as DigitsDataModule).")
        with torch.no_grad():
            z0 = self.vae.encode(x).latent_dist.sample() * self.latent_scale
        t = torch.randint(0, self.schedule.num_train_timesteps, (z0.shape[0],), device=z0.device)
        eps = torch.randn_like(z0)
        ab = self.alphas_cumprod[t]
        zt, a, s = add_noise(z0, eps, ab)
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        labels = torch.where(drop, torch.full_like(y, self.model.num_classes), y.long())
        out = self.model.model_output(zt, t.to(z0.dtype), labels)
        loss = F.mse_loss(out, training_target(self.model.prediction_type, z0, eps, a, s))
        eps_hat = to_epsilon(out.detach(), zt, ab, self.model.prediction_type)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=z0.shape[0])
        return {"loss": loss, "vrg_alpha_bar": ab.detach(), "vrg_error": (eps_hat - eps).detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step != self._ema_step:  # once per optimizer step
            self._ema_step = self.global_step
            self.ema.update_parameters(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr)
        warm = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
