"""Reports and figures: the one image tiler and its PNG, the compare table, the profile figures and the
``vrg inspect`` report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrg_lightning import report
from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.evaluation.paired import CompareRow
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.report import compare_markdown, format_report, image_grid, inspect_checkpoint, save_grid


def test_save_grid_writes_the_tiled_images_enlarged(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    save_grid(imgs, tmp_path / "g.png", nrow=2)
    png = np.asarray(Image.open(tmp_path / "g.png"))
    big = imgs.repeat_interleave(4, -2).repeat_interleave(4, -1)  # 16 px -> 64 px
    expected = ((image_grid(big, 2) + 1) * 127.5).round().to(torch.uint8)[0].numpy()
    assert png.shape == (2 * 65 + 1, 2 * 65 + 1) and np.array_equal(png, expected)
    assert (png[66:, 66:] == 255).all()  # the empty fourth cell is white padding


def _row(fid_base: tuple[float, ...], fid_vrg: tuple[float, ...]) -> CompareRow:
    diff = {"mean": -1.25, "ci_low": -2.0, "ci_high": -0.5, "relative": -0.1, "confidence": 0.9}
    return CompareRow("ddim", 4, "logSNR", "digits-classifier", (0, 1), fid_base, fid_vrg, diff, 0.5, None, "paper",
                      (0.9, 0.1), (0.8, 0.2), None, 16)


def test_compare_markdown_lists_means_ci_and_missing_values() -> None:
    md = compare_markdown([_row((10.0, 12.0), (9.0, 10.5))])
    assert "| FID[digits-classifier] base |" in md and "| 90% CI |" in md
    assert "| ddim | 4 | logSNR | 11.0000 | 9.7500 | -1.2500 | [-2.0000, -0.5000] | -10.0% | 2 | 0.5000 | — |" in md
    assert "16 images per FID" in md
    assert compare_markdown([]) == "No comparisons.\n"


def test_profile_figures_plot_the_profile() -> None:
    ab = torch.linspace(0.99, 0.01, 12, dtype=torch.float64)
    prof = ErrorProfile.from_table(ab, 0.1 + ab)
    figs = report.profile_figures(prof)
    assert set(figs) == {"mse", "gaussianity"}
    (line,) = figs["mse"].axes[0].get_lines()
    assert np.allclose(line.get_ydata(), prof.gaussianity()["mse"])


def test_inspect_report_of_a_checkpoint(sampling_files: dict[str, Path], tmp_path: Path) -> None:
    info = inspect_checkpoint(sampling_files["ckpt"])
    vrg = read_vrg(sampling_files["ckpt"])
    assert [e["alpha_bar"] for e in info["entries"]] == [list(e["alpha_bar"]) for e in vrg["entries"]]
    assert info["model"]["unet"]["sample_size"] == 16 and info["profile"]["bins"] > 0
    text = format_report(info)
    assert "ddim           4 logSNR" in text and text.count("\n") >= 4 + len(vrg["entries"])
    assert math.isfinite(info["profile"]["mse_min"])
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    bare = inspect_checkpoint(tmp_path / "bare.ckpt")
    assert "no 'vrg' section" in bare["missing"] and "vrg       " in format_report(bare)
    (tmp_path / "cut.ckpt").write_bytes((sampling_files["ckpt"]).read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        inspect_checkpoint(tmp_path / "cut.ckpt")


def test_inspect_names_a_spec_model_and_a_lightning_class(tmp_path) -> None:
    from vrg_lightning.checkpoint import build_vrg_state
    from vrg_lightning.profile import ErrorProfile
    from vrg_lightning.schedule import NoiseSchedule

    sched = NoiseSchedule()
    ab = sched.alphas_cumprod[::100]
    prof = ErrorProfile.from_table(ab, 0.1 + ab)
    spec = {"spec": "nets/mlp.py:make", "sample_shape": [8], "prediction_type": "epsilon", "num_classes": None}
    torch.save(build_vrg_state(sched, prof, [], model=spec), tmp_path / "p.pt")
    info = report.inspect_checkpoint(tmp_path / "p.pt")
    assert info["model"] == {"kind": "spec", **spec}
    assert "--model nets/mlp.py:make" in report.format_report(info) and "UNet2DModel" not in report.format_report(info)
    lit = build_vrg_state(sched, prof, [], extra={"module": {"class_path": "pkg.m:Lit", "sample_shape": [2]}})
    torch.save({"vrg": lit}, tmp_path / "l.ckpt")
    assert "LightningModule pkg.m:Lit" in report.format_report(report.inspect_checkpoint(tmp_path / "l.ckpt"))
