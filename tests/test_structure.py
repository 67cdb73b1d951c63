"""The code's shape: the dependency direction between layers and stages, and function size.

``sw → sim → hw`` and, inside ``sw``, ``runtime → compiler → quant → model``
(``docs/architecture.md``): a module may import only its own layer or stage and the ones
below. And no function in ``hw/`` is longer than a reader can hold in their head.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where each top-level folder is importable from.
PACKAGES = {"hw": "m3vit.hw", "sim": "m3vit.sim", "sw": "m3vit.sw"}
#: Lower rank = lower floor; a module may import its own rank or below, never above.
RANKS = {
    "m3vit.hw": 0,
    "m3vit.sim": 1,
    "m3vit.sw.errors": 2,
    "m3vit.sw.model": 3,
    "m3vit.sw.quant": 4,
    "m3vit.sw.compiler": 5,
    "m3vit.sw.runtime": 6,
    "m3vit.sw": 7,  # the faces: cli, demo, bench
}
#: Longest function allowed in hw/ (lines, decorators excluded).
HW_FUNCTION_LINES = 150


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield path, ".".join((package, *parts)), path.name == "__init__.py"


def _rank(module: str) -> int | None:
    best = None
    for prefix, rank in RANKS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    return None if best is None else best[1]


def _imports(path: Path, module: str, is_package: bool):
    """Absolute names of every m3vit module ``path`` imports (relative ones resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        yield from (name for name in names if name.startswith("m3vit."))


def test_every_import_points_down():
    upward = []
    for path, module, is_package in _modules():
        own = _rank(module)
        for name in _imports(path, module, is_package):
            if _rank(name) is not None and own is not None and _rank(name) > own:
                upward.append(f"{path.relative_to(REPO)} imports {name}")
    assert not upward, "imports against the layer order:\n  " + "\n  ".join(upward)


def test_the_layer_check_can_fail(tmp_path):
    """The rank table catches the imports it is meant to catch."""
    assert _rank("m3vit.hw.top") < _rank("m3vit.sim.soc") < _rank("m3vit.sw.model.m3vit")
    assert _rank("m3vit.sw.quant.golden") < _rank("m3vit.sw.compiler.lower") \
        < _rank("m3vit.sw.runtime.driver") < _rank("m3vit.sw.cli")
    bad = tmp_path / "x.py"
    bad.write_text("from ..runtime import driver\n")
    assert list(_imports(bad, "m3vit.sw.quant.x", False)) == ["m3vit.sw.runtime"]


@pytest.mark.parametrize("folder", ["hw"])
def test_no_function_is_longer_than_a_reader_can_hold(folder):
    long = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > HW_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert not long, (f"functions over {HW_FUNCTION_LINES} lines (split them along their "
                      "seams):\n  " + "\n  ".join(long))
