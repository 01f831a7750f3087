"""Sample quality: VRG candidates vs their base, the validated choice on fresh seeds, and why VRG loses.

    python benchmarks/quality.py --ckpt runs/digits/checkpoints/last.ckpt --dataset digits --grid small \\
        --out runs/quality/digits
    python benchmarks/quality.py --ckpt runs/patches/checkpoints/last.ckpt --dataset patches --features pixels \\
        --grid full --out runs/quality/patches
    python benchmarks/quality.py ... --report         # only print the markdown of the finished cells

Per (solver, steps, base) cell, resumable (one JSON per cell, written atomically; a rerun skips finished cells and
reuses the cached feature statistics of every (trajectory, seed)):

1. grid: every VRG candidate of :func:`vrg_lightning.evaluation.make_candidates` (lp x objective x start free/pinned,
   and the damped + discretisation-aware ``disc`` candidates for DDIM) against the base, paired FID over ``--seeds``
   (same initial noise per seed), mean difference with its t-interval (``evaluation.paired_difference``);
2. validated selection (:func:`vrg_lightning.evaluation.tune_cell`): screening = the grid seeds, confirmation on
   ``--confirm-seeds``; then the chosen trajectory vs the base once more on ``--fresh-seeds`` (not used for tuning);
3. for DDIM-like solvers, ``--analysis``: the measured discretisation error ``E‖x̂₀ - x₀^ref‖²/d`` (vs a 200-step
   reference from the same noise and the same start ᾱ) of the base and of each candidate, and its prediction.

Grids: ``smoke`` (one 4-step ddim cell, 2 lps; the CI test on a tiny model), ``small`` (ddim, dpmpp_2m; 10 steps; 4
bases; lp 0.01, 0.1; start free and pinned), ``full`` (ddim, dpmsolver2, dpmsolver3, dpmpp_2m, pndm, deis x 10, 20
steps x 4 bases x lp 0.01, 0.03, 0.1, 0.3 x paper, solver; start free as in the paper, lambda 100; plus ``disc`` for
DDIM). ``--pin-start`` overrides a grid's start setting.

Peers (issue 13): ``--peers gits,dmn`` adds each peer's trajectory and VRG on top of it to every cell's candidates
(GITS from the checkpoint's model, one teacher pass for all cells); ``--side-by-side`` (implies ``--peers gits,dmn``)
then writes, per solver x steps, the best classic base (lowest screening FID), GITS, DMN, VRG on the best base, VRG
on each peer (each the lowest screening FID of its kind) and the tuned choice of the best base's cell, all measured
once more on ``--fresh-seeds``: paired Δ against the best base with t-intervals, the tuned choice against the best
peer, and the cost of each (seconds and model evaluations to make the trajectory).

    python benchmarks/quality.py --ckpt CKPT --dataset digits --grid small --side-by-side --out runs/side/digits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from statistics import fmean as mean
from typing import Any

import torch

from vrg_lightning.evaluation import (
    PIN_CHOICES,
    Candidate,
    FIDEvaluator,
    TuneSettings,
    default_features,
    make_candidates,
    measure_curvature,
    median,
    paired_difference,
    spearman,
    tune_cell,
)
from vrg_lightning.io import atomic_write_json, atomic_write_text

GRIDS: dict[str, dict[str, Any]] = {
    "smoke": {"solvers": ("ddim",), "steps": (4,), "bases": ("time_uniform",), "lps": (0.03, 0.1),
              "objectives": ("paper",)},
    "small": {"solvers": ("ddim", "dpmpp_2m"), "steps": (10,), "bases": ("time_uniform", "time_quadratic", "logSNR",
              "karras"), "lps": (0.01, 0.1), "objectives": ("paper", "solver")},
    "full": {"solvers": ("ddim", "dpmsolver2", "dpmsolver3", "dpmpp_2m", "pndm", "deis"), "steps": (10, 20),
             "bases": ("time_uniform", "time_quadratic", "logSNR", "karras"), "lps": (0.01, 0.03, 0.1, 0.3),
             "objectives": ("paper", "solver"), "pin_start": "free"},
}


def _csv(text: str | None, cast: type) -> tuple | None:
    return None if text is None else tuple(cast(v) for v in text.split(",") if v.strip())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", default="digits", help="reference images: digits, patches, ...")
    p.add_argument("--features", default=None, help="digits (1 channel default) or pixels (RGB default)")
    p.add_argument("--grid", choices=tuple(GRIDS), default="small")
    p.add_argument("--solvers"), p.add_argument("--steps"), p.add_argument("--bases"), p.add_argument("--lps")
    p.add_argument("--objectives")
    p.add_argument("--peers", default=None, help="peer candidates, comma list of gits,dmn (default: none)")
    p.add_argument("--side-by-side", action="store_true", help="the peers table on fresh seeds (module docstring)")
    p.add_argument("--pin-start", default=None, choices=PIN_CHOICES,
                   help="start free (lambda), pinned, or both (default: the grid's, else both)")
    p.add_argument("--reg-lambda", type=float, default=100.0)
    p.add_argument("--no-fix", action="store_true")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--confirm-seeds", default="10,11,12,13,14")
    p.add_argument("--fresh-seeds", default="20,21,22")
    p.add_argument("--converged-steps", type=int, default=200,
                   help="FID floor: a DPM-Solver++(2M) logSNR sampler with this many steps on the fresh seeds (0: off)")
    p.add_argument("--analysis", action="store_true", help="measure discretisation errors (DDIM-like cells)")
    p.add_argument("--analysis-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="results folder (cells/*.json, stats/, summary.md)")
    p.add_argument("--report", action="store_true", help="only write/print the summary of finished cells")
    return p.parse_args(argv)


def settings_of(a: argparse.Namespace, channels: int) -> TuneSettings:
    g = dict(GRIDS[a.grid])
    for k, cast in (("solvers", str), ("steps", int), ("bases", str), ("lps", float), ("objectives", str)):
        v = _csv(getattr(a, k), cast)
        if v:
            g[k] = v
    grid_pin = g.pop("pin_start", "both")
    pin = a.pin_start or grid_pin
    peers = _csv(a.peers, str) or (("gits", "dmn") if a.side_by_side else ())
    return TuneSettings.from_dict({**g, "pin_start": pin, "peers": peers, "reg_lambda": a.reg_lambda,
                                   "fix": not a.no_fix, "num_samples": a.num_samples,
                                   "screen_seeds": _csv(a.seeds, int), "confirm_seeds": _csv(a.confirm_seeds, int),
                                   "features": default_features(a.features or "auto", channels),
                                   "batch_size": a.batch_size, "curvature_samples": 32, "curvature_steps": 100})


def analysis(denoiser: Any, solver: str, cands: list, curvature: Any, mse_fn: Any, n: int) -> list[dict[str, Any]]:
    """Measured vs predicted error of each candidate (DDIM-like): discretisation vs a 200-step reference from the
    candidate's own start, and the start ᾱ."""
    from vrg_lightning.optimize.discretization import (
        damped_cpe,
        disc_error,
        discretization_error,
        reference_trajectory,
    )
    from vrg_lightning.sampling import image_shape, initial_noise
    from vrg_lightning.variance import cpe_paper

    x, _ = initial_noise(999, 0, n, image_shape(denoiser))
    eps = denoiser.eps_fn(None)
    rows = []
    for c in cands:
        ab = c.tensor
        ref = reference_trajectory(ab, 100)
        with torch.no_grad():
            rows.append({"label": c.label, "start_alpha_bar": float(ab[-1]),
                         "disc_measured": discretization_error(eps, x, ab, solver, ref),
                         "disc_coherent": float(disc_error(ab, curvature, "coherent")),
                         "disc_independent": float(disc_error(ab, curvature, "independent")),
                         "disc_damped": float(disc_error(ab, curvature, "coherent", curvature.data_var)),
                         "cpe_paper": float(cpe_paper(ab, mse_fn)),
                         "cpe_damped": float(damped_cpe(ab, mse_fn, curvature.data_var))})
    return rows


