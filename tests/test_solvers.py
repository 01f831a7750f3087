"""Solvers over continuous ᾱ trajectories: diffusers cross-checks, convergence, devices, gradients, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from vrg_lightning.solvers import SOLVERS, SolverRun, num_evaluations, sample, solver_options

D = 6
_gen = torch.Generator().manual_seed(0)
A = torch.randn(D, D, dtype=torch.float64, generator=_gen) / D**0.5
B = torch.randn(D, dtype=torch.float64, generator=_gen)
X0 = torch.randn(3, D, dtype=torch.float64, generator=_gen)


def model(x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """A fixed random ε-model: exact ε of x₀ ~ N(0, 0.25 I), a random nonlinear map of x and an ᾱ-dependent term."""
    ab = ab.to(x.dtype)
    return (
        x * (1 - ab).sqrt() / (0.25 * ab + 1 - ab) + 0.2 * torch.tanh(x @ A.to(x)) + 0.1 * torch.sin(5 * ab + B.to(x))
    )


# --- diffusers 0.42 cross-checks --------------------------------------------------------------------------------
def _scheduler(name: str, **cfg):
    import diffusers

    return getattr(diffusers, name)(**cfg)


def _case(solver: str, cls: str, n: int, **cfg):
    """A diffusers configuration and the matching solver options and end point (ᾱ = 1, or ᾱ at t = 0)."""
    options = {k: cfg[k] for k in ("lower_order_final",) if k in cfg}
    if solver == "deis":
        options["order"] = cfg["solver_order"]
    t0 = cls == "DEISMultistepScheduler" or cfg.get("final_sigmas_type") == "sigma_min"
    name = "-".join([solver, str(n), *(f"{k}={v}" for k, v in cfg.items() if k not in ("clip_sample",))])
    return pytest.param(solver, options, cls, cfg, n, "t0" if t0 else "one", id=name)


DDIM = {"clip_sample": False, "set_alpha_to_one": True}
SINGLE, MULTI, DEIS, PNDM = (
    "DPMSolverSinglestepScheduler",
    "DPMSolverMultistepScheduler",
    "DEISMultistepScheduler",
    "PNDMScheduler",
)
CASES = [
    _case("ddim", "DDIMScheduler", 10, **DDIM),
    _case("ddim", "DDIMScheduler", 25, timestep_spacing="trailing", **DDIM),
    *[_case(f"dpmsolver{k}", SINGLE, n, solver_order=k) for k in (1, 2, 3) for n in (8, 9, 10)],
    *[
        _case(f"dpmsolver{k}", SINGLE, n, solver_order=k, final_sigmas_type="sigma_min", lower_order_final=lof)
        for k in (2, 3)
        for n, lof in ((12, False), (10, True), (10, False))  # N=10, False: diffusers forces it True
    ],
    *[_case("dpmpp_2m", MULTI, n) for n in (10, 20)],
    *[
        _case("dpmpp_2m", MULTI, n, final_sigmas_type="sigma_min", lower_order_final=lof)
        for n, lof in ((10, False), (14, True), (15, True))
    ],
    *[
        _case("deis", DEIS, n, solver_order=k, lower_order_final=lof)
        for k in (2, 3)
        for n, lof in ((10, False), (14, True))
    ],
    _case("deis", DEIS, 20, solver_order=3),
    *[_case("plms", PNDM, n, skip_prk_steps=True, set_alpha_to_one=True) for n in (1, 2, 10)],
    *[_case("pndm", PNDM, n, skip_prk_steps=False, set_alpha_to_one=True) for n in (4, 10)],
]


def _replay(sched, n: int) -> tuple[torch.Tensor, list[int]]:
    """Run a diffusers scheduler with the test model, in float64 where it allows it.

    After ``set_timesteps`` the scheduler's ᾱ table and σ's are recomputed in float64 from its own (float32-valued)
    ``alphas_cumprod`` -- the same noise levels, without diffusers' float32 rounding of coefficients -- so the
    comparison can be to 1e-10. ``DPMSolverMultistepScheduler.step`` casts the sample to float32 itself.
    """
    sched.set_timesteps(n)
    ac = sched.alphas_cumprod.double()
    sched.alphas_cumprod = ac
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    if hasattr(sched, "sigmas") and sched.sigmas is not None and len(sched.sigmas) == len(sched.timesteps) + 1:
        sig = ((1 - ac) / ac).sqrt()
        last = sig[:1] if float(sched.sigmas[-1]) > 0 else torch.zeros(1, dtype=torch.float64)
        sched.sigmas = torch.cat([sig[sched.timesteps], last])
    x, ts = X0.clone(), []
    kw = {"eta": 0.0} if type(sched).__name__ == "DDIMScheduler" else {}
    for t in sched.timesteps:
        ts.append(int(t))
        x = sched.step(model(x, ac[t]), t, x, **kw).prev_sample
    return x.double(), ts


@pytest.mark.parametrize(("solver", "options", "cls", "cfg", "n", "end"), CASES)
def test_matches_diffusers(solver, options, cls, cfg, n, end) -> None:
    """Each solver equals its diffusers 0.42 scheduler on the integer-timestep trajectory that scheduler uses.

    Config choices: ``clip_sample=False`` (DDIM clips x₀ by default; we never do), ``set_alpha_to_one=True``
    (DDIM/PNDM end on ᾱ = 1 like our default end point), DPM-Solver's ``final_sigmas_type="zero"`` (default) is our
    ``final_alpha_bar=1`` and ``"sigma_min"`` is ``final_alpha_bar = alphas_cumprod[0]``. ``DEISMultistepScheduler``
    always ends at ``alphas_cumprod[0]`` (it has no σ = 0 end point), so it is compared there; our step into σ = 0 is
    first order for DEIS, the convention of diffusers' DPM-Solver ``final_sigmas_type="zero"``. PNDM's Runge-Kutta
    midpoints are diffusers' integer timesteps ``t - T/(2N)``: we pass them as the ``midpoint`` option (our
    default is the logSNR midpoint, which diffusers cannot represent).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = _scheduler(cls, **cfg)
        ref, ts = _replay(sched, n)
    ac = sched.alphas_cumprod
    mids = {int(t) for t in getattr(sched, "prk_timesteps", [])[1::4]} if solver == "pndm" else set()
    traj = ac[torch.tensor(sorted(set(ts) - mids))]
    opts = dict(options)
    if solver == "pndm":

        def t_of(a: torch.Tensor) -> int:
            return int(torch.argmin((ac - a).abs()))

        opts["midpoint"] = lambda a, b: ac[(t_of(a) + t_of(b)) // 2]
    final = 1.0 if end == "one" else float(ac[0])
    seen: list[torch.Tensor] = []
    out = sample(
        solver, model, X0.clone(), traj, final_alpha_bar=final, callback=lambda d: seen.append(d["alpha_bar"]), **opts
    )
    # same model evaluations, at the same noise levels, in the same order
    assert len(seen) == len(ts) == num_evaluations(solver, traj.numel())
    torch.testing.assert_close(torch.stack(seen), ac[torch.tensor(ts)], rtol=0, atol=0)
    tol = 2e-6 if cls == "DPMSolverMultistepScheduler" else 1e-10  # that scheduler computes in float32
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_solvers_are_distinguishable() -> None:
    """The diffusers comparisons are meaningful: distinct solvers differ by far more than their tolerances."""
    ab = torch.linspace(0.999, 0.01, 12, dtype=torch.float64)
    outs = {s: sample(s, model, X0, ab) for s in SOLVERS}
    torch.testing.assert_close(outs["dpmsolver1"], outs["ddim"], rtol=1e-12, atol=1e-12)
    names = [s for s in SOLVERS if s != "dpmsolver1"]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)


