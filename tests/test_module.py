"""DiffusionModule (protocol fields, loss, label dropout, EMA, warm-up, checkpoint) and the datasets."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_UNET
from torch.utils.data import DataLoader, TensorDataset

from vrg_lightning.checkpoint import load_denoiser
from vrg_lightning.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataset,
    digits_dataset,
    load_real_images,
    patches_dataset,
)
from vrg_lightning.module import DiffusionModule
from vrg_lightning.report import image_grid
from vrg_lightning.sampling import generate
from vrg_lightning.trajectories import make_trajectory


class FixedNoise(DiffusionModule):
    def draw_noise(self, x0, batch):
        g = torch.Generator().manual_seed(1)
        return torch.tensor([0, 250, 999])[: x0.shape[0]], torch.randn(x0.shape, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_returns_the_protocol_fields_in_eps_space(prediction_type: str) -> None:
    torch.manual_seed(0)
    m = FixedNoise(unet=TINY_UNET, prediction_type=prediction_type, num_classes=10, label_dropout=0.0)
    x0, y = torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([1, 5, 9])
    out = m.training_step((x0, y), 0)
    t, eps = m.draw_noise(x0, None)
    ab = m.schedule.alphas_cumprod[t]
    torch.testing.assert_close(out["vrg_alpha_bar"], ab)
    a, s = ab.sqrt().float().view(-1, 1, 1, 1), (1 - ab).sqrt().float().view(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    with torch.no_grad():
        eps_hat = m.model(xt, ab, y)  # the Denoiser's ε̂, whatever the prediction type
        raw = m.model.model_output(xt, t.float(), y)
    assert not out["vrg_error"].requires_grad and out["vrg_error"].shape == x0.shape
    torch.testing.assert_close(out["vrg_error"], eps_hat - eps, rtol=1e-4, atol=1e-4)
    target = eps if prediction_type == "epsilon" else a * eps - s * x0
    torch.testing.assert_close(out["loss"].detach(), ((raw - target) ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert out["loss"].requires_grad


def test_label_dropout_uses_the_null_label() -> None:
    seen = []

    for p, expect_null in ((0.0, False), (0.999999, True)):
        m = FixedNoise(unet=TINY_UNET, num_classes=4, label_dropout=p)
        orig = m.model.model_output
        m.model.model_output = lambda x, t, labels, orig=orig: seen.append(labels) or orig(x, t, labels)
        m.training_step((torch.zeros(3, 1, 16, 16), torch.tensor([0, 1, 2])), 0)
        assert torch.equal(seen[-1], torch.full((3,), 4) if expect_null else torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no labels"):
        FixedNoise(unet=TINY_UNET, num_classes=4).training_step(torch.zeros(3, 1, 16, 16), 0)


def test_constructor_validates_arguments() -> None:
    bad = {"label_dropout": 1.0, "ema_decay": 1.0, "lr": 0.0, "warmup_steps": -1, "sample_every_n_epochs": -2,
           "beta_schedule": "x"}
    for name, value in bad.items():
        kw = {name: value}
        with pytest.raises(ValueError, match=name):
            DiffusionModule(unet=TINY_UNET, **kw)


def test_fit_updates_ema_warms_up_lr_and_saves_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = DiffusionModule(unet=TINY_UNET, lr=1e-2, warmup_steps=10, ema_decay=0.9)
    ema_ids = {id(p) for p in m.ema.parameters()}
    init = [p.detach().clone() for p in m.model.parameters()]
    data = DataLoader(TensorDataset(torch.rand(24, 1, 16, 16) * 2 - 1), batch_size=8)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ckpt_cb], accelerator="cpu")
    trainer.fit(m, data)
    opt = trainer.optimizers[0]
    assert not ema_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(not p.requires_grad for p in m.ema.parameters())
    assert int(m.ema.n_averaged) == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 4 / 10)  # LambdaLR after 3 steps: (3 + 1) / warmup
    p_model, p_ema, p0 = next(m.model.parameters()), next(m.ema.module.parameters()), init[0]
    assert not torch.equal(p_model, p0) and not torch.equal(p_ema, p0) and not torch.equal(p_ema, p_model)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["vrg"]["model"]["ema_weights"] == "ema.module."
    den, info = load_denoiser(tmp_path / "last.ckpt")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(den(x, torch.tensor(0.4)), m.ema.module.eval()(x, torch.tensor(0.4)))
    other = DiffusionModule(unet=TINY_UNET, beta_end=0.03)
    with pytest.raises(ValueError, match="noise schedule"):
        other.on_load_checkpoint(ckpt)


def test_generate_is_the_sampling_generator() -> None:
    """The TensorBoard grid's images are ``vrg sample``'s: sampling.generate with the module's EMA denoiser,
    trajectory, solver and guidance, sample i from (seed, i) whatever the batch."""
    torch.manual_seed(0)
    m = DiffusionModule(unet=TINY_UNET, num_classes=3, sample_steps=3, sample_solver="dpmpp_2m", sample_base="logSNR",
                        guidance_scale=2.0)
    with torch.no_grad():
        for p in m.ema.module.parameters():  # EMA weights differ from the raw ones
            p.add_(0.05 * torch.randn_like(p))
    imgs = m.generate(5, seed=1)
    ab = make_trajectory(m.schedule, "logSNR", 3)
    assert imgs.shape == (5, 1, 16, 16) and imgs.abs().max() <= 1
    m.ema.module.eval(), m.model.eval()  # as vrg sample runs them (train-mode kernels round differently)
    assert torch.equal(imgs, generate(m.ema.module, ab, "dpmpp_2m", 5, 1, guidance_scale=2.0))
    assert torch.equal(m.generate(5, seed=1, use_ema=False), generate(m.model, ab, "dpmpp_2m", 5, 1,
                                                                      guidance_scale=2.0))
    m.ema.module.train(), m.model.train()
    assert not torch.allclose(imgs, m.generate(5, seed=1, use_ema=False), atol=1e-3)
    torch.testing.assert_close(m.generate(3, seed=1, batch_size=2), imgs[:3], atol=1e-4, rtol=0)
    assert m.ema.module.training  # generate samples in eval mode and restores the mode
    assert (m.generate(5, seed=2) - imgs).abs().max() > 0.1


def test_image_grid() -> None:
    grid = image_grid(torch.rand(5, 1, 16, 16))
    assert grid.shape == (1, 3 * 17 + 1, 2 * 17 + 1)  # nrow = round(√5) = 2 columns, 3 rows
    imgs = torch.rand(5, 1, 16, 16)
    grid = image_grid(imgs, nrow=3, pad=2)
    assert grid.shape == (1, 2 * 18 + 2, 3 * 18 + 2) and torch.equal(grid[:, 2:18, 20:36], imgs[1])
    assert torch.equal(grid[:, 20:36, 38:54], torch.ones(1, 16, 16))  # the empty sixth cell is padding


# --- datasets ------------------------------------------------------------------------------------------------------
def test_digits_and_patches_are_offline_deterministic_and_in_range() -> None:
    d = digits_dataset()
    x, y = d.tensors
    assert x.shape == (1797, 1, 16, 16) and x.min() == -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    assert digits_dataset("pad").tensors[0][:, :, :4].eq(-1).all()  # padded border is background
    p1, p2, p3 = patches_dataset(50, seed=3), patches_dataset(50, seed=3), patches_dataset(50, seed=4)
    assert p1.tensors[0].shape == (50, 3, 16, 16) and p1.tensors[0].abs().max() <= 1
    assert torch.equal(p1.tensors[0], p2.tensors[0]) and not torch.equal(p1.tensors[0], p3.tensors[0])
    assert set(p1.tensors[1].tolist()) <= {0, 1}
    dm = DigitsDataModule(batch_size=64)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 1, 16, 16) and yb.dtype == torch.long


def test_load_real_images_subsets_and_names() -> None:
    a, b = load_real_images("digits", 10, seed=2), load_real_images("digits", 10, seed=2)
    assert a.shape == (10, 1, 16, 16) and torch.equal(a, b)
    assert load_real_images("digits").shape[0] == 1797
    assert torch.equal(load_real_images("patches", 7, seed=0), patches_dataset(seed=0).tensors[0][
        torch.randperm(20000, generator=torch.Generator().manual_seed(0))[:7]])
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        load_real_images("mnist")
    with pytest.raises(ValueError, match="num must be"):
        load_real_images("digits", 0)


def test_image_folder_and_cifar_errors(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "cats" / "a.png")
    Image.new("L", (10, 30), 0).save(tmp_path / "dogs" / "b.jpg")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    (xa, ya), (xb, yb) = ds[0], ds[1]
    assert xa.shape == xb.shape == (3, 8, 8) and (ya, yb) == (0, 1)
    torch.testing.assert_close(xa[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert xb.max() == -1
    assert load_real_images(f"folder:{tmp_path}", image_size=8).shape == (2, 3, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="download"):
        CIFAR10DataModule(root=str(tmp_path / "nocifar")).setup("fit")
