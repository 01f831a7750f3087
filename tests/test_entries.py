"""Stored trajectory entries: compute_entries is direct optimisation (in the schedule's trained range), entry for
entry; the paper objective is optimised once for all solvers; one cache-key rule; the entry's keys and their order;
the entry cache reuses unchanged profiles and lets rank 0 optimise for all ranks."""

from __future__ import annotations

import pytest
import torch

from vrg_lightning.optimize import (
    RESULT_KEYS,
    OptimizeSettings,
    TrajectoryGrid,
    cache_key,
    compute_entries,
    make_entry,
    optimize_cached,
    optimize_trajectory,
    result_fields,
    schedule_range,
    settings_fields,
)
from vrg_lightning.optimize import entries as entries_module
from vrg_lightning.optimize.entries import EntryCache, grid_settings
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.schedule import NoiseSchedule
from vrg_lightning.trajectories import make_trajectory

SCHED = NoiseSchedule()
# the keys of a stored entry (checkpoint["vrg"]["entries"]), in order, as the callback wrote them before the redesign
ENTRY_KEYS = ["solver", "steps", "base", "objective", "lp", "reg_lambda", "trust", "pin_start", "mse_mode",
              "alpha_bar", "base_alpha_bar", "cpe_before", "cpe_after", "loss_before", "loss", "seconds", "iterations",
              "evaluations", "profile_source", "validated"]


@pytest.fixture(scope="module")
def profile() -> ErrorProfile:
    ab = SCHED.alphas_cumprod[::40]
    return ErrorProfile.from_table(ab, 0.02 + 0.3 * (1 - ab) * ab + 0.01 * torch.sin(20 * ab) ** 2, source="table:t")


GRID = TrajectoryGrid(solvers=("ddim", "dpmpp_2m"), steps=(4,), bases=("time_uniform", "logSNR"), lps=(0.05,),
                      objectives=("paper", "solver"), mse_mode="paper")


def test_entries_equal_direct_optimisation(profile: ErrorProfile) -> None:
    entries = compute_entries(profile, SCHED, GRID)
    assert [(e["solver"], e["steps"], e["base"], e["objective"], e["lp"]) for e in entries] == list(
        GRID.combinations())
    mse = profile.mse_function(GRID.mse_mode)
    for e in entries:
        assert list(e) == ENTRY_KEYS
        base = make_trajectory(SCHED, e["base"], e["steps"])
        st = grid_settings(GRID, SCHED, e["solver"], e["lp"], e["objective"])
        assert st.alpha_bar_range == schedule_range(SCHED) == (SCHED.alpha_bar_min, SCHED.alpha_bar_max)
        assert st == OptimizeSettings(**{**GRID.settings(e["solver"], e["lp"], e["objective"]).to_dict(),
                                         "alpha_bar_range": schedule_range(SCHED)})
        r = optimize_trajectory(base, mse, st)
        assert e["alpha_bar"] == r.alpha_bar.tolist() and e["base_alpha_bar"] == base.tolist()
        assert SCHED.alpha_bar_min <= min(e["alpha_bar"]) and max(e["alpha_bar"]) <= SCHED.alpha_bar_max
        assert (e["cpe_before"], e["cpe_after"], e["loss"]) == (r.cpe_before, r.cpe_after, r.loss)
        assert e["profile_source"] == "table:t" and e["validated"] is None
        assert (e["reg_lambda"], e["trust"], e["pin_start"], e["mse_mode"]) == (100.0, "alpha", False, "paper")
    solver_aware = {e["solver"]: e["cpe_before"] for e in entries if e["objective"] == "solver"
                    and e["base"] == "time_uniform"}
    assert solver_aware["ddim"] != solver_aware["dpmpp_2m"]  # the solver objective is per solver


