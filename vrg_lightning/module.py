"""``DiffusionModule``: DDPM training of a :class:`~vrg_lightning.denoiser.Denoiser` with EMA, following the
VRG protocol (:mod:`vrg_lightning.protocol`) so :class:`~vrg_lightning.callbacks.VRGProfiler` can measure the error
profile for free.

Training (Ho et al. 2020) on any noise path (:mod:`vrg_lightning.paths`): for each image an **integer** level
``i ~ U{0, …, T-1}`` of the path's trained levels and ε ~ N(0, I); ``x = c (√ᾱ_i x_0 + √(1-ᾱ_i) ε)`` (the path's own
coordinates: c = 1 for VP; rectified flow ``x = (1-σ) x_0 + σ ε``); the UNet gets the path's time at level i (VP: the
timestep i; rectified flow: σ·T); loss = mean squared error against the prediction type's target
(:func:`~vrg_lightning.models.base.training_target`: ε, v, x_0 or the velocity ε - x_0). The error handed to
:class:`~vrg_lightning.callbacks.VRGProfiler` is always the ε-error ε̂ - ε (for a velocity v̂: (1-σ)(v̂ - v)). With
``num_classes``, labels are replaced by the null label with probability ``label_dropout`` (classifier-free guidance),
so free-mode statistics mix conditional and unconditional predictions in that proportion.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import (
    VRG_FORMAT,
    VRG_KEY,
    VRG_VERSION,
    CheckpointMismatchError,
    check_same_schedule,
    model_section,
)
from .denoiser import DIGITS_UNET, Denoiser
from .models.base import to_epsilon, training_target
from .paths import noise_path as make_noise_path
from .report import image_grid
from .schedule import NoisePath, NoiseSchedule, add_noise

__all__ = ["DiffusionModule", "split_batch", "image_grid"]


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images, labels | None)`` from a batch that is a tensor, ``(x,)`` or ``(x, y, ...)``."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    raise ValueError(f"Batches must be an image tensor or (images, labels); got {type(batch).__name__}.")


def _build_path(name: str, levels: int, beta_schedule: str | None, beta_start: float | None, beta_end: float | None,
                shift: float | None) -> NoisePath:
    """The module's noise path; a beta schedule on a path without betas, or a shift off rectified flow, is an error."""
    betas = {k: v for k, v in (("beta_schedule", beta_schedule), ("beta_start", beta_start), ("beta_end", beta_end))
             if v is not None}
    if name == "vp_discrete":
        if shift is not None:
            raise ValueError(f"shift={shift!r} is a rectified-flow setting; the vp_discrete path has none (set "
                             "noise_path: rectified_flow, or drop shift).")
        return NoiseSchedule(**betas, num_train_timesteps=levels)  # unset betas: NoiseSchedule's (diffusers') defaults
    if shift is not None and name != "rectified_flow":
        raise ValueError(f"shift={shift!r} is a rectified-flow setting; the {name} path has none.")
    opts = {"shift": shift} if shift is not None else {}
    return make_noise_path(name, num_train_timesteps=levels, **betas, **opts)


