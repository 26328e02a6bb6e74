"""The package's import structure: no import circles, and the plan below the card and the exports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "come"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for file in ROOT.rglob("*.py"):
        parts = list(file.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if package else parts)] = (file, package)
    return mods


def import_graph() -> dict[str, set[str]]:
    """{module: come modules it imports}, lazy (in-function) imports included. The package itself
    (come/__init__: the version, and `compress` and `LoadedModel` imported on use) is left out."""
    mods, graph = _modules(), {}
    for name, (file, package) in mods.items():
        here = name.split(".") if package else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package `level - 1` above this module's
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in mods and d not in (name, "come")}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_circles():
    graph = import_graph()
    circles = sorted(m for m in graph if m in reachable(graph, m))
    assert circles == []


@pytest.mark.parametrize("low,high", [("artifacts.card", "artifacts.export"), ("artifacts.export", "artifacts.card"),
                                      ("artifacts.plan", "artifacts.card"), ("artifacts.plan", "artifacts.export"),
                                      ("artifacts.plan", "artifacts.publish"), ("artifacts.plan", "engine.pipeline")])
def test_module_does_not_depend_on(low, high):
    """The card and the exports depend on the plan, not on each other."""
    graph = import_graph()
    assert f"come.{low}" in graph and f"come.{high}" in graph  # the names are still those of modules
    assert f"come.{high}" not in reachable(graph, f"come.{low}")


def test_the_card_and_the_exports_use_the_plan_module():
    graph = import_graph()
    plan = "come.artifacts.plan"
    assert plan in graph["come.artifacts.card"] and plan in graph["come.artifacts.export"]
