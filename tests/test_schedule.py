"""Noise schedules: diffusers parity and round trips between t, ᾱ, σ and λ."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vrg_lightning.schedule import (
    SCHEDULE_NAMES,
    NoiseSchedule,
    alpha_bar_to_lambda,
    alpha_bar_to_sigma,
    check_alpha_bar,
    lambda_to_alpha_bar,
    sigma_to_alpha_bar,
)

CONFIGS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {},
}


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_alphas_cumprod_match_diffusers(name: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **CONFIGS[name]).alphas_cumprod
    ours = NoiseSchedule(beta_schedule=name, **CONFIGS[name])
    torch.testing.assert_close(ours.alphas_cumprod, theirs.to(torch.float64), rtol=2e-6, atol=1e-9)
    assert ours.alphas_cumprod.dtype == torch.float64
    # the continuous schedule passes through the discrete one
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(ours.t_to_alpha_bar(t), ours.alphas_cumprod, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_from_diffusers_config(name: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = diffusers.DDIMScheduler(num_train_timesteps=500, beta_schedule=name, **CONFIGS[name]).config
    s = NoiseSchedule.from_config(cfg)
    assert s.num_train_timesteps == 500 and s.beta_schedule == name
    assert NoiseSchedule.from_dict(s.to_dict()) == s
    assert NoiseSchedule.from_config(dict(cfg)) == s


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCHEDULE_NAMES), t=st.floats(0.0, 999.0))
def test_t_alpha_bar_round_trip(name: str, t: float) -> None:
    s = NoiseSchedule(beta_schedule=name, **CONFIGS[name])
    tt = torch.tensor(t, dtype=torch.float64)
    ab = s.t_to_alpha_bar(tt)
    assert 0 < float(ab) < 1
    assert float(s.alpha_bar_to_t(ab)) == pytest.approx(t, abs=1e-7)
    assert float(s.sigma_to_t(s.t_to_sigma(tt))) == pytest.approx(t, abs=1e-7)
    assert float(s.lambda_to_t(s.t_to_lambda(tt))) == pytest.approx(t, abs=1e-7)


@settings(max_examples=100, deadline=None)
@given(ab=st.floats(1e-9, 1 - 1e-9))
def test_alpha_bar_sigma_lambda_round_trip(ab: float) -> None:
    a = torch.tensor(ab, dtype=torch.float64)
    sig = alpha_bar_to_sigma(a)
    lam = alpha_bar_to_lambda(a)
    assert float(sigma_to_alpha_bar(sig)) == pytest.approx(ab, rel=1e-12)
    assert float(lambda_to_alpha_bar(lam)) == pytest.approx(ab, rel=1e-10)
    assert float(lam) == pytest.approx(-2 * math.log(float(sig)), rel=1e-9, abs=1e-9)  # λ = -2 log σ
    assert float(lam) == pytest.approx(math.log(ab / (1 - ab)), rel=1e-9, abs=1e-9)


def test_monotone_and_differentiable() -> None:
    s = NoiseSchedule()
    t = torch.linspace(0, 999, 5001, dtype=torch.float64)
    ab = s.t_to_alpha_bar(t)
    assert bool((ab[1:] < ab[:-1]).all())
    assert s.alpha_bar_max == pytest.approx(0.9999) and s.alpha_bar_min == pytest.approx(float(ab[-1]))
    x = torch.tensor([12.3, 456.7, 900.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(s.t_to_alpha_bar, (x,))
    a = torch.tensor([0.9, 0.3, 0.001], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(s.alpha_bar_to_t, (a,))


def test_cosine_alias_and_dict_round_trip() -> None:
    s = NoiseSchedule(beta_schedule="cosine")
    assert s.beta_schedule == "squaredcos_cap_v2"
    assert NoiseSchedule.from_dict(s.to_dict()) == s
    assert s.to_dict() == {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "beta_start": 0.0001,
                           "beta_end": 0.02}


@pytest.mark.parametrize(
    "kwargs,word",
    [({"beta_schedule": "sigmoid"}, "sigmoid"), ({"num_train_timesteps": 1}, "num_train_timesteps"),
     ({"num_train_timesteps": 10.5}, "num_train_timesteps"), ({"beta_start": 0.0}, "beta_start"),
     ({"beta_end": 1.5}, "beta_end")],
)
def test_bad_schedules(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        NoiseSchedule(**kwargs)


def test_trained_betas_rejected() -> None:
    with pytest.raises(ValueError, match="trained_betas"):
        NoiseSchedule.from_config({"trained_betas": [0.1, 0.2]})


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, math.nan, math.inf])
def test_check_alpha_bar(bad: float) -> None:
    with pytest.raises(ValueError, match="alpha_bar"):
        check_alpha_bar(torch.tensor([0.5, bad], dtype=torch.float64))
    check_alpha_bar(torch.tensor([0.5, 1e-12], dtype=torch.float64))
