"""``vrg`` command line: one sub-command per module in :mod:`vrg_lightning.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``vrg optimize`` starts without Lightning.

Errors are one line on stderr, never a traceback: bad input (``ValueError``, ``KeyError``, our own
``FileNotFoundError``/``FileExistsError``) exits with 2; an error the operating system raised is worded by
:func:`os_error_message` (2 for a path of the wrong kind, 1 for the environment: permissions, a read-only or full
disk); a reader that closes the pipe (``| head``) ends the command quietly with 0; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import errno
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
    prefix = f"vrg {args._command}: error:"
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # a reader that left shows up here, not as a traceback at exit
        return status
    except BrokenPipeError:  # `vrg inspect CK | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"vrg {args._command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        code, msg = (2, str(exc)) if exc.errno is None else os_error_message(exc)  # errno None: raised by us
        print(f"{prefix} {_one_line(msg)}", file=sys.stderr)
        return code
    except (ValueError, KeyError) as exc:  # bad input, worded by the library (and the flags by the command)
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prefix} {_one_line(msg)}", file=sys.stderr)
        return 2


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def os_error_message(exc: OSError) -> tuple[int, str]:
    """``(exit code, message)`` for an error the operating system raised: 2 when the path given is of the wrong
    kind (missing, in the way, a folder, under a file), 1 for the environment (permissions, a read-only or full
    disk, ...).

    Example:
        >>> os_error_message(PermissionError(13, "Permission denied", "out/x.pt"))
        (1, "no permission for 'out/x.pt' (Permission denied); choose another location or change its permissions.")
    """
    where = "the path" if exc.filename is None else repr(os.fsdecode(exc.filename))
    why = exc.strerror or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return 2, f"{where} does not exist ({why}); check the path."
    if isinstance(exc, FileExistsError):
        return 2, f"{where} exists and is in the way ({why}); give another path or move it away."
    if isinstance(exc, IsADirectoryError):
        return 2, f"{where} is a folder ({why}); give a file path."
    if isinstance(exc, NotADirectoryError):
        return 2, f"a part of {where} is a file, not a folder ({why}); check the path."
    if isinstance(exc, PermissionError):
        return 1, f"no permission for {where} ({why}); choose another location or change its permissions."
    if exc.errno == errno.EROFS:
        return 1, f"{where} is on a read-only file system; choose another location."
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return 1, f"no space left writing {where} ({why}); free some space or choose another location."
    return 1, f"{why} ({where}); check the path, its permissions and the free disk space."

if __name__ == "__main__":
    sys.exit(main())
