"""``vrg tune``: validate candidate trajectories by paired FID and store the winners (or the kept bases, with the
reason) in a NEW checkpoint (:mod:`vrg_lightning.tune`).

    vrg tune --ckpt runs/digits/checkpoints/last.ckpt --out runs/digits/tuned.ckpt --reference digits
    vrg tune --ckpt a.ckpt --out b.ckpt --reference patches --features pixels --solvers ddim,dpmpp_2m --steps 10 \\
        --bases time_uniform,logSNR --lps 0.01,0.03 --objectives paper,solver --pin-start both --num-samples 256

Then ``vrg sample --ckpt b.ckpt --trajectory vrg --solver ddim --steps 10 --base logSNR`` samples the validated
choice: the VRG trajectory when its improvement was significant on fresh seeds, else the base.
"""

from __future__ import annotations

import argparse
import json

from ..tune import PIN_CHOICES, TuneSettings

_D = TuneSettings()


def _list(text: str, cast: type, name: str) -> tuple:
    try:
        vals = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"--{name} must be a comma list of {cast.__name__}; got {text!r}.") from exc
    if not vals:
        raise ValueError(f"--{name} is empty; got {text!r}.")
    return vals


def _j(v: tuple) -> str:
    return ",".join(str(x) for x in v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="input checkpoint (with checkpoint['vrg']); never overwritten")
    p.add_argument("--out", required=True, help="the tuned checkpoint (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--reference", default=None,
                   help="real images for FID: digits, patches, cifar10, folder:PATH (default: digits for 1-channel "
                        "models, else patches)")
    p.add_argument("--features", default=None, choices=["digits", "pixels", "inception"],
                   help="FID features (default: digits for 1-channel models, else pixels)")
    p.add_argument("--inception-weights", default=None, help="local InceptionV3 weights for --features inception")
    p.add_argument("--solvers", default=None, help="comma list (default: the solvers of the stored entries)")
    p.add_argument("--steps", default=None, help="comma list (default: the steps of the stored entries)")
    p.add_argument("--bases", default=None, help="comma list (default: the bases of the stored entries)")
    p.add_argument("--lps", default=_j(_D.lps), help=f"comma list (default {_j(_D.lps)})")
    p.add_argument("--objectives", default=_j(_D.objectives), help=f"comma list (default {_j(_D.objectives)})")
    p.add_argument("--pin-start", default=_D.pin_start, choices=PIN_CHOICES, help="start free, pinned or both")
    p.add_argument("--reg-lambda", type=float, default=_D.reg_lambda, help="start penalty when free")
    p.add_argument("--no-fix", action="store_true", help="leave out the damped + discretisation-aware candidates")
    p.add_argument("--num-samples", type=int, default=_D.num_samples, help="images per FID")
    p.add_argument("--seeds", default=_j(_D.screen_seeds), help="screening seeds")
    p.add_argument("--confirm-seeds", default=_j(_D.confirm_seeds), help="confirmation seeds (disjoint)")
    p.add_argument("--confidence", type=float, default=_D.confidence)
    p.add_argument("--rank-by", default=_D.rank_by, choices=["upper", "mean"],
                   help="screening rule: lowest upper confidence bound (default) or lowest mean paired difference")
    p.add_argument("--batch-size", type=int, default=_D.batch_size)
    p.add_argument("--cache-dir", default=None, help="reference / sample statistics cache (default ~/.cache)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the validated records as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint_file, read_vrg
    from ..tune import default_features, tune_checkpoint

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    vrg = read_vrg(load_checkpoint_file(args.ckpt))
    entries = vrg.get("entries", [])
    stored = lambda k: tuple(dict.fromkeys(e[k] for e in entries))  # noqa: E731 - stored values, in order
    if (args.solvers is None or args.steps is None or args.bases is None) and not entries:
        raise ValueError(f"{args.ckpt} stores no VRG entries; give --solvers, --steps and --bases.")
    channels = vrg.get("model", {}).get("denoiser", {}).get("unet", {}).get("in_channels", 1)
    settings = TuneSettings(
        solvers=_list(args.solvers, str, "solvers") if args.solvers else stored("solver"),
        steps=_list(args.steps, int, "steps") if args.steps else tuple(int(v) for v in stored("steps")),
        bases=_list(args.bases, str, "bases") if args.bases else stored("base"),
        lps=_list(args.lps, float, "lps"), objectives=_list(args.objectives, str, "objectives"),
        pin_start=args.pin_start, reg_lambda=args.reg_lambda, fix=not args.no_fix, num_samples=args.num_samples,
        screen_seeds=_list(args.seeds, int, "seeds"), confirm_seeds=_list(args.confirm_seeds, int, "confirm-seeds"),
        features=default_features(args.features or "auto", channels), confidence=args.confidence,
        rank_by=args.rank_by, batch_size=args.batch_size)
    reference = args.reference or ("digits" if channels == 1 else "patches")
    new = tune_checkpoint(args.ckpt, args.out, settings, reference, cache_dir=args.cache_dir, force=args.force,
                          inception_weights=args.inception_weights, log=None if args.json else print)
    tuned = [e for e in new["entries"] if isinstance(e.get("validated"), dict) and "screen" in e["validated"]]
    if args.json:
        print(json.dumps([{k: e.get(k) for k in ("solver", "steps", "base", "kind", "validated")} for e in tuned]))
    else:
        sel = sum(bool(e["validated"]["selected"]) for e in tuned)
        print(f"{len(tuned)} cells tuned in {new['tune']['seconds']:.1f} s ({new['tune']['images_sampled']} images "
              f"sampled): {sel} VRG trajectories selected, {len(tuned) - sel} bases kept. Wrote {args.out}")
    return 0
