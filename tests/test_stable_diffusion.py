"""Latent, text-conditioned models: a tiny random ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL,
CLIP text encoder and a tokenizer whose vocabulary the test writes) loads as a denoiser of the protocol; a guided
error profile → stored entries → ``VRGScheduler.from_checkpoint`` inside the pipeline at guidance 7.5 samples what
the toolkit's own latent sampler samples; bad folders and inputs are clear errors. Nothing is downloaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the optional group `sd`

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from vrg_lightning import VRGScheduler  # noqa: E402
from vrg_lightning.checkpoint import build_vrg_state  # noqa: E402
from vrg_lightning.denoiser import Denoiser  # noqa: E402
from vrg_lightning.models import LatentDenoiser, load_model, load_pipeline_dir  # noqa: E402
from vrg_lightning.models.guided import GuidedMoments, LatentCaptions, probe_guided, probe_guided_moments  # noqa: E402
from vrg_lightning.optimize import TrajectoryGrid, compute_entries  # noqa: E402
from vrg_lightning.schedule import NoiseSchedule  # noqa: E402
from vrg_lightning.solvers import sample  # noqa: E402
from vrg_lightning.trajectories import make_trajectory  # noqa: E402

SD_SCHEDULE = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PROMPTS = ["a cat", "a dog"]
STEPS, W = 6, 7.5
SOLVERS = ("ddim", "dpmpp_2m")


def _byte_chars() -> list[str]:
    """CLIP's byte-level alphabet (GPT-2's ``bytes_to_unicode``): one printable character per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from a vocab.json/merges.txt written here: every byte, alone and word-final, two words."""
    chars = _byte_chars()
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "ca", "cat</w>", "do", "dog</w>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_pipeline(root: Path) -> Path:
    """Save a tiny random StableDiffusionPipeline (latents 4x8x8, prompts of 16 tokens, width 32) under ``root``."""
    torch.manual_seed(0)
    tokenizer = write_tokenizer(root / "vocab")
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16)).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def den(sd_dir: Path) -> LatentDenoiser:
    return load_pipeline_dir(sd_dir)[0]


@pytest.fixture(scope="module")
def pipe(sd_dir: Path) -> StableDiffusionPipeline:
    p = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def data(den: LatentDenoiser) -> LatentCaptions:
    """Eight random 'images' with captions, encoded by the pipeline's own VAE and text encoder."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return LatentCaptions.from_images(den, images, ["a cat", "a dog"] * 4, seed=0)


@pytest.fixture(scope="module")
def profiles(den: LatentDenoiser, data: LatentCaptions) -> dict:
    return probe_guided(den, data, [0.0, 1.0, 2.0, W], num_samples=256, num_bins=8, seed=3, batch_size=128)


@pytest.fixture(scope="module")
def vrg(profiles: dict) -> dict:
    """profile → entries: the guided profile at w = 7.5, optimised for both solvers; entries record the scale."""
    grid = TrajectoryGrid(solvers=SOLVERS, steps=(STEPS,), bases=("time_uniform",))
    entries = [dict(e, guidance_scale=W) for e in compute_entries(profiles[W], SD_SCHEDULE, grid)]
    return build_vrg_state(SD_SCHEDULE, profiles[W], entries)


