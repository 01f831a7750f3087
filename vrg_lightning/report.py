"""Figures and tables: the image tiler and PNG grids, the error-profile figures, the base-vs-VRG compare table and
plot, and the ``vrg inspect`` report of a checkpoint (a plain dict and its text form).

Nothing here computes a result; every function turns one into something to look at. matplotlib and PIL are
imported only by the functions that draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .io import atomic_write

if TYPE_CHECKING:
    from .evaluation.paired import CompareRow
    from .profile import ErrorProfile

__all__ = [
    "log_profile",
    "cpe_metrics",
    "image_grid",
    "save_grid",
    "profile_figures",
    "compare_markdown",
    "plot_compare",
    "profile_summary",
    "inspect_checkpoint",
    "format_report",
]


# --- images -------------------------------------------------------------------------------------------------------
def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """Tile ``[N, C, H, W]`` images into one ``[C, H', W']`` grid, ``nrow`` images per row (default ≈ √N),
    ``pad`` pixels of value 1 (white in [0, 1] and in [-1, 1]) between and around them: the one image tiler.

    Example:
        >>> image_grid(torch.zeros(5, 1, 2, 2)).shape  # 2 per row, 3 rows of 2 + 1 pixels, plus 1
        torch.Size([1, 10, 7])
    """
    n, c, h, w = images.shape
    ncol = max(1, min(nrow or int(round(n**0.5)), n))
    rows = -(-n // ncol)
    grid = images.new_ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return grid


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, pad: int = 1) -> None:
    """Save images in [-1, 1] (``[N, C, H, W]``, C = 1 or 3) as one PNG grid (:func:`image_grid`), atomically;
    images smaller than 64 pixels are enlarged (nearest neighbour) so the grid can be looked at."""
    from PIL import Image

    scale = max(1, 64 // max(images.shape[-2:]))
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    grid = image_grid(images.float().cpu(), nrow, pad)
    c = grid.shape[0]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


# --- error profile ------------------------------------------------------------------------------------------------
def profile_figures(profile: ErrorProfile) -> dict[str, Any]:
    """Matplotlib figures of a profile: ``mse`` (MSE vs logSNR, log scale) and ``gaussianity`` (per-bin mean, std,
    skewness, excess kurtosis of ε̂ - ε; a Gaussian error has 0, √MSE, 0, 0)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = profile.gaussianity()
    figs = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(g["lambda"], g["mse"], ".-")
    ax.set_xlabel("logSNR λ = log(ᾱ/(1-ᾱ))")
    ax.set_ylabel("MSE of ε̂")
    ax.set_title(f"{profile.source} profile")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["mse"] = fig
    keys = [k for k in ("mean", "std", "skewness", "excess_kurtosis") if k in g]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, k in zip(list(axes) if len(keys) > 1 else [axes], keys, strict=True):
        ax.plot(g["lambda"], g[k], ".-")
        ax.set_title(k)
        ax.set_xlabel("λ")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["gaussianity"] = fig
    return figs


# --- compare mode -------------------------------------------------------------------------------------------------
def log_profile(logger: Any, profile: ErrorProfile | None, step: int) -> None:
    """Add a profile's :func:`profile_figures` to a TensorBoard-like logger (``experiment.add_figure``), if any."""
    exp = getattr(logger, "experiment", None) if logger is not None else None
    if not hasattr(exp, "add_figure") or profile is None or not bool(profile.nonempty.any()):
        return
    for tag, fig in profile_figures(profile).items():
        exp.add_figure(f"vrg/{profile.source}_{tag}", fig, step)


