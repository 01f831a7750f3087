"""``vrg inspect``: print the noise schedule, error profile and VRG trajectories stored in a checkpoint.

Examples::

    vrg inspect runs/digits/checkpoints/last.ckpt
    vrg inspect profiled.ckpt --json

Reads the file with ``torch.load(weights_only=True)`` only (no Lightning, no model code). A corrupt or truncated
file prints a clear error and exits with code 2; a checkpoint without VRG statistics exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="Lightning checkpoint or a file written by `vrg profile`")
    parser.add_argument("--json", action="store_true", help="print one JSON object (entries with their trajectories)")


def profile_summary(profile_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Plain summary of a stored ``ErrorProfile`` dict: source, bins, samples, MSE range and per-bin statistics."""
    from ..profile import ErrorProfile

    p = ErrorProfile.from_dict(profile_dict)
    g = p.gaussianity()
    out: dict[str, Any] = {"source": p.source, "bins": p.num_bins, "nonempty_bins": int(p.nonempty.sum()),
                           "samples": float(p.count.sum()), "meta": _plain(p.meta), "per_bin": g}
    if g["mse"]:
        out["mse_min"], out["mse_max"] = min(g["mse"]), max(g["mse"])
    for k in ("skewness", "excess_kurtosis"):
        if g.get(k):
            out[f"max_abs_{k}"] = max(abs(v) for v in g[k] if math.isfinite(v)) if any(
                math.isfinite(v) for v in g[k]) else math.nan
    return out


def _plain(obj: Any) -> Any:
    import torch

    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _model_summary(model: Any) -> dict[str, Any] | None:
    if not isinstance(model, Mapping):
        return None
    den = model.get("denoiser") or {}
    unet = den.get("unet") or {}
    keys = ("sample_size", "in_channels", "block_out_channels", "layers_per_block", "down_block_types")
    return {"prediction_type": den.get("prediction_type"), "num_classes": den.get("num_classes"),
            "unet": {k: unet.get(k) for k in keys}, "ema": bool(model.get("ema_weights")),
            "source": model.get("source")}


def inspect_checkpoint(path: str) -> dict[str, Any]:
    """Everything ``vrg inspect`` shows, as a plain dict (raises ``ValueError`` for unreadable files)."""
    from ..checkpoint import VRG_KEY, load_checkpoint_file, read_vrg

    ckpt = load_checkpoint_file(path)
    raw = ckpt if ckpt.get("format") == "vrg-lightning" else ckpt.get(VRG_KEY)
    info: dict[str, Any] = {"file": path, "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
                            "model": _model_summary(raw.get("model")) if isinstance(raw, Mapping) else None}
    try:
        vrg = read_vrg(ckpt)
    except ValueError as exc:
        info["missing"] = str(exc)
        return info
    info.update({"format": vrg["format"], "version": vrg["version"], "created": vrg.get("created"),
                 "toolkit_version": vrg.get("toolkit_version"), "schedule": dict(vrg["schedule"]),
                 "profile": profile_summary(vrg["profile"]), "profiler": _plain(vrg.get("profiler")),
                 "entries": [_plain(dict(e)) for e in vrg["entries"]]})
    return info


def format_report(info: Mapping[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`'s dict."""
    lines = [f"file      {info['file']}" + (f"  (step {info['global_step']}, epoch {info['epoch']})"
                                               if info.get("global_step") is not None else "")]
    m = info.get("model")
    if m:
        u = m["unet"]
        lines.append(f"model     UNet2DModel {u.get('sample_size')}px x{u.get('in_channels')}, blocks "
                     f"{u.get('block_out_channels')}, {m['prediction_type']}, classes {m['num_classes']}, "
                     f"EMA {'yes' if m['ema'] else 'no'}")
    if "missing" in info:
        lines.append(f"vrg       {info['missing']}")
        return "\n".join(lines)
    s = info["schedule"]
    lines.append(f"schedule  {s.get('beta_schedule')} T={s.get('num_train_timesteps')} beta {s.get('beta_start')}.."
                 f"{s.get('beta_end')}, prediction {s.get('prediction_type')}")
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
    lines.append(f"vrg       format {info['format']} v{info['version']}, created {info.get('created')}, "
                 f"toolkit {info.get('toolkit_version')}")
    entries = info["entries"]
    if not entries:
        lines.append("entries   none (profile only)")
        return "\n".join(lines)
    head = f"{'solver':<10} {'steps':>5} {'base':<15} {'objective':<9} {'lp':>6} {'cpe before':>12} " \
           f"{'cpe after':>12} {'change':>8}  validated"
    lines += ["", head, "-" * len(head)]
    for e in entries:
        num = {k: math.nan if e.get(k) is None else float(e[k]) for k in ("cpe_before", "cpe_after", "lp")}
        b, a = num["cpe_before"], num["cpe_after"]  # tuned "base" entries hold None
        change = 100 * (a / b - 1) if b and math.isfinite(b) else math.nan
        val = e.get("validated")
        vtxt = "-" if not val else ("selected" if val.get("selected") else "base kept") + f" ({val.get('reason', '')})"
        lines.append(f"{e['solver']:<10} {e['steps']:>5} {e['base']:<15} {str(e.get('objective', '?')):<9} "
                     f"{num['lp']:>6.3g} {b:>12.6g} {a:>12.6g} {change:>+7.2f}%  {vtxt}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, allow_nan=True))
    else:
        print(format_report(info))
    if "missing" in info:
        if not args.json:
            print("vrg inspect: the checkpoint holds no VRG statistics.", file=sys.stderr)
        return 1
    return 0
