"""Shared test code: the tiny UNet, the published reference data, a tiny sampling checkpoint, an error profile and
the check of an optimizer problem against ``cpe_solver``.

Imported by the tests as ``helpers`` (pytest puts ``tests/`` on ``sys.path``); fixtures built from it are in
``conftest.py``. Runnable as a script for the device checks: ``python tests/helpers.py OUT_DIR`` writes
``model.ckpt`` and ``reference.pt`` (64 real 16x16 digits in [-1, 1]).

The reference data (``REF``) is looked up in order: ``$VRG_REFERENCE_DIR``, ``../shared/reference`` beside the
checkout, ``/work/shared/reference``; tests that need it skip without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vrg_lightning.checkpoint import build_vrg_state, model_section
from vrg_lightning.denoiser import DIGITS_UNET, Denoiser
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_lambda
from vrg_lightning.trajectories import make_trajectory
from vrg_lightning.variance import cpe_solver

_CANDIDATES = [
    os.environ.get("VRG_REFERENCE_DIR", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "reference"),
    "/work/shared/reference",
]

REF = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "MSE_vs_alpha_bar_cifar10.txt").is_file()),
           Path(_CANDIDATES[1]))
TINY_UNET = dict(DIGITS_UNET, block_out_channels=[8, 8, 8], norm_num_groups=4, attention_head_dim=8)
ENTRIES = (("ddim", 4, "time_uniform"), ("ddim", 4, "logSNR"), ("dpmpp_2m", 4, "time_uniform"))


def vrg_version(ab: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for an optimized trajectory: a small logit shift that keeps the order."""
    lam = torch.logit(ab) + 0.2 * torch.linspace(-1, 1, ab.numel(), dtype=torch.float64)
    return torch.sigmoid(lam)


def make_checkpoint(path: str | Path, *, num_classes: int | None = None, seed: int = 0,
                    entries: tuple[tuple[str, int, str], ...] = ENTRIES, extra_entries: list[dict[str, Any]] = ()
                    ) -> Path:
    """Write a checkpoint whose EMA weights differ from the raw ones (EMA = raw + small noise)."""
    torch.manual_seed(seed)
    den = Denoiser(TINY_UNET, num_classes=num_classes)
    sched = den.schedule
    ab = sched.alphas_cumprod[::50]
    profile = ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.05 * ab)
    rows = []
    for solver, steps, base in entries:
        b = make_trajectory(sched, base, steps)
        rows.append({"solver": solver, "steps": steps, "base": base, "objective": "paper", "lp": 0.1,
                     "alpha_bar": vrg_version(b).tolist(), "base_alpha_bar": b.tolist(), "validated": None})
    rows.extend(dict(e) for e in extra_entries)
    state = {}
    for k, v in den.state_dict().items():
        state["model." + k] = v.clone()
        state["ema.module." + k] = (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone()
    ckpt = {"state_dict": state,
            "vrg": build_vrg_state(sched, profile, rows, model=model_section(den.config()))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def make_reference(path: str | Path, num: int = 64) -> Path:
    """``num`` real 16x16 digits in [-1, 1] as a tensor file (an offline FID reference)."""
    from vrg_lightning.data import load_real_images

    torch.save(load_real_images("digits", num), path)
    return Path(path)


def profile_mse(mode: str = "paper"):
    """A smooth error profile on every 10th timestep of the default schedule, as the optimizer uses it (``mode``)."""
    ab = NoiseSchedule().alphas_cumprod[::10]
    return ErrorProfile.from_table(ab, 0.6 * torch.sigmoid((alpha_bar_to_lambda(ab) - 2) / 1.2) + 1e-3).mse_function(
        mode)


def assert_loss_and_gradient_are_cpe_solver(prob: Any) -> None:
    """At a random point of the box, the problem's loss and gradient are ``cpe_solver`` + penalty by autograd."""
    import pytest  # (here, not at the top: the device checks run this file as a script, without pytest)

    rng = np.random.default_rng(prob.n)
    y = prob.lo + (prob.hi - prob.lo) * rng.random(prob.n)  # anywhere in the box
    f, g = prob.value_and_grad(y)
    yt = torch.tensor(y, requires_grad=True)
    ab = prob.vars.alpha_bar(yt)
    ref = cpe_solver(ab, prob.mse_fn, prob.s.solver) + prob.penalty * (ab[-1] - prob.end) ** 2
    (g_ref,) = torch.autograd.grad(ref, yt)
    assert f == pytest.approx(float(ref.detach()), rel=1e-12)
    assert np.allclose(g, g_ref.numpy(), rtol=1e-9, atol=1e-11 * np.abs(g_ref.numpy()).max())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    make_checkpoint(out / "model.ckpt")
    make_reference(out / "reference.pt")
