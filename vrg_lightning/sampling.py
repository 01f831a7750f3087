"""Sampling with stored trajectories: deterministic generation, the distributed resumable job, reports.

Determinism: sample ``i`` of seed ``s`` starts from noise (and, for class-conditional models, a label) drawn from
its own ``torch.Generator`` seeded with a hash of ``(s, i)``, so the images do not depend on the batch size or on
the number of processes, and a base trajectory and its VRG version sampled with the same seed start from the
same noise (paired comparisons).

The job (:func:`run_sampling_job`, ``vrg sample``) runs ``trainer.predict`` over index ranges ("shards");
a :class:`~lightning.pytorch.callbacks.BasePredictionWriter` saves each shard atomically as
``shards/samples_<start>-<end>.pt``. ``manifest.json`` records everything that determines the samples: a rerun
with the same arguments skips finished shards, one with different arguments into the same folder is refused.
After a barrier, every rank extracts FID features of its share of the shards; torchmetrics' sum states are
reduced across ranks, and rank 0 writes ``grid.png`` and ``report.json``.

Compare mode: :func:`paired_compare` samples a base trajectory and its VRG version from the same noise over several
seeds (single process, :func:`generate`), :func:`compare_markdown` and :func:`plot_compare` report it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .io import atomic_torch_save, atomic_write, atomic_write_json
from .metrics import FeatureExtractor, FeatureStats, FIDResult, feature_stats, fid_from_stats
from .solvers import sample as solver_sample
from .trajectories import BASES, load_trajectory, make_trajectory, validate_trajectory

__all__ = [
    "sample_seed",
    "initial_noise",
    "sample_labels",
    "image_shape",
    "generate",
    "Trajectory",
    "select_vrg_entry",
    "resolve_trajectory",
    "trajectory_cpe",
    "file_sha256",
    "SampleJob",
    "shard_ranges",
    "shard_path",
    "load_samples",
    "check_manifest",
    "save_grid",
    "run_sampling_job",
]

REPORT_FORMAT = "vrg-sample-report"
MANIFEST_FORMAT = "vrg-sample-manifest"


# --- determinism --------------------------------------------------------------------------------------------------
def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of run ``seed``: 63 bits of sha256("seed:index").

    Example:
        >>> sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(1, 0)
        True
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()[:8], "little") >> 1


def initial_noise(
    seed: int, start: int, end: int, shape: Sequence[int], num_classes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Starting noise ``[end-start, *shape]`` (float32, CPU) of samples ``start..end-1`` and their labels
    (:func:`sample_labels`); each depends only on ``(seed, index)``."""
    xs = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)),
                      dtype=torch.float32) for i in range(start, end)]  # explicit: the default dtype may be float64
    x = torch.stack(xs) if xs else torch.empty(0, *shape, dtype=torch.float32)
    return x, sample_labels(seed, start, end, num_classes)


def sample_labels(seed: int, start: int, end: int, num_classes: int | None) -> Tensor | None:
    """Class labels of samples ``start..end-1`` (uniform, from their own per-index stream), ``None`` if
    unconditional."""
    if num_classes is None:
        return None
    gens = [torch.Generator().manual_seed(sample_seed(seed, i) ^ 0x2545F4914F6CDD1D) for i in range(start, end)]
    return torch.tensor([int(torch.randint(num_classes, (), generator=g)) for g in gens], dtype=torch.long)


