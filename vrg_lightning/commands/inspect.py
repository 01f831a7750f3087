"""``vrg inspect``: print the noise schedule, error profile and VRG trajectories stored in a checkpoint
(:func:`vrg_lightning.report.inspect_checkpoint`, :func:`vrg_lightning.report.format_report`).

Examples::

    vrg inspect runs/digits/checkpoints/last.ckpt
    vrg inspect profiled.ckpt --json

A corrupt or truncated file prints a clear error and exits with code 2; a checkpoint without VRG statistics exits
with code 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..report import format_report, inspect_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="Lightning checkpoint or a file written by `vrg profile`")
    parser.add_argument("--json", action="store_true", help="print one JSON object (entries with their trajectories)")


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info, allow_nan=True) if args.json else format_report(info))
    if "missing" in info:
        if not args.json:
            print("vrg inspect: the checkpoint holds no VRG statistics.", file=sys.stderr)
        return 1
    return 0
