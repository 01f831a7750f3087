"""VRGProfiler: protocol errors, non-finite skipping, forgetting, probe sharding, checkpoints and resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_UNET
from torch.utils.data import DataLoader, TensorDataset

from vrg_lightning import TrajectoryGrid, VRGProfiler, probe_profile
from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.module import DiffusionModule
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule

SCHED = NoiseSchedule()


def fake(world_size: int = 1, global_rank: int = 0, schedule: NoiseSchedule = SCHED):
    """A trainer and any module that follows the protocol (only ``vrg_schedule`` is needed for free mode)."""
    trainer = SimpleNamespace(world_size=world_size, global_rank=global_rank, global_step=0, logger=None,
                              is_global_zero=global_rank == 0)
    return trainer, SimpleNamespace(vrg_schedule=schedule)


def free_profiler(**kw) -> VRGProfiler:
    kw = {"probe_at_fit_end": False, "steps": [], "num_bins": 10, "half_life_samples": None} | kw
    return VRGProfiler(**kw)


def batch(t: list[int], scale: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return SCHED.alphas_cumprod[torch.tensor(t)], scale * torch.randn(len(t), 1, 4, 4, generator=g)


def test_protocol_errors_name_the_missing_key() -> None:
    cb = free_profiler()
    trainer, module = fake()
    cb.setup(trainer, module, "fit")
    ab, err = batch([1, 2])
    with pytest.raises(ValueError, match="lacks 'vrg_error'"):
        cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0), "vrg_alpha_bar": ab}, None, 0)
    with pytest.raises(ValueError, match="return a dict"):
        cb.on_train_batch_end(trainer, module, torch.tensor(1.0), None, 0)
    with pytest.raises(ValueError, match="shapes"):
        cb.on_train_batch_end(trainer, module, {"vrg_alpha_bar": ab, "vrg_error": err[:1]}, None, 0)
    with pytest.raises(ValueError, match="vrg_schedule"):
        cb.setup(trainer, SimpleNamespace(), "fit")
    with pytest.raises(ValueError, match="vrg_denoiser"):
        VRGProfiler(num_bins=10).setup(trainer, module, "fit")  # probe mode needs a denoiser
    for kw, match in (({"steps": [0]}, "steps"), ({"bases": ["cosine"]}, "base"), ({"lps": [2.0]}, "lp"),
                      ({"solvers": ["euler"]}, "solver"), ({"half_life_samples": 0}, "half_life"),
                      ({"free": False, "probe_at_fit_end": False}, "free=False")):
        with pytest.raises(ValueError, match=match):
            VRGProfiler(**kw)


def test_free_mode_matches_error_profile_update_and_skips_non_finite_once() -> None:
    cb = free_profiler()
    trainer, module = fake()
    cb.setup(trainer, module, "fit")
    ref = ErrorProfile.for_schedule(SCHED, 10)
    for i, t in enumerate(([5, 400, 999], [0, 620, 333])):
        ab, err = batch(t, seed=i)
        cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(0.3), "vrg_alpha_bar": ab, "vrg_error": err},
                              None, i)
        ref.update(torch.log(ab) - torch.log1p(-ab), err)
    ab, err = batch([10, 20, 30])
    err[1, 0, 0, 0] = float("inf")  # one bad sample
    cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(0.3), "vrg_alpha_bar": ab, "vrg_error": err}, None, 2)
    ref.update(torch.log(ab[[0, 2]]) - torch.log1p(-ab[[0, 2]]), err[[0, 2]])
    ab, err = batch([40, 50])
    cb.on_train_batch_end(trainer, module, {"loss": torch.tensor(float("nan")), "vrg_alpha_bar": ab,
                                            "vrg_error": err}, None, 3)  # whole batch skipped
    with pytest.warns(UserWarning, match="skipped 3 training samples"):
        prof = cb.free_profile(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cb.free_profile(trainer).meta["nonfinite_skipped"] == 3  # reported once only
    for k in ("count", "lam_sum", "n", "s1", "s2", "s3", "s4"):
        torch.testing.assert_close(getattr(prof, k), getattr(ref, k))


def test_forgetting_halves_a_sample_weight_after_half_life_samples() -> None:
    cb = free_profiler(half_life_samples=4)
    trainer, module = fake(world_size=2)  # each rank's batch of 2 counts as 4 samples
    cb.setup(trainer, module, "fit")
    cb._reduce = lambda t, trainer: t.clone()  # single process standing in for rank 0 of 2
    for i in range(3):
        ab, err = batch([500, 501], seed=i)
        cb.on_train_batch_end(trainer, module, {"vrg_alpha_bar": ab, "vrg_error": err}, None, i)
    assert float(cb.free_profile(trainer).count.sum()) == pytest.approx(2 * (0.25 + 0.5 + 1))


def test_probe_is_stratified_seeded_and_independent_of_world_size() -> None:
    data = TensorDataset(torch.rand(37, 1, 4, 4) * 2 - 1, torch.zeros(37, dtype=torch.long))

    def zero(x, ab, labels):  # ε̂ = 0: the error is -ε, standard normal
        assert ab.shape == (x.shape[0],) and labels is None
        return torch.zeros_like(x)

    kw = {"num_samples": 300, "num_bins": 10, "seed": 5, "batch_size": 128}
    one = probe_profile(zero, data, SCHED, **kw)
    parts = [probe_profile(zero, data, SCHED, rank=r, world_size=3, **kw) for r in range(3)]
    merged = parts[0] + parts[1] + parts[2]
    assert all(float(p.count.sum()) > 0 for p in parts)
    for k in ("count", "lam_sum", "n", "s1", "s2", "s3", "s4"):
        torch.testing.assert_close(getattr(merged, k), getattr(one, k))
    assert torch.equal(one.count, torch.full((10,), 30.0, dtype=torch.float64))  # i mod bins: equal per bin
    again = probe_profile(zero, data, SCHED, **kw)
    assert torch.equal(again.s2, one.s2)
    assert not torch.equal(probe_profile(zero, data, SCHED, **(kw | {"seed": 6})).s2, one.s2)
    assert abs(float(one.s2.sum() / one.n.sum()) - 1) < 0.08  # 4,800 squared standard normals (SE 0.02)
    assert one.mse.sub(1).abs().max() < 0.3  # 480 per bin (SE 0.065)
    with pytest.raises(ValueError, match="rank"):
        probe_profile(zero, data, SCHED, rank=3, world_size=3)


def test_compute_entries_covers_the_grid_and_shares_paper_results() -> None:
    prof = ErrorProfile.for_schedule(SCHED, 20)
    lam = SCHED.t_to_lambda(torch.arange(0, 1000, 10).double())
    prof.update(lam, torch.randn(100, 64, generator=torch.Generator().manual_seed(0)) * torch.sigmoid(-lam)[:, None])
    from vrg_lightning.optimize.entries import compute_entries

    grid = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(5,), bases=("time_uniform", "logSNR"), lps=(0.1,))
    entries = compute_entries(prof, SCHED, grid)
    assert [(e["solver"], e["base"]) for e in entries] == [("ddim", "time_uniform"), ("ddim", "logSNR"),
                                                          ("dpmpp_2m", "time_uniform"), ("dpmpp_2m", "logSNR")]
    assert entries[0]["alpha_bar"] == entries[2]["alpha_bar"]  # the paper objective ignores the solver
    for e in entries:
        assert e["cpe_after"] <= e["cpe_before"] and len(e["alpha_bar"]) == 5 and e["validated"] is None


def _fit(tmp_path: Path, cb: VRGProfiler, max_steps: int, ckpt_path: str | None = None, **module_kw):
    torch.manual_seed(0)
    m = DiffusionModule(unet=TINY_UNET, **module_kw)
    data = DataLoader(TensorDataset(torch.rand(32, 1, 16, 16) * 2 - 1), batch_size=8)
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ck, cb], accelerator="cpu")
    trainer.fit(m, data, ckpt_path=ckpt_path)
    return trainer, m


def test_checkpoints_carry_profile_and_trajectories_and_resume_keeps_statistics(tmp_path: Path) -> None:
    opt = {"steps": [4], "bases": ["time_uniform"], "lps": [0.1], "num_bins": 10}
    cb = VRGProfiler(probe_samples=64, probe_batch_size=32, **opt)
    _fit(tmp_path, cb, max_steps=3)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    vrg = read_vrg(ckpt)
    assert vrg["profile"]["source"] == "probe" and vrg["profiler"]["step"] == 3  # re-saved at fit end
    assert float(vrg["profile"]["count"].sum()) == 64
    (entry,) = vrg["entries"]
    assert entry["steps"] == 4 and entry["cpe_after"] <= entry["cpe_before"]
    state = ckpt["callbacks"][cb.state_key]
    assert state["reduced"] and float(state["free_sums"][0].sum()) == pytest.approx(
        float(cb.running.count.sum()))  # 3 steps × 8 samples, decayed
    cb2 = VRGProfiler(probe_at_fit_end=False, resave_last=False, **opt)
    _fit(tmp_path, cb2, max_steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    torch.testing.assert_close(cb2.running.sums, cb.running.sums.cpu())
    assert cb2.probe is not None and torch.equal(cb2.probe.s2, cb.probe.s2)
    cb3 = VRGProfiler(probe_at_fit_end=False, **opt)
    cb3.setup(*fake(schedule=NoiseSchedule(beta_end=0.03)), "fit")
    with pytest.raises(ValueError, match="noise schedule"):
        cb3.load_state_dict(state)


def test_optimize_on_save_false_stores_entries_at_fit_end_only(tmp_path: Path) -> None:
    """optimize_on_save=False: the saves during training hold the profile and no entries (none stale, none computed);
    the fit-end re-save holds the optimised entries."""
    seen: list[tuple[int, int]] = []

    class Capture(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            vrg = checkpoint.get("vrg") or {}
            seen.append((trainer.global_step, len(vrg.get("entries", []))))

    torch.manual_seed(0)
    m = DiffusionModule(unet=TINY_UNET)
    cb = VRGProfiler(probe_samples=64, probe_batch_size=32, steps=[4], bases=["time_uniform"], num_bins=10,
                     optimize_on_save=False)
    data = DataLoader(TensorDataset(torch.rand(32, 1, 16, 16) * 2 - 1), batch_size=8)
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ck, cb, Capture()], accelerator="cpu")
    trainer.fit(m, data)
    assert seen[0] == (2, 0) and seen[-1] == (3, 1)
    assert len(read_vrg(torch.load(tmp_path / "last.ckpt", weights_only=True))["entries"]) == 1
