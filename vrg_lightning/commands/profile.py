"""``vrg profile``: measure a trained model's error profile post hoc and write a NEW file with the profile and
its VRG trajectories (the input is never modified).

Examples::

    vrg profile --ckpt runs/digits/checkpoints/last.ckpt --data digits --out digits_profiled.ckpt
    vrg profile --diffusers-dir ./ddpm-cifar10 --data cifar10 --data-root data --out cifar_vrg.ckpt --samples 8192

``--ckpt``: a checkpoint of ``DiffusionModule``; the output is a copy of it whose ``vrg`` section holds the new
profile and trajectories. ``--diffusers-dir``: a local ``UNet2DModel`` (``DIR`` or ``DIR/unet``) and its scheduler
config (``DIR/scheduler/scheduler_config.json`` or ``DIR/scheduler_config.json``); the output holds the UNet
weights (``state_dict``, prefix ``model.``), so ``vrg sample``/``load_denoiser`` can use it directly.
The probe is :func:`vrg_lightning.probe.probe_profile` (stratified over noise levels, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..probe import PROBE_BATCH, PROBE_BINS, PROBE_SAMPLES
from ._args import add_grid_arguments, grid_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="CKPT", help="checkpoint of vrg_lightning.module.DiffusionModule")
    src.add_argument("--diffusers-dir", metavar="DIR", help="local diffusers UNet2DModel + scheduler config")
    parser.add_argument("--data", required=True, metavar="NAME",
                        help="probe images: digits, patches, cifar10 or folder:PATH")
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


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import VRG_KEY, build_vrg_state, load_checkpoint_file, load_denoiser, model_section
    from ..data import load_dataset
    from ..denoiser import load_diffusers_dir
    from ..io import atomic_torch_save
    from ..optimize.entries import compute_entries
    from ..probe import probe_profile
    from ..report import format_report, inspect_checkpoint

    out = Path(args.out)
    src = Path(args.ckpt or args.diffusers_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"--out {args.out!r} is the input; vrg profile never modifies its input.")
    if out.exists() and not args.force:
        raise FileExistsError(f"--out {args.out!r} exists; choose a new file or pass --force to replace it.")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1; got {args.samples}.")
    if args.ckpt:
        ckpt = load_checkpoint_file(args.ckpt)
        den, _ = load_denoiser(ckpt, use_ema=not args.no_ema)
        model = dict((ckpt.get(VRG_KEY) or {}).get("model") or {})
    else:
        den, source = load_diffusers_dir(args.diffusers_dir)
        ckpt = {"state_dict": {f"model.{k}": v.detach().cpu() for k, v in den.state_dict().items()}}
        model = dict(model_section(den.config(), "model.", None), source=source)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    den = den.to(device).eval()
    size = int(den.unet.config.sample_size)
    dataset = load_dataset(args.data, root=args.data_root, image_size=size, download=False, seed=args.seed,
                           channels=int(den.unet.config.in_channels))
    x0 = dataset[0][0] if isinstance(dataset[0], (tuple, list)) else dataset[0]
    want = (int(den.unet.config.in_channels), size, size)
    if tuple(x0.shape) != want:
        raise ValueError(f"--data {args.data!r} gives images of shape {tuple(x0.shape)}; the model needs {want}.")
    profile = probe_profile(den, dataset, den.schedule, num_samples=args.samples, num_bins=args.bins, seed=args.seed,
                            batch_size=args.batch_size, device=device)
    profile.meta.pop("rank", None)
    profile.meta.update({"data": args.data, "ema": not args.no_ema})
    grid = grid_from_args(args)
    entries = compute_entries(profile, den.schedule, grid) if grid.steps else []
    result = dict(ckpt)
    result[VRG_KEY] = build_vrg_state(den.schedule, profile, entries, prediction_type=den.prediction_type,
                                      model=model or None,
                                      extra={"profiler": {"profile_source": "probe", "command": "vrg profile",
                                                          "input": str(src), "samples": args.samples,
                                                          "seed": args.seed, "ema": not args.no_ema,
                                                          "optimize": grid.to_dict()}})
    atomic_torch_save(out, result)
    info = inspect_checkpoint(os.fspath(out))
    print(json.dumps(info) if args.json else format_report(info))
    if not args.json:
        print(f"wrote {out}", file=sys.stderr)
    return 0
