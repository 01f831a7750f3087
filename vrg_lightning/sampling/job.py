"""The distributed, resumable sampling job behind ``vrg sample``.

:func:`run_sampling_job` runs ``trainer.predict`` of a :class:`SamplingModule` over index ranges ("shards"); a
:class:`ShardWriter` (a :class:`~lightning.pytorch.callbacks.BasePredictionWriter`) saves each shard atomically as
``shards/samples_<start>-<end>.pt`` with the sha256 of its tensors. ``manifest.json`` records everything that
determines the samples (:class:`SampleJob`); it is written once the job's arguments and the Trainer settings have
been checked, so a run refused for bad arguments leaves no manifest behind. A rerun with the same arguments skips
the shards that load and match their checksum (any other is sampled again), one with different arguments into the
same folder is refused. After a barrier every rank extracts FID features of its share of the shards, the float64
feature sums are reduced across ranks, and rank 0 verifies every shard and writes ``grid.png`` and ``report.json``
(with the shards' checksums). A rerun without FID keeps the FID of an earlier report over the same shards.

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

from ..io import atomic_torch_save, atomic_write_json, load_torch_file
from ..solvers import SOLVERS
from ..trajectories import validate_trajectory
from .generate import generate
from .seeds import sample_labels

__all__ = [
    "REPORT_FORMAT",
    "MANIFEST_FORMAT",
    "SampleJob",
    "file_sha256",
    "shard_ranges",
    "shard_path",
    "shard_digest",
    "read_shard",
    "load_samples",
    "check_output_folder",
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
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {self.solver!r}.")
        validate_trajectory(self.alpha_bar, "alpha_bar")
        if not self.image_shape or not all(isinstance(v, int) and v > 0 for v in self.image_shape):
            raise ValueError(f"image_shape must be positive integers (e.g. C, H, W); got {self.image_shape!r}.")

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


def shard_digest(samples: Tensor, labels: Tensor | None = None) -> str:
    """Hex sha256 of a shard's tensors (dtype, shape and bytes of ``samples`` and ``labels``)."""
    h = hashlib.sha256()
    for t in (samples, labels):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_shard(out: str | os.PathLike, start: int, end: int) -> dict[str, Any]:
    """Shard ``start..end-1`` of a job folder, verified: it loads, covers that range and matches its checksum.

    Raises:
        FileNotFoundError: no such shard.
        ValueError: the shard is truncated, corrupt or altered (the message names it; rerunning the job samples it
            again).
    """
    path = shard_path(out, start, end)
    redo = "rerun the same command to sample it again"
    try:
        shard = load_torch_file(path, "Sample shard")
    except ValueError as exc:
        raise ValueError(f"{str(exc).rstrip('.')}; {redo}.") from exc
    samples = shard.get("samples") if isinstance(shard, dict) else None
    if not torch.is_tensor(samples) or (shard.get("start"), shard.get("end")) != (start, end) \
            or samples.shape[0] != end - start:
        raise ValueError(f"Sample shard {str(path)!r} does not hold samples {start}..{end - 1}; {redo}.")
    if shard.get("sha256") != shard_digest(samples, shard.get("labels")):
        raise ValueError(f"Sample shard {str(path)!r} does not match its checksum (altered or written by an older "
                         f"version); {redo}.")
    return shard


def _shard_ok(out: str | os.PathLike, start: int, end: int) -> bool:
    try:
        read_shard(out, start, end)
    except (ValueError, FileNotFoundError):
        return False
    return True