def candidates(path: Path, schedule: Any, profile: Any, st: TuneSettings, solver: str, steps: int, base: str,
               curvature: Any, cache: dict, model: Any = None, peer_cache: dict | None = None) -> list[Candidate]:
    """``make_candidates``, kept in ``path`` (JSON, atomic) so that a rerun (e.g. with other selection settings)
    reuses the optimised trajectories instead of optimising again."""
    keys = ("lps", "objectives", "pin_start", "reg_lambda", "trust", "mse_mode", "fix", "peers")
    made_with = {k: v for k, v in st.to_dict().items() if k in keys}
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("settings") == made_with:
            return [Candidate(c["label"], c["kind"], tuple(c["alpha_bar"]), c["info"]) for c in d["candidates"]]
    cands = make_candidates(schedule, profile, solver, steps, base, st, curvature, cache, model=model,
                            peer_cache=peer_cache)
    atomic_write_json(path, {"settings": made_with, "candidates": [
        {"label": c.label, "kind": c.kind, "alpha_bar": list(c.alpha_bar), "info": c.info} for c in cands]})
    return cands


def run_cell(ev: FIDEvaluator, den: Any, schedule: Any, profile: Any, st: TuneSettings, solver: str, steps: int,
             base: str, curvature: Any, fresh: tuple[int, ...], do_analysis: bool, analysis_n: int,
             cache: dict, cand_path: Path, peer_cache: dict | None = None) -> dict[str, Any]:
    from vrg_lightning.variance import DDIM_LIKE

    t0, nfe0 = time.perf_counter(), ev.nfe
    cands = candidates(cand_path, schedule, profile, st, solver, steps, base, curvature, cache, den, peer_cache)
    chosen, rec = tune_cell(ev, solver, cands, st)
    out: dict[str, Any] = {"solver": solver, "steps": steps, "base": base, "validated": rec, "chosen": chosen.label}
    fb = ev.fids(solver, cands[0].alpha_bar, st.screen_seeds)
    rows = []
    for c in cands[1:]:
        fc = ev.fids(solver, c.alpha_bar, st.screen_seeds)
        d = paired_difference(fb, fc, st.confidence)
        cb, ca = c.info.get("cpe_before"), c.info.get("cpe_after")
        rows.append({"label": c.label, "kind": c.kind, "objective": c.info.get("objective"), "lp": c.info.get("lp"),
                     "pin_start": c.info.get("pin_start"), "fid_base": fb, "fid": fc, "diff": d.to_dict(),
                     "cpe_before": cb, "cpe_after": ca,
                     "start_move": float(c.alpha_bar[-1] / cands[0].alpha_bar[-1] - 1)})
    out["rows"] = rows
    if chosen.kind == "base":  # the tuned trajectory is the base: identical samples on any seed
        out["fresh"] = {"seeds": list(fresh), "fid_base": None, "fid_tuned": None,
                        "diff": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "relative": 0.0, "n": len(fresh)}}
    else:
        fbf, ftf = ev.fids(solver, cands[0].alpha_bar, fresh), ev.fids(solver, chosen.alpha_bar, fresh)
        out["fresh"] = {"seeds": list(fresh), "fid_base": fbf, "fid_tuned": ftf,
                        "diff": paired_difference(fbf, ftf, st.confidence).to_dict()}
    if do_analysis and solver in DDIM_LIKE and curvature is not None:
        out["analysis"] = analysis(den, solver, cands, curvature, profile.mse_function(st.mse_mode), analysis_n)
    out["seconds"], out["image_evaluations"] = time.perf_counter() - t0, ev.nfe - nfe0
    return out


