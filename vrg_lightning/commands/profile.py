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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..probe import PROBE_BATCH, PROBE_BINS, PROBE_SAMPLES
from ._args import add_grid_arguments, grid_from_args
from ._model import add_model_arguments, model_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", metavar="CKPT", default=None,
                        help="checkpoint of DiffusionModule or of a LightningModule following the VRG protocol")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="NAME|FILE.pt",
                        help="probe samples: digits, patches, cifar10, folder:PATH, or FILE.pt (a tensor [N, ...] of "
                             "training samples in model space)")
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


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import VRG_KEY, build_vrg_state
    from ..data import load_dataset
    from ..io import atomic_torch_save, check_output_file
    from ..optimize.entries import compute_entries
    from ..probe import probe_profile
    from ..report import format_report, inspect_checkpoint

    if not (args.ckpt or args.model or args.diffusers_dir):
        raise ValueError("vrg profile needs a model: --ckpt CKPT, --model SPEC or --diffusers-dir DIR.")
    out = Path(args.out)
    src = args.ckpt or args.diffusers_dir or args.model
    inputs = {"--ckpt": args.ckpt, "--data": args.data if Path(args.data).is_file() else None}
    check_output_file(out, inputs, force=args.force, name="--out", force_hint="--force")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1; got {args.samples}.")
    data = load_dataset(args.data) if args.data.endswith(".pt") else None  # a file gives the sample shape
    loaded = model_from_args(args, None if data is None else tuple(_first(data).shape), use_ema=not args.no_ema)
    den = loaded.denoiser
    dataset = _dataset(args, tuple(den.sample_shape), data)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    den = den.to(device).eval()
    profile = probe_profile(den, dataset, den.schedule, num_samples=args.samples, num_bins=args.bins, seed=args.seed,
                            batch_size=args.batch_size, device=device)
    profile.meta.pop("rank", None)
    profile.meta.update({"data": args.data, "ema": not args.no_ema})
    grid = grid_from_args(args)
    entries = compute_entries(profile, den.schedule, grid, model=den) if grid.steps else []  # den: for gits
    result = dict(loaded.checkpoint)
    sections = dict(loaded.sections)
    model = sections.pop("model", None)
    result[VRG_KEY] = build_vrg_state(den.schedule, profile, entries, prediction_type=den.prediction_type,
                                      model=model or None,
                                      extra={**sections,
                                             "profiler": {"profile_source": "probe", "command": "vrg profile",
                                                          "input": str(src), "samples": args.samples,
                                                          "seed": args.seed, "ema": not args.no_ema,
                                                          "optimize": grid.to_dict()}})
    check_output_file(out, inputs, force=args.force, name="--out", force_hint="--force")  # again: it took a while
    atomic_torch_save(out, result, overwrite=args.force)
    info = inspect_checkpoint(os.fspath(out))
    print(json.dumps(info) if args.json else format_report(info))
    if not args.json:
        print(f"wrote {out}", file=sys.stderr)
    return 0
