"""Run the examples in the public docstrings, so they cannot drift from the code."""

import doctest
import importlib

import pytest

MODULES = ["schedule", "trajectories", "profile", "variance", "stats", "solvers", "optimize"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    try:
        module = importlib.import_module(f"vrg_lightning.{name}")
    except ModuleNotFoundError:
        pytest.skip(f"vrg_lightning.{name} not present")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in vrg_lightning.{name}"