def test_paper_objective_is_optimised_once(profile: ErrorProfile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[OptimizeSettings] = []

    def counting(ab, mse, s, **kw):
        calls.append(s)
        return optimize_trajectory(ab, mse, s, **kw)

    monkeypatch.setattr(entries_module, "optimize_trajectory", counting)
    entries = compute_entries(profile, SCHED, GRID)
    # 2 bases x (paper once, shared by ddim's solver objective, the same formula + dpmpp_2m's solver objective)
    # = 4 optimisations for 8 entries
    assert len(entries) == 8 and len(calls) == 4
    assert sum(s.objective == "paper" for s in calls) == 2
    ddim = [e for e in entries if e["solver"] == "ddim" and e["base"] == "logSNR"]
    assert [e["objective"] for e in ddim] == ["paper", "solver"] and ddim[0]["alpha_bar"] == ddim[1]["alpha_bar"]
    paper = [e for e in entries if e["objective"] == "paper" and e["base"] == "logSNR"]
    assert [e["solver"] for e in paper] == ["ddim", "dpmpp_2m"] and paper[0]["alpha_bar"] == paper[1]["alpha_bar"]
    assert paper[0]["seconds"] == paper[1]["seconds"]  # the same result, recorded twice


def test_cache_key_rule() -> None:
    ab = make_trajectory(SCHED, "logSNR", 5)
    paper = [OptimizeSettings(solver=s) for s in ("ddim", "dpmpp_2m")]
    solver = [OptimizeSettings(objective="solver", solver=s) for s in ("ddim", "dpmpp_2m")]
    assert cache_key(ab, paper[0]) == cache_key(ab.tolist(), paper[1])  # paper: solver-independent
    assert cache_key(ab, solver[0]) != cache_key(ab, solver[1])
    assert cache_key(ab, solver[0]) == cache_key(ab, paper[1])  # ddim's solver objective is the paper formula
    ranged = OptimizeSettings(alpha_bar_range=(1e-4, 0.999))
    assert cache_key(ab, ranged) != cache_key(ab, paper[0]) and hash(cache_key(ab, ranged))
    assert cache_key(ab, paper[0]) != cache_key(ab * 0.999, paper[0])  # keyed by the trajectory's values
    assert cache_key(ab, paper[0]) != cache_key(ab, OptimizeSettings(lp=0.02))
    assert cache_key(ab, paper[0]) != cache_key(ab, paper[0], "disc")
    mse = lambda a: 0.1 + a  # noqa: E731
    cache: dict = {}
    r = optimize_cached(ab, mse, paper[0], cache)
    assert optimize_cached(ab.clone(), mse, paper[1], cache) is r and len(cache) == 1
    assert optimize_cached(ab, mse, solver[1], cache) is not r and len(cache) == 2


def test_entry_pieces() -> None:
    s = OptimizeSettings(lp=0.1, reg_lambda=1e4, trust="logsnr", pin_start=True, mse_mode="paper")
    assert settings_fields(s) == {"objective": "paper", "lp": 0.1, "reg_lambda": 1e4, "trust": "logsnr",
                                  "pin_start": True, "mse_mode": "paper"}
    assert settings_fields(s, objective="solver")["objective"] == "solver"
    with pytest.raises(ValueError, match="unknown field.*solver; allowed: objective"):
        settings_fields(s, solver="ddim")
    r = optimize_trajectory(make_trajectory(SCHED, "logSNR", 3), lambda a: 0.1 + a, s)
    assert list(result_fields(r)) == list(RESULT_KEYS) and result_fields(r)["alpha_bar"] == r.alpha_bar.tolist()
    assert result_fields({"loss": 1.0}, ("loss", "disc_after")) == {"loss": 1.0, "disc_after": None}
    e = make_entry("ddim", 3, "logSNR", {"objective": "base", "kind": "base"}, {"alpha_bar": [0.5]},
                   profile_source="p", validated={"selected": False})
    assert list(e) == ["solver", "steps", "base", "objective", "kind", "alpha_bar", "profile_source", "validated"]
    assert e["validated"] == {"selected": False}


def test_bad_grid(profile: ErrorProfile) -> None:
    with pytest.raises(ValueError, match="grid must be a TrajectoryGrid; got dict"):
        compute_entries(profile, SCHED, {"steps": [4]})  # type: ignore[arg-type]


def test_entry_cache_reuses_an_unchanged_profile_and_rank_zero_optimises(profile: ErrorProfile,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The same profile (even another object) reuses the entries without optimising; a changed profile optimises
    again; under DDP only global rank 0 optimises and every rank gets its entries through strategy.broadcast."""
    from types import SimpleNamespace

    calls: list[OptimizeSettings] = []

    def counting(ab, mse, s, **kw):
        calls.append(s)
        return optimize_trajectory(ab, mse, s, **kw)

    monkeypatch.setattr(entries_module, "optimize_trajectory", counting)
    grid = GRID.replace(solvers=("ddim",), objectives=("paper",))
    cache = EntryCache()
    first, fresh = cache.entries(profile, SCHED, grid)
    n = len(calls)
    assert fresh and n == 2 and cache.seconds > 0
    same = ErrorProfile.from_dict(profile.to_dict())
    again, fresh = cache.entries(same, SCHED, grid)
    assert again is first and not fresh and len(calls) == n and cache.seconds == 0.0
    changed = ErrorProfile.from_dict(profile.to_dict())
    changed.sums[4, ::2] *= 1.5  # the profile's MSE in fit mode, and its table rows in paper mode
    changed.paper_knots = (changed.paper_knots[0], changed.paper_knots[1] * torch.linspace(1, 2, 25))
    new, fresh = cache.entries(changed, SCHED, grid)
    assert fresh and len(calls) == 2 * n and new[0]["cpe_before"] != first[0]["cpe_before"]
    sent: list = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return (first, True, True, 5)  # rank 0's (entries, fresh, complete, oldest step)

    strategy = SimpleNamespace(broadcast=broadcast)
    other = EntryCache()
    got, fresh = other.entries(changed, SCHED, grid, SimpleNamespace(world_size=2, global_rank=1, strategy=strategy))
    assert got is first and fresh and other.step == 5 and sent == [None] and len(calls) == 2 * n  # rank 1 waits
    assert other.entries(changed, SCHED, grid, SimpleNamespace(world_size=2, global_rank=1, strategy=strategy)) == (
        first, False) and len(sent) == 1  # complete and unchanged: no collective on any rank
    zero = EntryCache()
    zero.entries(changed, SCHED, grid, SimpleNamespace(world_size=2, global_rank=0, strategy=strategy, global_step=5))
    assert len(calls) == 3 * n and sent[-1] is not None and len(sent[-1][0]) == len(first)
    assert sent[-1][1:] == (True, True, 5) and all(e["profile_step"] == 5 for e in sent[-1][0])


def test_tuning_candidates_keep_the_trained_range() -> None:
    """15.5: a fit-end tuned dpmpp_2m/20/logSNR entry put steps above ᾱ(t=0); every candidate of a cell (both
    objectives) now stays in [ᾱ(t=T-1), ᾱ(t=0)], with an MSE that pulls the cleanest step to ᾱ -> 1."""
    from vrg_lightning.evaluation.tune import TuneSettings, make_candidates
    from vrg_lightning.schedule import alpha_bar_to_lambda

    ab = SCHED.alphas_cumprod[::10]
    prof = ErrorProfile.from_table(ab, 0.6 * torch.sigmoid((alpha_bar_to_lambda(ab) - 2) / 2.5))
    st = TuneSettings.from_dict({"solvers": ["dpmpp_2m"], "steps": [20], "bases": ["logSNR"], "lps": [0.01],
                                 "objectives": ["paper", "solver"], "fix": False, "mse_mode": "paper"})
    cands = make_candidates(SCHED, prof, "dpmpp_2m", 20, "logSNR", st)
    assert [c.kind for c in cands] == ["base", "vrg", "vrg"]
    for c in cands:
        assert SCHED.alpha_bar_min <= min(c.alpha_bar) and max(c.alpha_bar) <= SCHED.alpha_bar_max, c.label
    free = optimize_trajectory(make_trajectory(SCHED, "logSNR", 20), prof.mse_function("paper"),
                               OptimizeSettings(mse_mode="paper"))
    assert float(free.alpha_bar[0]) > SCHED.alpha_bar_max  # what the range prevents


def test_entry_cache_budget_refreshes_stale_entries_round_robin_within_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget, a save optimises only what its predicted time lets fit in budget x the time since the last
    optimising save (nothing at a save right after the start: the first save never blows the budget); the stale
    entries are refreshed round-robin (wrapping around the grid), the others kept with the training step of their
    profile (``profile_step``; ``step`` the oldest); the fit end (``force``) optimises every stale point."""
    import dataclasses
    import time
    from types import SimpleNamespace

    real = entries_module.optimize_trajectory

    def slow(ab, mse, s, **kw):  # every optimisation takes 50 ms (a sleep the deadline cannot stop)
        t = time.perf_counter()
        r = real(ab, mse, s, **kw)
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - t)))
        return dataclasses.replace(r, seconds=time.perf_counter() - t)

    monkeypatch.setattr(entries_module, "optimize_trajectory", slow)
    grid = TrajectoryGrid(solvers=("ddim",), steps=(4,), bases=("time_uniform", "time_quadratic", "logSNR"),
                          lps=(0.01, 0.1), objectives=("paper",), mse_mode="paper")  # 6 optimisations
    ab = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    profiles = [ErrorProfile.from_table(ab, torch.tensor([0.3, 0.1, 0.01]) * (1 + k)) for k in range(4)]
    cache = EntryCache(budget=0.02)

    def save(k: int, step: int, seconds_since: float, force: bool = False):
        cache.last_end = cache.last_call = time.perf_counter() - seconds_since  # training since the last save
        cache.carry = 0.0  # (what carries from one save to the next is checked at the end)
        cache.overhead = 0.0  # (the time held back for building entries is another test's)
        return cache.entries(profiles[k], SCHED, grid, SimpleNamespace(global_step=step, world_size=1), force)

    assert save(0, 1, 0.0) == ([], False) and not cache.complete  # nothing fits yet: no entry, nothing spent
    first, fresh = save(0, 2, 6.5)  # 0.13 s: two optimisations of 50 ms
    assert fresh and len(first) == 2 and [e["profile_step"] for e in first] == [2, 2] and cache.cursor == 2
    full, fresh = save(0, 3, 0.0, force=True)  # the fit end: everything, whatever the budget
    assert fresh and cache.complete and len(full) == 6 and full[:2] == first and cache.step == 2
    assert [e["profile_step"] for e in full] == [2, 2, 3, 3, 3, 3] and save(0, 3, 0.0) == (full, False)
    steps = [e["profile_step"] for e in save(1, 10, 6.5)[0]]  # a new profile: the first two points refreshed
    assert steps == [10, 10, 3, 3, 3, 3] and cache.step == 3 and not cache.complete
    new, _ = save(2, 20, 6.5)
    assert [e["profile_step"] for e in new] == [10, 10, 20, 20, 3, 3] and new[4] == full[4]  # round-robin, kept
    assert [e["profile_step"] for e in save(3, 30, 12.0)[0]] == [30, 30, 20, 20, 30, 30]  # wraps around the grid
    assert cache.carry == 0.0  # time left over does not carry: each save keeps to its share
    assert cache.predict(next(iter(cache.results))) == pytest.approx(0.05, rel=0.2)  # the measured time
    cache.times = {kind: [0.0, 1] for kind in cache.times}  # a prediction far too low: the save overspends
    cache.timed = lambda key, seconds: None  # (and stays so)
    assert len(save(1, 40, 1.0)[0]) == 6 and cache.seconds > 0.05 > 0.02 and cache.carry < 0  # (by one at most)
    assert cache.carry == pytest.approx(0.02 - cache.seconds, abs=1e-3)
    cache.last_end = cache.last_call = time.perf_counter() - 1.0  # the overspend is paid back from the next share
    assert cache.entries(profiles[2], SCHED, grid, SimpleNamespace(global_step=41, world_size=1))[1] is False
    assert EntryCache().entries(profiles[0], SCHED, grid)[1] and EntryCache(None).budget is None
    with pytest.raises(ValueError, match="budget"):
        EntryCache(budget=2.0)