# --- convergence on Gaussian data, where ε is exact -------------------------------------------------------------
C = 0.5  # x₀ ~ N(0, C² I): ε(x, ᾱ) = √(1-ᾱ) x / (ᾱ C² + 1 - ᾱ), and x̃ = x/√ᾱ ∝ √(C² + σ²) along the ODE


def exact_eps(x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return x * (1 - ab).sqrt() / (C * C * ab + 1 - ab)


def _gaussian_error(solver: str, n: int, s_max: float, s_min: float, end: float | None, **opts) -> float:
    """|solver - exact| from x = 1 at σ = s_max over n values uniform in logSNR, ending at σ = end (None: σ = 0)."""
    pts = n if end is None else n + 1
    s = torch.logspace(math.log10(s_max), math.log10(s_min), pts, dtype=torch.float64)
    ab = 1 / (1 + s**2)
    traj = ab[:n].flip(0)
    final = 1.0 if end is None else float(ab[-1])
    out = float(sample(solver, exact_eps, torch.ones(1, dtype=torch.float64), traj, final_alpha_bar=final, **opts))
    s_start, s_end = float(s[0]), (0.0 if end is None else float(s[-1]))
    ref = math.sqrt((C * C + s_end**2) / (C * C + s_start**2)) / math.sqrt(float(ab[0])) * math.sqrt(final)
    return abs(out - ref)


# error ratio between n = 24 and 48 steps: ~2^order (multistep warm-ups limit DEIS-3 to order 2 asymptotically;
# pseudo linear multistep has order 2 on a grid that is not uniform in σ)
ORDER_RATIOS = {
    "ddim": (1.8, 2.2),
    "dpmsolver1": (1.8, 2.2),
    "dpmsolver2": (3.5, 4.5),
    "dpmsolver3": (7.0, 9.0),
    "dpmpp_2m": (3.4, 4.5),
    "pndm": (3.5, 4.5),
    "plms": (3.5, 4.5),
    "deis": (3.5, 9.0),
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_convergence_order_on_gaussian_data(solver: str) -> None:
    opts = {"lower_order_final": False} if "lower_order_final" in solver_options(solver) else {}
    e24, e48 = (_gaussian_error(solver, n, 10.0, 0.1, 0.1, **opts) for n in (24, 48))
    lo, hi = ORDER_RATIOS[solver]
    assert lo < e24 / e48 < hi, (e24, e48)
    if solver not in ("ddim", "dpmsolver1"):  # higher order: far below DDIM at the same number of steps
        assert e48 < 0.2 * _gaussian_error("ddim", 48, 10.0, 0.1, 0.1)


def test_pseudo_linear_multistep_is_high_order_on_sigma_uniform_grid() -> None:
    """PNDM/PLMS use constant Adams-Bashforth weights, exact for steps uniform in σ: there they beat order 3."""
    for solver in ("pndm", "plms"):
        errs = []
        for n in (24, 48):
            s = torch.linspace(10.0, 0.1, n + 1, dtype=torch.float64)
            ab = 1 / (1 + s**2)
            out = sample(
                solver, exact_eps, torch.ones(1, dtype=torch.float64), ab[:n].flip(0), final_alpha_bar=float(ab[-1])
            )
            ref = math.sqrt((C * C + 0.01) / (C * C + 100.0) * (1 + 100.0)) * math.sqrt(float(ab[-1]))
            errs.append(abs(float(out) - ref))
        assert errs[0] / errs[1] > 8, (solver, errs)


@pytest.mark.parametrize("solver", SOLVERS)
def test_default_end_point_converges_to_clean_sample(solver: str) -> None:
    errs = [_gaussian_error(solver, n, 10.0, 1e-3, None) for n in (12, 24, 48)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < (
        0.03 if solver in ("ddim", "dpmsolver1") else 0.25 * _gaussian_error("ddim", 48, 10.0, 1e-3, None)
    )


# --- dtype, device, gradients, callback --------------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_input_any_device(solver: str, device: str) -> None:
    """float32 x keeps its dtype and device, with the trajectory on that device or on the CPU."""
    ab = torch.linspace(0.999, 0.02, 9, dtype=torch.float64)
    ref = sample(solver, model, X0, ab)
    for traj in (ab.to(device), ab):
        out = sample(solver, model, X0.float().to(device), traj)
        assert out.dtype == torch.float32 and out.device.type == device
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", SOLVERS)
def test_differentiable_in_alpha_bar(solver: str) -> None:
    ab = torch.tensor([0.95, 0.7, 0.4, 0.2, 0.05], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: sample(solver, model, X0[:1], a).sum(), (ab,))


def test_final_alpha_bar_is_a_limit() -> None:
    """Ending at ᾱ close to 1 approaches the σ = 0 end point (for the DPM-Solver variants too)."""
    ab = torch.linspace(0.99, 0.05, 8, dtype=torch.float64)
    for solver in ("ddim", "plms", "pndm"):
        near = sample(solver, model, X0, ab, final_alpha_bar=1 - 1e-12)
        torch.testing.assert_close(near, sample(solver, model, X0, ab), rtol=1e-5, atol=1e-5)


def test_callback_reports_each_evaluation() -> None:
    ab = torch.linspace(0.99, 0.05, 6, dtype=torch.float64)
    for solver in SOLVERS:
        seen: list[dict] = []
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []

        def eps_fn(x, a, calls=calls):
            calls.append((x, a))
            return model(x, a)

        sample(solver, eps_fn, X0, ab, callback=seen.append)
        assert [d["i"] for d in seen] == list(range(num_evaluations(solver, 6)))
        assert all(set(d) == {"x", "i", "alpha_bar", "eps"} for d in seen)
        for d, (x, a) in zip(seen, calls, strict=True):
            assert d["x"] is x and d["alpha_bar"] is a and a.ndim == 0 and a.dtype == torch.float64
        if solver not in ("pndm", "plms"):
            torch.testing.assert_close(torch.stack([d["alpha_bar"] for d in seen]), ab.flip(0))


# --- errors ----------------------------------------------------------------------------------------------------
AB = torch.tensor([0.9, 0.5, 0.2, 0.1], dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "euler"}, "Unknown solver 'euler'; allowed: ddim, dpmsolver1"),
        ({"order": 2}, r"unknown option\(s\) order; allowed: lower_order_final"),
        ({"solver": "ddim", "order": 2}, "allowed: none"),
        ({"solver": "deis", "order": 4}, "deis order must be 1, 2 or 3; got 4"),
        ({"lower_order_final": "yes"}, "lower_order_final must be True or False; got 'yes'"),
        ({"solver": "pndm", "midpoint": 0.5}, "midpoint must be a callable"),
        ({"solver": "pndm", "midpoint": lambda a, b: a}, "strictly between"),
        ({"alpha_bar": AB.flip(0)}, "strictly decreasing"),
        ({"alpha_bar": torch.tensor([0.9, 1.0], dtype=torch.float64)}, "strictly inside"),
        ({"final_alpha_bar": 0.8}, r"final_alpha_bar must be a number in \(0.9, 1\].*; got 0.8"),
        ({"final_alpha_bar": 1.5}, "final_alpha_bar must be"),
        ({"x": torch.ones(3, dtype=torch.long)}, "x must be a floating-point tensor"),
        ({"eps_fn": lambda x, a: x[:1]}, r"eps_fn must return a tensor shaped like x \(3,\); got \(1,\)"),
        ({"solver": "pndm", "alpha_bar": AB[:3]}, "'pndm' needs a trajectory of at least 4 values"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    args = {"solver": "dpmsolver2", "eps_fn": model, "x": torch.ones(3, dtype=torch.float64), "alpha_bar": AB}
    args.update(kwargs)
    solver, eps_fn, x, ab = (args.pop(k) for k in ("solver", "eps_fn", "x", "alpha_bar"))
    with pytest.raises(ValueError, match=match):
        sample(solver, eps_fn, x, ab, **args)


def test_num_evaluations() -> None:
    assert [num_evaluations(s, 7) for s in SOLVERS] == [7, 7, 7, 7, 7, 16, 8, 7]
    assert num_evaluations("plms", 1) == 1
    with pytest.raises(ValueError, match="steps must be a positive integer; got 0"):
        num_evaluations("ddim", 0)
    with pytest.raises(ValueError, match="Unknown solver"):
        solver_options("heun")


# --- one implementation, driven two ways ---------------------------------------------------------------------------
# sha256 (first 16 hex digits) of the float64 results, the gradients in alpha_bar and the float32 results of
# ``_digest`` below, computed with the implementation before the solvers became generators (commit 70b5c03, where
# ``sample`` called each solver with a model object): the generator form must give the same bits. The test model uses
# only correctly rounded operations (+, -, *, /, sqrt); the solvers' own λ = -log σ is torch's float64 log.
BEFORE_GENERATORS = {
    "ddim": "847b25832f743609",
    "dpmsolver1": "847b25832f743609",
    "dpmsolver2": "2f35c2cefd7dfe0b",
    "dpmsolver3": "db5aef0f5c416585",
    "dpmpp_2m": "438d50d8bef474c0",
    "pndm": "19d5518f11f6fb98",
    "plms": "c929733bd19cdefc",
    "deis": "5e50478c564259e2",
}


def _rational_model(x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    ab = ab.to(x.dtype)
    return x * (1 - ab).sqrt() / (0.25 * ab + 1 - ab) + 0.2 * x * x / (1 + x * x) + 0.1 * ab


def _digest(solver: str) -> str:
    import hashlib

    h = hashlib.sha256()
    x = torch.tensor([[0.3, -1.2, 2.0], [1.1, 0.0, -0.7]], dtype=torch.float64)
    for n, final, lof in ((12, 1.0, False), (7, 1.0, False), (10, 0.9999, False), (9, 1.0, True)):
        opts = {"lower_order_final": False} if lof and "lower_order_final" in solver_options(solver) else {}
        ab = torch.linspace(0.9995, 0.004, n, dtype=torch.float64).requires_grad_(True)
        y = sample(solver, _rational_model, x, ab, final_alpha_bar=final, **opts)
        (g,) = torch.autograd.grad(y.sum(), ab)
        y32 = sample(solver, _rational_model, x.float(), ab.detach(), final_alpha_bar=final, **opts)
        for t in (y.detach(), g, y32):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("solver", SOLVERS)
def test_results_are_bit_identical_to_before_the_generator_form(solver: str) -> None:
    assert _digest(solver) == BEFORE_GENERATORS[solver]


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_run_is_sample_one_evaluation_at_a_time(solver: str) -> None:
    """Driving :class:`SolverRun` by hand gives ``sample``'s model inputs, levels and result, bit for bit."""
    ab = torch.linspace(0.99, 0.05, 6, dtype=torch.float64)
    seen: list[dict] = []
    ref = sample(solver, model, X0, ab, callback=seen.append)
    run = SolverRun(solver, ab)
    assert run.num_evaluations == num_evaluations(solver, 6) and run.alpha_bar is None
    x = run.start(X0)
    for d in seen:
        assert not run.done and torch.equal(x, d["x"]) and torch.equal(run.alpha_bar, d["alpha_bar"])
        x = run.send(model(x, run.alpha_bar))
    assert run.done and run.index == len(seen) and torch.equal(x, ref)
    with pytest.raises(ValueError, match="SolverRun.send needs a pending evaluation; the run is done"):
        run.send(x)
    with pytest.raises(ValueError, match="SolverRun.start was already called"):
        run.start(X0)
    with pytest.raises(ValueError, match="call start"):
        SolverRun(solver, ab).send(X0)