def latents(channels: int = 4) -> torch.Tensor:
    return torch.randn(len(PROMPTS), channels, 8, 8, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to float32 precision relative to the largest value (the pipeline's first input is z, the toolkit's
    (z/√ᾱ₀)·√ᾱ₀)."""
    assert float((a - b).abs().max()) <= rtol * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


# --- the folder as a denoiser -----------------------------------------------------------------------------------
def test_latent_modules_import_neither_transformers_nor_diffusers() -> None:
    code = ("import sys, vrg_lightning, vrg_lightning.models.latent, vrg_lightning.ays; "
            "print([m for m in ('transformers', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_pipeline_folder_loads_as_latent_denoiser(sd_dir: Path, pipe: StableDiffusionPipeline) -> None:
    loaded = load_model(diffusers_dir=sd_dir)
    d = loaded.denoiser
    assert loaded.kind == "latent" and isinstance(d, LatentDenoiser)
    assert d.sample_shape == (4, 8, 8) and d.schedule == SD_SCHEDULE and d.prediction_type == "epsilon"
    assert d.family is None  # a width-32 UNet is not SD 1.5 (768): no AYS base for it
    assert d.scaling_factor == pipe.vae.config.scaling_factor and d.clip_range is None
    assert d.config()["latent"] and d.config()["source"]["pipeline"] == "StableDiffusionPipeline"
    # a file records the folder, not gigabytes of weights, and says how to load it again
    assert loaded.checkpoint == {} and loaded.sections["model"]["latent_pipeline"]["diffusers_dir"] == str(sd_dir)
    ckpt = {"vrg": {"format": "vrg-lightning", "version": 1, "model": loaded.sections["model"]}}
    with pytest.raises(ValueError, match="diffusers_dir="):
        load_model(ckpt)


def test_prompt_embeddings_are_the_pipelines(den: LatentDenoiser, pipe: StableDiffusionPipeline) -> None:
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(den.encode_prompt(PROMPTS), cond)
    assert torch.equal(den.null_embedding.expand(2, -1, -1), uncond)
    assert not torch.equal(cond[0], cond[1])  # the two prompts differ


# --- guided profiles ---------------------------------------------------------------------------------------------
def test_guided_profiles_measure_the_guided_error_against_the_added_noise(profiles: dict, data: LatentCaptions
                                                                          ) -> None:
    assert data.latents.shape == (8, 4, 8, 8) and data.prompt_embeds.shape == (8, 16, 32)
    m = {w: p.mse for w, p in profiles.items()}
    assert all(float(p.count.sum()) == 256 and p.meta["guidance_scale"] == w for w, p in profiles.items())
    # e_w = (1-w) e_∅ + w e_c on one (x₀, t, ε) set: MSE_w = (1-w)² M_∅ + w² M_c + 2w(1-w) C, C from w = 2
    cross = (m[2.0] - m[0.0] - 4 * m[1.0]) / -4
    predicted = (1 - W) ** 2 * m[0.0] + W ** 2 * m[1.0] + 2 * W * (1 - W) * cross
    assert torch.allclose(m[W], predicted, rtol=1e-4)
    assert bool((m[W] > 1.02 * m[1.0]).all())  # the guidance drift adds error at every level: one profile per scale


def test_single_pass_profiles_equal_the_per_scale_probe(den: LatentDenoiser, data: LatentCaptions,
                                                        profiles: dict, tmp_path: Path) -> None:
    """One pass (both predictions at each (x_t, ε), mixed power sums) gives every scale's profile: all seven sum
    rows (counts, λ, Σe..Σe⁴) equal the per-scale probe's, which evaluates ε̂_w itself at each scale."""
    opts = dict(num_samples=256, num_bins=8, seed=3, batch_size=128)
    per_scale = probe_guided(den, data, [0.0, 1.0, W], single_pass=False, **opts)
    for w, p in per_scale.items():
        one = profiles[w]
        assert torch.equal(one.sums[:3], p.sums[:3]) and one.meta["guidance_scale"] == w == p.meta["guidance_scale"]
        assert torch.allclose(one.sums[3:], p.sums[3:], rtol=2e-4, atol=1e-6 * float(p.sums[4].max())), w
        assert torch.allclose(one.mse, p.mse, rtol=1e-4) and one.moments == 4
    # a scale that was never probed comes from the same sums; ranks add; the sums are a plain, safe file
    moments = probe_guided_moments(den, data, **opts)
    shards = [probe_guided_moments(den, data, rank=r, world_size=2, **opts) for r in (0, 1)]
    assert torch.allclose((shards[0] + shards[1]).sums, moments.sums, rtol=1e-6)
    torch.save(moments.to_dict(), tmp_path / "m.pt")
    back = GuidedMoments.from_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(back.profile(3.0).sums, moments.profile(3.0).sums)
    assert float(back.profile(3.0).mse.min()) > float(profiles[1.0].mse.min())


def test_guided_profiles_need_a_conditional_model(data: LatentCaptions) -> None:
    torch.manual_seed(0)
    uncond = Denoiser(schedule=SD_SCHEDULE, unet=UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    with pytest.raises(ValueError, match="LatentCaptions .* need a text-conditioned model"):
        probe_guided(uncond, data, [3.0])
    with pytest.raises(ValueError, match="has num_classes=None"):
        probe_guided(uncond, [(torch.zeros(4, 8, 8), 0)], [3.0])
    with pytest.raises(ValueError, match="guidance_scales must be one or more finite numbers"):
        probe_guided(uncond, data, [float("nan")])


def test_latent_captions_files_and_lengths(den: LatentDenoiser, data: LatentCaptions, tmp_path: Path) -> None:
    path = data.save(tmp_path / "latents.pt")
    back = LatentCaptions.load(path)
    assert torch.equal(back.latents, data.latents) and torch.equal(back.prompt_embeds, data.prompt_embeds)
    with pytest.raises(FileExistsError):
        data.save(path)
    with pytest.raises(ValueError, match=r"latents \(8\) and prompt_embeds \(7\) must have one caption per latent"):
        LatentCaptions(data.latents, data.prompt_embeds[:7])
    with pytest.raises(ValueError, match="images .* and captions must be as many; got images .* and 3 captions"):
        LatentCaptions.from_images(den, torch.zeros(2, 3, 16, 16), ["a", "b", "c"])
    torch.save({"latents": data.latents}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="it lacks prompt_embeds"):
        LatentCaptions.load(tmp_path / "half.pt")


# --- VRGScheduler inside StableDiffusionPipeline -----------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_pipeline_with_vrg_scheduler_equals_toolkit_sampler(den: LatentDenoiser, pipe: StableDiffusionPipeline,
                                                            vrg: dict, solver: str) -> None:
    pipe.scheduler = VRGScheduler.from_checkpoint({"vrg": vrg}, solver=solver, steps=STEPS)
    entry = next(e for e in vrg["entries"] if e["solver"] == solver)
    ab = torch.tensor(entry["alpha_bar"], dtype=torch.float64)
    assert torch.equal(pipe.scheduler.alpha_bar, ab) and entry["guidance_scale"] == W
    assert not torch.equal(ab, make_trajectory(SD_SCHEDULE, "time_uniform", STEPS))  # the VRG trajectory
    got = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, latents=latents(),
               output_type="latent").images
    with torch.no_grad():
        ref = sample(solver, den.eps_fn(PROMPTS, W), latents(), ab)
        unguided = sample(solver, den.eps_fn(PROMPTS, 1.0), latents(), ab)
        embedded = sample(solver, den.eps_fn(den.encode_prompt(PROMPTS), W), latents(), ab)
    close(got, ref)
    assert torch.equal(embedded, ref)  # strings and their embeddings are one input
    assert float((unguided - ref).abs().max()) > 0.05 * float(ref.abs().max())  # guidance is in both