class DiffusionModule(pl.LightningModule):
    """Diffusion training of a ``UNet2DModel`` on a noise path, AdamW with linear warm-up, EMA weights.

    Args:
        unet: ``UNet2DModel`` keyword arguments (default: the 16×16×1 digits UNet, ``denoiser.DIGITS_UNET``).
        noise_path: ``vp_discrete`` (diffusers betas, the default) or another of
            :data:`~vrg_lightning.paths.NOISE_PATHS`, e.g. ``rectified_flow`` (flow matching).
        beta_schedule, num_train_timesteps, beta_start, beta_end: the discrete VP schedule (diffusers names; default
            linear 1e-4..0.02); ``num_train_timesteps`` is every path's number of trained levels.
        shift: rectified flow's shift (diffusers' FlowMatch ``shift``; default 1).
        prediction_type: ``epsilon``, ``v_prediction`` (VP), ``sample`` or ``flow`` (rectified flow's velocity).
        num_classes: class conditioning with this many classes (``None``: unconditional).
        label_dropout: probability of the null label during training (classifier-free guidance).
        lr, weight_decay, warmup_steps: AdamW and the linear warm-up of the learning rate.
        ema_decay: EMA decay per optimizer step (``AveragedModel`` + ``get_ema_multi_avg_fn``).
        sample_every_n_epochs: log a grid of EMA samples to TensorBoard every k epochs (0: never).
        num_sample_images, sample_solver, sample_base, sample_steps, sample_seed, guidance_scale: that grid.
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        beta_schedule: str | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        prediction_type: str = "epsilon",
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        sample_every_n_epochs: int = 0,
        num_sample_images: int = 64,
        sample_solver: str = "ddim",
        sample_base: str = "time_uniform",
        sample_steps: int = 20,
        sample_seed: int = 0,
        guidance_scale: float = 1.0,
        noise_path: str = "vp_discrete",
        shift: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout!r}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {warmup_steps!r}.")
        if isinstance(sample_every_n_epochs, bool) or not isinstance(sample_every_n_epochs, int) \
                or sample_every_n_epochs < 0:
            raise ValueError(f"sample_every_n_epochs must be an integer >= 0; got {sample_every_n_epochs!r}.")
        self.save_hyperparameters()
        self.schedule = _build_path(noise_path, num_train_timesteps, beta_schedule, beta_start, beta_end, shift)
        self.model = Denoiser(dict(DIGITS_UNET) if unet is None else unet, self.schedule, prediction_type, num_classes)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod, persistent=False)
        self.register_buffer("level_times", self.schedule.timesteps, persistent=False)  # the model's time per level
        self._ema_step = -1

    # --- VRG protocol ---------------------------------------------------------------------------------------------
    @property
    def vrg_schedule(self) -> NoisePath:
        return self.schedule

    @property
    def vrg_prediction_type(self) -> str:
        return self.model.prediction_type

    def vrg_denoiser(self) -> Denoiser:
        """The EMA denoiser (what sampling uses), for probe-mode profiling."""
        return self.ema.module

    # --- training -------------------------------------------------------------------------------------------------
    def draw_noise(self, x0: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """Integer levels ``t ~ U{0..T-1}`` ``[B]`` and noise ε ``[B, ...]`` (override for deterministic noise)."""
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        return t, torch.randn_like(x0)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x0, y = split_batch(batch)
        t, eps = self.draw_noise(x0, batch)
        ab = self.alphas_cumprod[t]  # float64 [B]
        xt, a, s = add_noise(x0, eps, ab)  # VP coordinates; the model gets its path's c · x_t
        c = self.schedule.input_scale(ab)
        x_in = xt if c is None else xt * c.to(xt.dtype).view(a.shape)
        labels = None
        if self.model.num_classes is not None:
            if y is None:
                raise ValueError("num_classes is set but the batches carry no labels; use a labelled datamodule.")
            drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
            labels = torch.where(drop, torch.full_like(y, self.model.num_classes), y.long())
        out = self.model.model_output(x_in, self.level_times[t].to(x0.dtype), labels)
        loss = F.mse_loss(out, training_target(self.model.prediction_type, x0, eps, a, s))
        eps_hat = to_epsilon(out.detach(), xt, ab, self.model.prediction_type)  # the one conversion to ε
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return {"loss": loss, "vrg_alpha_bar": ab.detach(), "vrg_error": (eps_hat - eps).detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step != self._ema_step:  # once per optimizer step (gradient accumulation safe)
            self._ema_step = self.global_step
            self.ema.update_parameters(self.model)
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warm = max(1, hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- sample grids ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num: int, seed: int = 0, use_ema: bool = True, batch_size: int = 64) -> Tensor:
        """``num`` samples in [-1, 1] (float32, CPU) with ``sample_solver`` over ``make_trajectory(sample_base,
        sample_steps)`` and ``guidance_scale``: :func:`vrg_lightning.sampling.generate` on this module's denoiser, so
        sample ``i`` of ``seed`` (noise and, class-conditional, label) is the one ``vrg sample --seed`` makes."""
        from .sampling import generate
        from .trajectories import make_trajectory

        hp = self.hparams
        den = self.ema.module if use_ema else self.model
        ab = make_trajectory(self.schedule, hp.sample_base, hp.sample_steps)
        was_training = den.training
        den.eval()
        try:
            return generate(den, ab, hp.sample_solver, num, seed, batch_size=batch_size,
                            guidance_scale=hp.guidance_scale, device=self.device)
        finally:
            den.train(was_training)

    def on_train_epoch_end(self) -> None:
        k = self.hparams.sample_every_n_epochs
        if k and (self.current_epoch + 1) % k == 0 and self.trainer.is_global_zero:
            self._log_grid(f"samples/{self.hparams.sample_solver}_{self.hparams.sample_steps}")

    def _log_grid(self, tag: str) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image"):
            return
        imgs = (self.generate(self.hparams.num_sample_images, self.hparams.sample_seed) + 1) / 2
        exp.add_image(tag, image_grid(imgs), self.global_step)

    # --- checkpoint -----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        vrg = checkpoint.setdefault(VRG_KEY, {"format": VRG_FORMAT, "version": VRG_VERSION})
        vrg["model"] = model_section(self.model.config(), "model.", "ema.module.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose model was trained with another noise schedule.

        Raises:
            CheckpointMismatchError: (a ``ValueError``) the stored schedule differs from this module's.
        """
        model = (checkpoint.get(VRG_KEY) or {}).get("model") or {}
        stored = (model.get("denoiser") or {}).get("schedule")
        if stored is None:
            return
        try:
            check_same_schedule(stored, self.schedule, "checkpoint being loaded")
        except ValueError as exc:
            raise CheckpointMismatchError(
                f"Cannot resume from this checkpoint: its model was trained with noise schedule {dict(stored)}, but "
                f"this run configures {self.schedule.to_dict()}. Resume with the checkpoint's schedule settings "
                "(model.beta_schedule, model.beta_start, model.beta_end, model.num_train_timesteps) or start a new "
                "run without ckpt_path."
            ) from exc

