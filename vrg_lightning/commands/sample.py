"""``vrg sample``: sample a checkpoint's EMA model over a trajectory (Lightning, any number of processes, any
strategy), FID, grid and JSON report; ``--compare`` tabulates base trajectories against their VRG versions over
several seeds.

    vrg sample --ckpt model.ckpt --solver ddim --steps 10 --trajectory vrg --num-samples 2000 \\
        --out runs/ddim10 --reference digits --devices 2 --accelerator cpu --strategy ddp
    vrg sample --ckpt model.ckpt --compare --solver ddim,dpmpp_2m --steps 10 --trajectory time_uniform,logSNR \\
        --seeds 0,1,2 --num-samples 1000 --reference digits --out runs/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..evaluation.features import FEATURES
from ..sampling.resolve import TRAJECTORY_NAMES
from ..solvers import SOLVERS
from ..variance import OBJECTIVES
from ._args import add_list_argument
from ._model import add_model_arguments, model_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and trajectory")
    g.add_argument("--ckpt", required=True, help="Lightning checkpoint of the model (EMA weights are used).")
    add_list_argument(g, "--solver", str, ("ddim",), "Solver (several with --compare)", SOLVERS)
    add_list_argument(g, "--steps", int, None, "Number of steps (several with --compare)")
    add_list_argument(g, "--trajectory", str, None,
                      f"Base name ({', '.join(TRAJECTORY_NAMES[:-1])}), 'vrg' (the checkpoint's stored trajectory) "
                      "or a trajectory file; default vrg. With --compare: bases, each compared with its VRG version "
                      "(default: every base with a stored VRG trajectory)")
    g.add_argument("--base", default=None, help="With --trajectory vrg: the base of the stored entry to use.")
    g.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="Pick the stored entry optimized for this objective (also the cpe reported by --compare).")
    g.add_argument("--lp", type=float, default=None, help="Pick the stored entry with this learning portion.")
    g.add_argument("--guidance-scale", type=float, default=1.0, help="Classifier-free guidance weight.")
    g.add_argument("--raw-weights", action="store_true", help="Use the raw training weights instead of EMA.")
    add_model_arguments(p)
    g = p.add_argument_group("samples")
    g.add_argument("--num-samples", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=64, help="Images per solver call (does not change the images).")
    g.add_argument("--shard-size", type=int, default=500, help="Images per shard file (part of the manifest).")
    g.add_argument("--seed", type=int, default=0, help="Sample i's noise and label depend only on (seed, i).")
    add_list_argument(g, "--seeds", int, (0, 1, 2), "Seeds of --compare")
    g.add_argument("--out", required=True, help="Output folder (resumable; other arguments are refused).")
    g.add_argument("--compare", action="store_true", help="Base vs VRG table (paired FID over --seeds, cpe).")
    g = p.add_argument_group("FID (computed when --reference is given)")
    g.add_argument("--reference", default=None,
                   help="Real samples: a dataset name (digits, patches, cifar10, folder:PATH) or a FILE.pt holding "
                        "a tensor [N, ...] of samples of the model's shape (images in [-1, 1]).")
    g.add_argument("--reference-num", type=int, default=None, help="Number of real images (default: all).")
    g.add_argument("--data-root", default="data", help="Dataset root for --reference cifar10.")
    g.add_argument("--features", default=None, metavar="NAME|SPEC",
                   help=f"FID features: {', '.join(FEATURES)} or a SPEC (path/to/file.py:NAME, an nn.Module mapping "
                        "samples [B, ...] to [B, D]). Default: digits for 1-channel images, else inception when "
                        "--inception-weights is given, else pixels.")
    g.add_argument("--inception-weights", default=None,
                   help="Local InceptionV3 weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth).")
    g.add_argument("--cache-dir", default=None, help="Reference-statistics cache (default ~/.cache/vrg-lightning).")
    g = p.add_argument_group("Lightning")
    g.add_argument("--accelerator", default="auto")
    g.add_argument("--devices", default="1", help="Number of devices (or 'auto').")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--strategy", default="auto", help="e.g. ddp or ddp_spawn (CPU: gloo).")
    g.add_argument("--precision", default="32-true",
                   help="Lightning precision of the model (part of the manifest); 64-true makes the images "
                        "independent of --batch-size to ~1e-13 (float32 kernels round differently per batch size).")
    g.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 1:
            raise ValueError(f"--{n.replace('_', '-')} must be a positive integer; got {v!r}.")


def _devices(text: str) -> int | str:
    if text != "auto":
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--devices must be a positive integer or 'auto'; got {text!r}.")
        return n
    return text


def resolve_from_args(args: argparse.Namespace, schedule: Any, vrg: Any, solver: str, steps: int | None,
                      trajectory: str, model: Any = None) -> Any:
    """:func:`~vrg_lightning.sampling.resolve_trajectory` with the flags in its errors; prints a note (a tuned
    entry that kept its base) to stderr. Shared by ``vrg sample`` and ``vrg export``; ``model`` computes a ``gits``
    trajectory the checkpoint does not store (``vrg sample``)."""
    from ..sampling import resolve_trajectory

    given = {"--trajectory": trajectory, "--solver": solver if trajectory == "vrg" else None, "--steps": steps,
             **({"--base": args.base, "--objective": args.objective, "--lp": args.lp} if trajectory == "vrg" else {})}
    flags = " ".join(f"{k} {v}" for k, v in given.items() if v is not None)
    if steps is None and trajectory in TRAJECTORY_NAMES:
        raise ValueError(f"--trajectory {trajectory} needs --steps N.")
    try:
        traj = resolve_trajectory(schedule, vrg, solver, steps, trajectory, base=args.base, objective=args.objective,
                                  lp=args.lp, model=model, guidance_scale=getattr(args, "guidance_scale", None))
    except ValueError as exc:
        raise ValueError(f"{flags}: {exc}" + (" (flags --base, --objective, --lp)" if "match" in str(exc) else "")
                         ) from exc
    if traj.note:
        print(f"vrg: {traj.note}", file=sys.stderr)
    return traj


def _fid_setup(args: argparse.Namespace, shape: tuple[int, ...]):
    """``(extractor, reference stats, description)`` or ``(None, None, None)`` without --reference."""
    from ..evaluation import build_features, reference_for

    if args.reference is None:
        if args.features or args.inception_weights:
            raise ValueError("--features/--inception-weights need --reference (the real images FID compares with).")
        return None, None, None
    image = len(shape) == 3
    features = args.features or ("digits" if image and shape[0] == 1 else "inception" if args.inception_weights
                                 else "pixels")
    try:
        ext = build_features(features, image_shape=shape, inception_weights=args.inception_weights)
    except ValueError as exc:
        raise ValueError(f"--features {features}: {exc}") from exc
    try:
        ref = reference_for(args.reference, ext, shape, num=args.reference_num, cache_dir=args.cache_dir,
                            root=args.data_root, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"--reference {args.reference}: {exc}") from exc
    return ext, ref, {"reference": args.reference, "num_reference": ref.n, "features": ext.name,
                      "weights_hash": ext.weights_hash}


def run(args: argparse.Namespace) -> int:
    from ..sampling import file_sha256
    from ..sampling.generate import sample_shape

    _positive(args, "num_samples", "batch_size", "shard_size", "reference_num", "num_nodes")
    devices = _devices(args.devices)
    loaded = model_from_args(args, use_ema=not args.raw_weights)
    denoiser, vrg = loaded.denoiser, loaded.vrg
    shape = sample_shape(denoiser)
    sha = file_sha256(args.ckpt)
    common = {"checkpoint": {"path": str(args.ckpt), "sha256": sha, "weights": "raw" if args.raw_weights else "ema"}}
    if args.model or args.diffusers_dir:  # the weights are not the file's: the samples' identity names the model
        import hashlib

        from ..evaluation.paired import model_key

        key = model_key(denoiser)
        common["checkpoint"].update(file_sha256=sha, sha256=hashlib.sha256(f"{sha}:{key}".encode()).hexdigest())
        common["model"] = {"kind": loaded.kind, "spec": args.model, "diffusers_dir": args.diffusers_dir, "key": key}
    if args.compare:
        return _run_compare(args, denoiser, vrg, shape, common, devices)
    return _run_single(args, denoiser, vrg, shape, common, devices)


def _run_single(args, denoiser, vrg, shape, common, devices) -> int:
    from ..sampling import SampleJob, run_sampling_job, shard_ranges, trajectory_cpe

    lists = {"--solver": args.solver, "--steps": args.steps or (), "--trajectory": args.trajectory or ()}
    if any(len(v) > 1 for v in lists.values()):
        raise ValueError(f"Several values in {', '.join(k for k, v in lists.items() if len(v) > 1)} need --compare.")
    solver, steps, trajectory = args.solver[0], (args.steps or (None,))[0], (args.trajectory or ("vrg",))[0]
    shards = len(shard_ranges(args.num_samples, args.shard_size))
    procs = devices * args.num_nodes if isinstance(devices, int) else 1  # 'auto': the job checks
    if shards < procs:
        raise ValueError(f"--num-samples {args.num_samples} in shards of --shard-size {args.shard_size} give {shards} "
                         f"shard(s), fewer than the {procs} processes (--devices x --num-nodes); use fewer --devices "
                         "or a smaller --shard-size.")
    traj = resolve_from_args(args, denoiser.schedule, vrg, solver, steps, trajectory, model=denoiser)
    ext, ref, fid_desc = _fid_setup(args, shape)
    job = SampleJob(common["checkpoint"]["sha256"], solver, traj.alpha_bar, args.num_samples, args.seed,
                    args.shard_size, float(args.guidance_scale), not args.raw_weights, args.precision, shape)
    extra = {**common, "trajectory": traj.to_dict(), "cpe": trajectory_cpe(traj.tensor, vrg, solver),
             "fid_reference": fid_desc, "arguments": _arguments(args)}
    trainer_kwargs = {"accelerator": args.accelerator, "devices": devices, "num_nodes": args.num_nodes,
                      "strategy": args.strategy}
    report = run_sampling_job(denoiser, job, args.out, batch_size=args.batch_size, trainer_kwargs=trainer_kwargs,
                              extractor=ext, reference=ref, report_extra=extra, progress=not args.no_progress)
    if report is not None:
        fid, cpe = report["fid"], report["cpe"]
        print(f"{args.num_samples} samples ({solver}, {len(traj.alpha_bar)} steps, {traj.source}) -> {args.out}")
        if cpe:
            print(f"cpe[paper]={cpe['paper']:.6g}" + (f" cpe[solver]={cpe['solver']:.6g}" if cpe["solver"] else ""))
        if fid:
            kept = " (kept from the earlier run over these samples)" if report.get("fid_kept") else ""
            print(f"{fid['metric']}={fid['value']:.4f} ({fid['num_images']} images vs {fid['num_reference']} real)"
                  f"{kept}")
    return 0


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags for the report; list flags as comma strings (the form they are given in)."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if not k.startswith("_")}


def _run_compare(args, denoiser, vrg, shape, common, devices) -> int:
    import torch

    from ..checkpoint import select_entry
    from ..evaluation.paired import paired_compare
    from ..io import atomic_write_json, atomic_write_text
    from ..report import compare_markdown, plot_compare
    from ..sampling import check_manifest, resolve_trajectory
    from ..variance import objective_for_cpe

    if args.reference is None:
        raise ValueError("--compare needs --reference (FID compares base and VRG trajectories).")
    if devices not in (1, "auto") or args.num_nodes != 1:
        raise ValueError(f"--compare runs in one process; got --devices {args.devices} --num-nodes {args.num_nodes}.")
    if not vrg:
        raise ValueError(f"{args.ckpt} holds no VRG trajectories to compare; run `vrg profile` first.")
    if args.precision not in ("32-true", "64-true"):
        raise ValueError(f"--compare supports --precision 32-true or 64-true; got {args.precision!r}.")
    if args.trajectory is not None and "vrg" in args.trajectory:
        raise ValueError("--compare takes base names in --trajectory (each is compared with its VRG version).")
    solvers, seeds = list(args.solver), list(args.seeds)
    steps_list = list(args.steps) if args.steps else sorted({int(e["steps"]) for e in vrg["entries"]})
    ext, ref, fid_desc = _fid_setup(args, shape)
    accel = args.accelerator
    device = "cuda" if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()) else "cpu"
    denoiser.to(device, torch.float64 if args.precision == "64-true" else torch.float32)
    out = Path(args.out)
    traj_arg = None if args.trajectory is None else ",".join(args.trajectory)  # the manifest keeps the comma form
    identity = {"ckpt_sha256": common["checkpoint"]["sha256"], "solvers": solvers, "steps": steps_list,
                "trajectory": traj_arg, "base": args.base, "objective": args.objective, "lp": args.lp,
                "seeds": seeds, "num_samples": args.num_samples, "guidance_scale": args.guidance_scale,
                "precision": args.precision, "weights": common["checkpoint"]["weights"], "fid": fid_desc}
    mse = None
    if "profile" in vrg:
        from ..profile import ErrorProfile

        mse = ErrorProfile.from_dict(vrg["profile"]).mse_function("fit")
    cells = []  # every cell resolved before the manifest claims the folder: a refused run leaves none behind
    for solver in solvers:
        for steps in steps_list:
            bases = list(args.trajectory) if args.trajectory else sorted(
                {str(e["base"]) for e in vrg["entries"] if e["solver"] == solver and int(e["steps"]) == steps})
            for base in bases or [None]:  # no base: select_entry raises with the list of stored entries
                try:
                    entry = select_entry(vrg, solver, steps, base=base, objective=args.objective, lp=args.lp)
                    base_ab = resolve_trajectory(denoiser.schedule, vrg, solver, steps, base, model=denoiser).tensor
                    cells.append((solver, steps, base, entry, base_ab))  # a peer base: its stored values
                except ValueError as exc:
                    where = f"--solver {solver} --steps {steps}" + (f" --trajectory {base}" if base else "")
                    raise ValueError(f"{where}: {exc}") from exc
    check_manifest(out, identity, kind="compare")
    rows = []
    for solver, steps, base, entry, base_ab in cells:
        print(f"compare {solver} {steps} steps {base}: base vs VRG over seeds {seeds}", file=sys.stderr)
        rows.append(paired_compare(
            denoiser, solver, base_ab, torch.tensor(entry["alpha_bar"], dtype=torch.float64), extractor=ext,
            reference=ref, seeds=seeds, num_samples=args.num_samples, batch_size=args.batch_size,
            guidance_scale=args.guidance_scale, device=device, mse=mse,
            objective=args.objective or objective_for_cpe(entry.get("objective")), base=base,
            entry={k: entry.get(k) for k in ("objective", "lp", "cpe_before", "cpe_after", "validated")},
            cache_dir=out / "stats", progress=not args.no_progress))
    table = compare_markdown(rows)
    atomic_write_text(out / "compare.md", table)
    atomic_write_json(out / "compare.json", {"format": "vrg-compare-report", "version": 1, **common,
                                             "fid_reference": fid_desc, "arguments": _arguments(args),
                                             "rows": [r.to_dict() for r in rows]})
    plot_compare(rows, out / "compare.png", mse)
    print(table, end="")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    from vrg_lightning.cli import main

    sys.exit(main(["sample", *sys.argv[1:]]))
