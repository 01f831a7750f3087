"""``VRGScheduler``: a diffusers scheduler that runs the toolkit's solvers step by step over a continuous ᾱ
trajectory, so that a pipeline (``DDPMPipeline``, ``DDIMPipeline`` or any loop over ``scheduler.timesteps``) samples
what ``vrg sample`` samples. ``vrg export --format scheduler`` writes one as a folder.

    from diffusers import DDPMPipeline
    from vrg_lightning import VRGScheduler

    pipe = DDPMPipeline.from_pretrained("ddpm-dir")
    pipe.scheduler = VRGScheduler.from_checkpoint("tuned.ckpt", solver="dpmpp_2m", steps=10)
    images = pipe(num_inference_steps=10).images   # n = the trajectory's steps, as `vrg sample --steps`

The contract (diffusers 0.42, as ``DDIMScheduler`` / ``DPMSolverMultistepScheduler``):

=========================  ==========================================================================================
``timesteps``              the continuous model timesteps (``NoiseSchedule.alpha_bar_to_t``, float64) of every model
                           evaluation in order, noisiest first: one per trajectory value, plus the solver's
                           intermediate evaluations (``plms`` N+1, ``pndm`` N+9: ``solvers.num_evaluations``)
``set_timesteps(n)``       n is the number of trajectory values (the stored entry's ``steps``, ``vrg sample
                           --steps``); a trajectory is optimized for its length, so any other n is an error
``step(out, t, sample)``   ``out`` read per ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample``, ``flow``);
                           returns ``prev_sample`` (the next model input, after the last evaluation the final sample)
                           and ``pred_original_sample`` (x̂₀)
``init_noise_sigma``       the noise path's input scale c at the first level (1 for VP, ≈ σ_max for VE, √(α²+σ²)
                           for rectified flow), and ``scale_model_input`` returns the sample
=========================  ==========================================================================================

Noise paths: the samples a pipeline passes are in the model's own coordinates ``x = c · x_vp``
(:meth:`~vrg_lightning.schedule.NoisePath.input_scale`); the solver works on ``x_vp``. ``noise_path`` (a stored path
dict) or ``shift`` (a ``FlowMatchEulerDiscreteScheduler`` config: rectified flow) selects a path other than the
discrete VP betas.

The solver keeps its state between steps (multistep history, Runge-Kutta stages): ``sample`` is read at the first step
and must afterwards be the previous step's ``prev_sample`` (every pipeline loop passes it back); step k takes
``timesteps[k]``. The solvers are deterministic (η = 0): ``generator`` is ignored and ``eta`` must be 0.

Exactness: the steps are one :class:`~vrg_lightning.solvers.SolverRun`, the code of
:func:`vrg_lightning.solvers.sample`, so the same model outputs give the same samples bit for bit. In a pipeline the
first model input is the starting noise x itself, where ``sample`` evaluates (x/√ᾱ₀)·√ᾱ₀ (equal to a rounding).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from .schedule import NoisePath, NoiseSchedule
from .solvers import SolverRun, _check_options, num_evaluations
from .trajectories import validate_trajectory
from .variance import propagation

__all__ = ["PREDICTION_TYPES", "VRGScheduler", "VRGSchedulerOutput"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def path_kwargs(path: NoisePath) -> dict[str, Any]:
    """The :class:`VRGScheduler` arguments naming a noise path: diffusers' beta keys for the discrete VP path (its
    config stays a diffusers scheduler config), else ``noise_path`` (the stored path dict)."""
    return path.to_dict() if isinstance(path, NoiseSchedule) else {"noise_path": path.to_dict()}


@dataclass
class VRGSchedulerOutput(BaseOutput):
    """``prev_sample``: the next model input (after the last step, the final sample); ``pred_original_sample``: x̂₀."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class VRGScheduler(SchedulerMixin, ConfigMixin):
    """Any of :data:`vrg_lightning.solvers.SOLVERS` over a stored continuous trajectory, as a diffusers scheduler.

    Args:
        alpha_bar: the trajectory, ᾱ values cleanest first (a list, tensor or array; stored as a list of floats).
        solver: one of :data:`~vrg_lightning.solvers.SOLVERS`.
        solver_options: ``{"lower_order_final": bool}`` / ``{"order": 1|2|3}`` (deis), see ``solvers.solver_options``.
        final_alpha_bar: the end point of sampling (1 = σ 0, the clean sample).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the model's noise schedule (diffusers' names and
            defaults); ``trained_betas`` is not supported.
        prediction_type: what the model returns: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (default:
            ``flow`` on rectified flow, else ``epsilon``).
        source: where the trajectory came from (checkpoint, base, objective, lp, validated); recorded only.
        noise_path: a stored noise-path dict (``NoisePath.to_dict()``) of a path other than the discrete VP betas.
        shift: rectified flow with this shift (what a ``FlowMatchEulerDiscreteScheduler`` config gives).

    Raises:
        ValueError: no or an invalid trajectory, an unknown solver, option, schedule or prediction type.

    Example:
        >>> s = VRGScheduler(alpha_bar=[0.99, 0.5, 0.02], solver="plms")
        >>> s.set_timesteps(3)
        >>> [round(float(t), 2) for t in s.timesteps]  # noisiest first; plms evaluates the second value twice
        [619.91, 258.09, 258.09, 26.56]
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]  # from_config(other.config, alpha_bar=...) is quiet
    order = 1

    @register_to_config
    def __init__(
        self,
        alpha_bar: Sequence[float] | Tensor | None = None,
        solver: str = "ddim",
        solver_options: Mapping[str, Any] | None = None,
        final_alpha_bar: float = 1.0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | None = None,
        prediction_type: str | None = None,
        source: Mapping[str, Any] | None = None,
        noise_path: Mapping[str, Any] | None = None,
        shift: float | None = None,
    ) -> None:
        if alpha_bar is None:
            raise ValueError("VRGScheduler needs alpha_bar=[...] (the trajectory, cleanest first); or load a stored "
                             "one with VRGScheduler.from_checkpoint(path, solver=..., steps=...).")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}.")
        if noise_path is not None:
            self.schedule = NoisePath.from_dict(noise_path)
        elif shift is not None:
            self.schedule = NoisePath.from_dict({"path": "rectified_flow", "num_train_timesteps": num_train_timesteps,
                                                 "shift": shift})
        else:
            self.schedule = NoiseSchedule.from_config(
                {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule, "beta_start": beta_start,
                 "beta_end": beta_end, "trained_betas": trained_betas})
        prediction_type = self.schedule.check_prediction_type(prediction_type or self.schedule.prediction_types[0])
        self.register_to_config(prediction_type=prediction_type)
        opts = dict(solver_options or {})
        _check_options(solver, opts)
        if "midpoint" in opts:
            raise ValueError("solver_options: midpoint (a callable) cannot be stored in a scheduler config; the "
                             "scheduler uses the logSNR midpoint.")
        ab = validate_trajectory(torch.as_tensor(alpha_bar, dtype=torch.float64).detach().cpu(), "alpha_bar")
        self.schedule.check_covers(ab, "alpha_bar trajectory")
        self.register_to_config(alpha_bar=ab.tolist(), solver_options=opts or None)  # plain floats: JSON, exact
        self._ab, self._opts, self._final = ab, opts, float(final_alpha_bar)
        self._m = num_evaluations(solver, ab.numel())
        with torch.no_grad():  # the ᾱ of every model evaluation, in order: the solver's own yields
            levels = propagation(solver, ab, final_alpha_bar=final_alpha_bar, **opts).alpha_bar.flip(0)
        self._levels = levels
        self._t = self.schedule.alpha_bar_to_t(levels)
        self._t_list = self._t.tolist()
        self._a = levels.sqrt().tolist()  # √ᾱ and √(1-ᾱ) per evaluation, for the prediction types and x̂₀
        self._s = (1 - levels).sqrt().tolist()
        c = self.schedule.input_scale(torch.cat([levels, torch.tensor([float(final_alpha_bar)], dtype=torch.float64)]))
        self._c = None if c is None else c.tolist()  # the path's input scale per evaluation, then at the end point
        self.init_noise_sigma = 1.0 if c is None else self._c[0]
        self.set_timesteps()

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Mapping[str, Any], solver: str, steps: int,
                        base: str | None = None, objective: str | None = None, lp: float | None = None,
                        guidance_scale: float | None = None) -> VRGScheduler:
        """The stored trajectory of a checkpoint (``checkpoint["vrg"]``) for ``(solver, steps, ...)`` and its schedule.

        The entry is chosen by :func:`vrg_lightning.checkpoint.select_entry` (validated winners first; ``None`` =
        any; ``guidance_scale``: among entries optimised for several guidance scales, the one for this scale).
        ``path`` may also be a checkpoint dict or its ``vrg`` section.

        Raises:
            ValueError: no ``vrg`` section, no matching entry or several (the message lists them).
        """
        from .checkpoint import read_vrg, select_entry

        vrg = read_vrg(path)
        entry = select_entry(vrg, solver, steps, base, objective, lp, guidance_scale=guidance_scale)
        sched = dict(vrg["schedule"])
        validated = entry.get("validated")
        source = {"checkpoint": os.fspath(path) if isinstance(path, (str, os.PathLike)) else None,
                  "steps": int(steps), "base": entry.get("base"), "objective": entry.get("objective"),
                  "lp": entry.get("lp"),
                  "validated": validated.get("selected") if isinstance(validated, Mapping) else None}
        return cls(alpha_bar=[float(v) for v in entry["alpha_bar"]], solver=solver,
                   **path_kwargs(NoisePath.from_dict(sched)),
                   prediction_type=str(sched.get("prediction_type", "epsilon")), source=source)

    # --- the diffusers contract -------------------------------------------------------------------------------
    @property
    def alpha_bar(self) -> Tensor:
        """The trajectory (float64, cleanest first), as stored."""
        return self._ab.clone()

    @property
    def evaluation_alpha_bar(self) -> Tensor:
        """ᾱ of every model evaluation, in order (noisiest first): ``timesteps`` as noise levels."""
        return self._levels.clone()

    def __len__(self) -> int:
        return self.schedule.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The sample unchanged (variance preserving: the model takes x_t itself)."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None
                      ) -> None:
        """Restart sampling; ``num_inference_steps`` must be the trajectory's number of values (``None``: that).

        Raises:
            ValueError: any other number of steps.
        """
        n = self._ab.numel()
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or num_inference_steps != n):
            raise ValueError(
                f"num_inference_steps must be {n}, the number of values of the VRG trajectory ({self.config.solver}: "
                f"{self._m} model evaluations); got {num_inference_steps!r}. A trajectory is optimized for its length:"
                f" load one stored for {num_inference_steps} steps (VRGScheduler.from_checkpoint(..., steps=...)).")
        self.num_inference_steps = n
        self.timesteps = self._t.to(device if device is not None else "cpu", copy=True)
        self._run = SolverRun(self.config.solver, self._ab, final_alpha_bar=self._final, **self._opts)
        self._k, self._prev = 0, None

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool | None = None, generator: torch.Generator | None = None,
             return_dict: bool = True) -> VRGSchedulerOutput | tuple[Tensor, Tensor]:
        """One model evaluation: ``model_output`` at ``sample`` and ``timestep`` (= ``timesteps[k]`` at step k).

        Returns:
            :class:`VRGSchedulerOutput` (or the tuple ``(prev_sample, pred_original_sample)``).

        Raises:
            ValueError: all evaluations done (call ``set_timesteps``), a timestep other than ``timesteps[k]``, a
                ``sample`` that is not the previous ``prev_sample``, a model output shaped unlike the sample, eta ≠ 0.
        """
        k = self._k
        if k >= self._m:
            raise ValueError(f"All {self._m} model evaluations of this trajectory are done; call set_timesteps() "
                             "to sample again.")
        if eta:
            raise ValueError(f"eta must be 0 (VRGScheduler's solvers are deterministic ODE solvers); got {eta!r}.")
        self._check_timestep(k, timestep)
        if k and sample is not self._prev:
            raise ValueError(f"step {k}: sample must be the prev_sample returned by step {k - 1} (the solver keeps "
                             "its own state: multistep history, Runge-Kutta stages); call set_timesteps() to restart.")
        if not torch.is_tensor(model_output) or model_output.shape != sample.shape:
            got = tuple(model_output.shape) if torch.is_tensor(model_output) else type(model_output).__name__
            raise ValueError(f"model_output must be a tensor shaped like sample {tuple(sample.shape)}; got {got}.")
        a, s = self._a[k], self._s[k]
        kind = self.config.prediction_type
        x = sample if self._c is None else sample / self._c[k]  # the solver's VP coordinates
        if kind == "epsilon":
            eps, x0 = model_output, torch.sub(x, model_output, alpha=s).div_(a)
        elif kind == "v_prediction":
            eps, x0 = torch.add(model_output * a, x, alpha=s), torch.sub(x * a, model_output, alpha=s)
        elif kind == "sample":
            eps, x0 = torch.sub(x, model_output, alpha=a).div_(s), model_output
        else:  # velocity v = ε - x₀: ε = (x + √ᾱ v) / (√ᾱ + √(1-ᾱ))
            eps = torch.add(x, model_output, alpha=a).div_(a + s)
            x0 = eps - model_output
        if k == 0:
            self._run.start(x)
        prev = self._run.send(eps)
        if self._c is not None:
            prev = prev * self._c[k + 1]
        self._k, self._prev = k + 1, prev
        if not return_dict:
            return prev, x0
        return VRGSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _check_timestep(self, k: int, timestep: Any) -> None:
        """``timestep`` must be ``timesteps[k]`` (to float32 precision); a tensor off the CPU is not read (no sync)."""
        if torch.is_tensor(timestep):
            if timestep.device.type != "cpu" or timestep.numel() == 0:
                return
            value = float(timestep.reshape(-1)[0])
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            value = float(timestep)
        else:
            raise ValueError(f"timestep must be a number or a tensor (timesteps[{k}]); got {type(timestep).__name__}.")
        want = self._t_list[k]
        if abs(value - want) > 1e-6 * max(1.0, abs(want)):
            raise ValueError(f"step {k} expects timestep {want:.6g} (timesteps[{k}]); got {value:.6g}. Call step once "
                             "per entry of timesteps, in order; set_timesteps() restarts.")
