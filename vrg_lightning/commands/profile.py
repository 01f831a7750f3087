"""``vrg profile``: measure a trained model's error profile post hoc and write a NEW file with the profile and
its VRG trajectories (the input is never modified).

Examples::

    vrg profile --ckpt runs/digits/checkpoints/last.ckpt --data digits --out digits_profiled.ckpt
    vrg profile --ckpt last.ckpt --data digits --bases logSNR,gits,dmn --out peers.ckpt   # peer bases too
    vrg profile --diffusers-dir ./ddpm-cifar10 --data cifar10 --data-root data --out cifar_vrg.ckpt --samples 8192
    vrg profile --model nets/mlp.py:make --schedule linear --prediction-type epsilon --data train.pt --out mlp.pt

``--ckpt``: a checkpoint of ``DiffusionModule``, or of a LightningModule following the VRG protocol (its class
recorded in the checkpoint, or given with ``--model package.module:Class``); the output is a copy of it whose
``vrg`` section holds the new profile and trajectories. ``--diffusers-dir``: a local ``UNet2DModel`` (``DIR`` or
``DIR/unet``) and its scheduler config, or a ``DDPMPipeline``/``DDIMPipeline`` folder; the output holds the UNet
weights (``state_dict``, prefix ``model.``), so ``vrg sample``/``load_denoiser`` can use it directly. ``--model
SPEC``: any ``nn.Module`` called as ``model(x, t)``; the output records the SPEC, schedule, prediction type and
sample shape (not the weights): later commands take it with ``--model SPEC``. ``--data FILE.pt``: a tensor
``[N, ...]`` of training samples in model space (it also gives the sample shape). The probe is
:func:`vrg_lightning.probe.probe_profile` (stratified over noise levels, fixed seed).

Guided latent profiles (a local ``StableDiffusionPipeline`` folder; the output records the folder, not its
weights)::

    vrg profile --diffusers-dir SD_DIR --data latents.pt --guidance-scales 1,7.5 --out prof.pt
    vrg profile --diffusers-dir SD_DIR --data images/ --captions captions.txt --guidance-scales 7.5 --out prof.pt

``--guidance-scales`` (a text-conditioned model, or a class-conditional one with labelled ``--data``): one probe
pass measures ε̂_∅ and ε̂_c at each (x_t, ε) and gives the profile of ε̂_w - ε at every scale w
(:func:`vrg_lightning.models.guided.probe_guided`). The ``vrg`` section stores them as ``guided_profiles``
(``{str(w): profile}``), the scale-1 profile (else the first scale's) as ``profile``, and the entries of each scale,
optimised on that scale's profile, with their ``guidance_scale``. A Stable Diffusion folder without the flag is
profiled at w = 1 (the conditional prediction on the data's own captions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..probe import PROBE_BATCH, PROBE_BINS, PROBE_SAMPLES
from ._args import add_grid_arguments, add_list_argument, grid_from_args
from ._model import add_model_arguments, model_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", metavar="CKPT", default=None,
                        help="checkpoint of DiffusionModule or of a LightningModule following the VRG protocol")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="NAME|FILE.pt|DIR",
                        help="probe samples: digits, patches, cifar10, folder:PATH, or FILE.pt (a tensor [N, ...] of "
                             "training samples in model space). With a Stable Diffusion --diffusers-dir: FILE.pt, a "
                             "dict {'latents': float [N, C, h, w] (VAE latents times its scaling_factor), "
                             "'prompt_embeds': float [N, L, D] (the text encoder's embedding of each latent's "
                             "caption)}, as LatentCaptions.save writes it; or DIR, an image folder, with --captions")
    parser.add_argument("--captions", metavar="FILE.txt", default=None,
                        help="with --data DIR and a Stable Diffusion --diffusers-dir: one caption per line, line i for "
                             "the i-th image in sorted file order (as many lines as images)")
    add_list_argument(parser, "--guidance-scales", float, None,
                      "classifier-free guidance scales w to profile and optimise for (a conditional model; "
                      "default: unguided, or w = 1 for a Stable Diffusion folder)")
    parser.add_argument("--data-root", default="data", help="root folder of cifar10 (default: data)")
    parser.add_argument("--out", required=True, metavar="FILE", help="new file to write (refused if it exists)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out (never the input)")
    parser.add_argument("--samples", type=int, default=PROBE_SAMPLES, help=f"probe samples (default: {PROBE_SAMPLES})")
    parser.add_argument("--bins", type=int, default=PROBE_BINS, help=f"profile bins (default: {PROBE_BINS})")
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=PROBE_BATCH,
                        help=f"probe batch size (default: {PROBE_BATCH})")
    parser.add_argument("--no-ema", action="store_true", help="profile the raw weights instead of the EMA weights")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_grid_arguments(parser.add_argument_group("trajectories to optimise (an empty --steps stores the profile only)"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON (like `vrg inspect --json`)")


def _first(dataset: Any) -> Any:
    return dataset[0][0] if isinstance(dataset[0], (tuple, list)) else dataset[0]


def _dataset(args: argparse.Namespace, shape: tuple[int, ...], dataset=None):
    """The probe dataset of ``--data`` (``dataset``: already loaded), checked against the model's sample ``shape``."""
    from ..data import load_dataset

    if dataset is None and len(shape) != 3:
        raise ValueError(f"--data {args.data!r} is a dataset of images but the model makes samples of shape {shape}; "
                         "give --data FILE.pt (a tensor [N, ...] of training samples).")
    if dataset is None:
        dataset = load_dataset(args.data, root=args.data_root, image_size=shape[-1], download=False, seed=args.seed,
                               channels=shape[0])
    x0 = _first(dataset)
    if tuple(x0.shape) != shape:
        raise ValueError(f"--data {args.data!r} gives samples of shape {tuple(x0.shape)}; the model needs {shape} "
                         "(--sample-shape, or the model's own).")
    return dataset


