"""The latent, class-conditional module (``vrg_lightning.latent_module``): the VAE trains at the start of fit, the
UNet on its latents; VRGProfiler measures it (free mode and a probe on latents) and stores entries; its denoiser is
an ordinary class-conditional model (guidance, ``generate(labels=...)``, guided probes, decoded FID features)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vrg_lightning import VRGProfiler
from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.data import digits_dataset
from vrg_lightning.evaluation import FIDEvaluator, PixelFeatures
from vrg_lightning.latent_module import DecodedFeatures, LatentDataset, LatentDiffusionModule
from vrg_lightning.models.guided import probe_guided
from vrg_lightning.sampling import generate, initial_noise
from vrg_lightning.solvers import sample
from vrg_lightning.trajectories import make_trajectory

VAE = {"in_channels": 1, "out_channels": 1, "latent_channels": 2, "block_out_channels": [4, 8], "layers_per_block": 1,
       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
       "norm_num_groups": 4, "sample_size": 16}
UNET = {"sample_size": 8, "in_channels": 2, "out_channels": 2, "block_out_channels": [8, 16], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 8, "attention_head_dim": 4,
        "norm_num_groups": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[LatentDiffusionModule, dict, TensorDataset]:
    torch.manual_seed(0)
    ds = digits_dataset("bilinear")
    x = torch.stack([ds[i][0] for i in range(48)]).float()
    y = torch.tensor([int(ds[i][1]) for i in range(48)])
    data = TensorDataset(x, y)
    m = LatentDiffusionModule(vae=VAE, unet=UNET, vae_steps=3, vae_batch_size=16, warmup_steps=1)
    cb = VRGProfiler(num_bins=8, steps=(4,), solvers=("ddim",), bases=("time_uniform",), probe_samples=64,
                     probe_batch_size=32, probe_dataset=LatentDataset(m, data), half_life_samples=None)
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], accelerator="cpu")
    trainer.fit(m, DataLoader(data, batch_size=16, shuffle=True))
    path = tmp_path_factory.mktemp("latent") / "latent.ckpt"
    trainer.save_checkpoint(path)
    m.free_count = float(cb.running.count.sum())  # free mode: every training sample's error, at its level
    return m, torch.load(path, weights_only=True), data


def test_vae_trains_first_then_the_unet_and_the_profiler_stores_entries(trained) -> None:
    m, ckpt, _ = trained
    assert len(m.vae_losses) == 3 and bool(m.vae_ready) and float(m.latent_scale) != 1.0
    assert not any(p.requires_grad for p in m.vae.parameters())  # frozen after its phase
    assert m.free_count == 4 * 16
    vrg = read_vrg(ckpt)
    assert vrg["profile"]["source"] == "probe" and float(vrg["profile"]["count"].sum()) == 64
    (entry,) = vrg["entries"]
    assert entry["solver"] == "ddim" and entry["steps"] == 4 and entry["cpe_after"] <= entry["cpe_before"]
    # the checkpoint restores the trained VAE and its scale (a resumed fit does not train it again)
    back = LatentDiffusionModule(vae=VAE, unet=UNET)
    back.load_state_dict(ckpt["state_dict"])
    assert bool(back.vae_ready) and torch.equal(back.latent_scale, m.latent_scale)
    assert torch.equal(back.vae.decoder.conv_out.weight, m.vae.decoder.conv_out.weight)


def test_denoiser_is_class_conditional_with_guidance_and_labels(trained) -> None:
    m, _, data = trained
    den = m.vrg_denoiser().eval()
    assert den.sample_shape == (2, 8, 8) and den.num_classes == 10 and den.clip_range is None
    ab = make_trajectory(m.schedule, "time_uniform", 3)
    labels = torch.tensor([3, 3, 7])
    got = generate(den, ab, "ddim", 3, 0, guidance_scale=3.0, labels=labels)
    x, seeded = initial_noise(0, 0, 3, den.sample_shape, 10)
    with torch.no_grad():
        ref = sample("ddim", den.eps_fn(labels, 3.0), x, ab)
        other = sample("ddim", den.eps_fn(seeded, 3.0), x, ab)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(labels, seeded) and not torch.allclose(got, other)  # the given labels were used
    # one guided pass gives each scale's profile; the drift makes w = 3 differ from w = 1
    latents = LatentDataset(m, data)
    profiles = probe_guided(den, latents, [1.0, 3.0], num_samples=64, num_bins=4, batch_size=32)
    per_scale = probe_guided(den, latents, [3.0], num_samples=64, num_bins=4, batch_size=32, single_pass=False)
    torch.testing.assert_close(profiles[3.0].mse, per_scale[3.0].mse, rtol=1e-4, atol=0)
    assert not torch.allclose(profiles[1.0].mse, profiles[3.0].mse)


def test_decoded_features_measure_images_against_real_ones(trained, tmp_path: Path) -> None:
    m, _, data = trained
    ext = DecodedFeatures(m.decoder(), PixelFeatures((1, 16, 16)))
    real = ext.real_stats(data.tensors[0])
    assert real.features == ext.name == "pixels@decoded" and real.n == 48
    z = LatentDataset(m, data)[0][0][None]
    torch.testing.assert_close(ext(z), m.decoder()(z).flatten(1))
    ev = FIDEvaluator(m.vrg_denoiser().eval(), ext, real, 8, guidance_scale=3.0, cache_dir=tmp_path)
    ab = make_trajectory(m.schedule, "time_uniform", 3)
    fid = ev.fid("ddim", ab, 0)
    assert fid > 0 and ev.sampled_images == 8 and len(list(tmp_path.glob("*-g3.pt"))) == 1
    with pytest.raises(ValueError, match="accept images with 2 channel"):
        ext(torch.zeros(1, 1, 16, 16))
