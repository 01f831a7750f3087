"""Align Your Steps bases: the constants are diffusers' own, 10 steps give them back exactly, other step counts follow
the authors' log-linear interpolation, the family comes from the pipeline, and other schedules are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.schedulers import AysSchedules

from vrg_lightning.ays import (
    AYS_SCHEDULE,
    AYS_SIGMAS,
    AYS_TIMESTEPS,
    ays_sigmas,
    ays_trajectory,
    family_of_pipeline,
    loglinear_interp,
)
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_sigma

NAMES = {"sd15": "StableDiffusion", "sdxl": "StableDiffusionXL"}


def authors_loglinear_interp(t_steps: np.ndarray, num_steps: int) -> np.ndarray:
    """The AYS authors' reference code (their project page), verbatim in numpy."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_xs = np.linspace(0, 1, num_steps)
    new_ys = np.interp(new_xs, xs, ys)
    return np.exp(new_ys)[::-1].copy()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_constants_are_diffusers(family: str) -> None:
    sig = AysSchedules[f"{NAMES[family]}Sigmas"]
    assert list(AYS_SIGMAS[family]) == sig[:-1] and sig[-1] == 0.0  # σ = 0 is the end point, not a step
    assert list(AYS_TIMESTEPS[family]) == AysSchedules[f"{NAMES[family]}Timesteps"]
    assert AYS_SCHEDULE == NoiseSchedule.from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})  # SD's scheduler config


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ten_steps_are_the_published_levels(family: str) -> None:
    ab = ays_trajectory(AYS_SCHEDULE, family, 10)
    sig = torch.tensor(AYS_SIGMAS[family], dtype=torch.float64)
    assert torch.allclose(alpha_bar_to_sigma(ab.flip(0))[1:], sig[1:], rtol=1e-12, atol=0)
    # σ_max is published rounded (14.615 > 14.6146): it is the schedule's noisiest level, as every base
    assert float(ab[-1]) == AYS_SCHEDULE.alpha_bar_min and abs(float(alpha_bar_to_sigma(ab[-1])) - 14.615) < 1e-3
    ts = ays_trajectory(AYS_SCHEDULE, family, 10, kind="timesteps")
    assert torch.equal(ts, AYS_SCHEDULE.alphas_cumprod[list(AYS_TIMESTEPS[family])].flip(0))
    assert bool((ab[1:] < ab[:-1]).all()) and ab.dtype == torch.float64


@pytest.mark.parametrize("steps", [4, 7, 19, 25])
@pytest.mark.parametrize("kind", ["sigmas", "timesteps"])
def test_other_steps_are_the_authors_interpolation(steps: int, kind: str) -> None:
    ten = ays_sigmas("sd15", 10, kind)
    got = ays_sigmas("sd15", steps, kind)
    assert np.allclose(got.numpy(), authors_loglinear_interp(ten.numpy(), steps), rtol=1e-12, atol=0)
    assert float(got[0]) == pytest.approx(float(ten[0]), rel=1e-14)  # the ends stay the ends
    assert float(got[-1]) == pytest.approx(float(ten[-1]), rel=1e-14)
    if steps == 19:  # every other value is published, the ones between are geometric means (log-linear)
        assert torch.allclose(got[::2], ten, rtol=1e-12)
        assert torch.allclose(got[1::2], (ten[:-1] * ten[1:]).sqrt(), rtol=1e-12)
    ab = ays_trajectory(AYS_SCHEDULE, "sd15", steps, kind)
    assert ab.numel() == steps and bool((ab[1:] < ab[:-1]).all())
    assert AYS_SCHEDULE.alpha_bar_min <= float(ab.min()) and float(ab.max()) <= AYS_SCHEDULE.alpha_bar_max


def test_loglinear_interp_is_geometric() -> None:
    out = loglinear_interp(torch.tensor([1000.0, 10.0, 1.0], dtype=torch.float64), 5)
    assert torch.allclose(out, torch.tensor([1000.0, 100.0, 10.0, 10 ** 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(loglinear_interp(torch.tensor([5.0, 2.0]), 1), torch.tensor([5.0], dtype=torch.float64))


def test_family_from_the_pipeline() -> None:
    assert family_of_pipeline("StableDiffusionPipeline", 768) == "sd15"
    assert family_of_pipeline("StableDiffusionXLPipeline", 2048) == "sdxl"
    assert family_of_pipeline("StableDiffusionPipeline", 1024) is None  # SD 2.x: same class, no published AYS
    assert family_of_pipeline("StableDiffusionPipeline", 32) is None and family_of_pipeline(None) is None


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="ays family must be one of sd15, sdxl; got 'sd3'"):
        ays_trajectory(AYS_SCHEDULE, "sd3", 10)
    with pytest.raises(ValueError, match="the ays base is for the Stable Diffusion schedule"):
        ays_trajectory(NoiseSchedule(), "sd15", 10)  # the DDPM linear schedule
    with pytest.raises(ValueError, match="kind must be one of sigmas, timesteps; got 'karras'"):
        ays_trajectory(AYS_SCHEDULE, "sd15", 10, kind="karras")
    for steps in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
            ays_trajectory(AYS_SCHEDULE, "sd15", steps)


def test_ays_is_a_peer_base_for_a_model_that_names_its_family() -> None:
    from vrg_lightning.optimize import STORED_BASES
    from vrg_lightning.peers import base_trajectory

    class SD15:  # what models.latent.LatentDenoiser exposes
        family = "sd15"
        schedule = AYS_SCHEDULE

    assert "ays" in STORED_BASES
    ab, extra = base_trajectory(AYS_SCHEDULE, "ays", "dpmpp_2m", 10, model=SD15())
    assert torch.equal(ab, ays_trajectory(AYS_SCHEDULE, "sd15", 10))
    assert extra["base_provenance"]["method"] == "ays" and extra["base_provenance"]["settings"]["family"] == "sd15"
    with pytest.raises(ValueError, match="base 'ays' needs a model of the Stable Diffusion family"):
        base_trajectory(AYS_SCHEDULE, "ays", "ddim", 10)
    with pytest.raises(ValueError, match="the ays base is for the Stable Diffusion schedule"):
        base_trajectory(NoiseSchedule(), "ays", "ddim", 10, model=SD15())
