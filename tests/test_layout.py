"""The layout stays readable: every module <= 500 lines, every top-level class or function <= 300 lines, the
callback alone in callbacks.py (<= 300 lines), and commands/ holding argparse and calls only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vrg_lightning"
MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_definition_sizes(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 500, f"{path.name} has {len(text.splitlines())} lines (limit 500)"
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            size = node.end_lineno - node.lineno + 1
            assert size <= 300, f"{path.name}:{node.lineno} {node.name} has {size} lines (limit 300)"


def test_callbacks_module_holds_the_callback_only() -> None:
    text = (PACKAGE / "callbacks.py").read_text()
    tree = ast.parse(text)
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["VRGProfiler"] and len(text.splitlines()) <= 300
    hooks = {"setup", "on_train_batch_end", "on_save_checkpoint", "state_dict", "load_state_dict",
             "on_train_epoch_end", "on_train_start", "on_train_end"}
    (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef))
    overridden = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)
                  and any(getattr(d, "id", None) == "override" for d in f.decorator_list)}
    assert hooks <= overridden, f"hooks without @override: {sorted(hooks - overridden)}"


def test_commands_define_no_classes() -> None:
    for path in (PACKAGE / "commands").glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef) and not path.name.startswith("_")], path


CORE = ("schedule", "paths", "trajectories", "profile", "interpolants", "solvers", "variance", "io", "ays")


@pytest.mark.parametrize("name", CORE)
def test_core_imports_only_the_core(name: str) -> None:
    """The flat core depends on torch, numpy and scipy and on itself, never on a package, Lightning or diffusers."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert (node.module or "").split(".")[0] in CORE, f"{name}.py imports .{node.module}"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(m.split(".")[0] in ("lightning", "diffusers", "torchmetrics") for m in mods), name
