"""Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): the published 10-step noise levels of Stable Diffusion 1.5
and SDXL, as trajectories (ᾱ, cleanest first), and the authors' log-linear interpolation to other step counts.

The constants are those diffusers ships (``diffusers.schedulers.scheduling_utils.AysSchedules``; tests compare them):
``sigmas`` (σ = √((1-ᾱ)/ᾱ), eleven values ending in the end point σ = 0, which is not a step here) and ``timesteps``
(integer training timesteps, one per model evaluation). They were optimised for one model family on its schedule
(``scaled_linear``, β 0.00085-0.012, 1000 steps), so they are a base only where the family matches: the family is
given (``family=``) or read from a pipeline folder (:func:`family_of_pipeline`).

Other step counts (the authors' ``loglinear_interp``): with the N₀ = 10 published levels σ₀ > ... > σ₉ at the
normalised indices u_i = i/9, N levels are σ(u_j) at u_j = j/(N-1), log σ linear in u between the published ones:

    log σ(u) = interp(u; u_i, log σ_i)

(the end point σ = 0 stays the end point). ``timesteps`` are interpolated the same way, through their σ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedule import NoiseSchedule, alpha_bar_to_sigma, sigma_to_alpha_bar
from .trajectories import validate_trajectory

__all__ = ["AYS_FAMILIES", "AYS_KINDS", "AYS_SIGMAS", "AYS_TIMESTEPS", "AYS_SCHEDULE", "loglinear_interp",
           "ays_sigmas", "ays_trajectory", "family_of_pipeline", "check_family"]

AYS_FAMILIES = ("sd15", "sdxl")
AYS_KINDS = ("sigmas", "timesteps")
#: the published σ per model evaluation, noisiest first (diffusers' lists without their final 0)
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113),
}
AYS_TIMESTEPS = {
    "sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
}
#: the schedule both families were trained with (and the constants optimised on)
AYS_SCHEDULE = NoiseSchedule(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                             beta_end=0.012)
_PIPELINE_FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl"}
_SD15_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


def check_family(family: object) -> str:
    """``family`` if it is one of :data:`AYS_FAMILIES`, else a ``ValueError`` naming it."""
    if family not in AYS_FAMILIES:
        raise ValueError(f"ays family must be one of {', '.join(AYS_FAMILIES)}; got {family!r}. The Align-Your-Steps "
                         "constants exist for Stable Diffusion 1.5 and SDXL only.")
    return str(family)


def family_of_pipeline(class_name: str | None, cross_attention_dim: int | None = None) -> str | None:
    """The AYS family of a diffusers pipeline folder (``model_index.json``'s ``_class_name`` and the UNet's
    ``cross_attention_dim``), or ``None`` when it is neither family.

    ``StableDiffusionXL*Pipeline`` is ``sdxl``; a ``StableDiffusionPipeline`` is ``sd15`` only with SD 1.x's CLIP
    width 768 (SD 2.x, 1024, shares the class but not the constants; a model of another width is not SD 1.5).

    Example:
        >>> family_of_pipeline("StableDiffusionPipeline", 768), family_of_pipeline("StableDiffusionPipeline", 1024)
        ('sd15', None)
    """
    if class_name in _PIPELINE_FAMILIES:
        return _PIPELINE_FAMILIES[class_name]
    if class_name in _SD15_PIPELINES and cross_attention_dim == 768:
        return "sd15"
    return None


def loglinear_interp(levels: Tensor, steps: int) -> Tensor:
    """``steps`` values, log-linear in the normalised index between the decreasing positive ``levels`` (the AYS
    authors' ``loglinear_interp``); the ends stay the ends.

    Example:
        >>> [round(float(v), 9) for v in loglinear_interp(torch.tensor([100.0, 1.0]), 3)]
        [100.0, 10.0, 1.0]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}.")
    if steps == 1:
        return torch.as_tensor(levels, dtype=torch.float64)[:1].clone()
    y = torch.as_tensor(levels, dtype=torch.float64).log()
    n = y.numel()
    u = torch.linspace(0, n - 1, steps, dtype=torch.float64)  # the new indices on the published index scale
    i = u.floor().long().clamp(max=n - 2)
    frac = u - i
    return (y[i] + frac * (y[i + 1] - y[i])).exp()


def ays_sigmas(family: str, steps: int = 10, kind: str = "sigmas") -> Tensor:
    """σ of every model evaluation, noisiest first: the published 10 (``steps=10``, exact) or their log-linear
    interpolation. ``kind="timesteps"``: the σ of the published integer timesteps on :data:`AYS_SCHEDULE`.

    Raises:
        ValueError: an unknown family or kind, steps not an integer >= 1.
    """
    family = check_family(family)
    if kind not in AYS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(AYS_KINDS)}; got {kind!r}.")
    if kind == "sigmas":
        sig = torch.tensor(AYS_SIGMAS[family], dtype=torch.float64)
    else:
        sig = alpha_bar_to_sigma(AYS_SCHEDULE.alphas_cumprod[torch.tensor(AYS_TIMESTEPS[family])])
    return sig if steps == len(sig) else loglinear_interp(sig, steps)


def ays_trajectory(schedule: NoiseSchedule, family: str, steps: int, kind: str = "sigmas") -> Tensor:
    """The AYS base: ᾱ = 1/(1+σ²) of :func:`ays_sigmas`, cleanest first, within the schedule's trained range.

    ``kind="sigmas"`` rounds σ_max to 14.615, a hair above the schedule's 14.6146 (ᾱ(t=999)); it is clamped to the
    trained range like every base. ``kind="timesteps"`` at 10 steps is exactly ``schedule.alphas_cumprod[t]``.

    Args:
        schedule: the model's schedule; it must be :data:`AYS_SCHEDULE` (the constants are for that schedule).
        family: ``sd15`` or ``sdxl`` (:func:`family_of_pipeline` reads it from a pipeline folder).
        steps: number of model evaluations N.
        kind: ``sigmas`` (the default: continuous levels) or ``timesteps``.

    Raises:
        ValueError: another schedule, an unknown family or kind, steps not in [1, num_train_timesteps].

    Example:
        >>> ab = ays_trajectory(AYS_SCHEDULE, "sd15", 10, kind="timesteps")
        >>> bool((ab == AYS_SCHEDULE.alphas_cumprod[[24, 124, 233, 343, 455, 545, 645, 736, 850, 999]]).all())
        True
    """
    if not isinstance(schedule, NoiseSchedule) or schedule.to_dict() != AYS_SCHEDULE.to_dict():
        got = schedule.to_dict() if hasattr(schedule, "to_dict") else schedule
        raise ValueError(f"the ays base is for the Stable Diffusion schedule {AYS_SCHEDULE.to_dict()}; got {got}. "
                         "Its constants were optimised for SD 1.5 / SDXL and mean nothing on another schedule.")
    T = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the schedule's trained levels); got {steps!r}.")
    if kind == "timesteps" and steps == len(AYS_TIMESTEPS[check_family(family)]):
        return schedule.alphas_cumprod[torch.tensor(AYS_TIMESTEPS[family][::-1])].clone()
    ab = sigma_to_alpha_bar(ays_sigmas(family, steps, kind)).flip(0)
    return validate_trajectory(ab.clamp(schedule.alpha_bar_min, schedule.alpha_bar_max), "ays")
