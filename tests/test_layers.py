"""The package layout is the pipeline: every import points down the layers (docs/ARCHITECTURE.md).

Reads the import statements of every module (function-local ones included) and fails on any that
goes up a layer, and on any import of the test suite from the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cds_service

PACKAGE = Path(cds_service.__file__).parent

#: Rank of each top-level name under cds_service: a module may import only the same or lower ranks.
LAYERS: dict[str, int] = {
    "base": 0,
    "knowledge": 1,
    "patient_data": 2,
    "clinical": 3,
    "cards": 4,
    "protocol": 5,
    "screening": 5,
    "service": 5,
    "store": 5,
    "app": 5,
    "worksheet": 5,
    "tools": 6,
    "cli": 7,
    "serving": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from . import x` imports the module x; `from .x import name` imports from module x
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found += [(node.lineno, name) for name in names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cds_service" or len(parts) < 2:
        return None
    return parts[1]


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(_module_name(path))
        assert layer is None or layer in LAYERS, f"{path.relative_to(PACKAGE)}: add it to a layer"


def test_imports_only_point_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(_module_name(path))
        if own is None:
            continue
        for line, target in _imports(path):
            other = _layer(target)
            if other is not None and LAYERS[other] > LAYERS[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_package_never_imports_the_test_suite() -> None:
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in PACKAGE.rglob("*.py")
        for line, target in _imports(path)
        if target == "tests" or target.startswith("tests.")
    ]
    assert not offending, offending


def test_the_layer_check_sees_an_upward_import() -> None:
    """The checker itself: relative imports from clinical/ resolve to the modules they name."""
    source = "from ..cards.render import CardRenderer\nfrom . import derived\nfrom .. import tools\n"
    targets = [target for _, target in _imports_in(source, "cds_service.clinical")]
    assert targets == ["cds_service.cards.render", "cds_service.clinical.derived", "cds_service.tools"]
    assert [LAYERS[_layer(t) or ""] > LAYERS["clinical"] for t in targets] == [True, False, True]


def test_architecture_doc_lists_every_module_once() -> None:
    """docs/ARCHITECTURE.md's module table and the folders read the same."""
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = doc.split("<!-- modules:begin", 1)[1].split("<!-- modules:end -->", 1)[0]
    listed = [line.split("`")[1] for line in table.splitlines() if line.startswith("| ") and "`" in line]
    modules = sorted(
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
    )
    assert sorted(listed) == modules
    for row in table.splitlines():
        if row.startswith("| ") and "`" in row:
            layer, module = row.split("|")[1].strip(), row.split("`")[1]
            folder = module.split("/")[0] if "/" in module else module.removesuffix(".py")
            shown = {"cli": "entry", "serving": "entry", "tools": "tools"}.get(
                folder, folder if LAYERS[folder] < 5 else "top"
            )
            assert layer == shown, row