def cpe_metrics(entries: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Scalars ``vrg_cpe/<solver>_<steps>_<base>_<objective>_lp<lp>/before|after`` of stored entries.

    Example:
        >>> cpe_metrics([{"solver": "ddim", "steps": 10, "base": "logSNR", "objective": "paper", "lp": 0.1,
        ...               "cpe_before": 2.0, "cpe_after": 1.5}])
        {'vrg_cpe/ddim_10_logSNR_paper_lp0.1/before': 2.0, 'vrg_cpe/ddim_10_logSNR_paper_lp0.1/after': 1.5}
    """
    out = {}
    for e in entries:
        tag = f"vrg_cpe/{e['solver']}_{e['steps']}_{e['base']}_{e['objective']}_lp{e['lp']:g}"
        out[f"{tag}/before"], out[f"{tag}/after"] = e["cpe_before"], e["cpe_after"]
    return out


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def compare_markdown(rows: Sequence[CompareRow]) -> str:
    """Markdown table of :class:`~vrg_lightning.evaluation.paired.CompareRow` s: FID base / VRG (mean over seeds),
    the paired difference with its CI, cpe base / VRG."""
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

    matplotlib.use("Agg", force=False)
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


# --- vrg inspect --------------------------------------------------------------------------------------------------
def profile_summary(profile_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Plain summary of a stored ``ErrorProfile`` dict: source, bins, samples, MSE range and per-bin statistics."""
    from .profile import ErrorProfile

    p = ErrorProfile.from_dict(profile_dict)
    g = p.gaussianity()
    out: dict[str, Any] = {"source": p.source, "bins": p.num_bins, "nonempty_bins": int(p.nonempty.sum()),
                           "samples": float(p.count.sum()), "meta": _plain(p.meta), "per_bin": g}
    if g["mse"]:
        out["mse_min"], out["mse_max"] = min(g["mse"]), max(g["mse"])
    for k in ("skewness", "excess_kurtosis"):
        finite = [abs(v) for v in g.get(k) or () if math.isfinite(v)]
        if g.get(k):
            out[f"max_abs_{k}"] = max(finite) if finite else math.nan
    return out


def _plain(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _model_summary(model: Any, module: Any = None) -> dict[str, Any] | None:
    """What a file says about its model: a toolkit UNet (``kind="unet"``), a ``--model SPEC`` (``"spec"``) or a
    LightningModule class (``"lightning"``, from ``vrg["module"]``)."""
    if isinstance(model, Mapping) and "spec" in model:
        return {"kind": "spec", "spec": model.get("spec"), "sample_shape": model.get("sample_shape"),
                "prediction_type": model.get("prediction_type"), "num_classes": model.get("num_classes")}
    if isinstance(model, Mapping) and "denoiser" in model:
        den = model.get("denoiser") or {}
        unet = den.get("unet") or {}
        keys = ("sample_size", "in_channels", "block_out_channels", "layers_per_block", "down_block_types")
        return {"kind": "unet", "prediction_type": den.get("prediction_type"), "num_classes": den.get("num_classes"),
                "unet": {k: unet.get(k) for k in keys}, "ema": bool(model.get("ema_weights")),
                "source": model.get("source")}
    if isinstance(model, Mapping) and isinstance(model.get("latent_pipeline"), Mapping):
        src = model["latent_pipeline"]
        return {"kind": "latent", "diffusers_dir": src.get("diffusers_dir"), "pipeline": src.get("pipeline"),
                "sample_shape": model.get("sample_shape")}
    if isinstance(module, Mapping) and module.get("class_path"):
        return {"kind": "lightning", "class_path": module.get("class_path"),
                "sample_shape": module.get("sample_shape")}
    return None


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``vrg inspect`` shows, as a plain dict; ``"missing"`` says why a file holds no VRG statistics.

    Reads the file with ``torch.load(weights_only=True)`` only (no Lightning, no model code).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint (corrupt, truncated, not a dict).
    """
    from .checkpoint import VRG_KEY, load_checkpoint_file, read_vrg

    path = os.fspath(path)
    ckpt = load_checkpoint_file(path)
    raw = ckpt if ckpt.get("format") == "vrg-lightning" else ckpt.get(VRG_KEY)
    info: dict[str, Any] = {"file": path, "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
                            "model": _model_summary(raw.get("model"), raw.get("module")) if isinstance(raw, Mapping)
                            else None}
    try:
        vrg = read_vrg(ckpt)
    except ValueError as exc:
        info["missing"] = str(exc)
        return info
    info.update({"format": vrg["format"], "version": vrg["version"], "created": vrg.get("created"),
                 "toolkit_version": vrg.get("toolkit_version"), "schedule": dict(vrg["schedule"]),
                 "profile": profile_summary(vrg["profile"]), "profiler": _plain(vrg.get("profiler")),
                 "entries": [_plain(dict(e)) for e in vrg["entries"]]})
    if isinstance(vrg.get("guided_profiles"), Mapping):  # vrg profile --guidance-scales: {str(w): profile}
        info["guided_profiles"] = {str(w): profile_summary(d) for w, d in vrg["guided_profiles"].items()}
    return info


def _entry_line(e: Mapping[str, Any], guided: bool = False) -> str:
    num = {k: math.nan if e.get(k) is None else float(e[k]) for k in ("cpe_before", "cpe_after", "lp")}
    b, a = num["cpe_before"], num["cpe_after"]  # tuned "base" entries hold None
    change = 100 * (a / b - 1) if b and math.isfinite(b) else math.nan
    val = e.get("validated")
    vtxt = "-" if not val else ("selected" if val.get("selected") else "base kept") + f" ({val.get('reason', '')})"
    def cell(x: float, spec: str, width: int) -> str:  # tuned "base" entries have no lp / cpe: a dash
        return f"{x:{spec}}" if math.isfinite(x) else f"{'—':>{width}}"

    return (f"{e['solver']:<10} {e['steps']:>5} {e['base']:<15} {str(e.get('objective', '?')):<9} "
            f"{cell(num['lp'], '>6.3g', 6)} {cell(b, '>12.6g', 12)} {cell(a, '>12.6g', 12)} "
            f"{cell(change, '>+7.2f', 7)}{'%' if math.isfinite(change) else ' '}  "
            + (f"{float(e.get('guidance_scale', 1.0)):>8.4g}  " if guided else "") + vtxt)


def format_report(info: Mapping[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`'s dict."""
    lines = [f"file      {info['file']}" + (f"  (step {info['global_step']}, epoch {info['epoch']})"
                                               if info.get("global_step") is not None else "")]
    m = info.get("model")
    if m and m.get("kind") == "unet":
        u = m["unet"]
        lines.append(f"model     UNet2DModel {u.get('sample_size')}px x{u.get('in_channels')}, blocks "
                     f"{u.get('block_out_channels')}, {m['prediction_type']}, classes {m['num_classes']}, "
                     f"EMA {'yes' if m['ema'] else 'no'}")
    elif m and m.get("kind") == "spec":
        lines.append(f"model     --model {m['spec']} (weights not stored: pass it again), sample shape "
                     f"{m.get('sample_shape')}, {m.get('prediction_type')}, classes {m.get('num_classes')}")
    elif m and m.get("kind") == "latent":
        lines.append(f"model     {m.get('pipeline')} {m.get('diffusers_dir')} (weights not stored: pass "
                     f"--diffusers-dir again), latents {m.get('sample_shape')}")
    elif m:
        lines.append(f"model     LightningModule {m['class_path']}, sample shape {m.get('sample_shape')}")
    if "missing" in info:
        lines.append(f"vrg       {info['missing']}")
        return "\n".join(lines)
    s = info["schedule"]
    if s.get("path", "vp_discrete") != "vp_discrete":
        opts = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("path", "prediction_type"))
        lines.append(f"schedule  {s['path']} ({opts}), prediction {s.get('prediction_type')}")
    else:
        lines.append(f"schedule  {s.get('beta_schedule')} T={s.get('num_train_timesteps')} beta "
                     f"{s.get('beta_start')}..{s.get('beta_end')}, prediction {s.get('prediction_type')}")
    p = info["profile"]
    lines.append(f"profile   {p['source']}: {p['nonempty_bins']}/{p['bins']} bins, {p['samples']:.0f} samples, "
                 f"MSE {p.get('mse_min', math.nan):.4g}..{p.get('mse_max', math.nan):.4g}"
                 + (f", max |skew| {p['max_abs_skewness']:.3g}, max |excess kurtosis| "
                    f"{p['max_abs_excess_kurtosis']:.3g}" if "max_abs_skewness" in p else ""))
    prof = info.get("profiler") or {}
    if prof.get("command"):
        lines.append(f"profiler  {prof['command']} of {prof.get('input')}: {prof.get('samples')} samples, seed "
                     f"{prof.get('seed')}, {'EMA' if prof.get('ema') else 'raw'} weights")
    elif prof:
        lines.append(f"profiler  step {prof.get('step')}, half-life {prof.get('half_life_samples')} samples, "
                     f"skipped non-finite {prof.get('nonfinite_skipped', 0)}")
    if info.get("guided_profiles"):
        lines.append("guided    " + "; ".join(f"w = {w}: MSE {g.get('mse_min', math.nan):.4g}.."
                                              f"{g.get('mse_max', math.nan):.4g}"
                                              for w, g in info["guided_profiles"].items()))
    lines.append(f"vrg       format {info['format']} v{info['version']}, created {info.get('created')}, "
                 f"toolkit {info.get('toolkit_version')}")
    entries = info["entries"]
    if not entries:
        lines.append("entries   none (profile only)")
        return "\n".join(lines)
    guided = any("guidance_scale" in e for e in entries)  # a guidance column only where entries record one
    head = f"{'solver':<10} {'steps':>5} {'base':<15} {'objective':<9} {'lp':>6} {'cpe before':>12} " \
           f"{'cpe after':>12} {'change':>8}  " + (f"{'guidance':>8}  " if guided else "") + "validated"
    lines += ["", head, "-" * len(head)]
    lines += [_entry_line(e, guided) for e in entries]
    return "\n".join(lines)