def image_shape(denoiser: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` of a :class:`~vrg_lightning.denoiser.Denoiser`'s samples."""
    cfg = denoiser.unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)


@torch.no_grad()
def generate(
    denoiser: Any,
    alpha_bar: Tensor,
    solver: str,
    num_samples: int,
    seed: int,
    *,
    start: int = 0,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    **solver_options: Any,
) -> Tensor:
    """Samples ``start .. start+num_samples-1`` of ``seed`` in one process, clamped to [-1, 1] (float32, CPU).

    The starting noise depends only on ``(seed, index)``; the solver runs in the denoiser's dtype. Images equal
    the distributed job's for the same seed and indices. With the same batch size and threads per process they are
    bit-identical; across batch sizes, float32 kernels round differently (about 1e-5 after the cancellation in
    ``x₀ = x̃ - σ ε̂`` at σ_max ≈ 157), while a float64 denoiser (``denoiser.double()``, ``--precision 64-true``)
    agrees to ~1e-13.

    Args:
        denoiser: a :class:`~vrg_lightning.denoiser.Denoiser` (``eps_fn``, ``num_classes``, ``unet``).
        alpha_bar: the trajectory (ᾱ, cleanest first).
        solver: one of :data:`vrg_lightning.solvers.SOLVERS`.
        guidance_scale: classifier-free guidance weight (class-conditional models).
        device: where to run (default: the denoiser's device).
        **solver_options: passed to :func:`vrg_lightning.solvers.sample`.
    """
    from tqdm.auto import tqdm

    for name, v, lo in (("num_samples", num_samples, 0), ("batch_size", batch_size, 1), ("start", start, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    param = next(denoiser.parameters())
    dev = torch.device(device) if device is not None else param.device
    ab = validate_trajectory(alpha_bar).cpu()  # CPU coefficients and timesteps: no GPU sync per step
    shape = image_shape(denoiser)
    out = []
    for a in tqdm(range(start, start + num_samples, batch_size), desc=f"sampling {solver}", disable=not progress,
                  leave=False):
        b = min(a + batch_size, start + num_samples)
        x, labels = initial_noise(seed, a, b, shape, denoiser.num_classes)
        eps_fn = denoiser.eps_fn(None if labels is None else labels.to(dev), guidance_scale)
        x = x.to(dev, param.dtype)
        out.append(solver_sample(solver, eps_fn, x, ab, **solver_options).clamp(-1, 1).float().cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


# --- trajectories -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectory:
    """A resolved sampling trajectory and where it came from (``base:NAME``, ``vrg`` or ``file:PATH``)."""

    alpha_bar: tuple[float, ...]
    source: str
    base: str | None = None
    entry: dict[str, Any] | None = None

    @property
    def tensor(self) -> Tensor:
        return torch.tensor(self.alpha_bar, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "base": self.base, "steps": len(self.alpha_bar),
                "alpha_bar": list(self.alpha_bar), "entry": self.entry}


def _entry_summary(e: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("solver", "steps", "base", "objective", "lp", "reg_lambda", "trust", "cpe_before", "cpe_after",
            "validated")
    return {k: e.get(k) for k in keys if k in e}


def select_vrg_entry(
    vrg: Mapping[str, Any] | None,
    solver: str,
    steps: int,
    *,
    base: str | None = None,
    objective: str | None = None,
    lp: float | None = None,
) -> dict[str, Any]:
    """The stored VRG entry for ``(solver, steps)`` (optionally ``base``/``objective``/``lp``).

    An entry with ``validated.selected == True`` wins; otherwise the match must be unique.

    Raises:
        ValueError: no ``vrg`` section, no match (the message lists the stored ``(solver, steps, base)``), or
            several matches.
    """
    if not vrg:
        raise ValueError("--trajectory vrg needs a checkpoint with stored VRG trajectories (checkpoint['vrg']); "
                         "this one has none. Run `vrg profile` first, or sample a base trajectory.")
    from .checkpoint import matching_entries

    entries = list(vrg.get("entries", []))
    want = {"solver": solver, "steps": int(steps), "base": base, "objective": objective}
    found = matching_entries(vrg, solver, steps, base, objective, lp)
    asked = ", ".join(f"{k}={v}" for k, v in {**want, "lp": lp}.items() if v is not None)
    if not found:
        stored = sorted({(str(e.get("solver")), int(e.get("steps", 0)), str(e.get("base"))) for e in entries})
        listing = ", ".join(f"({s}, {n}, {b})" for s, n, b in stored) or "none"
        raise ValueError(f"No stored VRG trajectory for {asked}. Stored (solver, steps, base): {listing}. "
                         "Optimize one with `vrg profile`/`vrg optimize`, or pass a base name to --trajectory.")
    selected = [e for e in found if isinstance(e.get("validated"), Mapping) and e["validated"].get("selected") is True]
    pick = selected or found
    if len(pick) > 1:
        from .checkpoint import describe_entry

        raise ValueError(f"{len(pick)} stored VRG trajectories match {asked}: "
                         f"{'; '.join(describe_entry(e) for e in pick)}. Pick one with --base/--objective/--lp.")
    return dict(pick[0])


def resolve_trajectory(
    schedule: Any,
    vrg: Mapping[str, Any] | None,
    solver: str,
    steps: int | None,
    trajectory: str,
    *,
    base: str | None = None,
    objective: str | None = None,
    lp: float | None = None,
) -> Trajectory:
    """Turn ``--trajectory`` (a base name, ``vrg`` or a trajectory file) into ᾱ values.

    Raises:
        ValueError: unknown name and no such file, a file whose length differs from ``steps``, or no stored entry.
    """
    if trajectory == "vrg":
        if steps is None:
            raise ValueError("--trajectory vrg needs --steps N.")
        e = select_vrg_entry(vrg, solver, steps, base=base, objective=objective, lp=lp)
        if vrg is not None and "schedule" in vrg:
            from .checkpoint import check_same_schedule

            check_same_schedule(vrg["schedule"], schedule, "checkpoint's vrg section")
        ab = validate_trajectory(e["alpha_bar"], "stored VRG trajectory")
        val = e.get("validated")
        if isinstance(val, Mapping) and val.get("selected") is False:  # vrg tune kept the base: alpha_bar is the base
            import sys

            print(f"vrg: validated tuning kept the base {e.get('base')} for {solver}/{steps} ({val.get('reason')}); "
                  "sampling the base trajectory.", file=sys.stderr)
        return Trajectory(tuple(ab.tolist()), "vrg", e.get("base"), _entry_summary(e))
    if trajectory in BASES and trajectory != "list":
        if steps is None:
            raise ValueError(f"--trajectory {trajectory} needs --steps N.")
        ab = make_trajectory(schedule, trajectory, int(steps))
        return Trajectory(tuple(ab.tolist()), f"base:{trajectory}", trajectory)
    p = Path(trajectory)
    if not p.is_file():
        allowed = ", ".join(b for b in BASES if b != "list")
        raise ValueError(f"--trajectory must be a base name ({allowed}), 'vrg' or a trajectory file; got "
                         f"{trajectory!r} (no such file).")
    ab = load_trajectory(p)
    if steps is not None and ab.numel() != steps:
        raise ValueError(f"Trajectory file {trajectory!r} holds {ab.numel()} values but --steps is {steps}.")
    return Trajectory(tuple(ab.tolist()), f"file:{p}", None)


def trajectory_cpe(alpha_bar: Tensor, vrg: Mapping[str, Any] | None, solver: str) -> dict[str, float] | None:
    """cpe of a trajectory under the checkpoint's error profile: ``{"paper": .., "solver": .., "mse": "fit"}``."""
    if not vrg or "profile" not in vrg:
        return None
    from .profile import ErrorProfile
    from .variance import cpe

    mse = ErrorProfile.from_dict(vrg["profile"]).mse_function("fit")
    ab = validate_trajectory(alpha_bar)
    out: dict[str, Any] = {"mse": "fit", "paper": float(cpe(ab, mse, "paper"))}
    try:
        out["solver"] = float(cpe(ab, mse, "solver", solver))
    except ValueError:
        out["solver"] = None
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the job ------------------------------------------------------------------------------------------------------
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_bar"], d["image_shape"] = list(self.alpha_bar), list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleJob:
        d = dict(d)
        d["alpha_bar"], d["image_shape"] = tuple(d["alpha_bar"]), tuple(d["image_shape"])
        return cls(**d)


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(0, s), (s, 2s), ...]`` covering ``num_samples``.

    Example:
        >>> shard_ranges(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def shard_path(out: str | os.PathLike, start: int, end: int) -> Path:
    return Path(out) / "shards" / f"samples_{start:08d}-{end:08d}.pt"


def load_samples(out: str | os.PathLike, ranges: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The samples of a job folder (all shards of its manifest, or ``ranges``) in index order."""
    if ranges is None:
        job = SampleJob.from_dict(json.loads((Path(out) / "manifest.json").read_text())["job"])
        ranges = shard_ranges(job.num_samples, job.shard_size)
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
                f"{', '.join(diff)}); refusing to mix them. Use another --out, or delete the folder to start over."
            )
        return
    atomic_write_json(path, new)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, pad: int = 1) -> None:
    """Save images in [-1, 1] (``[N, C, H, W]``, C = 1 or 3) as one PNG grid, atomically; images smaller than
    64 pixels are enlarged (nearest neighbour) so the grid can be looked at."""
    from PIL import Image

    scale = max(1, 64 // max(images.shape[-2:]))
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def _first(batch: list[Any]) -> Any:
    return batch[0]


def run_sampling_job(
    denoiser: Any,
    job: SampleJob,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    trainer_kwargs: Mapping[str, Any] | None = None,
    extractor: FeatureExtractor | None = None,
    reference: FeatureStats | None = None,
    report_extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run (or resume) a sampling job with Lightning; returns the report on global rank 0, ``None`` elsewhere.

    Args:
        denoiser: the model (EMA weights already loaded).
        job: the sample-determining settings (written to / checked against ``out/manifest.json``).
        out: output folder: ``manifest.json``, ``shards/``, ``grid.png``, ``report.json``.
        batch_size: images per solver call (does not change the images).
        trainer_kwargs: ``accelerator``, ``devices``, ``num_nodes``, ``strategy`` for ``lightning.Trainer``.
        extractor, reference: FID features and reference statistics (both or neither).
        report_extra: more report fields (checkpoint path, trajectory, cpe, FID reference name, ...).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BasePredictionWriter
    from torch.utils.data import DataLoader

    if (extractor is None) != (reference is None):
        raise ValueError("run_sampling_job needs both extractor and reference for FID, or neither.")
    strategy = str((trainer_kwargs or {}).get("strategy", "auto"))
    if "spawn" in strategy:
        raise ValueError(f"--strategy {strategy} pickles the job, which holds local classes; use --strategy ddp "
                         "(one process per device, launched as a subprocess) instead.")
    out = Path(out)
    check_manifest(out, job.to_dict())
    ranges = shard_ranges(job.num_samples, job.shard_size)
    alpha_bar = torch.tensor(job.alpha_bar, dtype=torch.float64)
    started = time.time()

    class SamplingModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.denoiser = denoiser

        def predict_step(self, batch: tuple[int, int], batch_idx: int) -> dict[str, Any]:
            a, b = int(batch[0]), int(batch[1])
            if shard_path(out, a, b).is_file():
                return {"start": a, "end": b, "skipped": True}  # finished by an earlier run
            x = generate(self.denoiser, alpha_bar, job.solver, b - a, job.seed, start=a, batch_size=batch_size,
                         guidance_scale=job.guidance_scale, device=self.device, **job.solver_options)
            labels = sample_labels(job.seed, a, b, self.denoiser.num_classes)
            return {"start": a, "end": b, "samples": x, "labels": labels}

    class ShardWriter(BasePredictionWriter):
        def __init__(self) -> None:
            super().__init__(write_interval="batch")
            self.report: dict[str, Any] | None = None

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx) -> None:
            if not prediction.get("skipped"):
                atomic_torch_save(shard_path(out, prediction["start"], prediction["end"]), prediction)

        def on_predict_end(self, trainer, pl_module) -> None:
            trainer.strategy.barrier("vrg-shards-written")
            self.report = _finish(trainer, pl_module.device)
            trainer.strategy.barrier("vrg-report-written")

    def _finish(trainer: Any, device: torch.device) -> dict[str, Any] | None:
        missing = [shard_path(out, a, b).name for a, b in ranges if not shard_path(out, a, b).is_file()]
        if missing:
            raise RuntimeError(f"Shards missing after sampling: {', '.join(missing[:5])}")
        fid = None
        if extractor is not None and reference is not None:
            fid = _distributed_fid(ranges[trainer.global_rank :: trainer.world_size], trainer, device)
        if trainer.global_rank != 0:
            return None
        save_grid(load_samples(out, ranges[: -(-64 // job.shard_size)])[:64], out / "grid.png")
        seconds = time.time() - started
        report = {
            "format": REPORT_FORMAT,
            "version": 1,
            "job": job.to_dict(),
            **dict(report_extra or {}),
            "fid": fid,
            "samples": {"num": job.num_samples, "shards": [shard_path(out, a, b).name for a, b in ranges],
                        "grid": "grid.png"},
            "run": {"world_size": trainer.world_size, "batch_size": batch_size, "seconds": round(seconds, 3),
                    "trainer": {k: str(v) for k, v in (trainer_kwargs or {}).items()}},
        }
        atomic_write_json(out / "report.json", report)
        return report

    def _distributed_fid(mine: Sequence[tuple[int, int]], trainer: Any, device: torch.device) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from .metrics import make_fid_metric, synced_fake_stats

        metric = make_fid_metric(extractor, reference, sync_on_compute=True).to(device)
        bar = tqdm(mine, desc=f"FID[{extractor.name}] features", disable=not progress or trainer.global_rank != 0,
                   leave=False)
        with torch.no_grad():
            for a, b in bar:
                for chunk in load_samples(out, [(a, b)]).split(max(batch_size, 256)):
                    metric.update(chunk.to(device), real=False)
        stats = synced_fake_stats(metric, extractor)
        res = FIDResult(fid_from_stats(stats, reference), extractor.name, stats.n, reference.n)
        return res.to_dict()

    cpu = str((trainer_kwargs or {}).get("accelerator", "cpu")) == "cpu" or not torch.cuda.is_available()
    if cpu and "OMP_NUM_THREADS" not in os.environ:  # share the cores among the processes of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _local_world(trainer_kwargs)))
    writer = ShardWriter()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[writer],
                         enable_progress_bar=progress, precision=job.precision, **dict(trainer_kwargs or {}))
    loader = DataLoader(ranges, batch_size=1, shuffle=False, collate_fn=_first)
    if len(ranges) < trainer.world_size:
        raise ValueError(f"{job.num_samples} samples in shards of {job.shard_size} give {len(ranges)} shard(s), fewer "
                         f"than the {trainer.world_size} processes; use fewer devices or a smaller --shard-size.")
    trainer.predict(SamplingModule(), dataloaders=loader, return_predictions=False)
    return writer.report


def _local_world(trainer_kwargs: Mapping[str, Any] | None) -> int:
    d = (trainer_kwargs or {}).get("devices", 1)
    try:
        return max(1, int(d))
    except (TypeError, ValueError):
        return max(1, len(d)) if isinstance(d, (list, tuple)) else 1


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


__all__ += ["CompareRow", "paired_compare", "compare_markdown", "plot_compare", "fid_stats_of"]


# --- compare mode -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareRow:
    """Base trajectory vs its VRG version: FID per seed (same initial noise), paired difference, cpe."""

    solver: str
    steps: int
    base: str
    features: str
    seeds: tuple[int, ...]
    fid_base: tuple[float, ...]
    fid_vrg: tuple[float, ...]
    difference: dict[str, Any]
    cpe_base: float | None
    cpe_vrg: float | None
    objective: str
    alpha_bar_base: tuple[float, ...]
    alpha_bar_vrg: tuple[float, ...]
    entry: dict[str, Any] | None = None
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("seeds", "fid_base", "fid_vrg", "alpha_bar_base", "alpha_bar_vrg"):
            d[k] = list(d[k])
        return d


def fid_stats_of(
    denoiser: Any, alpha_bar: Tensor, solver: str, num_samples: int, seed: int, extractor: FeatureExtractor, *,
    batch_size: int = 64, guidance_scale: float = 1.0, device: torch.device | str | None = None,
    cache: str | os.PathLike | None = None, progress: bool = False,
) -> FeatureStats:
    """Feature statistics of ``generate(...)``'s images; with ``cache`` (a file) computed once and reused."""
    if cache is not None and Path(cache).is_file():
        return FeatureStats.from_dict(torch.load(cache, weights_only=True))
    images = generate(denoiser, alpha_bar, solver, num_samples, seed, batch_size=batch_size,
                      guidance_scale=guidance_scale, device=device, progress=progress)
    stats = feature_stats(images, extractor, batch_size=max(batch_size, 256))
    if cache is not None:
        atomic_torch_save(cache, stats.to_dict())
    return stats


def paired_compare(
    denoiser: Any,
    solver: str,
    base_alpha_bar: Tensor,
    vrg_alpha_bar: Tensor,
    *,
    extractor: FeatureExtractor,
    reference: FeatureStats,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 1000,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
    mse: Callable[[Tensor], Tensor] | None = None,
    objective: str = "paper",
    base: str = "",
    entry: Mapping[str, Any] | None = None,
    confidence: float = 0.95,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> CompareRow:
    """FID of a base trajectory and its VRG version over ``seeds``, each pair from the same initial noise.

    The paired difference ``FID_vrg - FID_base`` (mean over seeds, t-interval; negative = VRG better) comes from
    :func:`vrg_lightning.stats.paired_difference`. ``cache_dir`` keeps each (trajectory, seed)'s statistics so an
    interrupted comparison resumes.
    """
    from .stats import paired_difference
    from .variance import cpe

    if not seeds:
        raise ValueError("paired_compare needs at least one seed.")
    trajs = {"base": validate_trajectory(base_alpha_bar), "vrg": validate_trajectory(vrg_alpha_bar)}
    fids: dict[str, list[float]] = {"base": [], "vrg": []}
    steps = trajs["base"].numel()
    for seed in seeds:
        for kind, ab in trajs.items():
            cache = None if cache_dir is None else Path(cache_dir) / f"{solver}-{steps}-{base}-{kind}-seed{seed}.pt"
            stats = fid_stats_of(denoiser, ab, solver, num_samples, seed, extractor, batch_size=batch_size,
                                 guidance_scale=guidance_scale, device=device, cache=cache, progress=progress)
            fids[kind].append(fid_from_stats(stats, reference))
    diff = paired_difference(fids["base"], fids["vrg"], confidence)
    cb = cv = None
    if mse is not None:
        kw = {"solver": solver} if objective == "solver" else {}
        cb, cv = (float(cpe(trajs[k], mse, objective, **kw)) for k in ("base", "vrg"))
    return CompareRow(solver, steps, base, extractor.name, tuple(int(s) for s in seeds), tuple(fids["base"]),
                      tuple(fids["vrg"]), diff.to_dict(), cb, cv, objective, tuple(trajs["base"].tolist()),
                      tuple(trajs["vrg"].tolist()), dict(entry) if entry else None, num_samples)


def compare_markdown(rows: Sequence[CompareRow]) -> str:
    """Markdown table: FID base / VRG (mean over seeds), paired difference with its CI, cpe base / VRG."""
    if not rows:
        return "No comparisons.\n"
    conf = rows[0].difference.get("confidence", 0.95)
    head = (f"| solver | steps | base | FID[{rows[0].features}] base | FID VRG | Δ VRG−base (mean) | "
            f"{conf:.0%} CI | relative | seeds | cpe base | cpe VRG |\n"
            "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        d = r.difference
        lines.append(
            f"| {r.solver} | {r.steps} | {r.base} | {_fmt(sum(r.fid_base) / len(r.fid_base))} | "
            f"{_fmt(sum(r.fid_vrg) / len(r.fid_vrg))} | {_fmt(d['mean'])} | "
            f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] | {_fmt(100 * d['relative'], 1)}% | {len(r.seeds)} | "
            f"{_fmt(r.cpe_base)} | {_fmt(r.cpe_vrg)} |"
        )
    note = (f"\nΔ < 0 means the VRG trajectory has the lower (better) FID. Each seed's base and VRG samples start from "
            f"the same noise; {rows[0].num_samples} images per FID; cpe objective: {rows[0].objective}.\n")
    return head + "\n".join(lines) + "\n" + note


def plot_compare(rows: Sequence[CompareRow], path: str | os.PathLike,
                 mse: Callable[[Tensor], Tensor] | None = None) -> None:
    """PNG: per row, the logSNR of each step (base vs VRG) and, with ``mse``, each step's share of the cpe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .schedule import alpha_bar_to_lambda
    from .variance import cpe_contributions

    ncols = 2 if mse is not None else 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(5 * ncols, 3 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        ax = axes[i][0]
        for kind, ab, style in (("base", r.alpha_bar_base, "o-"), ("VRG", r.alpha_bar_vrg, "s--")):
            lam = alpha_bar_to_lambda(torch.tensor(ab, dtype=torch.float64)).flip(0)
            ax.plot(range(1, len(ab) + 1), lam.numpy(), style, ms=3, label=kind)
        ax.set(title=f"{r.solver} {r.steps} steps, {r.base}", xlabel="step (noisiest first)", ylabel="logSNR")
        ax.legend(fontsize=8)
        if mse is not None:
            ax = axes[i][1]
            kw = {"solver": r.solver} if r.objective == "solver" else {}
            for kind, ab, off in (("base", r.alpha_bar_base, -0.2), ("VRG", r.alpha_bar_vrg, 0.2)):
                c = cpe_contributions(torch.tensor(ab, dtype=torch.float64), mse, r.objective, **kw).flip(0)
                share = (c / c.sum()).numpy()
                ax.bar([k + 1 + off for k in range(len(share))], share, width=0.4,
                       label=f"{kind} (cpe {float(c.sum()):.4g})")
            ax.set(title=f"share of cpe ({r.objective}) per evaluation", xlabel="evaluation (noisiest first)",
                   ylabel="share")
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
