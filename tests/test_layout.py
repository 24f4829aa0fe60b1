"""The package's structure: no import cycles between its modules.

Imports inside functions count too: a cycle there still means two modules that each need
the other, which is what the layout is meant to rule out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit_ftt

PACKAGE = Path(mergekit_ftt.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts).removesuffix(".__init__")] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            # `from package import submodule` depends on the submodule, not on the package.
            found.update(submodules if len(submodules) == len(node.names) else {base, *submodules})
    return {target for target in found if target in modules and target != name}


def test_no_import_cycles():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def reaches_into_mergekit(path: Path) -> list[str]:
    """Private mergekit names this module imports or reads, and mergekit attributes it sets."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mergekit":
            bound.update(alias.asname or alias.name for alias in node.names)
            found += [f"imports {node.module}.{a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Import):
            bound.update(
                alias.asname or alias.name.split(".")[0]
                for alias in node.names
                if alias.name.split(".")[0] == "mergekit"
            )
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id not in bound:
                continue
            if isinstance(node.ctx, ast.Store):
                found.append(f"sets {node.value.id}.{node.attr}")
            elif node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"reads {node.value.id}.{node.attr}")
    return found


def test_only_the_adapter_reaches_into_mergekit():
    adapter = PACKAGE / "mergekit_adapter.py"
    found = {
        str(path.relative_to(PACKAGE)): reaches
        for path in PACKAGE.rglob("*.py")
        if path != adapter and (reaches := reaches_into_mergekit(path))
    }
    assert found == {}
    assert reaches_into_mergekit(adapter)  # the check sees what the adapter does
