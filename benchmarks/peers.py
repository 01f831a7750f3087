"""Peers side by side (issue 13): GITS, DMN and VRG on a model no one here trained, paired FID on fresh seeds.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --threads 1
    python benchmarks/peers.py --datasets gmm16 --train-steps 4000 --num-samples 1000 --out runs/peers_gmm16

The model and data are ``benchmarks/any_model.py``'s (imported, not copied): a mixture dataset (``gmm8``: 8
Gaussians on a circle in 2-d; ``gmm16``: 6 rank-3 Gaussians in 16-d), the MLP noise predictor of
``benchmarks/models/mixture_mlp.py`` trained by a plain PyTorch loop, and its random Fourier features for FID.
Per solver x steps cell:

- **best classic base**: the lowest mean FID on the screening seeds among ``--bases``;
- **GITS** (:func:`vrg_lightning.peers.gits_costs`, one teacher pass shared by all cells) and **DMN**
  (:func:`vrg_lightning.peers.dmn`);
- **VRG on X** for X = the best base, GITS, DMN: ``optimize_trajectory(X, profile.mse_function("fit"),
  OptimizeSettings(lp, objective, solver, alpha_bar_range))`` over lps ``--lps`` x objectives ``paper``/``solver``
  (the probe profile :func:`vrg_lightning.probe.probe_profile` of the training data, shared), then, as ``vrg
  tune`` does, the candidate with the lowest mean FID on the screening seeds, X itself included (so VRG on X may
  keep X);
- every row scored on ``--fresh-seeds`` (disjoint from the screening seeds): mean FID, paired Δ against the best
  base with its 95 % t-interval (:func:`vrg_lightning.evaluation.paired_difference`), and its cost: seconds and
  model evaluations to make the trajectory (selection FIDs included; shared passes marked).

Prints a markdown table per cell and, plainly, for every cell whether each peer (GITS, DMN) beats the cell's best
VRG row on the fresh seeds (paired interval below 0), is beaten by it, or neither. ``--out DIR`` (which must not
hold the datasets' folders yet) also writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent


def _csv(cast: type):
    def parse(text: str) -> tuple:
        return tuple(cast(v) for v in text.split(",") if v.strip())
    return parse


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", type=_csv(str), default=("gmm8", "gmm16"), help="comma list of gmm8, gmm16")
    p.add_argument("--out", default=None, help="folder for the model files and results (default: a temporary one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--train-steps", type=int, default=8000)
    p.add_argument("--solvers", type=_csv(str), default=("ddim", "dpmpp_2m"))
    p.add_argument("--steps", type=_csv(int), default=(5, 10))
    p.add_argument("--bases", type=_csv(str), default=("time_uniform", "time_quadratic", "logSNR", "karras"))
    p.add_argument("--lps", type=_csv(float), default=(0.01, 0.03, 0.1, 0.3))
    p.add_argument("--num-samples", type=int, default=2000, help="samples per FID")
    p.add_argument("--screen-seeds", type=_csv(int), default=(0, 1, 2))
    p.add_argument("--fresh-seeds", type=_csv(int), default=tuple(range(1000, 1008)))
    p.add_argument("--gits-noises", type=int, default=256)
    p.add_argument("--probe-samples", type=int, default=4096)
    a = p.parse_args(argv)
    if not a.datasets or set(a.datasets) - {"gmm8", "gmm16"}:
        p.error(f"--datasets must be a comma list of gmm8, gmm16; got {','.join(a.datasets)!r}")
    if set(a.screen_seeds) & set(a.fresh_seeds) or len(a.fresh_seeds) < 2:
        p.error("--fresh-seeds must hold >= 2 seeds, disjoint from --screen-seeds")
    return a


def _any_model():
    """``benchmarks/any_model.py`` as a module (its data and training loop)."""
    spec = importlib.util.spec_from_file_location("bench_any_model", ROOT / "any_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(folder: Path, dataset: str, a: argparse.Namespace) -> dict[str, Any]:
    """Data, the trained MLP as a denoiser, FID features and reference statistics, the probe profile."""
    from vrg_lightning.evaluation import build_features, feature_stats
    from vrg_lightning.models import ModuleDenoiser
    from vrg_lightning.probe import probe_profile
    from vrg_lightning.schedule import NoiseSchedule

    am = _any_model()
    g = torch.Generator().manual_seed(0)
    train_x, real_x = am.make_data(dataset, 20000, g), am.make_data(dataset, 10000, g)
    targs = argparse.Namespace(hidden=128, depth=3, num_features=64, train_steps=a.train_steps, train_batch=512,
                               lr=2e-3, seed=0)
    t0 = time.perf_counter()
    info = am.train(folder, train_x, targs)
    train_s = time.perf_counter() - t0
    mm = am._model_module()
    den = ModuleDenoiser(mm.model(folder), NoiseSchedule("linear"), "epsilon", (train_x.shape[1],),
                         spec=f"{dataset}-mixture_mlp").eval()
    ext = build_features(mm.features(folder), image_shape=(train_x.shape[1],))
    t0 = time.perf_counter()
    profile = probe_profile(den, train_x, den.schedule, num_samples=a.probe_samples)
    return {"den": den, "ext": ext, "ref": feature_stats(real_x, ext), "profile": profile, "train": info,
            "train_seconds": train_s, "probe_seconds": time.perf_counter() - t0, "probe_evals": a.probe_samples}


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def choose(ev: Any, solver: str, cands: dict[str, torch.Tensor], seeds: tuple[int, ...]) -> str:
    """The candidate with the lowest mean FID over ``seeds`` (ties: the first)."""
    return min(cands, key=lambda k: _mean(ev.fids(solver, cands[k], seeds)))


def vrg_on(ctx: dict[str, Any], ev: Any, solver: str, base: torch.Tensor, a: argparse.Namespace
           ) -> tuple[torch.Tensor, str, float, int]:
    """VRG on ``base``: the tune-like choice among ``base`` and its optimisations; (trajectory, label, s, evals)."""
    from vrg_lightning.optimize import OptimizeSettings, optimize_trajectory, schedule_range
    from vrg_lightning.variance import DDIM_LIKE

    t0, n0 = time.perf_counter(), ev.nfe
    mse = ctx["profile"].mse_function("fit")
    cands: dict[str, torch.Tensor] = {"kept": base}
    for lp in a.lps:
        for obj in ("paper",) if solver in DDIM_LIKE else ("paper", "solver"):
            st = OptimizeSettings(lp=lp, objective=obj, solver=solver, alpha_bar_range=schedule_range(
                ctx["den"].schedule))
            ab = optimize_trajectory(base, mse, st).alpha_bar
            if not any(torch.equal(ab, c) for c in cands.values()):
                cands[f"{obj}:lp={lp:g}"] = ab
    label = choose(ev, solver, cands, a.screen_seeds)
    return cands[label], label, time.perf_counter() - t0, ev.nfe - n0


def run_cell(ctx: dict[str, Any], ev: Any, gcosts: Any, solver: str, steps: int, a: argparse.Namespace
             ) -> list[dict[str, Any]]:
    from vrg_lightning.evaluation import paired_difference
    from vrg_lightning.peers import dmn, gits_from_costs
    from vrg_lightning.trajectories import make_trajectory

    sched = ctx["den"].schedule
    rows: list[dict[str, Any]] = []

    def add(name: str, ab: torch.Tensor, choice: str, seconds: float, evals: int, shared: str = "") -> None:
        rows.append({"row": name, "choice": choice, "alpha_bar": ab.tolist(), "seconds": seconds, "evals": evals,
                     "shared": shared, "fids": ev.fids(solver, ab, a.fresh_seeds)})

    t0, n0 = time.perf_counter(), ev.nfe
    bases = {b: make_trajectory(sched, b, steps) for b in a.bases}
    best = choose(ev, solver, bases, a.screen_seeds)
    add("best classic base", bases[best], best, time.perf_counter() - t0, ev.nfe - n0)
    g = gits_from_costs(gcosts, solver, steps)
    add("GITS", g.alpha_bar, f"grid {g.provenance['grid_indices']}", g.provenance["seconds"],
        g.provenance["model_evaluations"], "teacher pass shared by all cells")
    d = dmn(sched, solver, steps)
    add("DMN", d.alpha_bar, f"bound {d.provenance['bound_before']:.3g} -> {d.provenance['bound_after']:.3g}",
        d.provenance["seconds"], 0)
    probe = f"+ probe ({ctx['probe_evals']} evals, {ctx['probe_seconds']:.2f} s) shared"
    for name, base in (("best base", bases[best]), ("GITS", g.alpha_bar), ("DMN", d.alpha_bar)):
        ab, label, sec, evals = vrg_on(ctx, ev, solver, base, a)
        add(f"VRG on {name}", ab, label, sec, evals, probe)
    ref = rows[0]["fids"]
    for r in rows:
        r["fid"] = _mean(r["fids"])
        r["diff"] = paired_difference(ref, r["fids"]).to_dict()
    return rows


def _verdict(d: dict[str, Any]) -> str:
    return "better" if d["ci_high"] < 0 else "worse" if d["ci_low"] > 0 else "n.s."


def table(solver: str, steps: int, rows: list[dict[str, Any]], n_fresh: int) -> str:
    lines = [f"### {solver}, {steps} steps (FID mean over {n_fresh} fresh seeds; Δ = row - best base)", "",
             "| trajectory | choice | FID | Δ [95% CI] | vs base | seconds | model evals |",
             "|---|---|---:|---|---|---:|---:|"]
    for r in rows:
        d = r["diff"]
        ci = "—" if r is rows[0] else f"{d['mean']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
        cost = f"{r['evals']}" + (f" ({r['shared']})" if r["shared"] else "")
        lines.append(f"| {r['row']} | {r['choice']} | {r['fid']:.4g} | {ci} | {'' if r is rows[0] else _verdict(d)} "
                     f"| {r['seconds']:.2f} | {cost} |")
    return "\n".join(lines) + "\n"


def peers_vs_vrg(cells: list[tuple[str, int, list[dict[str, Any]]]]) -> str:
    """One plain line per cell: each peer against the cell's best VRG row (paired over the fresh seeds)."""
    from vrg_lightning.evaluation import paired_difference

    out = []
    for solver, steps, rows in cells:
        vrg = min((r for r in rows if r["row"].startswith("VRG")), key=lambda r: r["fid"])
        winner = min(rows, key=lambda r: r["fid"])
        parts = []
        for peer in (r for r in rows if r["row"] in ("GITS", "DMN")):
            d = paired_difference(vrg["fids"], peer["fids"])
            who = (f"**{peer['row']} beats VRG**" if d.ci_high < 0 else f"{peer['row']} is worse than VRG"
                   if d.ci_low > 0 else f"{peer['row']} and VRG do not differ significantly")
            parts.append(f"{who} (Δ {d.mean:+.4g} [{d.ci_low:+.4g}, {d.ci_high:+.4g}])")
        out.append(f"- {solver} {steps}: best VRG row {vrg['row']} ({vrg['fid']:.4g}); " + "; ".join(parts)
                   + f"; lowest mean FID: {winner['row']} ({winner['fid']:.4g}).")
    return "\n".join(out)


