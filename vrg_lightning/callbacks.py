"""``VRGProfiler``: a model's error profile during training and VRG trajectories in every checkpoint.

Free mode reads the :mod:`~vrg_lightning.protocol` fields of each ``training_step`` output into a running
:class:`~vrg_lightning.profile.ErrorProfile` on the model's device (no host sync per step), forgetting old samples:
before each batch the sums are multiplied by ``0.5 ** (B·world / half_life_samples)``; samples with a non-finite
loss or error are skipped and counted. Probe mode runs :func:`~vrg_lightning.probe.probe_profile`. Both sum over
ranks; the checkpoint gets the probe profile when measured at the current step, else the free one, and the
trajectories of the callback's :class:`~vrg_lightning.optimize.TrajectoryGrid` (``checkpoint["vrg"]``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from .checkpoint import VRG_KEY, build_vrg_state, check_same_schedule
from .optimize.entries import EntryCache
from .optimize.settings import TrajectoryGrid
from .probe import PROBE_BATCH, PROBE_BINS, PROBE_SAMPLES, probe_profile
from .profile import ErrorProfile
from .protocol import eval_mode, protocol_fields, protocol_schedule
from .report import cpe_metrics, log_profile
from .schedule import NoiseSchedule, alpha_bar_to_lambda

__all__ = ["VRGProfiler"]


class VRGProfiler(Callback):
    """Error profile during training (free and/or probe mode) and VRG trajectories in every checkpoint.

    Args:
        free: accumulate the profile from ``training_step`` outputs.
        half_life_samples: forgetting half-life of free mode in training samples (``None``: keep all).
        num_bins: bins of the profile (:meth:`ErrorProfile.for_schedule`).
        probe_at_fit_end, probe_every_n_epochs: when to run the probe (0: never every k epochs).
        probe_samples, probe_batch_size, probe_seed: the probe set (:func:`~vrg_lightning.probe.probe_profile`).
        probe_dataset: images to probe (default: ``trainer.datamodule.train_set`` or the train loader's dataset).
        solvers, steps, bases, lps, objectives, reg_lambda, trust, mse_mode, pin_start: the trajectories to
            optimise, the fields of :class:`~vrg_lightning.optimize.TrajectoryGrid` (``None``: its default; an
            empty ``steps`` stores the profile only).
        optimize_on_save: optimise at checkpoint saves (else only at fit end: earlier checkpoints then hold the
            profile and no entries). A save whose profile did not change reuses the entries; under DDP global rank 0
            optimises and broadcasts; ``save_budget`` caps the share of wall time optimising at saves (stale entries
            refreshed round-robin as they fit, the others kept: entry key ``profile_step``, the oldest in
            ``vrg.profiler.entries_step``; ``None``: no cap; the fit end does all) (:class:`~.optimize.EntryCache`).
        log_every_n_epochs: log MSE/Gaussianity figures of the free profile every k epochs (0: never).
        resave_last: at fit end, re-save ``ModelCheckpoint.last_model_path`` with the fit-end profile and entries.
        name: distinguishes several instances in a checkpoint (``state_key``).
        tune_at_fit_end: at fit end, replace the entries of every (solver, steps, base) by the paired-FID
            validated choice (:func:`vrg_lightning.evaluation.tune.tune_vrg`, as ``vrg tune``) on global rank 0,
            broadcast to the others (which wait: keep the budget under the process group's timeout).
        tune_settings: :class:`~vrg_lightning.evaluation.tune.TuneSettings` fields (solvers/steps/bases default to
            the grid's); tune_reference_samples: real images of the FID reference.
    """

    def __init__(
        self, free: bool = True, half_life_samples: int | None = 20000, num_bins: int = PROBE_BINS,
        probe_at_fit_end: bool = True, probe_every_n_epochs: int = 0, probe_samples: int = PROBE_SAMPLES,
        probe_batch_size: int = PROBE_BATCH, probe_seed: int = 0, probe_dataset: Dataset | None = None,
        solvers: Sequence[str] | None = None, steps: Sequence[int] | None = None, bases: Sequence[str] | None = None,
        lps: Sequence[float] | None = None, objectives: Sequence[str] | None = None, reg_lambda: float | None = None,
        trust: str | None = None, mse_mode: str | None = None, pin_start: bool | None = None,
        optimize_on_save: bool = True, save_budget: float | None = 0.02, log_every_n_epochs: int = 1,
        resave_last: bool = True, name: str = "vrg",
        tune_at_fit_end: bool = False, tune_settings: dict[str, Any] | None = None, tune_reference_samples: int = 2000,
    ) -> None:
        if half_life_samples is not None and (isinstance(half_life_samples, bool) or half_life_samples <= 0):
            raise ValueError(f"half_life_samples must be a positive number or None; got {half_life_samples!r}.")
        if not free and not probe_at_fit_end and not probe_every_n_epochs:
            raise ValueError("VRGProfiler with free=False needs probe_at_fit_end=True or probe_every_n_epochs > 0.")
        self.grid = TrajectoryGrid.from_dict(dict(solvers=solvers, steps=steps, bases=bases, lps=lps,
                                                  objectives=objectives, reg_lambda=reg_lambda, trust=trust,
                                                  mse_mode=mse_mode, pin_start=pin_start))
        self.free, self.half_life, self.num_bins, self.probe_dataset = free, half_life_samples, num_bins, probe_dataset
        self.probe_at_fit_end, self.probe_every = probe_at_fit_end, probe_every_n_epochs
        self.probe_samples, self.probe_batch_size, self.probe_seed = probe_samples, probe_batch_size, probe_seed
        self.optimize_on_save, self.log_every, self.resave_last = optimize_on_save, log_every_n_epochs, resave_last
        self.name, self.tune_reference_samples = name, int(tune_reference_samples)
        self.tune_settings = None
        if tune_at_fit_end:
            from .evaluation.tune import TuneSettings

            cells = {"solvers": self.grid.solvers, "steps": self.grid.steps, "bases": self.grid.bases}
            self.tune_settings = TuneSettings.from_dict({**cells, **dict(tune_settings or {})})
        self.schedule: NoiseSchedule | None = None
        self.running: ErrorProfile | None = None  # this rank's free-mode sums (on the model's device)
        self.skipped: Tensor = torch.zeros((), dtype=torch.float64)  # this rank's skipped samples
        self.probe: ErrorProfile | None = None
        self.probe_step, self.entries, self._entry_cache = -1, [], EntryCache(save_budget)
        self._tune_extra: dict[str, Any] = {}
        self._warned = self._fit_ended = False
        self._trainer: Trainer | None = None
        self._pending, self._train_started = None, None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.schedule = protocol_schedule(pl_module, probe=bool(self.probe_at_fit_end or self.probe_every))
        self._trainer, self._entry_cache.model_fn = trainer, getattr(pl_module, "vrg_denoiser", None)  # for gits
        if self.running is None:
            self.running = ErrorProfile.for_schedule(self.schedule, self.num_bins)
            self.running.source = "free"
        if self._pending is not None:
            self._apply_state(self._pending)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.free:
            return
        ab, err = protocol_fields(outputs)
        if self.running.sums.device != err.device:
            self.running.to(err.device)
            self.skipped = self.skipped.to(err.device)
        if self.half_life:
            self.running.scale_(0.5 ** (ab.shape[0] * trainer.world_size / self.half_life))
        loss = outputs.get("loss")
        valid = torch.isfinite(loss.detach()).expand(ab.shape[0]) if torch.is_tensor(loss) else None
        lam = alpha_bar_to_lambda(ab.detach().to(err.device, torch.float64))
        self.skipped = self.skipped + self.running.update(lam, err, valid)

    def _reduce(self, t: Tensor, trainer: Trainer) -> Tensor:
        return trainer.strategy.reduce(t.clone(), reduce_op="sum") if trainer.world_size > 1 else t.clone()

    def _all_rank_sums(self, trainer: Trainer | None) -> tuple[Tensor, int]:
        """``(free sums [7, bins] on CPU, skipped samples)`` summed over all ranks (a collective under DDP)."""
        flat = torch.cat([self.running.sums.flatten(), self.skipped.reshape(1)])
        flat = (self._reduce(flat, trainer) if trainer is not None else flat).cpu()
        return flat[:-1].view_as(self.running.sums).clone(), int(flat[-1].item())

    def free_profile(self, trainer: Trainer) -> ErrorProfile | None:
        """The free-mode profile summed over all ranks, on CPU (a collective under DDP: call on every rank)."""
        if not self.free or self.running is None:
            return None
        sums, skipped = self._all_rank_sums(trainer)
        if skipped and not self._warned:
            self._warned = True
            rank_zero_warn(f"VRGProfiler skipped {skipped} training samples with a non-finite loss or error so far; "
                           "they are left out of the error profile (count kept in vrg.profiler.nonfinite_skipped).")
        meta = {"schedule": self.schedule.to_dict(), "step": trainer.global_step, "half_life_samples": self.half_life,
                "nonfinite_skipped": skipped}
        return ErrorProfile(self.running.lambda_edges.cpu(), sums=sums, source="free", meta=meta)

    def _probe_dataset(self, trainer: Trainer) -> Dataset:
        ds = self.probe_dataset or getattr(getattr(trainer, "datamodule", None), "train_set", None) \
            or getattr(trainer.train_dataloader, "dataset", None)
        if ds is None:
            raise ValueError("VRGProfiler probe mode found no dataset: pass probe_dataset=... or use a datamodule "
                             "with a train_set attribute.")
        return ds

    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> ErrorProfile:
        """Probe with ``pl_module.vrg_denoiser()`` on this rank's shard and sum over ranks (collective)."""
        with eval_mode(pl_module.vrg_denoiser()) as den:
            local = probe_profile(den, self._probe_dataset(trainer), self.schedule, num_samples=self.probe_samples,
                                  num_bins=self.num_bins, seed=self.probe_seed, batch_size=self.probe_batch_size,
                                  rank=trainer.global_rank, world_size=trainer.world_size, device=pl_module.device)
        meta = {k: v for k, v in local.meta.items() if k != "rank"} | {"step": trainer.global_step}
        sums = self._reduce(local.sums.to(pl_module.device), trainer).cpu()
        self.probe = ErrorProfile(local.lambda_edges, sums=sums, source="probe", meta=meta)
        self.probe_step = trainer.global_step
        return self.probe

    def current_profile(self, trainer: Trainer) -> ErrorProfile | None:
        """Probe profile if measured at this step, else the free profile, else the last probe (collective)."""
        free = self.free_profile(trainer)
        if self.probe is not None and (self.probe_step == trainer.global_step or free is None
                                       or not bool(free.nonempty.any())):
            return self.probe
        return free

    def _entries(self, profile: ErrorProfile, trainer: Trainer) -> list[dict[str, Any]]:
        entries, fresh = self._entry_cache.entries(profile, self.schedule, self.grid, trainer, self._fit_ended)
        if fresh:  # a new profile: new entries (else keep these, which fit-end tuning may have validated)
            self.entries = entries
            if trainer.logger is not None and entries:
                trainer.logger.log_metrics(cpe_metrics(entries), step=trainer.global_step)
        return self.entries

    def vrg_state(self, trainer: Trainer, pl_module: LightningModule, optimize: bool = True) -> dict[str, Any] | None:
        """``checkpoint["vrg"]`` for the current state, trajectories optimised if ``optimize`` (collective)."""
        profile = self.current_profile(trainer)
        if profile is None or not bool(profile.nonempty.any()):
            return None
        entries = self._entries(profile, trainer) if optimize else []
        settings = {"profile_source": profile.source, "step": trainer.global_step, "free": self.free,
                    "half_life_samples": self.half_life, "num_bins": self.num_bins,
                    "probe_samples": self.probe_samples, "probe_seed": self.probe_seed,
                    "nonfinite_skipped": int(profile.meta.get("nonfinite_skipped", 0)), "optimize": self.grid.to_dict(),
                    "entries_step": self._entry_cache.step if entries else None}
        return build_vrg_state(self.schedule, profile, entries,
                               prediction_type=str(getattr(pl_module, "vrg_prediction_type", "epsilon")),
                               extra={"profiler": settings, **self._tune_extra})

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = self.vrg_state(trainer, pl_module, self.optimize_on_save or self._fit_ended)
        if state is not None:  # keeps what the module stored there (its "model" section)
            checkpoint[VRG_KEY] = {**(checkpoint.get(VRG_KEY) or {}), **state}

    @override
    def state_dict(self) -> dict[str, Any]:
        """The all-rank free sums and the probe (a collective under DDP, as Lightning calls it on every rank when
        it dumps a checkpoint), so a resume on any number of processes continues the same statistics."""
        sums, skipped = self._all_rank_sums(self._trainer) if self.running is not None else (None, 0)
        return {"version": 2, "schedule": self.schedule.to_dict() if self.schedule else None,
                "num_bins": self.num_bins, "free_sums": sums, "skipped": float(skipped), "reduced": True,
                "probe": None if self.probe is None else self.probe.to_dict(), "probe_step": self.probe_step,
                "warned": self._warned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)  # applied in setup, once the schedule is known
        if self.schedule is not None:
            self._apply_state(self._pending)

    def _apply_state(self, st: dict[str, Any]) -> None:
        self._pending = None
        if st.get("schedule") is not None:
            check_same_schedule(st["schedule"], self.schedule, "VRGProfiler state of the resumed checkpoint")
        if int(st.get("num_bins", self.num_bins)) != self.num_bins:
            raise ValueError(f"The resumed VRGProfiler state has num_bins={st.get('num_bins')} but this callback has "
                             f"num_bins={self.num_bins}; use the same num_bins or a fresh profile.")
        if st.get("free_sums") is not None:
            rank = self._trainer.global_rank if self._trainer is not None else 0
            keep = 1.0 if rank == 0 or not st.get("reduced", False) else 0.0  # all-rank sums: rank 0 holds them
            sums = torch.as_tensor(st["free_sums"], dtype=torch.float64)
            self.running.sums = sums.to(self.running.sums.device) * keep
            self.skipped = torch.tensor(float(st.get("skipped", 0.0)) * keep, dtype=torch.float64)
        if st.get("probe") is not None:
            self.probe = ErrorProfile.from_dict(st["probe"])
        self.probe_step = int(st.get("probe_step", -1))
        self._warned = bool(st.get("warned", False))

    def _log(self, trainer: Trainer, profile: ErrorProfile | None) -> None:
        if trainer.is_global_zero:
            log_profile(trainer.logger, profile, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.probe_every and epoch % self.probe_every == 0:
            self._log(trainer, self.run_probe(trainer, pl_module))
        if self.free and self.log_every and epoch % self.log_every == 0:
            self._log(trainer, self.free_profile(trainer))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_started = self._entry_cache.last_end = time.perf_counter()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_ended = True
        train_seconds = None if self._train_started is None else time.perf_counter() - self._train_started
        if self.probe_at_fit_end:
            self._log(trainer, self.run_probe(trainer, pl_module))
        elif self.free:
            self._log(trainer, self.free_profile(trainer))
        if self.tune_settings is not None:
            self.run_tune(trainer, pl_module, train_seconds)
        if self.resave_last and (path := _last_path(trainer)):
            trainer.save_checkpoint(path)
            trainer.checkpoint_callback.last_model_path = path
        elif self.resave_last:
            rank_zero_warn("VRGProfiler: no ModelCheckpoint(save_last=True) to re-save; the fit-end profile "
                               "is only in checkpoints saved from now on (trainer.save_checkpoint(...)).")

    def run_tune(self, trainer: Trainer, pl_module: LightningModule, train_seconds: float | None = None) -> None:
        """Validated selection of the current entries (:func:`~vrg_lightning.evaluation.tune.tune_in_fit`; rank 0
        samples, every rank gets the result: a collective)."""
        from .evaluation.tune import tune_in_fit

        state = self.vrg_state(trainer, pl_module, optimize=True)
        result = tune_in_fit(trainer, pl_module.vrg_denoiser(), state, self.tune_settings,
                             self._probe_dataset(trainer), self.tune_reference_samples, train_seconds)
        if result is not None:
            self.entries, self._tune_extra = result["entries"], result["extra"]


def _last_path(trainer: Trainer) -> str:
    """``ModelCheckpoint``'s last-checkpoint path (also when none was written yet), or ``""``."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "save_last", False):
        return ""
    if getattr(cb, "last_model_path", "") or not getattr(cb, "dirpath", None):
        return getattr(cb, "last_model_path", "")
    return os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
