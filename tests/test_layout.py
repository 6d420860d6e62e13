"""The folders are the architecture: every import (top-level, inside functions, under
``TYPE_CHECKING``) goes down the layers declared in ``docs/layers.txt``, and no files import each
other in a circle.

A failure names the file, the line and the import, and the rule it breaks: move the code to the
layer it belongs to, or change the declaration on purpose (docs/architecture.md explains it).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DECLARATION = ROOT / "docs" / "layers.txt"


def read_layers() -> List[Set[str]]:
    """The declared layers, highest first: each non-comment line lists the top-level names in one layer."""
    layers = []
    for line in DECLARATION.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            layers.append(set(line.split()))
    return layers


def project_files() -> List[Path]:
    """Every Python file of the project except the tests (which may import anything)."""
    return sorted(path for path in ROOT.rglob("*.py")
                  if path.relative_to(ROOT).parts[0] not in {"tests", ".git"} and ".whl" not in path.parts
                  and "site-packages" not in path.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (the module ``module``), relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                # ``from . import x``: x may be a module of the package
                found += [(node.lineno, f"{name}.{alias.name}" if not node.module else name) for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def project_module(name: str, known: Set[str]) -> Optional[str]:
    """The project module ``name`` refers to (its longest known prefix), or None for a library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def layer_of(module: str, layers: List[Set[str]]) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(layers):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer of {DECLARATION.relative_to(ROOT)}: add its top-level name "
                         "to the layer it belongs to")


def import_graph() -> Dict[str, List[Tuple[int, str]]]:
    files = project_files()
    known = {module_name(path) for path in files}
    graph = {}
    for path in files:
        edges = []
        for line, name in imports_of(path, module_name(path)):
            target = project_module(name, known)
            if target is not None and target != module_name(path):
                edges.append((line, target))
        graph[module_name(path)] = edges
    return graph


def source_file(module: str) -> str:
    path = ROOT / Path(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


def test_every_import_goes_down_the_layers() -> None:
    layers = read_layers()
    graph = import_graph()
    wrong = []
    for module, edges in graph.items():
        here = layer_of(module, layers)
        for line, target in edges:
            there = layer_of(target, layers)
            same_package = module.split(".")[0] == target.split(".")[0]
            if there < here or (there == here and not same_package):
                wrong.append(f"{source_file(module)}:{line} imports {target}: "
                             f"'{module.split('.')[0]}' may import only layers below it in docs/layers.txt "
                             f"('{target.split('.')[0]}' is {'above it' if there < here else 'beside it'})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_circle_of_files() -> None:
    graph = {module: sorted({target for _, target in edges}) for module, edges in import_graph().items()}
    circles = []
    state: Dict[str, int] = {}  # 1 on the path, 2 done
    path: List[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph.get(module, []):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "files that import each other in a circle:\n" + "\n".join(circles)


def test_declaration_names_every_top_level_package() -> None:
    layers = read_layers()
    declared = set().union(*layers)
    tops = {module_name(path).split(".")[0] for path in project_files()}
    assert tops <= declared, f"not in {DECLARATION.relative_to(ROOT)}: {sorted(tops - declared)}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The parser sees function-local, TYPE_CHECKING and relative imports."""
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainer\n"
                      "def f():\n    from training.engine import evaluate\n    from .export import main\n")
    names = [name for _, name in imports_of(source, "deploy.mod")]
    assert names == ["typing", "trainer", "training.engine", "deploy.export"]


@pytest.mark.parametrize("entry", ["main.py", "predict.py", "config.py", "launch.sh"])
def test_entry_points_stay_at_the_top(entry: str) -> None:
    assert (ROOT / entry).is_file()
