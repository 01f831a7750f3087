"""SPECs: a model (or feature extractor) named as ``path/to/file.py:NAME`` or ``package.module:NAME``.

``NAME`` (dots reach attributes: ``NAME.attr``) is an ``nn.Module``, an ``nn.Module`` class (built with no
arguments), a LightningModule class (rebuilt from a checkpoint by :mod:`.lightning`), or a callable returning an
``nn.Module``. A file is imported under a private module name (its ``if __name__ == "__main__":`` block does not
run), once per file version.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

__all__ = ["is_spec", "split_spec", "is_file_location", "import_spec", "build_module", "spec_of_class",
           "FILE_MODULE_PREFIX"]

FILE_MODULE_PREFIX = "vrg_spec_"


def split_spec(spec: str, what: str = "model") -> tuple[str, str]:
    """``(file or module, NAME)`` of a SPEC.

    Raises:
        ValueError: no ``:``, or an empty side.

    Example:
        >>> split_spec("models/mlp.py:make"), split_spec("pkg.nets:Net")
        (('models/mlp.py', 'make'), ('pkg.nets', 'Net'))
    """
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"{what} SPEC {spec!r} must be path/to/file.py:NAME or package.module:NAME (NAME a Python "
                         "name, dots for attributes).")
    return where, name


def is_spec(text: Any) -> bool:
    """Whether ``text`` reads as a SPEC (``X:NAME``), not a plain name such as ``digits``.

    Example:
        >>> is_spec("feat.py:extractor"), is_spec("digits"), is_spec(3)
        (True, False, False)
    """
    if not isinstance(text, str):
        return False
    try:
        split_spec(text)
    except ValueError:
        return False
    return True


def is_file_location(where: str) -> bool:
    """Whether the part of a SPEC before ``:`` is a file (``.py``, or a path) rather than a module name."""
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_file(path: Path, spec: str, what: str) -> ModuleType:
    p = path.resolve()
    if not p.is_file():
        raise FileNotFoundError(f"{what} SPEC {spec!r}: no such file {str(path)!r}.")
    stat = p.stat()
    key = hashlib.sha256(f"{p}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
    name = f"{FILE_MODULE_PREFIX}{key}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, p)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"{what} SPEC {spec!r}: {str(path)!r} cannot be imported as a Python file.")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # before exec: dataclasses, pickling and Lightning look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file means the same: it did not import
        del sys.modules[name]
        raise ValueError(f"{what} SPEC {spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(where: str, spec: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
            raise ValueError(f"{what} SPEC {spec!r}: no module named {where!r} (is it installed, or on PYTHONPATH? "
                             "A file is given as path/to/file.py:NAME).") from exc
        raise ValueError(f"{what} SPEC {spec!r}: importing module {where!r} failed: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{what} SPEC {spec!r}: importing module {where!r} failed: {type(exc).__name__}: "
                         f"{exc}") from exc


def import_spec(spec: str, what: str = "model") -> Any:
    """The object a SPEC names (not called).

    Args:
        spec: ``path/to/file.py:NAME`` or ``package.module:NAME``.
        what: how messages call it (``model``, ``features``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a SPEC, the file or module does not import, or it has no ``NAME`` (the message lists the
            names it has).
    """
    where, name = split_spec(spec, what)
    module = _import_file(Path(where), spec, what) if is_file_location(where) else _import_module(where, spec, what)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = sorted(k for k, v in vars(module).items() if not k.startswith("_") and callable(v))
            defined = ", ".join(names) or "no public callables"
            raise ValueError(f"{what} SPEC {spec!r}: {where!r} has no {name!r}; it defines {defined}.")
        obj = getattr(obj, part)
    return obj


def build_module(obj: Any, spec: str, what: str = "model") -> nn.Module:
    """The ``nn.Module`` of a SPEC's object: the module itself, a module class built with no arguments, or what a
    callable returns.

    Raises:
        ValueError: the call fails, or what it gives is not an ``nn.Module``.

    Example:
        >>> type(build_module(nn.Identity, "torch.nn:Identity")).__name__
        'Identity'
    """
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ValueError(f"{what} SPEC {spec!r} names a {type(obj).__name__}, not an nn.Module or a callable "
                         "returning one.")
    try:
        module = obj()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise ValueError(f"{what} SPEC {spec!r}: calling it failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what} SPEC {spec!r} returned a {type(module).__name__}, not an nn.Module; NAME must be an "
                         "nn.Module, its class, or a callable returning one.")
    return module


def spec_of_class(cls: type) -> str:
    """The SPEC that imports ``cls`` again: ``package.module:Class``, or ``/abs/file.py:Class`` for a class defined in
    a script or in a file imported by SPEC.

    Example:
        >>> spec_of_class(nn.Linear)
        'torch.nn.modules.linear:Linear'
    """
    mod = sys.modules.get(cls.__module__)
    file = getattr(mod, "__file__", None)
    if file and (cls.__module__ == "__main__" or cls.__module__.startswith(FILE_MODULE_PREFIX)):
        return f"{Path(file).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"
