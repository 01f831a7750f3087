"""Base trajectories: validity for any base and size, the DPM-Solver reference files, diffusers spacings, file I/O."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REF as REFERENCE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrg_lightning.schedule import NoiseSchedule, alpha_bar_to_sigma
from vrg_lightning.trajectories import BASES, load_trajectory, make_trajectory, save_trajectory, validate_trajectory

REF = REFERENCE / "trajectories"
SCHEDULES = [NoiseSchedule(), NoiseSchedule("squaredcos_cap_v2"), NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)]
GENERATED = [b for b in BASES if b != "list"]


@settings(max_examples=80, deadline=None)
@given(base=st.sampled_from(GENERATED), steps=st.integers(1, 300), sched=st.sampled_from(range(len(SCHEDULES))),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_any_base_and_size_is_a_valid_trajectory(base: str, steps: int, sched: int, dtype: torch.dtype) -> None:
    s = SCHEDULES[sched]
    if steps > s.num_train_timesteps:
        with pytest.raises(ValueError, match="steps"):
            make_trajectory(s, base, steps)
        return
    ab = make_trajectory(s, base, steps, dtype=dtype)
    assert ab.dtype == torch.float64 and ab.shape == (steps,)
    assert bool(((ab > 0) & (ab < 1)).all()) and bool((ab[1:] < ab[:-1]).all())
    # the noisiest step is the schedule's noisiest level (the DPM-Solver and karras bases start there)
    if base in ("time_uniform", "time_quadratic", "logSNR", "karras", "trailing"):
        assert float(ab[-1]) == pytest.approx(s.alpha_bar_min, rel=1e-4)
    torch.testing.assert_close(validate_trajectory(ab), ab)
    # every base lies in the schedule's trained range [alpha_bar(t=T-1), alpha_bar(t=0)] (float32 arithmetic: 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert s.alpha_bar_min * (1 - tol) <= float(ab[-1]) and float(ab[0]) <= s.alpha_bar_max * (1 + tol)


@pytest.mark.parametrize("base", GENERATED)
def test_more_steps_than_training_timesteps_is_refused_at_once(base: str) -> None:
    """A discrete schedule of T timesteps holds at most T steps: T + 1 is a clear error naming the value and the
    limit, raised before any work; T itself is a valid trajectory."""
    import time

    s = NoiseSchedule(num_train_timesteps=50)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"steps=51 is more than the schedule can hold.*steps <= 50"):
        make_trajectory(s, base, 51)
    with pytest.raises(ValueError, match="steps=1001"):
        make_trajectory(NoiseSchedule(), base, 1001)
    assert time.perf_counter() - t0 < 1.0
    ab = make_trajectory(s, base, 50)
    assert ab.numel() == 50 and bool((ab[1:] < ab[:-1]).all())


REF_FILES = sorted(REF.glob("dpm_alphaBar_1-*.txt")) if REF.is_dir() else []


@pytest.mark.skipif(not REF_FILES, reason="reference trajectories not present")
@pytest.mark.parametrize("path", REF_FILES, ids=lambda p: p.stem)
def test_dpm_solver_bases_reproduce_reference(path: Path) -> None:
    _, steps, base = path.stem.split("-", 2)
    ref = load_trajectory(path)
    assert ref.numel() == int(steps)
    f32 = make_trajectory(NoiseSchedule(), base, int(steps), dtype=torch.float32)
    # the reference was computed in float32 and printed with 8 decimals
    assert bool(((f32 - ref).abs() <= 5e-9 + 2e-6 * ref).all()), float(((f32 - ref).abs() / ref).max())
    f64 = make_trajectory(NoiseSchedule(), base, int(steps))
    torch.testing.assert_close(f64, ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [1, 7, 48, 61, 223, 999])
def test_trailing_leading_match_diffusers(spacing: str, steps: int) -> None:
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sch.set_timesteps(steps)
    # diffusers' trailing spacing returns steps+1 timesteps (the last one -1) for 61, 223, ...: compare the first N
    ref = NoiseSchedule().alphas_cumprod[sch.timesteps[:steps].long()].sort(descending=True).values
    torch.testing.assert_close(make_trajectory(NoiseSchedule(), spacing, steps), ref, rtol=1e-12, atol=0)


def test_karras_sigmas() -> None:
    s = NoiseSchedule()
    ab = make_trajectory(s, "karras", 12, rho=7.0)
    sig = alpha_bar_to_sigma(ab).flip(0)  # noisiest first
    ramp = torch.linspace(0, 1, 12, dtype=torch.float64)
    lo, hi = alpha_bar_to_sigma(torch.tensor([s.alpha_bar_max, s.alpha_bar_min], dtype=torch.float64))
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="rho"):
        make_trajectory(s, "karras", 5, rho=0.0)


def test_list_base() -> None:
    ab = make_trajectory(NoiseSchedule(), "list", 3, values=[0.9, 0.5, 0.1])
    assert ab.tolist() == [0.9, 0.5, 0.1]
    with pytest.raises(ValueError, match="values"):
        make_trajectory(NoiseSchedule(), "list", 3)
    with pytest.raises(ValueError, match="steps=2"):
        make_trajectory(NoiseSchedule(), "list", 2, values=[0.9, 0.5, 0.1])


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps) -> None:
    with pytest.raises(ValueError, match="steps"):
        make_trajectory(NoiseSchedule(), "time_uniform", steps)


def test_unknown_base() -> None:
    with pytest.raises(ValueError, match="allowed"):
        make_trajectory(NoiseSchedule(), "uniform", 10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(1e-12, 1 - 1e-9), min_size=1, max_size=40, unique=True),
       header=st.dictionaries(st.sampled_from(["solver", "note", "lp"]), st.text("abc 0.1_-", max_size=12)))
def test_save_load_round_trip(tmp_path: Path, values: list[float], header: dict) -> None:
    ab = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    if ab.numel() > 1 and bool(((ab[:-1] - ab[1:]) <= 1e-9 * ab[:-1]).any()):
        return  # closer than the file's 10 significant digits
    path = tmp_path / "traj.txt"
    save_trajectory(path, ab, header={k: v.strip() or "x" for k, v in header.items()})
    back = load_trajectory(path)
    torch.testing.assert_close(back, ab, rtol=1e-9, atol=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.sampled_from("0123456789.e-+# \n\tabc:steps_data_type"), max_size=120))
def test_parser_gives_a_trajectory_or_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.txt"
    path.write_text(text)
    try:
        ab = load_trajectory(path)
    except ValueError as exc:
        assert str(path) in str(exc) or "trajectory" in str(exc) or "alpha_bar" in str(exc)
        return
    assert ab.dtype == torch.float64 and ab.numel() >= 1
    assert bool(((ab > 0) & (ab < 1)).all()) and bool((ab[1:] < ab[:-1]).all())


def test_reference_format_drops_end_point(tmp_path: Path) -> None:
    p = tmp_path / "ref.txt"
    p.write_text("# order : 1\n# steps : 3\n# data_type : alpha_bar\n0.9999\n0.9\n0.5\n0.1\n")
    assert load_trajectory(p).tolist() == [0.9, 0.5, 0.1]
    p.write_text("# steps : 3\n0.9\n0.5\n0.1\n")  # the toolkit's own files hold exactly N values
    assert load_trajectory(p).tolist() == [0.9, 0.5, 0.1]


@pytest.mark.parametrize(
    "text,word",
    [("0.9\nabc\n", ":2:"), ("", "no values"), ("# only a comment\n", "no values"), ("0.5\n0.9\n", "decreasing"),
     ("0.9\n1.2\n", r"\(0, 1\)"), ("# steps : 5\n0.9\n0.5\n", "steps=5"), ("# steps : x\n0.9\n", "integer"),
     ("# data_type : sigma\n3.0\n1.0\n", "data_type"), ("0.9\nnan\n", "finite")],
)
def test_parser_errors(tmp_path: Path, text: str, word: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(ValueError, match=word):
        load_trajectory(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(tmp_path / "nope.txt")


def test_save_is_atomic_and_validates(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    save_trajectory(p, torch.tensor([0.9, 0.5], dtype=torch.float64))
    before = p.read_text()
    with pytest.raises(ValueError, match="decreasing"):
        save_trajectory(p, torch.tensor([0.5, 0.9], dtype=torch.float64))
    assert p.read_text() == before  # a rejected write leaves the old file alone
    assert [q.name for q in tmp_path.iterdir()] == ["t.txt"]  # and no temporary file behind


def test_validate_trajectory_errors() -> None:
    for bad, word in (([], "non-empty"), ([[0.5]], "1-D"), ([0.5, 0.5], "decreasing"), ([math.inf], "finite")):
        with pytest.raises(ValueError, match=word):
            validate_trajectory(torch.tensor(bad, dtype=torch.float64))
    assert validate_trajectory(np.array([0.5, 0.25]).tolist()).dtype == torch.float64


@pytest.mark.parametrize("base", [b for b in BASES if b != "list"])
def test_every_base_stays_in_the_trained_range(base: str) -> None:
    sched = NoiseSchedule()
    for n in (2, 10, 50):
        ab = make_trajectory(sched, base, n)
        assert float(ab.max()) <= sched.alpha_bar_max and float(ab.min()) >= sched.alpha_bar_min, (base, n)