def _real_results():
    """``optimize_trajectory`` memoised, so that a stub's sleeps alone set how long an optimisation takes (every
    point is computed before the timed saves, :func:`_warm`)."""
    memo: dict = {}

    def results(ab, mse, s):
        key = (tuple(ab.tolist()), s)
        if key not in memo:
            memo[key] = optimize_trajectory(ab, mse, s)
        return memo[key]

    return results


def _warm(results, grid: TrajectoryGrid, prof: ErrorProfile) -> None:
    """Every optimisation of ``grid`` into ``results``, before the timed saves."""
    from vrg_lightning.peers import base_trajectory

    for solver, n, base, objective, lp in grid.combinations():
        ab = base_trajectory(SCHED, base, solver, int(n))[0]
        results(ab, prof.mse_function(grid.mse_mode), grid_settings(grid, SCHED, solver, lp, objective))


def test_entry_cache_resumes_what_its_deadline_stopped_over_several_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each optimisation of a budgeted save gets the end of the save's allowance (its share, less what the last save
    spent besides optimising) as deadline. One the deadline stops is not stored (the entry keeps what it held), the
    pass stops there and the next save resumes it from its best point; so optimisations longer than a whole share
    finish over several saves while no save runs past its share. After MAX_RESUMES stopped tries in a row a point
    is passed over (the others go on; the fit end does it)."""
    import dataclasses
    import time
    from types import SimpleNamespace

    from vrg_lightning.optimize.entries import MAX_RESUMES

    work, done, calls, results = 0.15, {}, [], _real_results()

    def long(ab, mse, s, deadline=None, resume=None):  # 0.15 s of work per point, interruptible, resumable
        key = (float(ab[0]), s.lp)
        t0 = time.perf_counter()
        calls.append((deadline, t0, resume is not None))
        left = work - done.get(key, 0.0)
        stop = t0 + left if deadline is None else min(t0 + left, deadline)
        time.sleep(max(0.0, stop - t0))
        done[key] = done.get(key, 0.0) + time.perf_counter() - t0
        r = results(ab, mse, s)
        complete = done[key] >= work - 1e-3
        if complete:
            done.pop(key)
        return dataclasses.replace(r, seconds=time.perf_counter() - t0, complete=complete)

    monkeypatch.setattr(entries_module, "optimize_trajectory", long)
    grid = TrajectoryGrid(solvers=("ddim",), steps=(4,), bases=("time_uniform", "logSNR"), lps=(0.01,),
                          objectives=("paper",), mse_mode="paper")
    ab = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    prof = ErrorProfile.from_table(ab, torch.tensor([0.3, 0.1, 0.01]))
    _warm(results, grid, prof)
    cache = EntryCache(budget=0.02)
    cache.overhead = 0.0

    def save(step: int):  # 5 s of training since the last save: a share of 0.1 s
        cache.last_end = cache.last_call = time.perf_counter() - 5.0
        out, _ = cache.entries(prof, SCHED, grid, SimpleNamespace(global_step=step, world_size=1))
        assert cache.seconds < 0.1 + 0.03  # never past its share (by more than the stub's own work)
        return [e["base"] for e in out]

    assert save(1) == [] and len(calls) == 1 and calls[0][0] - calls[0][1] <= 0.1  # tried first, stopped
    (key,) = cache.partial
    assert cache.partial[key][1] == 1 and cache.cursor == 0 and cache.results == {}
    assert save(2) == ["time_uniform"] and calls[1][2] and cache.partial == {}  # resumed, finished
    assert cache.predict(key) == pytest.approx(work, rel=0.2)  # timed over both tries
    assert save(3) == ["time_uniform"] and len(cache.partial) == 1  # the other: tried, stopped
    assert save(4) == ["time_uniform", "logSNR"] and cache.complete
    cache.partial = {k: (ab, 1, 0.0) for k in cache.results}  # a fit end (no limit) searches afresh, never resumes
    n = len(calls)
    cache.entries(ErrorProfile.from_table(ab, torch.tensor([0.3, 0.1, 0.01]) * 3), SCHED, grid, force=True)
    assert [c[2] for c in calls[n:]] == [False, False] and cache.partial == {}
    prof2 = ErrorProfile.from_table(ab, torch.tensor([0.3, 0.1, 0.01]) * 2)  # a new profile: both stale
    cache.partial = {k: (ab, MAX_RESUMES, 0.0) for k in list(cache.results)[:1]}  # the first has used its tries
    cache.last_end = cache.last_call = time.perf_counter() - 5.0
    n = len(calls)
    cache.entries(prof2, SCHED, grid)
    assert len(calls) == n + 1 and not calls[-1][2]  # passed over: only the second was tried


def test_a_budgeted_save_fills_its_share_with_points_that_fit_and_starts_the_next_at_the_first_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A point that does not fit what is left of the share (but would fit a whole one) is where the next save starts;
    later points that fit what is left are optimised meanwhile."""
    import dataclasses
    import time
    from types import SimpleNamespace

    results = _real_results()

    def timed(ab, mse, s, deadline=None, resume=None):  # solver-aware 60 ms, paper 10 ms
        t0 = time.perf_counter()
        r = results(ab, mse, s)
        time.sleep(max(0.0, (0.06 if s.objective == "solver" else 0.01) - (time.perf_counter() - t0)))
        return dataclasses.replace(r, seconds=time.perf_counter() - t0)

    monkeypatch.setattr(entries_module, "optimize_trajectory", timed)
    grid = TrajectoryGrid(solvers=("dpmpp_2m",), steps=(4,), bases=("time_uniform", "logSNR"), lps=(0.05,),
                          objectives=("solver", "paper"), mse_mode="paper")
    ab = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    prof = ErrorProfile.from_table(ab, torch.tensor([0.3, 0.1, 0.01]))
    _warm(results, grid, prof)
    cache = EntryCache(budget=0.02)
    cache.overhead, cache.times = 0.0, {(True, "dpmpp_2m", 4): [0.06, 1], (False, None, 4): [0.01, 1]}
    cache.last_end = cache.last_call = time.perf_counter() - 5.0  # a share of 0.1 s
    out, fresh = cache.entries(prof, SCHED, grid, SimpleNamespace(global_step=1, world_size=1))
    got = [(e["base"], e["objective"]) for e in out]
    assert fresh and got == [("time_uniform", "solver"), ("time_uniform", "paper"), ("logSNR", "paper")]
    assert cache.cursor == 2 and cache.seconds < 0.1 + 0.03  # the logSNR solver-aware point is next
