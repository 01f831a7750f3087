"""``VRGProfiler``: measure a diffusion model's error profile during training and store VRG trajectories in
every checkpoint (``checkpoint["vrg"]``, docs/ARCHITECTURE.md).

Modes
-----
- **free** (default on): reads the protocol fields of each ``training_step`` output (``vrg_alpha_bar`` [B],
  ``vrg_error`` [B, ...] = ε̂ - ε; see :mod:`vrg_lightning.module`) — no extra forward pass. The moment sums are
  accumulated on the model's device (no host sync per step) with an **exponential forgetting** so the statistics
  describe the current model: before each batch all sums are multiplied by ``0.5 ** (B·world / half_life_samples)``,
  i.e. a sample's weight halves after ``half_life_samples`` further training samples (all ranks together);
  ``half_life_samples=None`` keeps everything. Batches with a non-finite loss and samples with non-finite errors
  are skipped and counted (one warning).
- **probe**: a ``no_grad`` pass of ``pl_module.vrg_denoiser()`` (EMA weights) over ``probe_samples`` training images
  at fit end (and every ``probe_every_n_epochs``), stratified over the profile's bins (sample ``i`` goes to bin
  ``i mod num_bins``, an integer timestep uniform within it), with noise fixed by ``probe_seed`` per chunk of
  :data:`PROBE_CHUNK` samples; rank ``r`` of ``W`` takes chunks ``r, r+W, …`` so the probed (image, t, noise) set
  does not depend on the number of processes. :func:`probe_profile` does the same post hoc (``vrg profile``).

Both reduce their sums over all ranks (``trainer.strategy.reduce(..., "sum")``), so every rank holds the identical
profile. The checkpoint's profile is the probe profile when one was measured at the current step, else the free one.
At each checkpoint save and at fit end the callback optimizes ``solvers × steps × bases × lps × objectives`` with
:func:`vrg_lightning.optimize.optimize_trajectory` and stores them as ``vrg.entries``; at fit end it re-saves
``ModelCheckpoint``'s ``last.ckpt`` so the final file carries the fit-end probe and its trajectories.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from .checkpoint import VRG_KEY, build_vrg_state, check_same_schedule
from .profile import ErrorProfile
from .schedule import NoiseSchedule, alpha_bar_to_lambda

__all__ = ["VRGProfiler", "probe_profile", "compute_entries", "profile_figures", "PROBE_CHUNK", "PROTOCOL_KEYS"]

PROBE_CHUNK = 64
PROTOCOL_KEYS = ("vrg_alpha_bar", "vrg_error")
_ROWS = 7  # count, lam_sum, n, s1, s2, s3, s4 (ErrorProfile's sums)


def _profile_from_sums(edges: Tensor, sums: Tensor, source: str, meta: dict[str, Any]) -> ErrorProfile:
    s = sums.detach().to("cpu", torch.float64)
    return ErrorProfile(edges.cpu(), *s.unbind(0), source=source, meta=meta)


def _sample_sums(lam: Tensor, error: Tensor) -> Tensor:
    """``[7, B]`` per-sample rows (1, λ, n, Σe, Σe², Σe³, Σe⁴) in float64."""
    e = error.flatten(1).to(torch.float64)
    e2 = e * e
    ones = torch.ones_like(lam)
    return torch.stack([ones, lam, ones * e.shape[1], e.sum(1), e2.sum(1), (e2 * e).sum(1), (e2 * e2).sum(1)])


def _accumulate(sums: Tensor, edges: Tensor, alpha_bar: Tensor, error: Tensor, valid: Tensor | None = None) -> Tensor:
    """Add a batch into ``sums`` ``[7, bins]`` in place; returns the number of skipped samples (0-d tensor)."""
    ab = alpha_bar.detach().to(torch.float64).reshape(-1)
    lam = alpha_bar_to_lambda(ab)
    rows = _sample_sums(lam, error.detach())
    ok = torch.isfinite(rows).all(0)
    if valid is not None:
        ok = ok & valid
    rows = torch.where(ok, rows, torch.zeros_like(rows))
    idx = (torch.searchsorted(edges, lam.contiguous(), right=True) - 1).clamp(0, edges.numel() - 2)
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    sums.index_add_(1, idx, rows)
    return (~ok).sum()


# --- probe ---------------------------------------------------------------------------------------------------------
def _bin_timesteps(profile: ErrorProfile, schedule: NoiseSchedule) -> list[Tensor]:
    t = torch.arange(schedule.num_train_timesteps)
    b = profile.bin_index(schedule.t_to_lambda(t.double()))
    return [t[b == k] for k in range(profile.num_bins) if bool((b == k).any())]


@torch.no_grad()
def probe_profile(
    denoiser: Callable[..., Tensor],
    dataset: Dataset,
    schedule: NoiseSchedule,
    *,
    num_samples: int = 2048,
    num_bins: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    use_labels: bool = True,
) -> ErrorProfile:
    """Measure the error profile of ``denoiser(x, alpha_bar[B], class_labels) -> ε̂`` on this rank's probe shard.

    Sample ``i < num_samples``: bin ``i mod (#bins)`` (bins of :meth:`ErrorProfile.for_schedule`), an integer
    timestep uniform within the bin, image ``perm[i mod len(dataset)]`` and ε, all drawn from generators seeded by
    ``(seed, i // PROBE_CHUNK)``. Rank ``rank`` evaluates chunks ``rank, rank + world_size, …``; the sum of all
    ranks' profiles is therefore independent of ``world_size`` (up to float rounding of the batches).

    Returns:
        This rank's :class:`ErrorProfile` (add the ranks' profiles, or reduce their sums, for the full one).
    """
    for name, v, lo in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank!r}.")
    n_data = len(dataset)  # type: ignore[arg-type]
    if n_data < 1:
        raise ValueError("The probe dataset is empty.")
    profile = ErrorProfile.for_schedule(schedule, num_bins)
    t_of_bin = _bin_timesteps(profile, schedule)
    perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(seed))
    acp = schedule.alphas_cumprod
    dev = torch.device(device) if device is not None else torch.device("cpu")
    edges = profile.lambda_edges.to(dev)
    sums = torch.zeros(_ROWS, profile.num_bins, dtype=torch.float64, device=dev)
    chunks = list(range(rank, math.ceil(num_samples / PROBE_CHUNK), world_size))
    per_batch = max(1, batch_size // PROBE_CHUNK)
    for start in range(0, len(chunks), per_batch):
        xs, ys, ts, es = [], [], [], []
        for c in chunks[start:start + per_batch]:
            i = torch.arange(c * PROBE_CHUNK, min((c + 1) * PROBE_CHUNK, num_samples))
            g = torch.Generator().manual_seed(seed * 1_000_003 + c)
            u = torch.rand(i.numel(), generator=g, dtype=torch.float64)
            bins = (i % len(t_of_bin)).tolist()
            ts.append(torch.stack([t_of_bin[b][int(v * t_of_bin[b].numel())] for b, v in zip(bins, u.tolist(),
                                                                                             strict=True)]))
            items = [dataset[int(perm[k % n_data])] for k in i.tolist()]
            x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()
            xs.append(x)
            if use_labels and isinstance(items[0], (tuple, list)) and len(items[0]) > 1:
                ys.append(torch.as_tensor([int(it[1]) for it in items]))
            es.append(torch.randn(x.shape, generator=g))
        x0, eps, t = torch.cat(xs).to(dev), torch.cat(es).to(dev), torch.cat(ts)
        ab = acp[t].to(dev)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        xt = ab.sqrt().to(x0.dtype).view(shape) * x0 + (1 - ab).sqrt().to(x0.dtype).view(shape) * eps
        conditional = getattr(denoiser, "num_classes", None) is not None
        labels = torch.cat(ys).to(dev) if conditional and len(ys) == len(xs) else None
        eps_hat = denoiser(xt, ab, labels)
        _accumulate(sums, edges, ab, eps_hat.float() - eps)
    return _profile_from_sums(profile.lambda_edges, sums, "probe", {
        "schedule": schedule.to_dict(), "num_samples": num_samples, "seed": seed, "rank": rank,
        "world_size": world_size})


# --- trajectories --------------------------------------------------------------------------------------------------
def compute_entries(
    profile: ErrorProfile,
    schedule: NoiseSchedule,
    *,
    solvers: Sequence[str] = ("ddim",),
    steps: Sequence[int] = (10, 20),
    bases: Sequence[str] = ("time_uniform", "time_quadratic", "logSNR"),
    lps: Sequence[float] = (0.1,),
    objectives: Sequence[str] = ("paper",),
    reg_lambda: float = 1e4,
    trust: str = "alpha",
    mse_mode: str = "fit",
    pin_start: bool = False,
) -> list[dict[str, Any]]:
    """Optimize every (solver, steps, base, lp, objective) against ``profile``; one schema entry each.

    ``objective="paper"`` does not depend on the solver: it is optimized once and recorded for each solver.
    """
    from .optimize import OptimizeSettings, optimize_trajectory
    from .trajectories import make_trajectory

    mse_fn = profile.mse_function(mse_mode)
    cache: dict[tuple, Any] = {}
    entries = []
    for solver in solvers:
        for n in steps:
            for base in bases:
                base_ab = make_trajectory(schedule, base, int(n))
                for objective in objectives:
                    for lp in lps:
                        st = OptimizeSettings(lp=float(lp), reg_lambda=float(reg_lambda), objective=objective,
                                              solver=solver, mse_mode=mse_mode, trust=trust, pin_start=pin_start)
                        key = (n, base, objective, float(lp), solver if objective == "solver" else "")
                        if key not in cache:
                            cache[key] = optimize_trajectory(base_ab, mse_fn, st)
                        r = cache[key].to_dict()
                        r.pop("settings", None)
                        entries.append({"solver": solver, "steps": int(n), "base": base, "objective": objective,
                                        "lp": float(lp), "reg_lambda": float(reg_lambda), "trust": trust,
                                        "pin_start": bool(pin_start), "mse_mode": mse_mode, **r,
                                        "profile_source": profile.source, "validated": None})
    return entries


# --- callback ------------------------------------------------------------------------------------------------------
class VRGProfiler(Callback):
    """Error profile during training (free and/or probe mode) and VRG trajectories in every checkpoint.

    Args:
        free: accumulate the profile from ``training_step`` outputs (module docstring: protocol, forgetting).
        half_life_samples: forgetting half-life of free mode in training samples (``None``: keep all).
        num_bins: bins of the profile (``ErrorProfile.for_schedule``).
        probe_at_fit_end: run the probe with ``pl_module.vrg_denoiser()`` when fitting ends.
        probe_every_n_epochs: also probe every k epochs (0: never).
        probe_samples, probe_batch_size, probe_seed: the probe set (:func:`probe_profile`).
        probe_dataset: images to probe on (default: ``trainer.datamodule.train_set`` or the train loader's dataset).
        solvers, steps, bases, lps, objectives, reg_lambda, trust, mse_mode, pin_start: the trajectories to optimize
            (:func:`compute_entries`); an empty ``steps`` stores the profile only.
        optimize_on_save: optimize at every checkpoint save (else only at fit end).
        log_every_n_epochs: log MSE/Gaussianity figures of the free profile every k epochs (0: never).
        resave_last: at fit end, re-save ``ModelCheckpoint.last_model_path`` with the fit-end profile and entries.
        name: distinguishes several instances in a checkpoint (``state_key``).
        tune_at_fit_end: at fit end, replace the entries of every (solver, steps, base) by the paired-FID validated
            choice (:func:`vrg_lightning.tune.tune_vrg`, the function behind ``vrg tune``) on global rank 0,
            broadcast to the others; reference statistics come from ``tune_reference_samples`` probe images.
            The other ranks wait in the broadcast meanwhile: keep the tuning budget under the process group's
            timeout (NCCL's default is 30 min), or run ``vrg tune`` after training instead.
        tune_settings: :class:`~vrg_lightning.tune.TuneSettings` fields (solvers/steps/bases default to the ones
            above).
    """

    def __init__(
        self,
        free: bool = True,
        half_life_samples: int | None = 20000,
        num_bins: int = 100,
        probe_at_fit_end: bool = True,
        probe_every_n_epochs: int = 0,
        probe_samples: int = 4096,
        probe_batch_size: int = 256,
        probe_seed: int = 0,
        probe_dataset: Dataset | None = None,
        solvers: Sequence[str] = ("ddim",),
        steps: Sequence[int] = (10, 20),
        bases: Sequence[str] = ("time_uniform", "time_quadratic", "logSNR"),
        lps: Sequence[float] = (0.1,),
        objectives: Sequence[str] = ("paper",),
        reg_lambda: float = 1e4,
        trust: str = "alpha",
        mse_mode: str = "fit",
        pin_start: bool = False,
        optimize_on_save: bool = True,
        log_every_n_epochs: int = 1,
        resave_last: bool = True,
        name: str = "vrg",
        tune_at_fit_end: bool = False,
        tune_settings: dict[str, Any] | None = None,
        tune_reference_samples: int = 2000,
    ) -> None:
        from .optimize import OptimizeSettings
        from .trajectories import BASES

        if half_life_samples is not None and (isinstance(half_life_samples, bool) or half_life_samples <= 0):
            raise ValueError(f"half_life_samples must be a positive number or None; got {half_life_samples!r}.")
        if not free and not probe_at_fit_end and not probe_every_n_epochs:
            raise ValueError("VRGProfiler with free=False needs probe_at_fit_end=True or probe_every_n_epochs > 0.")
        for n in steps:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"steps must be positive integers; got {n!r} in steps={list(steps)!r}.")
        for b in bases:
            if b not in BASES or b == "list":
                raise ValueError(f"Unknown base {b!r} in bases; allowed: {', '.join(x for x in BASES if x != 'list')}.")
        for s in solvers:  # OptimizeSettings validates names and the numbers
            for o in objectives:
                for lp in lps:
                    OptimizeSettings(lp=float(lp), reg_lambda=float(reg_lambda), objective=o, solver=s,
                                     mse_mode=mse_mode, trust=trust, pin_start=pin_start)
        self.free, self.half_life, self.num_bins = free, half_life_samples, num_bins
        self.probe_at_fit_end, self.probe_every = probe_at_fit_end, probe_every_n_epochs
        self.probe_samples, self.probe_batch_size, self.probe_seed = probe_samples, probe_batch_size, probe_seed
        self.probe_dataset = probe_dataset
        self.opt = {"solvers": list(solvers), "steps": [int(n) for n in steps], "bases": list(bases),
                    "lps": [float(x) for x in lps], "objectives": list(objectives), "reg_lambda": float(reg_lambda),
                    "trust": trust, "mse_mode": mse_mode, "pin_start": bool(pin_start)}
        self.optimize_on_save, self.log_every, self.resave_last, self.name = (
            optimize_on_save, log_every_n_epochs, resave_last, name)
        self.tune_settings = None
        if tune_at_fit_end:
            from .tune import TuneSettings

            base = {"solvers": tuple(solvers), "steps": tuple(int(n) for n in steps), "bases": tuple(bases)}
            self.tune_settings = TuneSettings.from_dict({**base, **dict(tune_settings or {})})
        self.tune_reference_samples = int(tune_reference_samples)
        self._tune_extra: dict[str, Any] = {}
        self.schedule: NoiseSchedule | None = None
        self.edges: Tensor | None = None
        self.sums: Tensor | None = None  # [7, bins] local free-mode sums (device)
        self.skipped: Tensor | None = None  # local count of skipped samples (device)
        self.probe: ErrorProfile | None = None
        self.probe_step = -1
        self.entries: list[dict[str, Any]] = []
        self._entries_key: tuple | None = None
        self._warned = False
        self._world, self._rank = 1, 0
        self._pending: dict[str, Any] | None = None
        self._fit_ended = False
        self._train_started: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # --- setup ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        schedule = getattr(pl_module, "vrg_schedule", None)
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"VRGProfiler needs {type(pl_module).__name__}.vrg_schedule (a NoiseSchedule); got "
                             f"{type(schedule).__name__}. See the protocol in vrg_lightning.module.")
        if (self.probe_at_fit_end or self.probe_every) and not callable(getattr(pl_module, "vrg_denoiser", None)):
            raise ValueError(f"Probe mode needs {type(pl_module).__name__}.vrg_denoiser() returning a callable "
                             "(x, alpha_bar[B], class_labels) -> eps; set probe_at_fit_end=False, "
                             "probe_every_n_epochs=0 otherwise.")
        self.schedule = schedule
        self._world, self._rank = trainer.world_size, trainer.global_rank
        profile = ErrorProfile.for_schedule(schedule, self.num_bins)
        self.edges = profile.lambda_edges
        if self.sums is None:
            self.sums = torch.zeros(_ROWS, profile.num_bins, dtype=torch.float64)
            self.skipped = torch.zeros((), dtype=torch.float64)
        if self._pending is not None:
            self._apply_state(self._pending)

    def _to(self, device: torch.device) -> None:
        if self.sums.device != device:
            self.sums, self.skipped, self.edges = self.sums.to(device), self.skipped.to(device), self.edges.to(device)

    # --- free mode ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.free:
            return
        if not isinstance(outputs, Mapping):
            raise ValueError(f"VRGProfiler (free mode) needs training_step to return a dict with 'loss', "
                             f"{', '.join(repr(k) for k in PROTOCOL_KEYS)}; got {type(outputs).__name__}. "
                             "See the protocol in vrg_lightning.module, or use free=False (probe only).")
        missing = [k for k in PROTOCOL_KEYS if k not in outputs]
        if missing:
            raise ValueError(f"training_step output lacks {', '.join(repr(k) for k in missing)} (VRG protocol: "
                             "vrg_alpha_bar [B] = noise level, vrg_error [B, ...] = eps_hat - eps, detached); "
                             f"got keys {sorted(outputs)}.")
        ab, err = outputs["vrg_alpha_bar"], outputs["vrg_error"]
        if not torch.is_tensor(ab) or not torch.is_tensor(err) or ab.ndim != 1 or err.ndim < 2 \
                or err.shape[0] != ab.shape[0]:
            raise ValueError(f"vrg_alpha_bar must be a [B] tensor and vrg_error a [B, ...] tensor; got shapes "
                             f"{tuple(getattr(ab, 'shape', ()))} and {tuple(getattr(err, 'shape', ()))}.")
        self._to(err.device)
        if self.half_life:
            self.sums.mul_(0.5 ** (ab.shape[0] * self._world / self.half_life))
        loss = outputs.get("loss")
        valid = None
        if torch.is_tensor(loss):
            valid = torch.isfinite(loss.detach()).expand(ab.shape[0]).to(err.device)
        self.skipped += _accumulate(self.sums, self.edges, ab.to(err.device), err, valid)

    def _reduce(self, t: Tensor, trainer: Trainer) -> Tensor:
        t = t.clone()
        return trainer.strategy.reduce(t, reduce_op="sum") if trainer.world_size > 1 else t

    def free_profile(self, trainer: Trainer) -> ErrorProfile | None:
        """The free-mode profile summed over all ranks (a collective under DDP: call on every rank)."""
        if not self.free or self.sums is None:
            return None
        flat = self._reduce(torch.cat([self.sums.flatten(), self.skipped[None]]), trainer)
        skipped = int(flat[-1].item())
        self._warn_skipped(skipped)
        sums = flat[:-1].view_as(self.sums)
        meta = {"schedule": self.schedule.to_dict(), "step": trainer.global_step, "half_life_samples": self.half_life,
                "nonfinite_skipped": skipped}
        return _profile_from_sums(self.edges, sums, "free", meta)

    def _warn_skipped(self, skipped: int) -> None:
        if skipped and not self._warned:
            self._warned = True
            rank_zero_warn(f"VRGProfiler skipped {skipped} training samples with a non-finite loss or error so far; "
                           "they are left out of the error profile (count kept in vrg.profiler.nonfinite_skipped).")

    # --- probe mode -----------------------------------------------------------------------------------------------
    def _probe_dataset(self, trainer: Trainer) -> Dataset:
        if self.probe_dataset is not None:
            return self.probe_dataset
        ds = getattr(getattr(trainer, "datamodule", None), "train_set", None)
        if ds is None:
            loader = trainer.train_dataloader
            ds = getattr(loader, "dataset", None)
        if ds is None:
            raise ValueError("VRGProfiler probe mode found no dataset: pass probe_dataset=... or use a datamodule "
                             "with a train_set attribute.")
        return ds

    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> ErrorProfile:
        """Probe with ``pl_module.vrg_denoiser()`` on this rank's shard and reduce over ranks (collective)."""
        den = pl_module.vrg_denoiser()
        was = getattr(den, "training", False)
        if hasattr(den, "eval"):
            den.eval()
        try:
            local = probe_profile(den, self._probe_dataset(trainer), self.schedule, num_samples=self.probe_samples,
                                  num_bins=self.num_bins, seed=self.probe_seed, batch_size=self.probe_batch_size,
                                  rank=trainer.global_rank, world_size=trainer.world_size, device=pl_module.device)
        finally:
            if was:
                den.train()
        sums = torch.stack([getattr(local, k) for k in ("count", "lam_sum", "n", "s1", "s2", "s3", "s4")])
        sums = self._reduce(sums.to(pl_module.device), trainer)
        meta = dict(local.meta, step=trainer.global_step)
        meta.pop("rank", None)
        self.probe = _profile_from_sums(local.lambda_edges, sums, "probe", meta)
        self.probe_step = trainer.global_step
        return self.probe

    # --- profile → trajectories -----------------------------------------------------------------------------------
    def current_profile(self, trainer: Trainer) -> ErrorProfile | None:
        """Probe profile if measured at this step, else the free profile, else the last probe (collective)."""
        free = self.free_profile(trainer)
        if self.probe is not None and (self.probe_step == trainer.global_step or free is None
                                       or not bool(free.nonempty.any())):
            return self.probe
        return free

    def _entries(self, profile: ErrorProfile, trainer: Trainer) -> list[dict[str, Any]]:
        key = (profile.source, trainer.global_step, float(profile.count.sum()))
        if key != self._entries_key:
            self.entries = compute_entries(profile, self.schedule, **self.opt) if self.opt["steps"] else []
            self._entries_key = key
            self._log_cpe(trainer)
        return self.entries

    def vrg_state(self, trainer: Trainer, pl_module: LightningModule, optimize: bool = True) -> dict[str, Any] | None:
        """``checkpoint["vrg"]`` for the current state, trajectories optimized if ``optimize`` (collective)."""
        profile = self.current_profile(trainer)
        if profile is None or not bool(profile.nonempty.any()):
            return None
        entries = self._entries(profile, trainer) if optimize else []
        return build_vrg_state(self.schedule, profile, entries,
                               prediction_type=str(getattr(pl_module, "vrg_prediction_type", "epsilon")),
                               extra={"profiler": self._settings(trainer, profile), **self._tune_extra})

    def _settings(self, trainer: Trainer, profile: ErrorProfile) -> dict[str, Any]:
        return {"profile_source": profile.source, "step": trainer.global_step, "free": self.free,
                "half_life_samples": self.half_life, "num_bins": self.num_bins, "probe_samples": self.probe_samples,
                "probe_seed": self.probe_seed, "nonfinite_skipped": int(profile.meta.get("nonfinite_skipped", 0)),
                "optimize": dict(self.opt)}

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = self.vrg_state(trainer, pl_module, self.optimize_on_save or self._fit_ended)
        if state is not None:
            vrg = checkpoint.setdefault(VRG_KEY, {})
            model = vrg.get("model")
            vrg.update(state)
            if model is not None:
                vrg["model"] = model
        own = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(own, dict) and self.free and self.sums is not None:  # store the all-rank sums for resuming
            own["free_sums"] = self._reduce(self.sums, trainer).cpu()
            own["skipped"] = float(self._reduce(self.skipped, trainer))
            own["reduced"] = True

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "schedule": self.schedule.to_dict() if self.schedule else None,
                "num_bins": self.num_bins,
                "free_sums": None if self.sums is None else self.sums.cpu().clone(),
                "skipped": 0.0 if self.skipped is None else float(self.skipped), "reduced": False,
                "probe": None if self.probe is None else self.probe.to_dict(), "probe_step": self.probe_step,
                "warned": self._warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
        if self.schedule is not None:
            self._apply_state(self._pending)

    def _apply_state(self, st: dict[str, Any]) -> None:
        self._pending = None
        if st.get("schedule") is not None:
            check_same_schedule(st["schedule"], self.schedule, "VRGProfiler state of the resumed checkpoint")
        if int(st.get("num_bins", self.num_bins)) != self.num_bins:
            raise ValueError(f"The resumed VRGProfiler state has num_bins={st.get('num_bins')} but this callback has "
                             f"num_bins={self.num_bins}; use the same num_bins or a fresh profile.")
        sums = st.get("free_sums")
        if sums is not None:
            keep = self._rank == 0 or not st.get("reduced", False)  # all-rank sums: rank 0 holds them
            self.sums = torch.as_tensor(sums, dtype=torch.float64).clone() * (1.0 if keep else 0.0)
            self.skipped = torch.tensor(float(st.get("skipped", 0.0)) if keep else 0.0, dtype=torch.float64)
        if st.get("probe") is not None:
            self.probe = ErrorProfile.from_dict(st["probe"])
        self.probe_step = int(st.get("probe_step", -1))
        self._warned = bool(st.get("warned", False))

    # --- epoch / fit end ------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.probe_every and epoch % self.probe_every == 0:
            self._log_profile(trainer, self.run_probe(trainer, pl_module))
        if self.free and self.log_every and epoch % self.log_every == 0:
            self._log_profile(trainer, self.free_profile(trainer))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_ended = True
        train_seconds = None if self._train_started is None else time.perf_counter() - self._train_started
        if self.probe_at_fit_end:
            self._log_profile(trainer, self.run_probe(trainer, pl_module))
        elif self.free:
            self._log_profile(trainer, self.free_profile(trainer))
        if self.tune_settings is not None:
            self.run_tune(trainer, pl_module, train_seconds)
        if self.resave_last:
            path = _last_path(trainer)
            if path:
                trainer.save_checkpoint(path)
                trainer.checkpoint_callback.last_model_path = path
            else:
                rank_zero_warn("VRGProfiler: no ModelCheckpoint(save_last=True) to re-save; the fit-end profile "
                               "is only in checkpoints saved from now on (trainer.save_checkpoint(...)).")

    def run_tune(self, trainer: Trainer, pl_module: LightningModule, train_seconds: float | None = None) -> None:
        """Validated selection of the current entries (rank 0 samples, every rank gets the result; collective).

        ``vrg["tune"]`` records its seconds and, given ``train_seconds`` (the fit's wall time up to the fit-end
        probe), ``train_seconds`` and ``fraction_of_training`` = tune seconds / train seconds."""
        from .metrics import build_features, feature_stats
        from .sampling import image_shape
        from .tune import default_features, tune_vrg

        state = self.vrg_state(trainer, pl_module, optimize=True)
        result = None
        if state is not None and trainer.global_rank == 0:
            den = pl_module.vrg_denoiser()
            was = getattr(den, "training", False)
            den.eval()
            try:
                ds = self._probe_dataset(trainer)
                n = min(len(ds), self.tune_reference_samples)
                real = torch.stack([torch.as_tensor(ds[i][0]) for i in range(n)]).float()
                shape = image_shape(den)
                features = default_features(self.tune_settings.features, shape[0])
                ext = build_features(features, image_shape=shape).to(pl_module.device)
                ref = feature_stats(real, ext)
                new = tune_vrg(den, state, self.tune_settings, ext, ref, log=None)
            finally:
                if was:
                    den.train()
            if train_seconds:
                new["tune"].update(train_seconds=train_seconds,
                                   fraction_of_training=new["tune"]["seconds"] / train_seconds)
                rank_zero_info(f"VRGProfiler: validated tuning took {new['tune']['seconds']:.1f} s, "
                               f"{100 * new['tune']['fraction_of_training']:.1f}% of the {train_seconds:.0f} s of "
                               "training.")
            result = {"entries": new["entries"], "extra": {k: new[k] for k in ("curvature", "tune") if k in new}}
        result = trainer.strategy.broadcast(result, src=0)
        if result is not None:
            self.entries = result["entries"]
            self._tune_extra = result["extra"]

    # --- logging --------------------------------------------------------------------------------------------------
    def _experiment(self, trainer: Trainer) -> Any:
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        return exp if trainer.is_global_zero and hasattr(exp, "add_figure") else None

    def _log_profile(self, trainer: Trainer, profile: ErrorProfile | None) -> None:
        exp = self._experiment(trainer)
        if exp is None or profile is None or not bool(profile.nonempty.any()):
            return
        for tag, fig in profile_figures(profile).items():
            exp.add_figure(f"vrg/{profile.source}_{tag}", fig, trainer.global_step)

    def _log_cpe(self, trainer: Trainer) -> None:
        if trainer.logger is None or not self.entries:
            return
        metrics = {}
        for e in self.entries:
            tag = f"{e['solver']}_{e['steps']}_{e['base']}_{e['objective']}_lp{e['lp']:g}"
            metrics[f"vrg_cpe/{tag}/before"] = e["cpe_before"]
            metrics[f"vrg_cpe/{tag}/after"] = e["cpe_after"]
        trainer.logger.log_metrics(metrics, step=trainer.global_step)


def _last_path(trainer: Trainer) -> str:
    """``ModelCheckpoint``'s last-checkpoint path (also when none was written yet), or ``""``."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "save_last", False):
        return ""
    if getattr(cb, "last_model_path", ""):
        return cb.last_model_path
    if getattr(cb, "dirpath", None):
        return os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
    return ""


def profile_figures(profile: ErrorProfile) -> dict[str, Any]:
    """Matplotlib figures of a profile: ``mse`` (MSE vs logSNR, log scale) and ``gaussianity`` (per-bin mean, std,
    skewness, excess kurtosis of ε̂ - ε; a Gaussian error has 0, √MSE, 0, 0)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = profile.gaussianity()
    figs = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(g["lambda"], g["mse"], ".-")
    ax.set_xlabel("logSNR λ = log(ᾱ/(1-ᾱ))")
    ax.set_ylabel("MSE of ε̂")
    ax.set_title(f"{profile.source} profile")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["mse"] = fig
    keys = [k for k in ("mean", "std", "skewness", "excess_kurtosis") if k in g]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, k in zip(list(axes) if len(keys) > 1 else [axes], keys, strict=True):
        ax.plot(g["lambda"], g[k], ".-")
        ax.set_title(k)
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["gaussianity"] = fig
    return figs
