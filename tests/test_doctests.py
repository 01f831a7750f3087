"""Run the examples in every module's docstrings, so they cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vrg_lightning

MODULES = sorted(m.name for m in pkgutil.walk_packages(vrg_lightning.__path__, "vrg_lightning."))


def test_every_module_is_collected() -> None:
    assert {"vrg_lightning.schedule", "vrg_lightning.optimize.settings", "vrg_lightning.callbacks"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
