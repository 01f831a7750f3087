"""``vrg profile`` of a Stable Diffusion folder under guidance: a tiny random ``StableDiffusionPipeline`` (built as in
tests/test_stable_diffusion.py), latents + caption embeddings from a ``.pt`` or an image folder + captions file,
per-scale profiles and entries in one safe file that ``vrg inspect`` and ``VRGScheduler`` read; bad input is a clear
error and writes nothing. Nothing is downloaded."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the optional group `sd`

from helpers import make_checkpoint  # noqa: E402
from test_stable_diffusion import SD_SCHEDULE, build_pipeline  # noqa: E402

from vrg_lightning import VRGScheduler  # noqa: E402
from vrg_lightning.checkpoint import select_entry  # noqa: E402
from vrg_lightning.cli import main  # noqa: E402
from vrg_lightning.models import load_pipeline_dir  # noqa: E402
from vrg_lightning.models.guided import LatentCaptions, probe_guided  # noqa: E402
from vrg_lightning.optimize import TrajectoryGrid, compute_entries  # noqa: E402
from vrg_lightning.profile import ErrorProfile  # noqa: E402

PROBE = dict(num_samples=128, num_bins=8, seed=0, batch_size=128)
GRID = ["--solvers", "ddim", "--steps", "4", "--bases", "time_uniform"]


def _flags() -> list[str]:
    return ["--samples", "128", "--bins", "8", "--seed", "0", "--batch-size", "128", "--device", "cpu", *GRID]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_pipeline(tmp_path_factory.mktemp("sdcli"))


@pytest.fixture(scope="module")
def den(sd_dir: Path):
    return load_pipeline_dir(sd_dir)[0]


@pytest.fixture(scope="module")
def latents_file(den, tmp_path_factory) -> Path:
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return LatentCaptions.from_images(den, images, ["a cat", "a dog"] * 3).save(
        tmp_path_factory.mktemp("lat") / "latents.pt")


def _write_folder(root: Path, n: int) -> Path:
    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(7)
    for i in reversed(range(n)):  # written in reverse: the captions follow the sorted names, not the creation order
        px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(root / f"img{i}.png")
    return root


def test_guided_profiles_and_entries_per_scale(sd_dir: Path, den, latents_file: Path, tmp_path: Path,
                                               capsys) -> None:
    out = tmp_path / "prof.pt"
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(latents_file), "--guidance-scales",
                 "7.5,1", "--out", str(out), *_flags()]) == 0
    capsys.readouterr()
    vrg = torch.load(out, weights_only=True)["vrg"]
    # what the command stored is what the library's guided probe measures on the same data and seeds
    want = probe_guided(den, LatentCaptions.load(latents_file), [7.5, 1.0], **PROBE)
    assert set(vrg["guided_profiles"]) == {"7.5", "1.0"}
    for w, p in want.items():
        got = ErrorProfile.from_dict(vrg["guided_profiles"][str(w)])
        assert torch.allclose(got.sums, p.sums, rtol=1e-6) and got.meta["guidance_scale"] == w
    assert torch.equal(ErrorProfile.from_dict(vrg["profile"]).sums,  # w = 1 is "profile", though given second
                       ErrorProfile.from_dict(vrg["guided_profiles"]["1.0"]).sums)
    assert bool((want[7.5].mse > want[1.0].mse).all())  # the scales' profiles differ
    # one entry per scale, optimised on that scale's profile, recording the scale
    grid = TrajectoryGrid(solvers=("ddim",), steps=(4,), bases=("time_uniform",))
    assert sorted(e["guidance_scale"] for e in vrg["entries"]) == [1.0, 7.5]
    for w in (1.0, 7.5):
        (ref,) = compute_entries(want[w], SD_SCHEDULE, grid)
        e = select_entry(vrg, "ddim", 4, guidance_scale=w)
        assert e["guidance_scale"] == w and e["cpe_before"] == pytest.approx(ref["cpe_before"], rel=1e-5)
        assert torch.allclose(torch.tensor(e["alpha_bar"]), torch.tensor(ref["alpha_bar"]), rtol=1e-5)
        sched = VRGScheduler.from_checkpoint({"vrg": vrg}, solver="ddim", steps=4, guidance_scale=w)
        assert torch.equal(sched.alpha_bar, torch.tensor(e["alpha_bar"], dtype=torch.float64))
    assert vrg["model"]["latent_pipeline"]["diffusers_dir"] == str(sd_dir.resolve())
    assert vrg["profiler"]["guidance_scales"] == [7.5, 1.0]
    # vrg inspect reads it, with the scale of each entry
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "guidance" in text and sum(line.startswith("ddim") for line in text.splitlines()) == 2
    assert any(line.startswith("ddim") and " 7.5 " in line for line in text.splitlines())
    assert "model     StableDiffusionPipeline" in text and "guided    w = 7.5: MSE" in text


def test_image_folder_with_captions(sd_dir: Path, den, tmp_path: Path, capsys) -> None:
    folder = _write_folder(tmp_path / "images", 4)
    caps = tmp_path / "captions.txt"
    caps.write_text("a cat\na dog\na dog\na cat\n")
    data = LatentCaptions.from_folder(den, folder, caps)
    assert data.latents.shape == (4, 4, 8, 8)
    assert torch.equal(data.prompt_embeds, den.encode_prompt(["a cat", "a dog", "a dog", "a cat"]))  # sorted order
    out = tmp_path / "prof.pt"
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(folder), "--captions", str(caps),
                 "--out", str(out), *_flags()]) == 0  # no --guidance-scales: w = 1
    capsys.readouterr()
    vrg = torch.load(out, weights_only=True)["vrg"]
    (want,) = probe_guided(den, data, [1.0], **PROBE).values()
    assert list(vrg["guided_profiles"]) == ["1.0"] and [e["guidance_scale"] for e in vrg["entries"]] == [1.0]
    assert torch.allclose(ErrorProfile.from_dict(vrg["profile"]).sums, want.sums, rtol=1e-6)
    # captions of another length: a clear error, nothing written
    caps.write_text("a cat\na dog\na dog\n")
    bad = tmp_path / "bad.pt"
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(folder), "--captions", str(caps),
                 "--out", str(bad), *_flags()]) == 2
    err = capsys.readouterr().err
    assert "--captions" in err and "has 3 lines but folder" in err and "has 4 images" in err and not bad.exists()
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(folder), "--out", str(bad),
                 *_flags()]) == 2
    assert "is a folder of images: give their captions with --captions" in capsys.readouterr().err
    assert not bad.exists()


def test_bad_guided_input_is_a_clear_error(sd_dir: Path, latents_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.pt"
    ckpt = make_checkpoint(tmp_path / "uncond.ckpt")  # an unconditional UNet2DModel
    assert main(["profile", "--ckpt", str(ckpt), "--data", "digits", "--guidance-scales", "3", "--out", str(out),
                 *_flags()]) == 2
    assert "--guidance-scales 3.0" in (err := capsys.readouterr().err) and "conditional model" in err
    assert main(["profile", "--ckpt", str(ckpt), "--data", "digits", "--captions", str(latents_file), "--out",
                 str(out), *_flags()]) == 2
    assert "--captions" in capsys.readouterr().err
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(latents_file), "--guidance-scales",
                 "1,nan", "--out", str(out), *_flags()]) == 2
    assert "--guidance-scales must be one or more finite numbers" in capsys.readouterr().err
    d = torch.load(latents_file, weights_only=True)
    torch.save({"latents": d["latents"][:, :3], "prompt_embeds": d["prompt_embeds"]}, tmp_path / "three.pt")
    assert main(["profile", "--diffusers-dir", str(sd_dir), "--data", str(tmp_path / "three.pt"), "--out", str(out),
                 *_flags()]) == 2
    assert "shape (3, 8, 8)" in capsys.readouterr().err
    assert not out.exists()


def test_class_conditional_checkpoint_is_guided_too(tmp_path: Path, capsys) -> None:
    """The flag is not Stable Diffusion only: a class-conditional UNet with labelled data gets per-scale profiles."""
    from vrg_lightning.checkpoint import load_denoiser
    from vrg_lightning.data import load_dataset

    ckpt, out = make_checkpoint(tmp_path / "cond.ckpt", num_classes=10), tmp_path / "out.ckpt"
    assert main(["profile", "--ckpt", str(ckpt), "--data", "digits", "--guidance-scales", "1,3", "--out", str(out),
                 *_flags()]) == 0
    capsys.readouterr()
    raw = torch.load(out, weights_only=True)
    den, vrg = load_denoiser(raw)  # the weights came along
    data = load_dataset("digits", image_size=16, channels=1, download=False, seed=0)
    want = probe_guided(den, data, [1.0, 3.0], **PROBE)
    for w in (1.0, 3.0):
        assert torch.allclose(ErrorProfile.from_dict(vrg["guided_profiles"][str(w)]).sums, want[w].sums, rtol=1e-6)
    assert sorted(e["guidance_scale"] for e in vrg["entries"]) == [1.0, 3.0]