def load_samples(out: str | os.PathLike, ranges: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The samples of a job folder (all shards of its manifest, or ``ranges``) in index order, each shard verified
    (:func:`read_shard`)."""
    if ranges is None:
        ranges = SampleJob.from_dict(_read_manifest(Path(out) / "manifest.json")["job"]).ranges
    return torch.cat([read_shard(out, a, b)["samples"] for a, b in ranges])


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable manifest ({exc}); it was changed by hand. Use another "
                         "output folder, or delete this one to start over.") from exc
    if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{str(path)!r} is not a {MANIFEST_FORMAT} file. Use another output folder.")
    return old


def check_output_folder(out: str | os.PathLike) -> Path:
    """Create the output folder ``out`` (and its parents) if needed; returns it.

    Raises:
        ValueError: ``out`` is a file. OSError: it cannot be created (permissions, read-only file system).
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"The output folder {str(p)!r} is a file; give a folder (new or from an earlier run).")
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_manifest(out: str | os.PathLike, identity: Mapping[str, Any], kind: str = "sample") -> None:
    """Write ``out/manifest.json`` or check that the one there has the same arguments. Call it once the
    arguments are known to be valid: a manifest claims the folder for them.

    Raises:
        FileExistsError: the folder holds output of different arguments (nothing is mixed or overwritten).
        ValueError: ``out`` is a file, or its manifest is unreadable.
    """
    path = check_output_folder(out) / "manifest.json"
    new = {"format": MANIFEST_FORMAT, "kind": kind, "job": json.loads(json.dumps(identity))}
    if path.exists():
        old = _read_manifest(path)
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
        if _shard_ok(self.out, a, b):  # finished by an earlier run: it loads and matches its checksum
            return {"start": a, "end": b, "skipped": True}
        j = self.job
        x = generate(self.denoiser, self.alpha_bar, j.solver, b - a, j.seed, start=a, batch_size=self.batch_size,
                     guidance_scale=j.guidance_scale, device=self.device, **j.solver_options).cpu()
        labels = sample_labels(j.seed, a, b, self.denoiser.num_classes)
        return {"start": a, "end": b, "samples": x, "labels": labels, "sha256": shard_digest(x, labels)}


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
        if not prediction.get("skipped"):  # a new shard, or one that replaces a broken one
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
            digests = {shard_path(self.out, a, b).name: read_shard(self.out, a, b)["sha256"] for a, b in ranges}
            self.report = self._write_report(trainer, fid, digests)
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

    def _earlier_fid(self, digests: Mapping[str, str]) -> dict[str, Any] | None:
        """``{"fid", "fid_reference"}`` of the report already in the folder if it measured these very shards."""
        try:
            old = json.loads((self.out / "report.json").read_text())
        except (OSError, ValueError):
            return None
        same = (isinstance(old, dict) and old.get("job") == self.job.to_dict()
                and (old.get("samples") or {}).get("sha256") == dict(digests))
        if not same or not old.get("fid"):
            return None
        return {"fid_reference": old.get("fid_reference"), "fid": old["fid"],
                "fid_kept": "measured by an earlier run over these same shards (sha256 unchanged); this run computed "
                            "no FID"}

    def _write_report(self, trainer: pl.Trainer, fid: dict[str, Any] | None,
                      digests: Mapping[str, str]) -> dict[str, Any]:
        from ..report import save_grid

        job, out, ranges = self.job, self.out, self.job.ranges
        shape = tuple(job.image_shape)
        grid = "grid.png" if len(shape) == 3 and shape[0] in (1, 3) else None  # images only (not vectors, ...)
        if grid is not None:
            save_grid(load_samples(out, ranges[: -(-GRID_IMAGES // job.shard_size)])[:GRID_IMAGES], out / grid)
        kept = self._earlier_fid(digests) if fid is None else None  # a rerun without FID keeps the earlier one
        report = {
            "format": REPORT_FORMAT,
            "version": 1,
            "job": job.to_dict(),
            **self.report_extra,
            **({"fid": fid} if kept is None else kept),
            "samples": {"num": job.num_samples, "shards": [shard_path(out, a, b).name for a, b in ranges],
                        "sha256": dict(digests), "grid": grid},
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

    ``out/manifest.json`` is written only after everything above has been checked and the Trainer built, so a
    refused run leaves the folder free for the corrected one.

    Raises:
        ValueError: only one of ``extractor``/``reference``, Trainer settings Lightning refuses, fewer shards than
            processes, or ``out`` is a file.
        FileExistsError: ``out`` holds output of a job with other settings.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from torch.utils.data import DataLoader

    writer = ShardWriter(job, out, batch_size=batch_size, extractor=extractor, reference=reference,
                         report_extra=report_extra, trainer_kwargs=trainer_kwargs, progress=progress)
    check_output_folder(out)
    kwargs = {"precision": job.precision, **dict(trainer_kwargs or {})}
    try:
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[writer],
                             enable_progress_bar=progress, **kwargs)
    except (ValueError, TypeError, MisconfigurationException) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(f"Lightning refuses the Trainer settings ({given}): {exc}") from exc
    ranges = job.ranges
    if len(ranges) < trainer.world_size:
        raise ValueError(f"{job.num_samples} samples in shards of {job.shard_size} give {len(ranges)} shard(s), fewer "
                         f"than the {trainer.world_size} processes; use fewer devices or a smaller shard_size.")
    check_manifest(out, job.to_dict())
    loader = DataLoader(ranges, batch_size=1, shuffle=False, collate_fn=_first)
    trainer.predict(SamplingModule(denoiser, job, out, batch_size), dataloaders=loader, return_predictions=False)
    if writer.report is None and trainer.is_global_zero:  # spawned ranks: rank 0 wrote the report in its process
        return json.loads((Path(out) / "report.json").read_text())
    return writer.report
