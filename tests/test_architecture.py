"""The rooms of pagctl and the arrows between them (docs/architecture.md), checked on the
source: imports point down the layers only, no module imports another's ``_private`` names,
and no ``import X as X`` re-export remains."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pagctl"

LAYERS: list[list[str]] = [  # lowest first; a room may import from its own layer and below
    ["__init__", "errors"],
    ["spec", "protocols", "records", "stats", "progress", "distributed", "trust"],
    ["registry", "data", "robustbench_zoo", "models", "architectures", "gradients", "losses"],
    ["checkpoint", "figures", "build", "grid", "provenance", "evaluation"],
    ["banks", "score"],
    ["attacks", "target_gradients", "testing"],
    ["align", "robustness", "objectives"],
    ["train", "compare", "importing"],
    ["cli", "api", "toy_experiment", "study", "_docgen", "__main__"],
]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported pagctl module, names) of every import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pagctl":
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names
                      if a.name.split(".")[0] == "pagctl"]
    return found


def _target_room(module: str, names: list[str]) -> list[str]:
    parts = module.split(".")
    if len(parts) > 1:
        return [parts[1]]
    return [name if name in LEVEL else "__init__" for name in names]  # from pagctl import x


def test_every_room_has_a_layer() -> None:
    rooms = {_room(p) for p in _modules()}
    assert rooms <= set(LEVEL), f"rooms without a layer: {sorted(rooms - set(LEVEL))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    room = _room(path)
    for line, module, names in _imports(path):
        for target in _target_room(module, names):
            assert LEVEL[target] <= LEVEL[room], (
                f"{path.relative_to(PACKAGE)}:{line} imports {module} ({target}, layer "
                f"{LEVEL[target]}) from {room} (layer {LEVEL[room]}); see docs/architecture.md")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_or_reexports_across_modules(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = _module_name(path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("pagctl"):
            continue
        for alias in node.names:
            private = alias.name.startswith("_") and not alias.name.startswith("__")
            assert not (private and node.module != own), (
                f"{path.relative_to(PACKAGE)}:{node.lineno} imports {node.module}.{alias.name}: "
                "make it public or move it to the room that uses it")
            assert alias.asname != alias.name, (
                f"{path.relative_to(PACKAGE)}:{node.lineno}: re-export façade "
                f"'import {alias.name} as {alias.name}'; import it from its home instead")
