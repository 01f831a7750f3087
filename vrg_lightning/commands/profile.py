"""``vrg profile``: measure a trained model's error profile post hoc and write a NEW file with the profile and
its VRG trajectories (the input is never modified).

Examples::

    vrg profile --ckpt runs/digits/checkpoints/last.ckpt --data digits --out digits_profiled.ckpt
    vrg profile --diffusers-dir ./ddpm-cifar10 --data cifar10 --data-root data --out cifar_vrg.ckpt --samples 8192

``--ckpt``: a checkpoint of ``DiffusionModule``; the output is a copy of it whose ``vrg`` section holds the new
profile and trajectories. ``--diffusers-dir``: a local ``UNet2DModel`` (``DIR`` or ``DIR/unet``) and its scheduler
config (``DIR/scheduler/scheduler_config.json`` or ``DIR/scheduler_config.json``); the output holds the UNet
weights (``state_dict``, prefix ``model.``), so ``vrg sample``/``load_denoiser`` can use it directly.
The probe is :func:`vrg_lightning.callbacks.probe_profile` (stratified over noise levels, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="CKPT", help="checkpoint of vrg_lightning.module.DiffusionModule")
    src.add_argument("--diffusers-dir", metavar="DIR", help="local diffusers UNet2DModel + scheduler config")
    parser.add_argument("--data", required=True, metavar="NAME",
                        help="probe images: digits, patches, cifar10 or folder:PATH")
    parser.add_argument("--data-root", default="data", help="root folder of cifar10 (default: data)")
    parser.add_argument("--out", required=True, metavar="FILE", help="new file to write (refused if it exists)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out (never the input)")
    parser.add_argument("--samples", type=int, default=4096, help="probe samples (default: 4096)")
    parser.add_argument("--bins", type=int, default=100, help="profile bins (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch size (default: 256)")
    parser.add_argument("--no-ema", action="store_true", help="profile the raw weights instead of the EMA weights")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--solvers", nargs="+", default=["ddim"], help="solvers (default: ddim)")
    parser.add_argument("--steps", nargs="*", type=int, default=[10, 20], help="step counts (default: 10 20)")
    parser.add_argument("--bases", nargs="+", default=["time_uniform", "time_quadratic", "logSNR"],
                        help="base trajectories (default: time_uniform time_quadratic logSNR)")
    parser.add_argument("--lps", nargs="+", type=float, default=[0.1], help="learning portions (default: 0.1)")
    parser.add_argument("--objectives", nargs="+", default=["paper"], choices=["paper", "solver"],
                        help="objectives (default: paper)")
    parser.add_argument("--reg-lambda", type=float, default=1e4, help="start penalty weight (default: 1e4)")
    parser.add_argument("--trust", choices=["alpha", "logsnr"], default="alpha", help="trust region (default: alpha)")
    parser.add_argument("--mse-mode", choices=["fit", "paper"], default="fit", help="MSE interpolation (default: fit)")
    parser.add_argument("--pin-start", action="store_true", help="hold the noisiest alpha_bar exactly")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (like `vrg inspect --json`)")


def _load_diffusers(directory: str) -> tuple[Any, dict[str, Any]]:
    """``(Denoiser, source info)`` from a local diffusers folder (no network)."""
    from diffusers import UNet2DModel

    from ..denoiser import Denoiser
    from ..schedule import NoiseSchedule

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"--diffusers-dir {directory!r} is not a folder.")
    unet_dir = d / "unet" if (d / "unet" / "config.json").is_file() else d
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"No UNet config.json in {str(d)!r} or {str(d / 'unet')!r}.")
    sched_file = next((p for p in (d / "scheduler" / "scheduler_config.json", d / "scheduler_config.json")
                       if p.is_file()), None)
    if sched_file is None:
        raise FileNotFoundError(f"No scheduler_config.json in {str(d / 'scheduler')!r} or {str(d)!r}.")
    cfg = json.loads(sched_file.read_text())
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    if getattr(unet.config, "num_class_embeds", None):
        raise ValueError("Class-conditional diffusers UNets are not supported by `vrg profile --diffusers-dir`.")
    den = Denoiser(schedule=NoiseSchedule.from_config(cfg), prediction_type=str(cfg.get("prediction_type", "epsilon")),
                   unet=unet)
    return den, {"diffusers_dir": str(d.resolve()), "scheduler_config": str(sched_file.resolve())}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..callbacks import compute_entries, probe_profile
    from ..checkpoint import VRG_KEY, build_vrg_state, load_checkpoint_file, load_denoiser, model_section
    from ..data import load_dataset
    from ..io import atomic_torch_save
    from .inspect import format_report, inspect_checkpoint

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
        den, source = _load_diffusers(args.diffusers_dir)
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
    entries = compute_entries(profile, den.schedule, solvers=args.solvers, steps=args.steps, bases=args.bases,
                              lps=args.lps, objectives=args.objectives, reg_lambda=args.reg_lambda, trust=args.trust,
                              mse_mode=args.mse_mode, pin_start=args.pin_start) if args.steps else []
    result = dict(ckpt)
    result[VRG_KEY] = build_vrg_state(den.schedule, profile, entries, prediction_type=den.prediction_type,
                                      model=model or None,
                                      extra={"profiler": {"profile_source": "probe", "command": "vrg profile",
                                                          "input": str(src), "samples": args.samples,
                                                          "seed": args.seed, "ema": not args.no_ema}})
    atomic_torch_save(out, result)
    info = inspect_checkpoint(os.fspath(out))
    print(json.dumps(info) if args.json else format_report(info))
    if not args.json:
        print(f"wrote {out}", file=sys.stderr)
    return 0
