"""Does VRG still help under classifier-free guidance? A latent, class-conditional digits model trained here
(:class:`vrg_lightning.latent_module.LatentDiffusionModule`: a small AutoencoderKL, then a UNet2DConditionModel on
its 2x8x8 latents, one learned token per class, label dropout 0.1), then paired FID of base vs VRG vs the tuned
choice at several guidance scales and step counts, on fresh seeds.

    python benchmarks/latent.py train --out runs/latent            # Lightning, CPU; writes model.ckpt, train.json
    python benchmarks/latent.py bench --out runs/latent --scales 1,3,7.5 --steps 10,20
    python benchmarks/latent.py report --out runs/latent            # print the markdown of finished cells

Per guidance scale w: the guided profile of e_w = ε̂_w - ε from one probe pass (:func:`probe_guided`, latents of
the digits with their labels); per (w, steps) cell, resumable (``cells/*.json`` written atomically, feature
statistics cached under ``stats/``): the candidates of :func:`~vrg_lightning.evaluation.make_candidates` on the
w-profile (VRG = ``vrg:paper:lp=0.01:free``, the stored default), validated selection by
:func:`~vrg_lightning.evaluation.tune_cell` (screen seeds, then confirmation seeds), then base, VRG and the tuned
choice once more on fresh seeds (used by neither). FID features: the digits classifier on decoded images
(:class:`DecodedFeatures`) against the 1,797 real digits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vrg_lightning.evaluation import (
    DigitsFeatures,
    FIDEvaluator,
    TuneSettings,
    make_candidates,
    paired_difference,
    tune_cell,
)
from vrg_lightning.io import atomic_write_json, atomic_write_text

VRG_LABEL = "vrg:paper:lp=0.01:free"


def _csv(text: str, cast: type) -> tuple:
    return tuple(cast(v) for v in text.split(",") if v.strip())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("train", "bench", "report"))
    p.add_argument("--out", required=True, help="folder: model.ckpt, train.json, profiles.pt, cells/, stats/")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-minutes", type=float, default=11.0, help="training stops here even before --train-steps")
    p.add_argument("--scales", default="1,3,7.5")
    p.add_argument("--steps", default="10,20")
    p.add_argument("--solver", default="ddim")
    p.add_argument("--base", default="time_uniform")
    p.add_argument("--lps", default="0.01,0.1")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--probe-samples", type=int, default=4096)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--confirm-seeds", default="10,11,12,13,14")
    p.add_argument("--fresh-seeds", default="20,21,22,23,24")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def train(a: argparse.Namespace, out: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from vrg_lightning.data import digits_dataset
    from vrg_lightning.latent_module import LatentDiffusionModule

    if (out / "model.ckpt").is_file():
        print(f"{out / 'model.ckpt'} exists; not training again")
        return
    pl.seed_everything(0, workers=True)
    m = LatentDiffusionModule(vae_steps=a.vae_steps)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    t0 = time.perf_counter()
    budget = f"00:00:{int(a.max_minutes):02d}:{int(60 * (a.max_minutes % 1)):02d}"
    trainer = pl.Trainer(max_steps=a.train_steps, max_time=budget, logger=False, enable_checkpointing=False,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(m, DataLoader(digits_dataset("bilinear"), batch_size=a.batch_size, shuffle=True, drop_last=True))
    seconds = time.perf_counter() - t0
    trainer.save_checkpoint(out / "model.ckpt")
    k = max(1, len(losses) // 10)
    atomic_write_json(out / "train.json", {
        "seconds": seconds, "vae_steps": a.vae_steps, "train_steps": trainer.global_step, "batch_size": a.batch_size,
        "vae_loss_first_last": [m.vae_losses[0], m.vae_losses[-1]] if m.vae_losses else None,
        "latent_scale": float(m.latent_scale), "loss_by_tenth": [sum(losses[i:i + k]) / k for i in
                                                                 range(0, len(losses), k)],
        "hparams": dict(m.hparams), "threads": torch.get_num_threads()}, overwrite=True)
    print(f"trained {trainer.global_step} steps in {seconds:.0f} s; final loss {sum(losses[-k:]) / k:.4f}")


def load(out: Path) -> Any:
    from vrg_lightning.latent_module import LatentDiffusionModule

    ckpt = torch.load(out / "model.ckpt", map_location="cpu", weights_only=True)
    m = LatentDiffusionModule(**ckpt["hyper_parameters"])
    m.load_state_dict(ckpt["state_dict"])
    return m.eval()


def profiles(m: Any, out: Path, scales: tuple[float, ...], n: int) -> dict[float, Any]:
    """The guided profile per scale from one probe pass (cached in ``profiles.pt`` as the moment sums)."""
    from vrg_lightning.data import digits_dataset
    from vrg_lightning.latent_module import LatentDataset
    from vrg_lightning.models.guided import GuidedMoments, probe_guided_moments

    path = out / "profiles.pt"
    if path.is_file():
        moments = GuidedMoments.from_dict(torch.load(path, weights_only=True))
    else:
        t0 = time.perf_counter()
        moments = probe_guided_moments(m.vrg_denoiser(), LatentDataset(m, digits_dataset("bilinear")), num_samples=n)
        print(f"guided probe: one pass, {n} samples, {time.perf_counter() - t0:.1f} s")
        torch.save(moments.to_dict(), path)
    return {w: moments.profile(w) for w in scales}


def run_cell(ev: FIDEvaluator, m: Any, prof: Any, prof1: Any, a: argparse.Namespace, steps: int,
             settings: TuneSettings, caches: dict) -> dict[str, Any]:
    """Tune one (w, steps) cell on the w-profile; then base, VRG, the tuned choice and the tuned choice's setting
    (VRG's when the base was kept) optimised on the w = 1 profile (``prof1``) instead, on the fresh seeds."""
    t0 = time.perf_counter()
    den, w = m.vrg_denoiser(), ev.guidance_scale
    cands = make_candidates(m.schedule, prof, a.solver, steps, a.base, settings, None, caches.setdefault(w, {}),
                            model=den)  # one optimisation cache per profile: its keys do not name the profile
    chosen, rec = tune_cell(ev, a.solver, cands, settings)
    vrg = next((c for c in cands if c.label == VRG_LABEL), cands[0])  # deduplicated when it is the base
    fresh = _csv(a.fresh_seeds, int)
    fb = ev.fids(a.solver, cands[0].alpha_bar, fresh)
    fv, ft = ev.fids(a.solver, vrg.alpha_bar, fresh), ev.fids(a.solver, chosen.alpha_bar, fresh)
    unguided = {}
    if w != 1.0:
        c1s = make_candidates(m.schedule, prof1, a.solver, steps, a.base, settings, None, caches.setdefault(1.0, {}),
                              model=den)
        label = chosen.label if chosen.kind == "vrg" else VRG_LABEL
        c1 = next((c for c in c1s if c.label == label), c1s[0])
        f1 = ev.fids(a.solver, c1.alpha_bar, fresh)
        unguided = {"w1_profile_label": label, "fid_w1_profile": f1, "w1_profile": paired_difference(fb, f1).to_dict(),
                    "alpha_bar_w1_profile": list(c1.alpha_bar)}
    return {**unguided, "guidance_scale": ev.guidance_scale, "steps": steps, "solver": a.solver, "base": a.base,
            "num_samples": ev.num_samples, "fresh_seeds": list(fresh), "fid_base": fb, "fid_vrg": fv, "fid_tuned": ft,
            "vrg": paired_difference(fb, fv).to_dict(), "tuned": paired_difference(fb, ft).to_dict(),
            "chosen": chosen.label, "validated": rec, "cpe_base_vrg": [vrg.info.get("cpe_before"),
                                                                       vrg.info.get("cpe_after")],
            "alpha_bar": {"base": list(cands[0].alpha_bar), "vrg": list(vrg.alpha_bar),
                          "tuned": list(chosen.alpha_bar)},
            "seconds": time.perf_counter() - t0}


def bench(a: argparse.Namespace, out: Path) -> None:
    from vrg_lightning.data import digits_dataset
    from vrg_lightning.latent_module import DecodedFeatures

    m = load(out)
    scales, steps = _csv(a.scales, float), _csv(a.steps, int)
    profs = profiles(m, out, (*scales, 1.0), a.probe_samples)
    ds = digits_dataset("bilinear")
    ext = DecodedFeatures(m.decoder(), DigitsFeatures())
    ref = ext.real_stats(torch.stack([ds[i][0] for i in range(len(ds))]).float())
    settings = TuneSettings.from_dict({"solvers": [a.solver], "steps": list(steps), "bases": [a.base],
                                       "lps": list(_csv(a.lps, float)), "objectives": ["paper"], "fix": False,
                                       "num_samples": a.num_samples, "screen_seeds": list(_csv(a.seeds, int)),
                                       "confirm_seeds": list(_csv(a.confirm_seeds, int)), "batch_size": 250})
    (out / "cells").mkdir(exist_ok=True)
    caches: dict = {}
    for w in scales:
        ev = FIDEvaluator(m.vrg_denoiser(), ext, ref, a.num_samples, batch_size=250, guidance_scale=w,
                          cache_dir=out / "stats")
        for n in steps:
            path = out / "cells" / f"{a.solver}-{n}-{a.base}-w{w:g}.json"
            if path.is_file():
                continue
            cell = run_cell(ev, m, profs[w], profs[1.0], a, n, settings, caches)
            atomic_write_json(path, cell, overwrite=True)
            print(row(cell), flush=True)
    report(out)


def _ci(d: dict[str, Any]) -> str:
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def row(c: dict[str, Any]) -> str:
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    cb, cv = c["cpe_base_vrg"]
    cpe = f"{100 * (cv / cb - 1):+.0f} %" if cb and cv is not None else "-"
    w1 = f"{_ci(c['w1_profile'])} ({c['w1_profile_label'].split(':')[2]})" if "w1_profile" in c else "(same)"
    return (f"| {c['guidance_scale']:g} | {c['steps']} | {mean(c['fid_base']):.2f} | {mean(c['fid_vrg']):.2f} | "
            f"{_ci(c['vrg'])} | {cpe} | {w1} | {c['chosen']} | {_ci(c['tuned'])} |")


def report(out: Path) -> None:
    cells = sorted((json.loads(p.read_text()) for p in (out / "cells").glob("*.json")),
                   key=lambda c: (c["guidance_scale"], c["steps"]))
    if not cells:
        print("no finished cells")
        return
    c0 = cells[0]
    lines = [f"{c0['solver']}, base {c0['base']}, {c0['num_samples']} images per FID (digits-classifier features of "
             f"decoded samples vs the 1,797 real digits), fresh seeds {c0['fresh_seeds']}; Δ = FID − FID_base, mean "
             "[95% t-interval]; VRG = lp 0.01 (the stored default); cpe: VRG's predicted change on the w-profile; "
             "Δ on the w=1 profile: the tuned choice's setting (VRG's when the base was kept) optimised on the "
             "unguided profile instead, sampled at w.", "",
             "| w | steps | FID base | FID VRG | Δ VRG | cpe VRG | Δ on the w=1 profile | tuned choice | Δ tuned |",
             "|---|---|---|---|---|---|---|---|---|", *[row(c) for c in cells]]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text, overwrite=True)
    print(text)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# benchmarks/latent.py {a.stage} ({platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, pid {os.getpid()})", file=sys.stderr)
    {"train": train, "bench": bench, "report": lambda a, out: report(out)}[a.stage](a, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