def test_generate_samples_prompts_under_guidance(den: LatentDenoiser) -> None:
    """``generate(labels=prompts)``: the seeded noise of each index, the given prompts instead of seeded labels."""
    from vrg_lightning.sampling import generate, initial_noise

    ab = make_trajectory(SD_SCHEDULE, "logSNR", STEPS)
    got = generate(den, ab, "ddim", 3, 5, start=1, batch_size=2, guidance_scale=W, labels=["a cat", "a dog", "a cat"])
    x, _ = initial_noise(5, 1, 4, den.sample_shape)
    with torch.no_grad():
        ref = sample("ddim", den.eps_fn(["a cat", "a dog", "a cat"], W), x, ab)
    close(got, ref)
    emb = generate(den, ab, "ddim", 3, 5, start=1, batch_size=3, guidance_scale=W,
                   labels=den.encode_prompt(["a cat", "a dog", "a cat"]))
    close(emb, ref)
    with pytest.raises(ValueError, match="labels must hold one label .* per sample, num_samples=3; got 2 of them"):
        generate(den, ab, "ddim", 3, 5, guidance_scale=W, labels=PROMPTS)
    with pytest.raises(ValueError, match="guidance_scale=7.5 needs prompts"):
        generate(den, ab, "ddim", 2, 5, guidance_scale=W)


