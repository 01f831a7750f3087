"""Sampling with stored trajectories.

- :mod:`.seeds`: per-index noise and labels (:func:`sample_seed`, :func:`initial_noise`, :func:`sample_labels`).
- :mod:`.generate`: the one generator (:func:`generate`, :func:`sample_shape`; ``image_shape`` is its earlier name).
- :mod:`.resolve`: which trajectory to sample (:class:`Trajectory`, :func:`resolve_trajectory`,
  :func:`trajectory_cpe`).
- :mod:`.job`: the distributed, resumable job (:class:`SampleJob`, :class:`SamplingModule`, :class:`ShardWriter`,
  :func:`run_sampling_job`, shards and manifest); imported on first use, as it loads Lightning.

Figures and tables (:func:`~vrg_lightning.report.save_grid`, :func:`~vrg_lightning.report.compare_markdown`) are in
:mod:`vrg_lightning.report`; the paired base-vs-VRG comparison in :mod:`vrg_lightning.evaluation.paired`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..checkpoint import select_entry as select_vrg_entry  # the earlier name of the one entry lookup
from .generate import generate, image_shape, sample_shape
from .resolve import TRAJECTORY_NAMES, Trajectory, resolve_trajectory, trajectory_cpe
from .seeds import initial_noise, sample_labels, sample_seed

_JOB = ("REPORT_FORMAT", "MANIFEST_FORMAT", "SampleJob", "SamplingModule", "ShardWriter", "file_sha256",
        "shard_ranges", "shard_path", "load_samples", "check_manifest", "run_sampling_job")

__all__ = ["sample_seed", "initial_noise", "sample_labels", "sample_shape", "image_shape", "generate", "Trajectory",
           "TRAJECTORY_NAMES", "select_vrg_entry", "resolve_trajectory", "trajectory_cpe", *_JOB]


_MOVED = {"save_grid": "..report", "compare_markdown": "..report", "plot_compare": "..report",
          "CompareRow": "..evaluation.paired", "paired_compare": "..evaluation.paired"}  # earlier homes


def __getattr__(name: str) -> Any:  # PEP 562: the job (and with it Lightning) loads on first use
    if name in _JOB or name in _MOVED:
        return getattr(importlib.import_module(_MOVED.get(name, ".job"), __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