def run_dataset(dataset: str, root: Path, a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Build, run every cell, and the markdown section of one dataset."""
    from vrg_lightning.evaluation import FIDEvaluator
    from vrg_lightning.peers import GITSSettings, gits_costs

    t0 = time.perf_counter()
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=False)
    ctx = build(folder, dataset, a)
    ev = FIDEvaluator(ctx["den"], ctx["ext"], ctx["ref"], a.num_samples, batch_size=a.num_samples)
    gcosts = gits_costs(ctx["den"], GITSSettings(num_noises=a.gits_noises))
    cells = [(s, k, run_cell(ctx, ev, gcosts, s, k, a)) for s in a.solvers for k in a.steps]
    seconds = time.perf_counter() - t0
    text = "\n".join([
        f"## {dataset}: peers vs VRG on a model no one here trained", "",
        *(table(s, k, rows, len(a.fresh_seeds)) for s, k, rows in cells),
        "Each peer against the cell's best VRG row (paired over the fresh seeds):", "", peers_vs_vrg(cells), "",
        f"Model: final training loss {ctx['train']['final_loss']:.4f} after {a.train_steps} steps "
        f"({ctx['train_seconds']:.1f} s); probe {ctx['probe_evals']} evaluations ({ctx['probe_seconds']:.2f} s); "
        f"GITS teacher pass {gcosts.provenance['seconds']:.2f} s, {gcosts.provenance['model_evaluations']} model "
        f"evaluations; {dataset} wall time {seconds:.1f} s.", ""])
    return text, {"dataset": dataset, "seconds": seconds, "cells": [
        {"solver": s, "steps": k, "rows": rows} for s, k, rows in cells]}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads is not None:
        torch.set_num_threads(max(1, a.threads))
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if a.out is None else None
    root = Path(tmp.name if tmp else a.out)
    results = [run_dataset(d, root, a) for d in a.datasets]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([f"Command: `python benchmarks/peers.py {command}`", "", *(t for t, _ in results),
                      f"Total wall time {time.perf_counter() - t_all:.1f} s ({torch.get_num_threads()} threads).", ""])
    print(text)
    if a.out is not None:
        (root / "results.md").write_text(text)
        (root / "results.json").write_text(json.dumps({"arguments": vars(a), "results": [r for _, r in results]},
                                                      indent=1, default=str))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
