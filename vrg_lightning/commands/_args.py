"""Argument helpers shared by the commands: comma lists, and the trajectory-grid flags derived from
:class:`~vrg_lightning.optimize.TrajectoryGrid` (names, choices and defaults come from its fields)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..optimize.settings import TrajectoryGrid, grid_fields

__all__ = ["CommaList", "add_list_argument", "add_grid_arguments", "grid_from_args", "parse_list"]


def parse_list(values: str | Iterable[str], cast: Callable[[str], Any], flag: str,
               choices: Sequence[Any] | None = None) -> tuple[Any, ...]:
    """Items of a comma list (``"a,b"``), of several words (``["a", "b"]``) or of both (``["a,b", "c"]``).

    Example:
        >>> parse_list(["10,20", "50"], int, "--steps")
        (10, 20, 50)
    """
    words = [values] if isinstance(values, str) else list(values)
    items = [v.strip() for w in words for v in str(w).split(",") if v.strip()]
    try:
        out = tuple(cast(v) for v in items)
    except ValueError as exc:
        raise ValueError(f"{flag} must be a comma list of {getattr(cast, '__name__', 'values')}; got "
                         f"{','.join(words)!r}.") from exc
    bad = [v for v in out if choices is not None and v not in choices]
    if bad:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(map(str, choices))}.")
    return out


class CommaList(argparse.Action):
    """``--flag a,b`` or ``--flag a b`` (the older space-separated form) into a tuple; errors as argparse errors."""

    def __init__(self, option_strings: Sequence[str], dest: str, cast: Callable[[str], Any] = str,
                 choices_: Sequence[Any] | None = None, **kwargs: Any) -> None:
        self.cast, self.allowed = cast, choices_
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, parse_list(values or [], self.cast, option_string or self.dest,
                                                      self.allowed))
        except ValueError as exc:
            parser.error(str(exc))


def add_list_argument(parser: Any, flag: str, cast: Callable[[str], Any], default: Any, help: str,
                      choices: Sequence[Any] | None = None, allow_empty: bool = False) -> None:
    """A list flag that takes a comma list (or several words); ``help`` gets the default and the choices."""
    shown = "none" if default is None else ",".join(map(str, default)) or "empty"
    text = f"{help}, comma list (default: {shown})"
    if choices:
        text += f"; from {','.join(map(str, choices))}"
    parser.add_argument(flag, action=CommaList, cast=cast, choices_=choices, nargs="*" if allow_empty else "+",
                        default=default, metavar="A,B", help=text)


def _item_type(f: dataclasses.Field) -> Callable[[str], Any]:
    hint = typing.get_type_hints(TrajectoryGrid)[f.name]
    args = typing.get_args(hint)
    return args[0] if args else hint


def add_grid_arguments(parser: Any, defaults: TrajectoryGrid | None = None, *, skip: Iterable[str] = (),
                       none_defaults: Iterable[str] = ()) -> None:
    """One flag per :class:`TrajectoryGrid` field (``--reg-lambda`` for ``reg_lambda``), with its choices and default.

    ``none_defaults``: fields whose default is ``None`` (the command fills them in, e.g. from a checkpoint).
    """
    defaults = defaults or TrajectoryGrid()
    skip, none_defaults = set(skip), set(none_defaults)
    for f in grid_fields():
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), None if f.name in none_defaults else getattr(defaults, f.name)
        help_, choices = f.metadata.get("help", f.name), f.metadata.get("choices")
        if isinstance(getattr(defaults, f.name), tuple):
            add_list_argument(parser, flag, _item_type(f), default, help_, choices, allow_empty=f.name == "steps")
        elif isinstance(getattr(defaults, f.name), bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_} (default: {default})")
        else:
            cast = _item_type(f) if _item_type(f) in (int, float) else str
            parser.add_argument(flag, type=cast, choices=choices, default=default,
                                help=f"{help_} (default: {default})")


def grid_from_args(args: argparse.Namespace, base: TrajectoryGrid | None = None) -> TrajectoryGrid:
    """The :class:`TrajectoryGrid` of parsed :func:`add_grid_arguments` flags (``None`` values keep ``base``'s)."""
    base = base or TrajectoryGrid()
    given = {f.name: getattr(args, f.name) for f in grid_fields() if getattr(args, f.name, None) is not None}
    return base.replace(**given)