def test_entries_are_selected_by_guidance_scale(profiles: dict, vrg: dict) -> None:
    """Entries of one cell optimised on different scales' profiles: ``select_entry(guidance_scale=)`` picks one; an
    entry without the key was optimised for w = 1; without the argument the lookup asks for it."""
    from vrg_lightning.checkpoint import select_entry

    grid = TrajectoryGrid(solvers=("ddim",), steps=(STEPS,), bases=("time_uniform",))
    (plain,) = compute_entries(profiles[1.0], SD_SCHEDULE, grid)
    both = {"entries": [plain, next(e for e in vrg["entries"] if e["solver"] == "ddim")]}
    assert "guidance_scale" not in plain and plain["cpe_before"] != both["entries"][1]["cpe_before"]
    assert select_entry(both, "ddim", STEPS, guidance_scale=W) == both["entries"][1]
    assert select_entry(both, "ddim", STEPS, guidance_scale=1) == plain
    with pytest.raises(ValueError, match="2 stored VRG trajectories match .* lp or guidance_scale"):
        select_entry(both, "ddim", STEPS)
    with pytest.raises(ValueError, match="No stored VRG trajectory for solver=ddim, steps=6, guidance_scale=3"):
        select_entry(both, "ddim", STEPS, guidance_scale=3)


def test_pipeline_images_are_the_decoded_latents(den: LatentDenoiser, pipe: StableDiffusionPipeline) -> None:
    ab = make_trajectory(SD_SCHEDULE, "logSNR", STEPS)
    pipe.scheduler = VRGScheduler.from_config(pipe.scheduler.config, alpha_bar=ab, solver="dpmpp_2m")
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, latents=latents(), output_type="pt").images
    with torch.no_grad():
        z = sample("dpmpp_2m", den.eps_fn(PROMPTS, W), latents(), ab)
    mine = den.decode(z) / 2 + 0.5
    assert images.shape == (2, 3, 16, 16) and float((images - mine).abs().max()) < 1e-4


# --- bad input -----------------------------------------------------------------------------------------------
def _copy(sd_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sd_dir, tmp_path / "pipe"))


@pytest.mark.parametrize("component", ["vae", "text_encoder", "unet"])
def test_missing_component_is_named(sd_dir: Path, tmp_path: Path, component: str) -> None:
    d = _copy(sd_dir, tmp_path)
    shutil.rmtree(d / component)
    with pytest.raises(FileNotFoundError, match=f"lacks the {component} component"):
        load_model(diffusers_dir=d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(dict(index, **{component: [None, None]})))
    with pytest.raises(FileNotFoundError, match=rf"lacks the {component} component \(model_index.json entry"):
        load_pipeline_dir(d)


def test_missing_tokenizer_files_and_other_pipelines(sd_dir: Path, tmp_path: Path) -> None:
    d = _copy(sd_dir, tmp_path)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (d / "tokenizer" / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="needs vocab.json and merges.txt, or tokenizer.json"):
        load_pipeline_dir(d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(ValueError, match="latent pipelines supported: StableDiffusionPipeline"):
        load_pipeline_dir(d)
    (d / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        load_pipeline_dir(d)


def test_wrong_latents_and_prompts_are_clear_errors(den: LatentDenoiser) -> None:
    ab = make_trajectory(SD_SCHEDULE, "time_uniform", STEPS)
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\].* 4 latent channels\); got \(2, 3, 8, 8\)"):
        sample("ddim", den.eps_fn(PROMPTS, W), latents(3), ab)
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\] with h and w multiples of 2"):
        den.decode(torch.zeros(1, 4, 7, 8))
    with pytest.raises(ValueError, match=r"prompts \(class_labels\) must be a list of strings or embeddings"):
        den.eps_fn(torch.zeros(2, 16, 8), W)
    with pytest.raises(ValueError, match="prompts: 3 given for 2 latents; give one per sample"):
        den.eps_fn(["a cat"] * 3, W)(latents(), ab[-1])
    with pytest.raises(ValueError, match=r"prompt embeddings must be \[2, L, D\], one per sample; got \(3, 16, 32\)"):
        den(latents(), ab[-1], den.encode_prompt(["a cat"] * 3))


def test_guidance_needs_prompts_and_a_conditional_model(den: LatentDenoiser) -> None:
    with pytest.raises(ValueError, match=r"guidance_scale=7.5 needs prompts"):
        den.eps_fn(None, W)
    x = latents()
    with torch.no_grad():  # unguided without prompts: the empty prompt's prediction
        assert torch.equal(den.eps_fn(None, 1.0)(x, torch.tensor(0.5, dtype=torch.float64)),
                           den(x, torch.tensor(0.5, dtype=torch.float64), den.null_embedding.expand(2, -1, -1)))
    torch.manual_seed(0)
    uncond = Denoiser(schedule=SD_SCHEDULE, unet=UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        uncond.eps_fn(torch.zeros(2, dtype=torch.long), W)
