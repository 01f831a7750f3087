"""What a checkpoint save costs in optimisation time, as a share of the training between two saves.

Trains the offline digits default (``configs/digits.yaml``: its model, data and save frequency, on the CPU) for a few
steps with ``VRGProfiler`` recording the free-mode profile, to measure the time per training step and to get a real
profile. Then times what ``VRGProfiler`` does at a save (``EntryCache.entries``, as the callback calls it):

- the digits default grid (the YAML's ``solvers x steps x bases x lps x objectives``), with the profile changed since
  the last save (free mode: every save) and unchanged (a second save at the same step: reused);
- a large grid: 6 solvers x 3 step counts x 4 bases x 2 lps x 2 objectives (288 entries), changed profile;

and reports each as a share of the training time between saves (``every_n_epochs`` x steps per epoch x seconds per
step). With ``optimize_on_save=False`` a save costs nothing and the grid is optimised once at fit end: that cost is
reported as a share of the whole training (``max_steps``). Last, the default ``save_budget`` over a simulated
training (``budgeted_training``: every save of ``max_steps`` with a new profile, the training time between saves
simulated, then the fit end): the share of each save, the entries the checkpoints hold and how stale, how many
optimisations a save's deadline stopped and how many of those a later save resumed to the end, and the latest any
optimisation ended past its deadline (negative: none did).

    python benchmarks/save_cost.py [--train-steps 40] [--repeats 3] [--skip-large] [--budget 0.02]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LARGE = {"solvers": ["ddim", "dpmsolver2", "dpmsolver3", "dpmpp_2m", "deis", "plms"], "steps": [10, 20, 50],
         "bases": ["time_uniform", "time_quadratic", "logSNR", "karras"], "lps": [0.01, 0.1],
         "objectives": ["paper", "solver"]}


def digits_config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())


def train(config: dict, steps: int):
    """Fit the YAML's model and data for ``steps`` steps on the CPU with a profile-only VRGProfiler; returns
    ``(seconds per step (median after warm-up), steps per epoch, the free-mode profile, the schedule)``."""
    import lightning.pytorch as pl

    from vrg_lightning.callbacks import VRGProfiler
    from vrg_lightning.data import DigitsDataModule
    from vrg_lightning.module import DiffusionModule

    model_kw = {k: v for k, v in config["model"].items() if k != "sample_every_n_epochs"}
    data = DigitsDataModule(**config["data"]["init_args"])
    module = DiffusionModule(**model_kw, sample_every_n_epochs=0)
    cb = config["trainer"]["callbacks"][1]["init_args"]
    profiler = VRGProfiler(free=True, half_life_samples=cb["half_life_samples"], num_bins=cb["num_bins"],
                           probe_at_fit_end=False, steps=[], log_every_n_epochs=0, resave_last=False)
    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            times.append(time.perf_counter() - self.t)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[profiler, Clock()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    per_epoch = len(trainer.train_dataloader)
    return statistics.median(times[min(5, len(times) - 1):]), per_epoch, profiler.free_profile(trainer), \
        module.vrg_schedule


def save_seconds(profile, schedule, grid, repeats: int, changed: bool) -> float:
    """Median seconds of ``EntryCache.entries`` at a save, after a save with another profile (``changed``) or with
    this one (reused)."""
    from vrg_lightning.optimize.entries import EntryCache
    from vrg_lightning.profile import ErrorProfile

    out = []
    for i in range(repeats):
        cache = EntryCache()
        other = ErrorProfile.from_dict(profile.to_dict())
        other.sums = other.sums * (1 + 1e-3 * (i + 1))  # the previous save's profile
        cache.entries(profile if not changed else other, schedule, grid)
        t = time.perf_counter()
        cache.entries(profile, schedule, grid)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def budgeted_training(profile, schedule, grid, between: float, saves: int, budget: float) -> dict:
    """The saves of a training run as ``VRGProfiler`` makes them with ``save_budget=budget``: ``saves`` saves, each
    with a new free-mode profile, ``between`` seconds of training apart (simulated: the cache's clocks ``last_end``
    and ``last_call`` are moved back by that much before each save), then the fit end (``force``). Returns the
    seconds of every save, the fit end's, the entries each save holds and how many saves old its oldest entry's
    profile is."""
    from vrg_lightning.optimize import entries as entries_module
    from vrg_lightning.optimize.entries import EntryCache
    from vrg_lightning.profile import ErrorProfile

    real, late = entries_module.optimize_trajectory, []  # (seconds past the deadline, complete, resumed)

    def watched(ab, mse, s, deadline=None, resume=None):
        r = real(ab, mse, s, deadline=deadline, resume=resume)
        if deadline is not None:
            late.append((time.perf_counter() - deadline, r.complete, resume is not None))
        return r

    entries_module.optimize_trajectory = watched

    cache, seconds, held, lag = EntryCache(budget), [], [], []
    for k in range(1, saves + 1):
        prof = ErrorProfile.from_dict(profile.to_dict())
        prof.sums = prof.sums * (1 + 1e-3 * k)  # free mode: the profile changes between saves
        cache.last_end, cache.last_call = cache.last_end - between, cache.last_call - between
        out, _ = cache.entries(prof, schedule, grid, SimpleNamespace(global_step=k, world_size=1))
        seconds.append(cache.seconds)
        held.append(len(out))
        lag.append(k - min((e["profile_step"] for e in out), default=k))
    cache.last_end, cache.last_call = cache.last_end - between, cache.last_call - between
    entries_module.optimize_trajectory = real
    cache.entries(profile, schedule, grid, SimpleNamespace(global_step=saves + 1, world_size=1), force=True)
    return {"seconds": seconds, "fit_end": cache.seconds, "held": held, "lag": lag,
            "past": max((x[0] for x in late), default=0.0), "stopped": sum(not x[1] for x in late),
            "resumed": sum(x[2] and x[1] for x in late)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=40, help="training steps to time (after 5 of warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="time the digits grid only")
    ap.add_argument("--budget", type=float, default=0.02, help="save_budget of the simulated training (default 0.02)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from vrg_lightning.optimize import TrajectoryGrid

    config = digits_config()
    cb = config["trainer"]["callbacks"][1]["init_args"]
    every = config["trainer"]["callbacks"][0]["init_args"]["every_n_epochs"]
    max_steps = config["trainer"]["max_steps"]
    step_s, per_epoch, profile, schedule = train(config, args.train_steps)
    between = every * per_epoch * step_s
    digits = TrajectoryGrid.from_dict({k: cb.get(k) for k in ("solvers", "steps", "bases", "lps", "objectives",
                                                               "reg_lambda", "trust", "mse_mode", "pin_start")})
    large = digits.replace(**LARGE)
    print(f"training: {step_s * 1e3:.1f} ms/step (CPU, one thread), {per_epoch} steps/epoch, a save every {every} "
          f"epochs = {every * per_epoch} steps = {between:.1f} s; max_steps {max_steps} = {max_steps * step_s:.0f} s")
    print("\n| grid | entries | optimisations | save, profile changed, no budget | share of training between saves | "
          "save, profile unchanged | fit end only: share of the whole training |")
    print("|---|---|---|---|---|---|---|")
    grids = [("digits default (configs/digits.yaml)", digits)] + ([] if args.skip_large else [("large", large)])
    saves = max_steps // (every * per_epoch)
    rows = []
    for name, grid in grids:
        from vrg_lightning.optimize.entries import cache_key, grid_settings
        from vrg_lightning.trajectories import make_trajectory

        entries = len(list(grid.combinations()))
        keys = {cache_key(make_trajectory(schedule, b, n), grid_settings(grid, schedule, s, lp, o))
                for s, n, b, o, lp in grid.combinations()}
        changed = save_seconds(profile, schedule, grid, args.repeats if grid is digits else 1, True)
        same = save_seconds(profile, schedule, grid, args.repeats, False)
        print(f"| {name} | {entries} | {len(keys)} | {changed:.2f} s | {100 * changed / between:.2f}% | "
              f"{1e3 * same:.2f} ms | {100 * changed / (max_steps * step_s):.2f}% |", flush=True)
        rows.append((name, entries, budgeted_training(profile, schedule, grid, between, saves, args.budget)))
    print(f"\nWith save_budget={args.budget} (the default): {saves} saves, a new profile at each (free mode), "
          "then the fit end.\n")
    print("| grid | share of training between saves: max, median | entries held at save 1, 2, last | oldest entry "
          "(saves ago), max | fit end | share of the whole training, saves + fit end | stopped by the deadline, "
          "resumed to the end | latest end past a deadline |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entries, r in rows:
        shares = [100 * t / between for t in r["seconds"]]
        whole = 100 * (sum(r["seconds"]) + r["fit_end"]) / (max_steps * step_s)
        held = f"{r['held'][0]}, {r['held'][min(1, saves - 1)]}, {r['held'][-1]} of {entries}"
        print(f"| {name} | {max(shares):.2f}%, {statistics.median(shares):.2f}% | {held} | {max(r['lag'])} | "
              f"{r['fit_end']:.2f} s | {whole:.2f}% | {r['stopped']}, {r['resumed']} | {1e3 * r['past']:.1f} ms |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
