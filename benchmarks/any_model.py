"""Any model: VRG on networks the toolkit never saw (not a UNet, not trained by it), through the real CLI.

    OMP_NUM_THREADS=1 python benchmarks/any_model.py --out runs/any_model --threads 1
    python benchmarks/any_model.py --out runs/any_model_quick --datasets gmm8 --train-steps 3000 \\
        --num-samples 500 --solvers ddim --fresh-seeds 1000,1001,1002

Per dataset (``--datasets``; each in ``OUT/<dataset>/``):

1. data the toolkit never saw: ``gmm8`` (a 2-d mixture of 8 Gaussians on a circle) or ``gmm16`` (a 16-d mixture of
   6 Gaussians with random rank-3 covariances); ``train.pt`` (training samples) and ``real.pt`` (independent real
   samples, the FID reference);
2. an MLP noise predictor (``benchmarks/models/mixture_mlp.py``: ``NoiseMLP(x, t)``, ε-prediction, t continuous in
   training-timestep units) trained by a plain PyTorch loop (Adam, no Lightning, not ``DiffusionModule``) on the
   diffusers ``linear`` schedule (:class:`vrg_lightning.schedule.NoiseSchedule`, T = 1000, β 1e-4..0.02), with t
   drawn uniformly from [0, T-1] (continuous: the model is called between integer timesteps when sampling). The
   model file is copied next to ``weights.pt`` and ``config.json``; SPECs ``DIR/mixture_mlp.py:model`` and
   ``DIR/mixture_mlp.py:features`` (fixed random Fourier features; why: that file's docstring);
3. the real CLI (``vrg_lightning.cli.main``): ``vrg profile --model ... --data train.pt --out P.pt``, ``vrg tune
   --ckpt P.pt --model ... --features ... --reference real.pt --out T.pt`` over ``--solvers`` x ``--steps`` x
   ``--bases`` (tune's own candidates and validation: screening on ``--seeds``, confirmation on
   ``--confirm-seeds``), ``vrg inspect T.pt --json``, then ``vrg sample --compare`` of every cell's validated entry
   against its base on ``--fresh-seeds`` (disjoint from both tune seed sets: noise tune never saw);
4. a markdown table per cell (base FID, tuned choice, tuned FID, paired Δ = tuned - base with its 95 % t-interval
   over the fresh seeds, selected or base kept) and the summary: cells significantly better / not significantly
   different / significantly worse on fresh seeds. A cell whose base was kept samples the base itself (Δ = 0).

Writes ``OUT/results.md`` (what it prints) and ``OUT/results.json``; the CLI's own outputs stay in each dataset folder
(``P.pt``, ``T.pt``, ``inspect.json``, ``compare/``, ``*.log``). ``OUT/<dataset>`` must not exist yet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
MODEL_FILE = ROOT / "models" / "mixture_mlp.py"
DATASETS = ("gmm8", "gmm16")


def _csv(cast: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma list of {cast.__name__}; got {text!r}") from exc
    return parse


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Stages and outputs: see the module docstring (benchmarks/any_model.py).")
    p.add_argument("--out", required=True, help="results folder; OUT/<dataset> must not exist yet")
    p.add_argument("--datasets", type=_csv(str), default=DATASETS, help=f"comma list from {','.join(DATASETS)} "
                   f"(default: {','.join(DATASETS)})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("data and model")
    g.add_argument("--train-size", type=int, default=20000, help="training samples (default: 20000)")
    g.add_argument("--real-size", type=int, default=10000, help="real samples for the FID reference (default: 10000)")
    g.add_argument("--train-steps", type=int, default=10000, help="Adam steps (default: 10000)")
    g.add_argument("--train-batch", type=int, default=512, help="training batch (default: 512)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default: 2e-3)")
    g.add_argument("--hidden", type=int, default=128, help="MLP width (default: 128)")
    g.add_argument("--depth", type=int, default=3, help="MLP hidden layers (default: 3)")
    g.add_argument("--num-features", type=int, default=64, help="random Fourier features for FID (default: 64)")
    g.add_argument("--seed", type=int, default=0, help="data, model init and training seed (default: 0)")
    g = p.add_argument_group("profile, tune and the fresh comparison")
    g.add_argument("--probe-samples", type=int, default=4096, help="vrg profile --samples (default: 4096)")
    g.add_argument("--solvers", default="ddim,dpmpp_2m", help="(default: ddim,dpmpp_2m)")
    g.add_argument("--steps", default="5,10", help="(default: 5,10)")
    g.add_argument("--bases", default="time_uniform,logSNR", help="(default: time_uniform,logSNR)")
    g.add_argument("--num-samples", type=int, default=2000, help="samples per FID, tune and compare (default: 2000)")
    g.add_argument("--seeds", type=_csv(int), default=(0, 1, 2), help="tune screening seeds (default: 0,1,2)")
    g.add_argument("--confirm-seeds", type=_csv(int), default=(100, 101, 102, 103, 104),
                   help="tune confirmation seeds (default: 100,...,104)")
    g.add_argument("--fresh-seeds", type=_csv(int), default=tuple(range(1000, 1008)),
                   help="seeds of the final comparison, disjoint from both (default: 1000,...,1007)")
    a = p.parse_args(argv)
    bad = [d for d in a.datasets if d not in DATASETS]
    if bad or not a.datasets:
        p.error(f"--datasets: unknown {bad or 'empty'}; allowed: {', '.join(DATASETS)}")
    overlap = set(a.fresh_seeds) & (set(a.seeds) | set(a.confirm_seeds))
    if overlap:
        p.error(f"--fresh-seeds must be disjoint from --seeds and --confirm-seeds; shared: {sorted(overlap)}")
    if len(a.fresh_seeds) < 2:
        p.error("--fresh-seeds needs at least 2 seeds (a confidence interval)")
    return a


# --- 1. data ----------------------------------------------------------------------------------------------------

def make_data(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` samples of dataset ``name``; its parameters are fixed (seed 0), ``g`` draws the samples."""
    if name == "gmm8":  # 8 modes on a circle of radius 1.4 (per-coordinate variance ~1), std 0.1
        angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 1.4 * torch.stack([angle.cos(), angle.sin()], 1)
        k = torch.randint(8, (n,), generator=g)
        return (means[k] + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()
    if name == "gmm16":  # 6 modes in 16-d, each a random rank-3 Gaussian plus isotropic 0.05, overall std ~1
        pg = torch.Generator().manual_seed(0)
        means = torch.randn(6, 16, generator=pg, dtype=torch.float64)
        factors = 0.3 * torch.randn(6, 16, 3, generator=pg, dtype=torch.float64) / math.sqrt(3)
        k = torch.randint(6, (n,), generator=g)
        z = torch.randn(n, 3, 1, generator=g, dtype=torch.float64)
        x = means[k] + (factors[k] @ z).squeeze(-1) + 0.05 * torch.randn(n, 16, generator=g, dtype=torch.float64)
        return (x / 1.02).float()
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}.")


