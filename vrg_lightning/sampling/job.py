"""The distributed, resumable sampling job behind ``vrg sample``.

:func:`run_sampling_job` runs ``trainer.predict`` of a :class:`SamplingModule` over index ranges ("shards"); a
:class:`ShardWriter` (a :class:`~lightning.pytorch.callbacks.BasePredictionWriter`) saves each shard atomically as
``shards/samples_<start>-<end>.pt``. ``manifest.json`` records everything that determines the samples
(:class:`SampleJob`): a rerun with the same arguments skips finished shards, one with different arguments into the
same folder is refused. After a barrier every rank extracts FID features of its share of the shards, the float64
feature sums are reduced across ranks, and rank 0 writes ``grid.png`` and ``report.json``.

Both classes live at module level and hold only picklable state, so every Lightning strategy works, ``ddp_spawn``
and notebooks included.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from ..io import atomic_torch_save, atomic_write_json
from .generate import generate
from .seeds import sample_labels

__all__ = [
    "REPORT_FORMAT",
    "MANIFEST_FORMAT",
    "SampleJob",
    "file_sha256",
    "shard_ranges",
    "shard_path",
    "load_samples",
    "check_manifest",
    "SamplingModule",
    "ShardWriter",
    "run_sampling_job",
]

REPORT_FORMAT = "vrg-sample-report"
MANIFEST_FORMAT = "vrg-sample-manifest"
GRID_IMAGES = 64


@dataclass(frozen=True)
class SampleJob:
    """Everything that determines a job's samples (the manifest); batch size and process count do not."""

    ckpt_sha256: str
    solver: str
    alpha_bar: tuple[float, ...]
    num_samples: int
    seed: int = 0
    shard_size: int = 500
    guidance_scale: float = 1.0
    use_ema: bool = True
    precision: str = "32-true"
    image_shape: tuple[int, int, int] = (1, 16, 16)
    solver_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_samples", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The job's shards (:func:`shard_ranges`)."""
        return shard_ranges(self.num_samples, self.shard_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_bar"], d["image_shape"] = list(self.alpha_bar), list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleJob:
        d = dict(d)
        d["alpha_bar"], d["image_shape"] = tuple(d["alpha_bar"]), tuple(d["image_shape"])
        return cls(**d)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(0, s), (s, 2s), ...]`` covering ``num_samples``.

    Example:
        >>> shard_ranges(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(out: str | os.PathLike, start: int, end: int) -> Path:
    """The file of shard ``start..end-1`` in a job folder."""
    return Path(out) / "shards" / f"samples_{start:08d}-{end:08d}.pt"


def load_samples(out: str | os.PathLike, ranges: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The samples of a job folder (all shards of its manifest, or ``ranges``) in index order."""
    if ranges is None:
        ranges = SampleJob.from_dict(json.loads((Path(out) / "manifest.json").read_text())["job"]).ranges
    return torch.cat([torch.load(shard_path(out, a, b), weights_only=True)["samples"] for a, b in ranges])


def check_manifest(out: str | os.PathLike, identity: Mapping[str, Any], kind: str = "sample") -> None:
    """Write ``out/manifest.json`` or check that the one there has the same arguments.

    Raises:
        FileExistsError: the folder holds output of different arguments (nothing is mixed or overwritten).
    """
    path = Path(out) / "manifest.json"
    new = {"format": MANIFEST_FORMAT, "kind": kind, "job": json.loads(json.dumps(identity))}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("kind") != kind or old.get("job") != new["job"]:
            a, b = old.get("job", {}), new["job"]
            diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] or ["kind"]
            raise FileExistsError(
                f"{str(out)!r} holds output of a {old.get('kind')} run with different arguments (differ in: "
                f"{', '.join(diff)}); refusing to mix them. Use another output folder, or delete this one to start "
                "over."
            )
        return
    atomic_write_json(path, new)


class SamplingModule(pl.LightningModule):
    """``predict_step`` over shards ``(start, end)``: the images of :func:`~vrg_lightning.sampling.generate` and
    their labels, or ``{"skipped": True}`` for a shard an earlier run finished."""

    def __init__(self, denoiser: Any, job: SampleJob, out: str | os.PathLike, batch_size: int = 64) -> None:
        super().__init__()
        self.denoiser, self.job, self.out, self.batch_size = denoiser, job, Path(out), int(batch_size)
        self.alpha_bar = torch.tensor(job.alpha_bar, dtype=torch.float64)

    def on_predict_start(self) -> None:
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores of this node
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, self.trainer.num_devices)))

    def predict_step(self, batch: tuple[int, int], batch_idx: int) -> dict[str, Any]:
        a, b = int(batch[0]), int(batch[1])
        if shard_path(self.out, a, b).is_file():
            return {"start": a, "end": b, "skipped": True}
        j = self.job
        x = generate(self.denoiser, self.alpha_bar, j.solver, b - a, j.seed, start=a, batch_size=self.batch_size,
                     guidance_scale=j.guidance_scale, device=self.device, **j.solver_options)
        return {"start": a, "end": b, "samples": x, "labels": sample_labels(j.seed, a, b, self.denoiser.num_classes)}


class ShardWriter(BasePredictionWriter):
    """Saves each predicted shard atomically; at the end of predict, the FID (all ranks), the grid and the report
    (rank 0, also kept in :attr:`report`)."""

    def __init__(self, job: SampleJob, out: str | os.PathLike, *, batch_size: int = 64, extractor: Any = None,
                 reference: Any = None, report_extra: Mapping[str, Any] | None = None,
                 trainer_kwargs: Mapping[str, Any] | None = None, progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        if (extractor is None) != (reference is None):
            raise ValueError("FID needs both extractor and reference, or neither; got "
                             f"extractor={type(extractor).__name__}, reference={type(reference).__name__}.")
        self.job, self.out, self.batch_size, self.progress = job, Path(out), int(batch_size), progress
        self.extractor, self.reference = extractor, reference
        self.report_extra, self.trainer_kwargs = dict(report_extra or {}), dict(trainer_kwargs or {})
        self.started = time.time()
        self.report: dict[str, Any] | None = None

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not prediction.get("skipped"):
            atomic_torch_save(shard_path(self.out, prediction["start"], prediction["end"]), prediction)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("vrg-shards-written")
        ranges = self.job.ranges
        missing = [shard_path(self.out, a, b).name for a, b in ranges if not shard_path(self.out, a, b).is_file()]
        if missing:
            raise RuntimeError(f"Shards missing after sampling: {', '.join(missing[:5])}")
        fid = None
        if self.extractor is not None:
            fid = self._fid(ranges[trainer.global_rank :: trainer.world_size], trainer, pl_module.device)
        if trainer.global_rank == 0:
            self.report = self._write_report(trainer, fid)
        trainer.strategy.barrier("vrg-report-written")

    def _fid(self, mine: Sequence[tuple[int, int]], trainer: pl.Trainer, device: torch.device) -> dict[str, Any]:
        """FID of all ranks' shards: this rank's feature sums, reduced across ranks (a collective)."""
        from ..evaluation import FIDResult, feature_stats, reduce_feature_stats

        ext = self.extractor.to(device)
        chunk = max(self.batch_size, 256)
        batches = (c for a, b in mine for c in load_samples(self.out, [(a, b)]).split(chunk))
        with torch.no_grad():
            local = feature_stats(batches, ext, progress=self.progress and trainer.global_rank == 0,
                                  desc=f"FID[{ext.name}] features")
        return FIDResult.from_stats(reduce_feature_stats(local, trainer.strategy), self.reference).to_dict()

    def _write_report(self, trainer: pl.Trainer, fid: dict[str, Any] | None) -> dict[str, Any]:
        from ..report import save_grid

        job, out, ranges = self.job, self.out, self.job.ranges
        save_grid(load_samples(out, ranges[: -(-GRID_IMAGES // job.shard_size)])[:GRID_IMAGES], out / "grid.png")
        report = {
            "format": REPORT_FORMAT,
            "version": 1,
            "job": job.to_dict(),
            **self.report_extra,
            "fid": fid,
            "samples": {"num": job.num_samples, "shards": [shard_path(out, a, b).name for a, b in ranges],
                        "grid": "grid.png"},
            "run": {"world_size": trainer.world_size, "batch_size": self.batch_size,
                    "seconds": round(time.time() - self.started, 3),
                    "trainer": {k: str(v) for k, v in self.trainer_kwargs.items()}},
        }
        atomic_write_json(out / "report.json", report)
        return report


def _first(batch: list[Any]) -> Any:
    return batch[0]


def run_sampling_job(
    denoiser: Any,
    job: SampleJob,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    trainer_kwargs: Mapping[str, Any] | None = None,
    extractor: Any = None,
    reference: Any = None,
    report_extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run (or resume) a sampling job with Lightning; returns the report on global rank 0, ``None`` elsewhere.

    Args:
        denoiser: the model (EMA weights already loaded).
        job: the sample-determining settings (written to / checked against ``out/manifest.json``).
        out: output folder: ``manifest.json``, ``shards/``, ``grid.png``, ``report.json``.
        batch_size: images per solver call (does not change the images).
        trainer_kwargs: ``accelerator``, ``devices``, ``num_nodes``, ``strategy`` (any, ``ddp_spawn`` included)
            for ``lightning.Trainer``.
        extractor, reference: FID features and reference statistics (both or neither).
        report_extra: more report fields (checkpoint path, trajectory, cpe, FID reference name, ...).

    Raises:
        ValueError: only one of ``extractor``/``reference``, or fewer shards than processes.
        FileExistsError: ``out`` holds output of a job with other settings.
    """
    from torch.utils.data import DataLoader

    writer = ShardWriter(job, out, batch_size=batch_size, extractor=extractor, reference=reference,
                         report_extra=report_extra, trainer_kwargs=trainer_kwargs, progress=progress)
    check_manifest(out, job.to_dict())
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[writer],
                         enable_progress_bar=progress, precision=job.precision, **dict(trainer_kwargs or {}))
    ranges = job.ranges
    if len(ranges) < trainer.world_size:
        raise ValueError(f"{job.num_samples} samples in shards of {job.shard_size} give {len(ranges)} shard(s), fewer "
                         f"than the {trainer.world_size} processes; use fewer devices or a smaller shard_size.")
    loader = DataLoader(ranges, batch_size=1, shuffle=False, collate_fn=_first)
    trainer.predict(SamplingModule(denoiser, job, out, batch_size), dataloaders=loader, return_predictions=False)
    if writer.report is None and trainer.is_global_zero:  # spawned ranks: rank 0 wrote the report in its process
        return json.loads((Path(out) / "report.json").read_text())
    return writer.report