def _f(x: float | None, d: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _medians_by_steps(values: dict[int, list[float]]) -> str:
    return ", ".join(f"{n} steps {100 * median(v):.1f}% over {len(v)} cells" for n, v in sorted(values.items()))


def summary(cells: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: per cell the base FID, the best grid candidate, the tuned choice on fresh seeds; all grid rows;
    Spearman(cpe reduction, FID change); medians."""
    lines = [f"Checkpoint `{meta.get('ckpt')}`, dataset `{meta.get('dataset')}`, features `{meta.get('features')}`, "
             f"{meta.get('num_samples')} images per FID, grid seeds {meta.get('seeds')}, confirmation seeds "
             f"{meta.get('confirm_seeds')}, fresh seeds {meta.get('fresh_seeds')}.", "",
             "| solver | steps | base | FID base | best candidate | Δ best (95% CI) | tuned choice | Δ tuned on fresh "
             "seeds (95% CI) | relative |", "|---|---:|---|---:|---|---|---|---|---:|"]
    rel_by_steps: dict[int, list[float]] = {}
    x, y = [], []
    for c in cells:
        rows = c["rows"]
        fb = sum(c["validated"]["fid_base_screen"]) / len(c["validated"]["fid_base_screen"])
        best = min(rows, key=lambda r: r["diff"]["mean"]) if rows else None
        fr = c["fresh"]["diff"]
        rel_by_steps.setdefault(int(c["steps"]), []).append(-fr["relative"])
        lines.append(f"| {c['solver']} | {c['steps']} | {c['base']} | {_f(fb)} | {best['label'] if best else '—'} | "
                     f"{_f(best['diff']['mean']) if best else '—'} [{_f(best['diff']['ci_low']) if best else ''}, "
                     f"{_f(best['diff']['ci_high']) if best else ''}] | {c['chosen']} | {_f(fr['mean'])} "
                     f"[{_f(fr['ci_low'])}, {_f(fr['ci_high'])}] | {_f(100 * fr['relative'], 1)}% |")
        for r in rows:
            if r["cpe_before"] and r["cpe_after"] is not None and r["kind"] == "vrg":
                x.append(r["cpe_after"] / r["cpe_before"] - 1)
                y.append(r["diff"]["relative"])
    fresh = [c["fresh"]["diff"] for c in cells]
    conv = meta.get("converged")
    if conv:
        floor = sum(conv["fids"]) / len(conv["fids"])
        ex_by_steps: dict[int, list[float]] = {}
        for c in cells:
            fb = c["fresh"].get("fid_base")
            excess = sum(fb) / len(fb) - floor if fb else None
            if excess is not None and excess <= 0:
                continue  # the base is already at the floor: nothing measurable to remove
            ex_by_steps.setdefault(int(c["steps"]), []).append(0.0 if excess is None
                                                                else -c["fresh"]["diff"]["mean"] / excess)
        lines += ["", f"FID floor at this sample count: {conv['steps']}-step {conv['solver']} ({conv['base']}) on the "
                  f"fresh seeds, {floor:.2f} (per seed {', '.join(f'{v:.2f}' for v in conv['fids'])}). Median share "
                  "of the base's excess FID (FID_base − floor, fresh seeds) removed by the tuned choice: "
                  + _medians_by_steps(ex_by_steps)
                  + " (cells whose base is at or below the floor left out; a kept base counts 0 %)."]
    medians = _medians_by_steps(rel_by_steps)
    selected = sum(not c["chosen"].startswith("base:") for c in cells)
    lines += ["", "Median relative FID reduction of the tuned choice on fresh seeds (a kept base counts 0 %): "
              f"{medians}.", f"VRG selected in {selected} of {len(cells)} cells; on the fresh seeds the tuned choice "
              "has mean Δ ≤ 0 in "
              f"{sum(d['mean'] <= 0 for d in fresh)}/{len(cells)} cells, a 95% CI below 0 in "
              f"{sum(d['ci_high'] < 0 for d in fresh)} and above 0 (significantly worse) in "
              f"{sum(d['ci_low'] > 0 for d in fresh)}."]
    rho, p = spearman(x, y)
    lines += [f"Spearman over all VRG grid rows ({len(x)}) between relative cpe change and relative FID change: "
              f"ρ = {_f(rho, 3)} (p = {_f(p, 3)})."]
    return "\n".join(lines) + "\n"


def rows_md(cells: list[dict[str, Any]]) -> str:
    """Markdown: every grid row, and the discretisation-error analysis of the cells that have one."""
    lines = ["All grid rows (Δ = FID_candidate − FID_base, mean over paired seeds, 95% t-interval; start = relative "
             "change of the noisiest ᾱ):", "", "| cell | candidate | Δ | 95% CI | relative | cpe change | start |",
             "|---|---|---:|---|---:|---:|---:|"]
    for c in cells:
        for r in c["rows"]:
            d = r["diff"]
            cpe = (r["cpe_after"] / r["cpe_before"] - 1) if r["cpe_before"] else None
            lines.append(f"| {c['solver']}/{c['steps']}/{c['base']} | {r['label']} | {_f(d['mean'])} | "
                         f"[{_f(d['ci_low'])}, {_f(d['ci_high'])}] | {_f(100 * d['relative'], 1)}% | "
                         f"{_f(None if cpe is None else 100 * cpe, 1)}% | {_f(100 * r['start_move'], 1)}% |")
    an = [c for c in cells if c.get("analysis")]
    if an:
        lines += ["", "Discretisation error (measured vs a 100-step DPM-Solver++(2M) reference from the same noise and "
                  "start; predictions from G(λ)):", "", "| cell | trajectory | start ᾱ | measured | coherent | "
                  "independent | coherent damped | cpe paper | cpe damped |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in an:
            for r in c["analysis"]:
                lines.append(f"| {c['solver']}/{c['steps']}/{c['base']} | {r['label']} | {r['start_alpha_bar']:.3g} | "
                             f"{r['disc_measured']:.4g} | {r['disc_coherent']:.4g} | {r['disc_independent']:.4g} | "
                             f"{r.get('disc_damped', math.nan):.4g} | {r['cpe_paper']:.4g} | {r['cpe_damped']:.4g} |")
    return "\n".join(lines) + "\n"


def _half_width(r: dict[str, Any]) -> float:
    """Half-width of a grid row's paired-difference interval relative to the mean base FID."""
    return (r["diff"]["ci_high"] - r["diff"]["ci_low"]) / 2 / (sum(r["fid_base"]) / len(r["fid_base"]))


def aggregates(cells: list[dict[str, Any]]) -> str:
    """Markdown: grid rows grouped by candidate setting and by solver x steps (median relative Δ, how many rows are
    significantly better / worse than the base at the rows' confidence)."""
    def table(title: str, key: Any) -> list[str]:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for c in cells:
            for r in c["rows"]:
                groups.setdefault(key(c, r), []).append(r)
        out = [f"| {title} | rows | median relative Δ | significantly better | significantly worse | median CI "
               "half-width | half-width ≤ 5% |", "|---|---:|---:|---:|---:|---:|---:|"]
        for k in sorted(groups, key=str):
            ds = [r["diff"] for r in groups[k]]
            hw = [_half_width(r) for r in groups[k]]
            out.append(f"| {k} | {len(ds)} | {100 * median([d['relative'] for d in ds]):.1f}% | "
                       f"{sum(d['ci_high'] < 0 for d in ds)} | {sum(d['ci_low'] > 0 for d in ds)} | "
                       f"{100 * median(hw):.1f}% | {sum(h <= 0.05 for h in hw)}/{len(hw)} |")
        return out

    lines = table("candidate (objective, lp, start)", lambda c, r: r["label"].replace("solver", "solver-aware")
                  if c["solver"] not in ("ddim", "dpmsolver1") else r["label"])
    lines += [""] + table("solver / steps", lambda c, r: f"{c['solver']} / {c['steps']}")
    return "\n".join(lines) + "\n"


SIDE_ROWS = ("best base", "GITS", "DMN", "VRG on best base", "VRG on GITS", "VRG on DMN", "tuned")


def _cost(c: Candidate) -> tuple[float, int]:
    """Seconds and model evaluations that made a candidate's trajectory: its peer's (provenance) plus VRG's
    optimisation (which needs the stored error profile, no model call)."""
    prov = c.info.get("base_provenance") or {}
    vrg = float(c.info.get("seconds") or 0.0) if c.kind in ("vrg", "disc") else 0.0
    return float(prov.get("seconds", 0.0)) + vrg, int(prov.get("model_evaluations", 0))


def side_by_side(ev: FIDEvaluator, st: TuneSettings, solver: str, steps: int, cells: dict[str, dict],
                 cands: dict[str, list[Candidate]], fresh: tuple[int, ...]) -> dict[str, Any]:
    """One solver x steps: :data:`SIDE_ROWS` (each the lowest screening FID of its kind in the best base's cell) on
    ``fresh`` seeds against the best base, the tuned choice against the best peer, and the cost of each."""
    best = min(cells, key=lambda b: mean(cells[b]["validated"]["fid_base_screen"]))
    cs = cands[best]

    def pick(pred: Any) -> Candidate | None:
        return min((c for c in cs if pred(c)), key=lambda c: mean(ev.fids(solver, c.alpha_bar, st.screen_seeds)),
                   default=None)

    chosen = {"best base": cs[0], "GITS": pick(lambda c: c.label == "peer:gits"),
              "DMN": pick(lambda c: c.label == "peer:dmn"),
              "VRG on best base": pick(lambda c: c.kind == "vrg" and "peer" not in c.info),
              "VRG on GITS": pick(lambda c: c.kind == "vrg" and c.info.get("peer") == "gits"),
              "VRG on DMN": pick(lambda c: c.kind == "vrg" and c.info.get("peer") == "dmn"),
              "tuned": next(c for c in cs if c.label == cells[best]["chosen"])}
    fb = ev.fids(solver, cs[0].alpha_bar, fresh)
    rows: dict[str, Any] = dict.fromkeys(chosen)
    for name, c in ((k, c) for k, c in chosen.items() if c is not None):  # None: e.g. DMN, solver not covered
        f = ev.fids(solver, c.alpha_bar, fresh)
        secs, nfe = _cost(c)
        rows[name] = {"label": c.label, "fid": f, "mean": mean(f), "seconds": secs, "model_evaluations": nfe,
                      "diff": paired_difference(fb, f, st.confidence).to_dict()}
    rows["tuned"]["tuning"] = {"seconds": cells[best]["seconds"], "image_evaluations": cells[best]["image_evaluations"]}
    bp = min((rows[k] for k in ("GITS", "DMN") if rows[k] is not None), key=lambda r: r["mean"], default=None)
    vs_peer = None if bp is None else {"peer": bp["label"], **paired_difference(bp["fid"], rows["tuned"]["fid"],
                                                                                 st.confidence).to_dict()}
    winner = min((k for k in SIDE_ROWS[:-1] if rows[k] is not None), key=lambda k: rows[k]["mean"])
    return {"solver": solver, "steps": steps, "best_base": best, "seeds": list(fresh), "rows": rows,
            "tuned_vs_best_peer": vs_peer, "winner": winner}


def side_md(groups: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown of :func:`side_by_side`: mean FID on the fresh seeds and Δ vs the best base (95% CI), the tuned
    choice against the best peer, the winner; then the cost of each; then the counts the issue asks for."""
    head = " | ".join(SIDE_ROWS)
    lines = [f"Dataset `{meta.get('dataset')}`, features `{meta.get('features')}`, {meta.get('num_samples')} images "
             f"per FID, fresh seeds {meta.get('fresh_seeds')} (screening {meta.get('seeds')}). Each entry: mean FID on "
             "the fresh seeds, then Δ vs the best base [95% CI].", "",
             f"| solver | steps | {head} | tuned − best peer [95% CI] | winner |",
             "|---|---:|" + "---|" * (len(SIDE_ROWS) + 2)]
    costs = [f"| solver | steps | {head} |", "|---|---:|" + "---|" * len(SIDE_ROWS)]
    worse = vrg_wins = 0
    for g in groups:
        cells, cost = [], []
        for k in SIDE_ROWS:
            r = g["rows"][k]
            if r is None:
                cells.append("—")
                cost.append("—")
                continue
            d = r["diff"]
            name = f"{g['best_base']}: " if k == "best base" else (f"{r['label']}: " if k == "tuned" else "")
            cells.append(f"{name}{_f(r['mean'])} ({_f(d['mean'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}])")
            extra = (f"; cell {r['tuning']['seconds']:.0f} s, {r['tuning']['image_evaluations']:,} image NFE"
                     if k == "tuned" else "")
            cost.append(f"{r['seconds']:.2f} s, {r['model_evaluations']:,} NFE{extra}")
        v = g["tuned_vs_best_peer"]
        worse += bool(v and v["ci_low"] > 0)
        vrg_wins += g["winner"].startswith("VRG")
        vp = "—" if v is None else f"{_f(v['mean'])} [{_f(v['ci_low'])}, {_f(v['ci_high'])}] vs {v['peer']}"
        lines.append(f"| {g['solver']} | {g['steps']} | {' | '.join(cells)} | {vp} | {g['winner']} |")
        costs.append(f"| {g['solver']} | {g['steps']} | {' | '.join(cost)} |")
    peer_wins = [f"{g['solver']}/{g['steps']} ({g['winner']})" for g in groups if g["winner"] in ("GITS", "DMN")]
    lines += ["", "Cost of making each trajectory (seconds, model evaluations; VRG's optimisation uses the stored "
              "error profile; the tuned choice adds its cell's grid + validation):", "", *costs, "",
              f"Tuned choice significantly worse than the best peer (95% CI above 0) in {worse} of {len(groups)} "
              f"cells; VRG (alone or on a peer) has the lowest fresh FID in {vrg_wins} of {len(groups)}; a peer "
              f"alone in {len(peer_wins)}{': ' + ', '.join(peer_wins) if peer_wins else ''}."]
    return "\n".join(lines) + "\n"


def gaussianity_md(profile: Any, every: int = 10) -> str:
    g = profile.gaussianity()
    lines = ["| λ | ᾱ | MSE | mean | skewness | excess kurtosis |", "|---:|---:|---:|---:|---:|---:|"]
    for i in range(0, len(g["lambda"]), every):
        lines.append(f"| {g['lambda'][i]:.2f} | {g['alpha_bar'][i]:.3g} | {g['mse'][i]:.3g} | {g['mean'][i]:.2g} | "
                     f"{g.get('skewness', [math.nan] * (i + 1))[i]:.2f} | "
                     f"{g.get('excess_kurtosis', [math.nan] * (i + 1))[i]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vrg_lightning.checkpoint import load_denoiser
    from vrg_lightning.evaluation import build_features, reference_for
    from vrg_lightning.profile import ErrorProfile
    from vrg_lightning.sampling import image_shape

    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    den, vrg = load_denoiser(a.ckpt)
    if vrg is None:
        raise SystemExit(f"{a.ckpt} has no vrg section (error profile); train with VRGProfiler or run vrg profile.")
    shape = image_shape(den)
    st = settings_of(a, shape[0])
    fresh = _csv(a.fresh_seeds, int)
    if set(fresh) & (set(st.screen_seeds) | set(st.confirm_seeds)):
        raise SystemExit("--fresh-seeds must differ from --seeds and --confirm-seeds.")
    profile = ErrorProfile.from_dict(vrg["profile"])
    meta = {"ckpt": a.ckpt, "dataset": a.dataset, "features": st.features, "num_samples": st.num_samples,
            "seeds": list(st.screen_seeds), "confirm_seeds": list(st.confirm_seeds), "fresh_seeds": list(fresh),
            "grid": a.grid, "settings": st.to_dict(), "machine": platform.machine(), "threads": torch.get_num_threads()}
    cell_dir, conv_path = out / "cells", out / "converged.json"
    todo = [(s, n, b) for s in st.solvers for n in st.steps for b in st.bases]
    if not a.report:
        ext = build_features(st.features, image_shape=shape)
        ref = reference_for(a.dataset, ext, shape, cache_dir=out / "ref")
        ev = FIDEvaluator(den, ext, ref, st.num_samples, batch_size=st.batch_size, cache_dir=out / "stats")
        curv_path = out / "curvature.json"
        curvature = None
        if st.fix or a.analysis:
            from vrg_lightning.optimize.discretization import Curvature

            if curv_path.is_file():
                curvature = Curvature.from_dict(json.loads(curv_path.read_text()))
            else:
                t = time.perf_counter()
                curvature = measure_curvature(den, st)
                atomic_write_json(curv_path, {**curvature.to_dict(), "seconds": time.perf_counter() - t})
        cache: dict = {}
        peer_cache: dict = {}  # one GITS teacher pass for every cell
        for s, n, b in todo:
            path = cell_dir / f"{s}-{n}-{b}.json"
            if path.is_file():
                continue
            res = run_cell(ev, den, den.schedule, profile, st, s, n, b, curvature, fresh, a.analysis,
                           a.analysis_samples, cache, out / "candidates" / f"{s}-{n}-{b}.json", peer_cache)
            res["meta"] = meta
            atomic_write_json(path, res)
            print(f"{s}/{n}/{b}: {res['seconds']:.1f} s, {res['image_evaluations']} image-NFE, chosen {res['chosen']}"
                  f", fresh Δ {res['fresh']['diff']['mean']:.3f}", flush=True)
        if not conv_path.is_file() and a.converged_steps:
            from vrg_lightning.trajectories import make_trajectory

            ab = make_trajectory(den.schedule, "logSNR", a.converged_steps).tolist()
            atomic_write_json(conv_path, {"solver": "dpmpp_2m", "base": "logSNR", "steps": a.converged_steps,
                                          "seeds": list(fresh), "fids": ev.fids("dpmpp_2m", ab, fresh)})
        for s, n in dict.fromkeys((s, n) for s, n, _ in todo) if a.side_by_side else ():
            path, names = out / "side" / f"{s}-{n}.json", [f"{s}-{n}-{b}" for b in st.bases]
            if not path.is_file() and all((cell_dir / f"{k}.json").is_file() for k in names):
                cs = {b: candidates(out / "candidates" / f"{k}.json", den.schedule, profile, st, s, n, b, curvature,
                                    cache, den, peer_cache) for b, k in zip(st.bases, names, strict=True)}
                cl = {b: json.loads((cell_dir / f"{k}.json").read_text()) for b, k in zip(st.bases, names, strict=True)}
                atomic_write_json(path, side_by_side(ev, st, s, n, cl, cs, fresh))
    if conv_path.is_file():
        meta["converged"] = json.loads(conv_path.read_text())
    cells = [json.loads((cell_dir / f"{s}-{n}-{b}.json").read_text()) for s, n, b in todo
             if (cell_dir / f"{s}-{n}-{b}.json").is_file()]
    md = (summary(cells, meta) + "\nGrid rows grouped (Δ relative to the base FID; significant = 95% CI excludes 0):"
          "\n\n" + aggregates(cells) + "\nGaussianity of the per-bin error (every 10th bin):\n\n"
          + gaussianity_md(profile) + "\n" + rows_md(cells))
    groups = [json.loads(p.read_text()) for s, n in dict.fromkeys((s, n) for s, n, _ in todo)
              if (p := out / "side" / f"{s}-{n}.json").is_file()]
    if groups:
        atomic_write_text(out / "side.md", side_md(groups, meta))
        md = "Peers side by side:\n\n" + side_md(groups, meta) + "\n" + md
    atomic_write_text(out / "summary.md", md)
    print(md)
    print(f"{len(cells)}/{len(todo)} cells done; results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
