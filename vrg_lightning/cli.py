"""``vrg`` command line: one sub-command per module in :mod:`vrg_lightning.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``vrg optimize`` starts without Lightning.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "optimize": "Optimize a VRG trajectory from an error profile.",
    "inspect": "Print the error profile and VRG trajectories stored in a checkpoint.",
    "profile": "Measure a trained model's error profile post hoc and store VRG trajectories in a new file.",
    "sample": "Sample with a checkpoint's trajectories (distributed), FID and baseline-vs-VRG reports.",
    "tune": "Validate candidate trajectories by paired FID and store the winners in a new checkpoint.",
    "export": "Export a trajectory as the sigmas=/timesteps= list a diffusers pipeline accepts.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrg", description="Variance-Reduction Guidance for diffusion sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_command=name)
        try:
            importlib.import_module(f"vrg_lightning.commands.{name}").add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != f"vrg_lightning.commands.{name}":
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help): return its status, not raise
        return int(exc.code or 0)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"vrg_lightning.commands.{args._command}")
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # `vrg inspect CK | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vrg {args._command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a folder where a file was expected, a full disk, ...
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"vrg {args._command}: error: {exc.strerror or exc}{where}; check the path and its permissions.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