def _latent_data(args: argparse.Namespace, den: Any):
    """The :class:`~vrg_lightning.models.guided.LatentCaptions` of ``--data`` (and ``--captions``)."""
    from ..models.guided import LatentCaptions

    data = Path(args.data)
    if args.captions is None:
        if data.is_dir():
            raise ValueError(f"--data {args.data!r} is a folder of images: give their captions with --captions "
                             "FILE.txt (one per line, in sorted file order), or a .pt of latents and prompt_embeds.")
        return LatentCaptions.load(data)
    if not data.is_dir():
        raise ValueError(f"--captions {args.captions!r} goes with --data DIR, a folder of images; got --data "
                         f"{args.data!r}.")
    try:
        return LatentCaptions.from_folder(den, data, args.captions, seed=args.seed, batch_size=args.batch_size)
    except ValueError as exc:
        raise ValueError(f"--data {args.data!r} with --captions {args.captions!r}: {exc}") from exc


def _scales(args: argparse.Namespace, latent: bool) -> tuple[float, ...] | None:
    """The guidance scales to profile (distinct, in the given order); ``None``: the unguided probe."""
    import math

    if args.guidance_scales is None:
        return (1.0,) if latent else None
    scales = tuple(dict.fromkeys(float(w) for w in args.guidance_scales))
    if not scales or not all(math.isfinite(w) for w in scales):
        raise ValueError(f"--guidance-scales must be one or more finite numbers; got "
                         f"{','.join(map(str, args.guidance_scales)) or 'none'}.")
    return scales


def _profile_meta(profile: Any, args: argparse.Namespace) -> Any:
    profile.meta.pop("rank", None)
    profile.meta.update({"data": args.data, "ema": not args.no_ema})
    return profile


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import VRG_KEY, build_vrg_state
    from ..data import load_dataset
    from ..io import atomic_torch_save, check_output_file
    from ..models.latent import is_latent_pipeline_dir
    from ..optimize.entries import compute_entries
    from ..probe import probe_profile
    from ..report import format_report, inspect_checkpoint

    if not (args.ckpt or args.model or args.diffusers_dir):
        raise ValueError("vrg profile needs a model: --ckpt CKPT, --model SPEC or --diffusers-dir DIR.")
    out = Path(args.out)
    src = args.ckpt or args.diffusers_dir or args.model
    inputs = {"--ckpt": args.ckpt, "--data": args.data if Path(args.data).is_file() else None,
              "--captions": args.captions}
    check_output_file(out, inputs, force=args.force, name="--out", force_hint="--force")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1; got {args.samples}.")
    latent = bool(args.diffusers_dir) and is_latent_pipeline_dir(args.diffusers_dir)
    if args.captions is not None and not latent:
        raise ValueError(f"--captions {args.captions!r} is for a Stable Diffusion pipeline folder (--diffusers-dir "
                         "with a StableDiffusionPipeline model_index.json) and --data DIR.")
    scales = _scales(args, latent)
    data = load_dataset(args.data) if args.data.endswith(".pt") and not latent else None  # gives the sample shape
    loaded = model_from_args(args, None if data is None else tuple(_first(data).shape), use_ema=not args.no_ema)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    den = loaded.denoiser.to(device).eval()
    dataset = _latent_data(args, den) if latent else _dataset(args, tuple(den.sample_shape), data)
    probe = dict(num_samples=args.samples, num_bins=args.bins, seed=args.seed, batch_size=args.batch_size,
                 device=device)
    grid = grid_from_args(args)
    if scales is None:
        profile = _profile_meta(probe_profile(den, dataset, den.schedule, **probe), args)
        entries = compute_entries(profile, den.schedule, grid, model=den) if grid.steps else []  # den: for gits
        guided = {}
    else:
        from ..models.guided import probe_guided

        try:
            profiles = probe_guided(den, dataset, scales, **probe)
        except ValueError as exc:
            flag = "--guidance-scales " + ",".join(map(str, scales)) if args.guidance_scales else "--diffusers-dir"
            raise ValueError(f"{flag} (--data {args.data!r}): {exc}") from exc
        profiles = {w: _profile_meta(p, args) for w, p in profiles.items()}
        profile = profiles.get(1.0, profiles[scales[0]])
        entries = [dict(e, guidance_scale=w) for w in scales for e in
                   (compute_entries(profiles[w], den.schedule, grid, model=den) if grid.steps else [])]
        guided = {"guided_profiles": {str(w): p.to_dict() for w, p in profiles.items()}}
    result = dict(loaded.checkpoint)
    sections = dict(loaded.sections)
    model = sections.pop("model", None)
    settings = {"profile_source": "probe", "command": "vrg profile", "input": str(src), "samples": args.samples,
                "seed": args.seed, "ema": not args.no_ema, "optimize": grid.to_dict()}
    if scales is not None:
        settings.update(guidance_scales=list(scales), data=args.data, captions=args.captions)
    result[VRG_KEY] = build_vrg_state(den.schedule, profile, entries, prediction_type=den.prediction_type,
                                      model=model or None, extra={**sections, **guided, "profiler": settings})
    check_output_file(out, inputs, force=args.force, name="--out", force_hint="--force")  # again: it took a while
    atomic_torch_save(out, result, overwrite=args.force)
    info = inspect_checkpoint(os.fspath(out))
    print(json.dumps(info) if args.json else format_report(info))
    if not args.json:
        print(f"wrote {out}", file=sys.stderr)
    return 0
