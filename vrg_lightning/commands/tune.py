"""``vrg tune``: validate candidate trajectories by paired FID and store the winners (or the kept bases, with the
reason) in a NEW checkpoint (:mod:`vrg_lightning.evaluation.tune`).

    vrg tune --ckpt runs/digits/checkpoints/last.ckpt --out runs/digits/tuned.ckpt --reference digits
    vrg tune --ckpt a.ckpt --out b.ckpt --reference patches --features pixels --solvers ddim,dpmpp_2m --steps 10 \\
        --bases time_uniform,logSNR --lps 0.01,0.03 --objectives paper,solver --pin-start both --num-samples 256
    vrg tune --ckpt a.ckpt --out c.ckpt --peers gits,dmn   # GITS, DMN and VRG on each are candidates too

Then ``vrg sample --ckpt b.ckpt --trajectory vrg --solver ddim --steps 10 --base logSNR`` samples the validated
choice: the winning trajectory (VRG, a peer, or VRG on a peer) when its improvement was significant on fresh
seeds, else the base.
"""

from __future__ import annotations

import argparse
import json

from ..evaluation.features import FEATURES
from ..evaluation.tune import PIN_CHOICES, RANK_CHOICES, TUNE_GRID, TuneSettings
from ..optimize.settings import STORED_BASES
from ..peers import PEERS
from ..solvers import SOLVERS
from ._args import add_grid_arguments, add_list_argument
from ._model import add_model_arguments, model_from_args

_D = TuneSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="input checkpoint (with checkpoint['vrg']); never overwritten")
    p.add_argument("--out", required=True, help="the tuned checkpoint (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (never the input)")
    p.add_argument("--reference", default=None,
                   help="real samples for FID: digits, patches, cifar10, folder:PATH, or FILE.pt (a tensor [N, ...] "
                        "of the model's sample shape); default: digits for 1-channel models, else patches")
    p.add_argument("--features", default=None, metavar="NAME|SPEC",
                   help=f"FID features: {', '.join(FEATURES)} or a SPEC (path/to/file.py:NAME, an nn.Module mapping "
                        "samples [B, ...] to [B, D]); default: digits for 1-channel images, else pixels")
    p.add_argument("--inception-weights", default=None, help="local InceptionV3 weights for --features inception")
    add_list_argument(p, "--solvers", str, None, "solvers to tune (unset: those of the stored entries)", SOLVERS)
    add_list_argument(p, "--steps", int, None, "step counts (unset: those of the stored entries)")
    add_list_argument(p, "--bases", str, None, "base trajectories (unset: those of the stored entries)", STORED_BASES)
    add_grid_arguments(p, TUNE_GRID, skip=("solvers", "steps", "bases", "pin_start"))
    p.add_argument("--pin-start", default=_D.pin_start, choices=PIN_CHOICES,
                   help=f"start free, pinned or both (default: {_D.pin_start})")
    add_list_argument(p, "--peers", str, None, "peer schedule optimisers whose trajectories, and VRG on top of each, "
                      "are candidates too (gits needs the model; dmn only the schedule and solver)", PEERS)
    p.add_argument("--no-fix", action="store_true", help="leave out the damped + discretisation-aware candidates")
    p.add_argument("--num-samples", type=int, default=_D.num_samples, help=f"images per FID (default: "
                   f"{_D.num_samples})")
    add_list_argument(p, "--seeds", int, _D.screen_seeds, "screening seeds")
    add_list_argument(p, "--confirm-seeds", int, _D.confirm_seeds, "confirmation seeds (disjoint from --seeds)")
    p.add_argument("--confidence", type=float, default=_D.confidence, help=f"(default: {_D.confidence})")
    p.add_argument("--rank-by", default=_D.rank_by, choices=RANK_CHOICES,
                   help="screening rule: lowest upper confidence bound (default) or lowest mean paired difference")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help=f"(default: {_D.batch_size})")
    p.add_argument("--cache-dir", default=None, help="reference / sample statistics cache (default ~/.cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the validated records as JSON")
    add_model_arguments(p)


def _check_flags(args: argparse.Namespace) -> None:
    """The flag-level rules, worded as flags (the library raises the same errors in Python terms)."""
    from ..io import check_output_file

    check_output_file(args.out, {"--ckpt": args.ckpt}, force=args.force, name="--out", force_hint="--force")
    if args.features == "inception" and not args.inception_weights:
        raise ValueError("--features inception needs --inception-weights PATH (a local InceptionV3 weights file; "
                         "nothing is downloaded).")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint_file, read_vrg
    from ..evaluation.features import default_features
    from ..evaluation.tune import checkpoint_settings, tune_checkpoint

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    _check_flags(args)
    vrg = read_vrg(load_checkpoint_file(args.ckpt))
    if not vrg.get("entries") and None in (args.solvers, args.steps, args.bases):
        raise ValueError(f"{args.ckpt} stores no VRG entries; give --solvers, --steps and --bases.")
    denoiser = model_from_args(args).denoiser
    flat = {"solvers": args.solvers, "steps": args.steps, "bases": args.bases, "lps": args.lps,
            "objectives": args.objectives, "reg_lambda": args.reg_lambda, "trust": args.trust,
            "mse_mode": args.mse_mode, "pin_start": args.pin_start, "fix": not args.no_fix,
            "num_samples": args.num_samples, "screen_seeds": args.seeds, "confirm_seeds": args.confirm_seeds,
            "features": args.features or default_features("auto", tuple(denoiser.sample_shape)),
            "confidence": args.confidence, "rank_by": args.rank_by,
            "batch_size": args.batch_size, "peers": args.peers}
    settings = checkpoint_settings(vrg, flat)
    new = tune_checkpoint(args.ckpt, args.out, settings, args.reference, cache_dir=args.cache_dir, force=args.force,
                          inception_weights=args.inception_weights, log=None if args.json else print,
                          denoiser=denoiser)
    cells = {(s, int(n), b) for s in settings.solvers for n in settings.steps for b in settings.bases}
    tuned = [e for e in new["entries"] if (e["solver"], int(e["steps"]), e["base"]) in cells]  # this run's cells
    if args.json:
        print(json.dumps([{k: e.get(k) for k in ("solver", "steps", "base", "kind", "validated")} for e in tuned]))
    else:
        sel = sum(bool(e["validated"]["selected"]) for e in tuned)
        cells_txt = f"{len(tuned)} cell" + ("" if len(tuned) == 1 else "s")
        print(f"{cells_txt} tuned in {new['tune']['seconds']:.1f} s ({new['tune']['images_sampled']} images "
              f"sampled): {sel} candidates selected, {len(tuned) - sel} bases kept. Wrote {args.out}")
    return 0
