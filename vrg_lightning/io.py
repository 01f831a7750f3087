"""Files: atomic writes that never replace what they must not, safe ``torch.load``, and the versioned formats.

- A write goes to a temporary file in the target folder (created with mode ``0o666``, so the umask applies as
  for any new file) and is renamed over the target: a crash never leaves a half-written file under the final name.
  With ``overwrite=False`` the rename is a hard link that fails when the target exists, so a file that appeared in
  the meantime is never replaced.
- :func:`check_output_file` is the one rule for output files: never an input (same path, symlink or hard link),
  never a folder, an existing file only with ``force``.
- :func:`load_torch_file` is ``torch.load(weights_only=True)`` with errors that name the file and say what is
  wrong with it (never torch's advice to retry with ``weights_only=False``).
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FORMAT_VERSIONS",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "same_file",
    "check_output_file",
    "check_format",
    "load_torch_file",
    "read_text_file",
    "from_plain_dict",
]

#: The newest version of each versioned format this toolkit reads (``checkpoint["vrg"]``, error profiles).
FORMAT_VERSIONS = {"vrg-lightning": 1, "vrg-profile": 1}


def _temp_file(folder: Path, name: str) -> tuple[int, Path]:
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:  # 0o666 & ~umask, like any new file (tempfile.mkstemp would make it 0600)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _link_new(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` unless ``target`` exists (``FileExistsError``), atomically where the file
    system has hard links."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"{str(target)!r} exists (written meanwhile by another process); it was not replaced."
                              ) from None
    except OSError:  # no hard links here (some network or FAT file systems): claim the name, then rename over it
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, target)
        return
    tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, overwrite: bool = True) -> None:
    """Call ``write(f)`` on a temporary file in the target folder, then rename it to ``path``.

    Args:
        overwrite: replace an existing ``path``; with ``False`` an existing file (even one created while
            ``write`` ran) raises ``FileExistsError`` and is left as it was.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(p.parent, p.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            _link_new(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def atomic_torch_save(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), overwrite=overwrite)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path after resolving symlinks and ``..``, or a hard link."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.samefile(pb)
    except OSError:  # one of them does not exist
        return False


def check_output_file(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | None = None, *,
                      force: bool = False, name: str = "out", force_hint: str = "force=True") -> None:
    """The rule for an output file: never one of ``inputs``, never a folder, an existing file only with ``force``.

    Args:
        out: the file about to be written.
        inputs: ``{name: path}`` of the inputs (``None`` paths are skipped); a symlink or hard link to an input is
            that input.
        name, force_hint: how the message names ``out`` and the way to allow replacing (``--out``, ``--force`` for
            the CLI).

    Raises:
        ValueError: ``out`` is an input or a folder.
        FileExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> check_output_file("a-file-that-does-not-exist.pt", {"ckpt": "model.ckpt"})
    """
    for what, path in (inputs or {}).items():
        if path is not None and same_file(out, path):
            how = "the same path" if Path(out).resolve() == Path(path).resolve() else "a link to the same file"
            raise ValueError(f"{name} {str(out)!r} is the {what} input ({how}); vrg-lightning never overwrites "
                             "its inputs. Give another path.")
    if Path(out).is_dir():
        raise ValueError(f"{name} {str(out)!r} is a folder; give a file name.")
    if Path(out).exists() and not force:
        raise FileExistsError(f"{name} {str(out)!r} exists; pass {force_hint} to replace it, or choose a new file.")


def check_format(obj: Mapping[str, Any], fmt: str, name: str, required: bool = True) -> int:
    """Check ``obj["format"] == fmt`` and ``1 <= obj["version"] <=`` :data:`FORMAT_VERSIONS` ``[fmt]``; returns the
    version (0 for an ``obj`` that declares neither, allowed when ``required`` is False).

    Raises:
        ValueError: another format, a version that is not a positive integer, or a newer version than this
            toolkit reads (the message says to upgrade).
    """
    if not required and "format" not in obj and "version" not in obj:
        return 0
    if obj.get("format") != fmt:
        raise ValueError(f"{name}: format is {obj.get('format')!r}, expected {fmt!r}.")
    version, newest = obj.get("version"), FORMAT_VERSIONS[fmt]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{name}: {fmt} version must be a positive integer; got {version!r}.")
    if version > newest:
        raise ValueError(f"{name}: {fmt} version {version} is newer than this toolkit reads ({newest}); upgrade "
                         "vrg-lightning.")
    return version


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut at the end of the sample
    return True


def _unreadable(head: bytes, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in the user's terms."""
    if not head:
        return "is empty"
    if head.startswith((b"PK\x03\x04", b"\x80")) and isinstance(exc, pickle.UnpicklingError) \
            and "weights" in str(exc).lower():
        return ("holds Python objects other than tensors, numbers, strings, lists and dicts; vrg-lightning does "
                "not load such files (unpickling them could run code)")
    if head.startswith(b"PK\x03\x04"):
        return "cannot be read: the torch file is corrupt, truncated or incomplete (its zip archive is damaged)"
    if _looks_like_text(head):
        return "is a text file, not a torch file"
    return "is not a torch file (corrupt, truncated, or another format)"


def load_torch_file(path: str | os.PathLike, what: str = "File") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, nothing else ever.

    Args:
        what: how messages name the file (``"Checkpoint"``, ``"Profile file"``, ...).

    Raises:
        FileNotFoundError: no such file (or a folder).
        ValueError: empty, truncated or corrupt, not a torch file, or holding objects other than tensors and plain
            containers; the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist" + (" (it is a folder)." if p.is_dir() else "."))
    with open(p, "rb") as f:
        head = f.read(512)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure: say what is wrong with the file
        raise ValueError(f"{what} {str(p)!r} {_unreadable(head, exc)}.") from exc


def read_text_file(path: str | os.PathLike, what: str = "File", expected: str = "text") -> str:
    """The UTF-8 text of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is binary or not UTF-8 (the message names it and says what was ``expected``).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist" + (" (it is a folder)." if p.is_dir() else "."))
    data = p.read_bytes()
    if data.startswith((b"PK\x03\x04", b"\x80")):
        problem = "is a torch file"
    elif b"\0" in data[:8192]:
        problem = "is binary"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"is not UTF-8 text (byte {exc.start})"
    raise ValueError(f"{what} {str(p)!r} {problem}; expected a text file of {expected}.")


def from_plain_dict(cls: type, d: Mapping[str, Any], *, skip_none: bool = False) -> Any:
    """A settings dataclass from its stored plain dict: unknown keys are ignored (files written by newer versions),
    missing keys (and ``None`` values, with ``skip_none``) take the class's defaults; the class validates the rest.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class S:
        ...     a: int = 1
        ...     b: int = 2
        >>> from_plain_dict(S, {"a": 5, "newer": 0}), from_plain_dict(S, {"b": None}, skip_none=True)
        (S(a=5, b=2), S(a=1, b=2))
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and not (skip_none and v is None)})
