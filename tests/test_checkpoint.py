"""checkpoint["vrg"]: build/read round trip through weights_only files, errors, select_entry, load_denoiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_UNET

from vrg_lightning.checkpoint import (
    VRG_FORMAT,
    VRG_VERSION,
    build_vrg_state,
    find_entry,
    load_checkpoint_file,
    load_denoiser,
    model_section,
    read_vrg,
    select_entry,
)
from vrg_lightning.module import DiffusionModule
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule

SCHED = NoiseSchedule()


def _entry(solver: str, steps: int, base: str, objective: str = "paper", lp: float = 0.1) -> dict:
    return {"solver": solver, "steps": steps, "base": base, "objective": objective, "lp": lp,
            "alpha_bar": [0.9, 0.5][:steps], "cpe_before": 1.0, "cpe_after": 0.5}


def _profile() -> ErrorProfile:
    p = ErrorProfile.for_schedule(SCHED, 10)
    g = torch.Generator().manual_seed(0)
    p.update(SCHED.t_to_lambda(torch.arange(0, 1000, 50).double()), torch.randn(20, 8, generator=g))
    return p


def _module_checkpoint() -> tuple[DiffusionModule, dict]:
    """A checkpoint dict as Lightning writes it for DiffusionModule (state_dict + on_save_checkpoint)."""
    torch.manual_seed(0)
    m = DiffusionModule(unet=TINY_UNET, prediction_type="v_prediction", num_classes=3, ema_decay=0.5)
    m.ema.update_parameters(m.model)
    with torch.no_grad():  # move the raw weights so raw and EMA differ
        for p in m.model.parameters():
            p.add_(0.05)
    m.ema.update_parameters(m.model)
    ckpt = {"state_dict": m.state_dict(), "global_step": 7}
    m.on_save_checkpoint(ckpt)
    return m, ckpt


def test_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    prof = _profile()
    entries = [_entry("ddim", 2, "time_uniform"), _entry("ddim", 2, "logSNR")]
    state = build_vrg_state(SCHED, prof, entries, prediction_type="v_prediction", model=model_section({"x": 1}))
    torch.save({"vrg": state}, tmp_path / "c.ckpt")
    vrg = read_vrg(tmp_path / "c.ckpt")
    assert vrg["format"] == VRG_FORMAT and vrg["version"] == VRG_VERSION
    assert vrg["schedule"] == dict(SCHED.to_dict(), prediction_type="v_prediction")
    assert [e["base"] for e in vrg["entries"]] == ["time_uniform", "logSNR"]
    back = ErrorProfile.from_dict(vrg["profile"])
    torch.testing.assert_close(back.mse, prof.mse, equal_nan=True)
    assert read_vrg(state)["entries"] == vrg["entries"]  # the section itself is accepted too


def test_read_vrg_explains_missing_and_invalid_sections(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vrg profile"):
        read_vrg({"state_dict": {}})
    with pytest.raises(ValueError, match="no VRG statistics.*VRGProfiler"):
        read_vrg({"vrg": {"format": VRG_FORMAT, "version": 1, "model": {}}})
    with pytest.raises(ValueError, match="newer"):
        read_vrg({"vrg": dict(build_vrg_state(SCHED, _profile(), []), version=VRG_VERSION + 1)})
    with pytest.raises(ValueError, match=r"entries\[0\] lacks"):
        read_vrg({"vrg": build_vrg_state(SCHED, _profile(), [{"solver": "ddim"}])})


def test_truncated_and_missing_files_give_clear_errors(tmp_path: Path) -> None:
    torch.save({"vrg": build_vrg_state(SCHED, _profile(), [])}, tmp_path / "ok.ckpt")
    data = (tmp_path / "ok.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    for name, why in (("cut.ckpt", "cannot be read: the torch file is corrupt, truncated"),
                      ("junk.ckpt", "is a text file, not a torch file")):
        with pytest.raises(ValueError, match=f"'.*{name}' {why}"):
            load_checkpoint_file(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vrg(tmp_path / "absent.ckpt")


def test_select_entry_unique_validated_missing_and_ambiguous() -> None:
    vrg = {"entries": [_entry("ddim", 10, "time_uniform"), _entry("ddim", 10, "logSNR"),
                       _entry("dpmpp_2m", 10, "logSNR", "solver", 0.2)]}
    assert select_entry(vrg, "dpmpp_2m", 10)["objective"] == "solver"
    assert select_entry(vrg, "ddim", 10, base="logSNR")["base"] == "logSNR"
    with pytest.raises(ValueError, match="2 stored VRG trajectories match") as exc:
        select_entry(vrg, "ddim", 10)
    assert "time_uniform" in str(exc.value) and "logSNR" in str(exc.value)
    with pytest.raises(ValueError, match=r"No stored VRG trajectory.*\(ddim, 10, logSNR\), \(ddim, 10, time_uniform\)"):
        select_entry(vrg, "ddim", 20)
    with pytest.raises(ValueError, match="No stored VRG trajectory"):
        select_entry(vrg, "dpmpp_2m", 10, lp=0.1)
    with pytest.raises(ValueError, match="no stored VRG trajectories"):
        select_entry(None, "ddim", 10)
    # a validated winner breaks the tie; two winners are ambiguous again
    won = dict(_entry("ddim", 10, "karras"), validated={"selected": True})
    assert select_entry({"entries": [*vrg["entries"], won]}, "ddim", 10)["base"] == "karras"
    with pytest.raises(ValueError, match="2 stored"):
        select_entry({"entries": [won, dict(won, base="leading")]}, "ddim", 10)
    assert find_entry is select_entry


def test_load_denoiser_rebuilds_ema_and_raw_weights(tmp_path: Path) -> None:
    m, ckpt = _module_checkpoint()
    torch.save(ckpt, tmp_path / "m.ckpt")
    ema, info = load_denoiser(tmp_path / "m.ckpt")
    assert info is None  # weights only, no profile yet
    with pytest.warns(UserWarning, match="no EMA"):
        load_denoiser({k: v for k, v in ckpt.items() if k != "state_dict"} | {
            "state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}})
    raw, _ = load_denoiser(tmp_path / "m.ckpt", use_ema=False)
    assert ema.prediction_type == "v_prediction" and ema.num_classes == 3 and not ema.training
    x, ab, y = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(ema(x, ab, y), m.ema.module.eval()(x, ab, y))
        torch.testing.assert_close(raw(x, ab, y), m.model.eval()(x, ab, y))
        assert not torch.allclose(ema(x, ab, y), raw(x, ab, y))


def test_load_denoiser_errors(tmp_path: Path) -> None:
    _, ckpt = _module_checkpoint()
    with pytest.raises(ValueError, match="no vrg.model section"):
        load_denoiser({"state_dict": ckpt["state_dict"]})
    with pytest.raises(ValueError, match="no state_dict"):
        load_denoiser({"vrg": ckpt["vrg"]})
    bad = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if "conv_in" not in k})
    with pytest.raises(ValueError, match="do not fit the stored denoiser config"):
        load_denoiser(bad)
