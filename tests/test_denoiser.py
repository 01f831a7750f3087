"""Denoiser: ᾱ → continuous timestep, v → ε conversion, classifier-free guidance, config round trip, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_UNET
from torch import nn

from vrg_lightning.denoiser import Denoiser
from vrg_lightning.schedule import NoiseSchedule

SCHED = NoiseSchedule()


class OracleUNet(nn.Module):
    """Returns the exact ε or v for known (x0, ε), reading ᾱ back from the timestep it is given."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, target: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_class_embeds=None, sample_size=4, in_channels=1)
        self.x0, self.eps, self.target = x0, eps, target
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, class_labels=None):
        self.seen_t.append(t)
        ab = SCHED.t_to_alpha_bar(torch.as_tensor(t, dtype=torch.float64)).reshape(-1, 1, 1, 1)
        out = self.eps if self.target == "epsilon" else ab.sqrt() * self.eps - (1 - ab).sqrt() * self.x0
        return SimpleNamespace(sample=out.to(x.dtype))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_returns_eps_for_an_exact_model(prediction_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.31, 0.002], dtype=torch.float64)
    xt = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    den = Denoiser(schedule=SCHED, prediction_type=prediction_type, unet=OracleUNet(x0, eps, prediction_type))
    torch.testing.assert_close(den(xt, ab), eps, rtol=1e-9, atol=1e-9)


def test_timestep_is_continuous_and_exact_at_training_levels() -> None:
    x = torch.zeros(2, 1, 4, 4)
    unet = OracleUNet(x, x, "epsilon")
    den = Denoiser(schedule=SCHED, unet=unet)
    den(x, SCHED.alphas_cumprod[torch.tensor([17, 640])])
    torch.testing.assert_close(unet.seen_t[-1], torch.tensor([17.0, 640.0], dtype=torch.float64))
    mid = SCHED.t_to_alpha_bar(torch.tensor(123.25, dtype=torch.float64))
    den(x, mid)  # 0-d ᾱ: one timestep for the batch, not rounded
    assert unet.seen_t[-1].ndim == 0 and abs(float(unet.seen_t[-1]) - 123.25) < 1e-9


def test_guidance_combines_conditional_and_null_predictions() -> None:
    class LabelUNet(nn.Module):
        config = SimpleNamespace(num_class_embeds=4)

        def forward(self, x, t, class_labels=None):
            return SimpleNamespace(sample=class_labels.float().view(-1, 1, 1, 1).expand_as(x).clone())

    den = Denoiser(schedule=SCHED, num_classes=3, unet=LabelUNet())
    x = torch.zeros(2, 1, 2, 2)
    labels = torch.tensor([0, 2])
    out = den.eps_fn(labels, guidance_scale=3.0)(x, torch.tensor(0.5, dtype=torch.float64))
    null = 3.0  # the null label is num_classes
    expected = null + 3.0 * (labels.float() - null)
    torch.testing.assert_close(out[:, 0, 0, 0], expected)
    torch.testing.assert_close(den(x, torch.tensor(0.5))[:, 0, 0, 0], torch.full((2,), null))  # default: null label
    plain = den.eps_fn(labels)(x, torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(plain[:, 0, 0, 0], labels.float())


def test_config_round_trip_rebuilds_the_same_function() -> None:
    den = Denoiser(TINY_UNET, NoiseSchedule("scaled_linear", 500, 0.001, 0.015), "v_prediction", num_classes=5).eval()
    again = Denoiser.from_config(den.config()).eval()
    again.load_state_dict(den.state_dict())
    assert again.config() == den.config()
    assert again.schedule == den.schedule and again.num_classes == 5
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.tensor([0.2, 0.7]), y), den(x, torch.tensor([0.2, 0.7]), y))


def test_bad_arguments_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(TINY_UNET, prediction_type="velocity")
    with pytest.raises(ValueError, match="'flow' is not defined on the vp_discrete"):
        Denoiser(TINY_UNET, prediction_type="flow")  # the rectified-flow velocity needs that path
    with pytest.raises(ValueError, match="num_classes"):
        Denoiser(TINY_UNET, num_classes=0)
    den = Denoiser(TINY_UNET)
    with pytest.raises(ValueError, match="unconditional"):
        den(torch.zeros(2, 1, 16, 16), torch.tensor(0.5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="alpha_bar must be 0-d or of shape"):
        den(torch.zeros(2, 1, 16, 16), torch.tensor([0.5, 0.4, 0.3]))
    with pytest.raises(ValueError, match="guidance_scale"):
        den.eps_fn(guidance_scale=2.0)
    with pytest.raises(ValueError, match="lacks"):
        Denoiser.from_config({"prediction_type": "epsilon"})