# --- 2. model ---------------------------------------------------------------------------------------------------

def _model_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("any_model_mixture_mlp", MODEL_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train(folder: Path, x: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    """Train ``NoiseMLP`` on ``x`` (plain loop); write ``weights.pt``, ``config.json`` and the model file."""
    from vrg_lightning.schedule import NoiseSchedule

    mm = _model_module()
    dim = x.shape[1]
    cfg = {"model": {"dim": dim, "hidden": a.hidden, "depth": a.depth, "temb": 32},
           "features": {"dim": dim, "num_features": a.num_features, "scale": math.sqrt(dim) if dim > 2 else 1.0,
                        "bw_min": 0.1, "bw_max": 1.0, "seed": 1234},
           "schedule": "linear", "prediction_type": "epsilon", "train_steps": a.train_steps,
           "train_batch": a.train_batch, "lr": a.lr, "seed": a.seed}
    torch.manual_seed(a.seed)
    net = mm.NoiseMLP(**cfg["model"])
    sched = NoiseSchedule("linear")
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.train_steps)
    g = torch.Generator().manual_seed(a.seed + 1)
    t_max = sched.num_train_timesteps - 1
    losses = []
    for _ in range(a.train_steps):
        x0 = x[torch.randint(x.shape[0], (a.train_batch,), generator=g)]
        t = torch.rand(a.train_batch, generator=g, dtype=torch.float64) * t_max
        ab = sched.t_to_alpha_bar(t).float()[:, None]
        eps = torch.randn(x0.shape, generator=g)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        loss = ((net(xt, t.float()) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        losses.append(float(loss.detach()))
    torch.save(net.state_dict(), folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copyfile(MODEL_FILE, folder / MODEL_FILE.name)
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_loss": sum(tail) / len(tail), "params": sum(p.numel() for p in net.parameters())}


# --- 3. the CLI -------------------------------------------------------------------------------------------------

def vrg(argv: list[str], log: Path) -> str:
    """``vrg ARGV`` in this process (``vrg_lightning.cli.main``); stdout saved to ``log`` and returned."""
    from vrg_lightning.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([str(v) for v in argv])
    log.write_text(f"$ vrg {' '.join(map(str, argv))}\n{buf.getvalue()}")
    if code != 0:
        raise RuntimeError(f"vrg {argv[0]} exited with {code} (its error is above; command in {log}).")
    return buf.getvalue()


def run_dataset(name: str, a: argparse.Namespace) -> dict[str, Any]:
    folder = Path(a.out) / name
    folder.mkdir(parents=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(a.seed)
    train_x, real_x = make_data(name, a.train_size, g), make_data(name, a.real_size, g)
    torch.save(train_x, folder / "train.pt")
    torch.save(real_x, folder / "real.pt")
    times["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = train(folder, train_x, a)
    times["train"] = time.perf_counter() - t0
    spec, feats = f"{folder.resolve()}/mixture_mlp.py:model", f"{folder.resolve()}/mixture_mlp.py:features"
    model = ["--model", spec, "--schedule", "linear", "--prediction-type", "epsilon"]
    grid = ["--solvers", a.solvers, "--steps", a.steps, "--bases", a.bases]
    threads = [] if a.threads is None else ["--threads", a.threads]
    seeds = ",".join(map(str, a.fresh_seeds))
    stages = [
        ("profile", ["profile", *model, "--data", folder / "train.pt", "--out", folder / "P.pt", "--samples",
                     a.probe_samples, "--device", "cpu", *grid]),
        ("tune", ["tune", "--ckpt", folder / "P.pt", "--model", spec, "--features", feats, "--reference",
                  folder / "real.pt", "--out", folder / "T.pt", *grid, "--num-samples", a.num_samples,
                  "--seeds", ",".join(map(str, a.seeds)), "--confirm-seeds", ",".join(map(str, a.confirm_seeds)),
                  "--batch-size", a.num_samples, "--cache-dir", folder / "cache", *threads]),
        ("inspect", ["inspect", folder / "T.pt", "--json"]),
        ("sample --compare", [
            "sample", "--ckpt", folder / "T.pt", "--model", spec, "--compare", "--solver", a.solvers, "--steps",
            a.steps, "--trajectory", a.bases, "--seeds", seeds, "--num-samples", a.num_samples, "--batch-size",
            a.num_samples, "--reference", folder / "real.pt", "--features", feats, "--out", folder / "compare",
            "--cache-dir", folder / "cache", "--accelerator", "cpu", "--no-progress"]),
    ]
    outputs = {}
    for stage, argv in stages:
        print(f"[{name}] vrg {stage} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        outputs[stage] = vrg(argv, folder / f"{stage.split()[0]}.log")
        times[stage] = time.perf_counter() - t0
    t0 = time.perf_counter()
    floor = floors(folder, spec, feats, name, a)
    times["floors"] = time.perf_counter() - t0
    inspect = json.loads(outputs["inspect"].strip().splitlines()[-1])
    (folder / "inspect.json").write_text(json.dumps(inspect, indent=1))
    rows = json.loads((folder / "compare" / "compare.json").read_text())["rows"]
    return {"dataset": name, "dim": train_x.shape[1], "model": spec, "features": feats, "train": info,
            "seconds": times, "floors": floor, "cells": cells_of(inspect, rows)}


def floors(folder: Path, spec: str, feats: str, name: str, a: argparse.Namespace) -> dict[str, float]:
    """Context for the FIDs (library calls, not the CLI): ``real`` = FID of as many new real samples (one draw per
    fresh seed) against the reference (the FID floor of ``--num-samples``); ``converged`` = the model sampled with
    200 logSNR steps of dpmpp_2m on the fresh seeds (what the model can do when discretisation is negligible)."""
    from vrg_lightning.evaluation import FIDEvaluator, build_features, fid_of, reference_for
    from vrg_lightning.models import load_model
    from vrg_lightning.trajectories import make_trajectory

    den = load_model(folder / "T.pt", model=spec).denoiser
    shape = tuple(den.sample_shape)
    ext = build_features(feats, image_shape=shape)
    ref = reference_for(str(folder / "real.pt"), ext, shape, cache_dir=folder / "cache")
    real = [fid_of(make_data(name, a.num_samples, torch.Generator().manual_seed(10_000 + s)), ext, ref).value
            for s in a.fresh_seeds]
    ev = FIDEvaluator(den, ext, ref, a.num_samples, batch_size=a.num_samples, cache_dir=folder / "cache")
    ab = make_trajectory(den.schedule, "logSNR", 200)
    conv = [ev.fid("dpmpp_2m", ab, s) for s in a.fresh_seeds]
    return {"real": sum(real) / len(real), "converged": sum(conv) / len(conv)}


# --- 4. the table -----------------------------------------------------------------------------------------------

def _choice(entry: dict[str, Any]) -> str:
    v = entry.get("validated") or {}
    if v.get("selected"):
        return str(v.get("candidate"))
    if v.get("candidate"):
        return f"base (best {v['candidate']} not confirmed)"
    return "base (no candidate beat it in screening)"


def cells_of(inspect: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell: the tuned entry (``vrg inspect --json``) joined with its fresh comparison."""
    entries = {(e["solver"], int(e["steps"]), e["base"]): e for e in inspect["entries"]}
    cells = []
    for r in rows:
        e = entries[(r["solver"], int(r["steps"]), r["base"])]
        d = r["difference"]
        v = e.get("validated") or {}
        identical = list(r["alpha_bar_vrg"]) == list(r["alpha_bar_base"])
        verdict = ("better" if d["ci_high"] < 0 else "worse" if d["ci_low"] > 0 else "n.s.")
        cells.append({
            "solver": r["solver"], "steps": int(r["steps"]), "base": r["base"], "selected": bool(v.get("selected")),
            "choice": _choice(e), "tune_diff": v.get("paired_diff"), "tune_ci": [v.get("ci_low"), v.get("ci_high")],
            "fresh_seeds": r["seeds"], "fid_base": sum(r["fid_base"]) / len(r["fid_base"]),
            "fid_tuned": sum(r["fid_vrg"]) / len(r["fid_vrg"]), "diff": d["mean"], "ci": [d["ci_low"], d["ci_high"]],
            "relative": d["relative"], "identical_to_base": identical, "verdict": verdict,
            "cpe_base": r.get("cpe_base"), "cpe_tuned": r.get("cpe_vrg")})
    return cells


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def table(result: dict[str, Any]) -> str:
    lines = [f"### {result['dataset']} ({result['dim']}-d; FID[random Fourier features, "
             f"{len(result['cells'][0]['fresh_seeds'])} fresh seeds])", "",
             "| solver | steps | base | base FID | tuned choice | tuned FID | Δ fresh [95% CI] | Δ % | tune Δ "
             "(confirm) | stored | fresh verdict |",
             "|---|---:|---|---:|---|---:|---|---:|---|---|---|"]
    for c in result["cells"]:
        lo, hi = c["tune_ci"]
        tune = "—" if c["tune_diff"] is None else f"{_g(c['tune_diff'])} [{_g(lo)}, {_g(hi)}]"
        verdict = "= base (identical)" if c["identical_to_base"] else c["verdict"]
        lines.append(f"| {c['solver']} | {c['steps']} | {c['base']} | {_g(c['fid_base'])} | {c['choice']} | "
                     f"{_g(c['fid_tuned'])} | {_g(c['diff'])} [{_g(c['ci'][0])}, {_g(c['ci'][1])}] | "
                     f"{100 * c['relative']:+.1f} | {tune} | {'VRG selected' if c['selected'] else 'base kept'} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def summary(cells: list[dict[str, Any]], label: str) -> str:
    n = len(cells)
    better = sum(c["verdict"] == "better" for c in cells)
    worse = sum(c["verdict"] == "worse" for c in cells)
    kept = sum(not c["selected"] for c in cells)
    return (f"**{label}**: {n} cells; significantly better on fresh seeds: {better}; not significantly different: "
            f"{n - better - worse} ({kept} of them kept the base); significantly worse: {worse}.")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads is not None:
        torch.set_num_threads(max(1, a.threads))
    out = Path(a.out)
    for name in a.datasets:
        if (out / name).exists():
            raise SystemExit(f"any_model.py: --out {a.out!r} already holds {name}/; choose a new --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results = [run_dataset(name, a) for name in a.datasets]
    total = time.perf_counter() - t_all
    parts = ["## Any model: tuned VRG vs base on fresh seeds", "",
             f"Command: `{' '.join(['python', 'benchmarks/any_model.py', *(argv or sys.argv[1:])])}`", ""]
    for r in results:
        parts += [table(r), summary(r["cells"], r["dataset"]), "",
                  f"FID floors (mean over the fresh seeds): {a.num_samples} new real samples "
                  f"{_g(r['floors']['real'])}; the model with 200 logSNR steps of dpmpp_2m "
                  f"{_g(r['floors']['converged'])}.", "",
                  "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
                  + f"; final training loss {r['train']['final_loss']:.4f}", ""]
    parts += [summary([c for r in results for c in r["cells"]], "all datasets"), "",
              f"Total wall time {total:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.processor() or platform.machine()}).", ""]
    text = "\n".join(parts)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"arguments": vars(a), "seconds_total": total, "results": results},
                                                 indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
