"""The tree keeps its architecture: read from the code's own imports (every ``import`` statement,
lazy ones inside functions included), so a shortcut anywhere shows up here.

- no import cycles between Cascade's modules;
- the wire contract (``tasks.contract``) imports nothing else of Cascade;
- the producer side (``tasks.producer``: client and CLI) imports only the contract;
- providers never reach up into tasks or worker code, settings only into settings and the contract;
- no package floor holds more than a dozen modules, and no module grows past the size limit.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("settings", "providers", "tasks", "worker")
MAX_MODULES_PER_FLOOR = 12
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The Cascade module an imported name lives in (``a.b.c`` -> ``a.b`` if ``c`` is an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            resolved = _resolve(name)
            if resolved is not None and resolved != module:
                targets.add(resolved)
    return targets


GRAPH = {module: _imports(module) for module in MODULES}


def _edges() -> Iterator[tuple[str, str]]:
    for source, targets in GRAPH.items():
        for target in targets:
            yield source, target


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _package_inits(module: str) -> set[str]:
    """A module's parent packages (importing ``a.b.c`` runs ``a`` and ``a.b`` too)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_the_graph_sees_the_tree() -> None:
    assert "tasks.contract.schemas" in MODULES
    assert "tasks.contract.schemas" in GRAPH["tasks.chat"]


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("tasks.contract", ("tasks.contract",)),
        ("tasks.producer", ("tasks.contract", "tasks.producer")),
        ("settings", ("settings", "tasks.contract")),
        ("providers", ("providers", "settings", "tasks.contract")),
    ],
)
def test_layers_import_only_below(package: str, allowed: tuple[str, ...]) -> None:
    bad = sorted(
        (source, target)
        for source, target in _edges()
        if _within(source, package)
        and not any(_within(target, ok) for ok in allowed)
        and target not in _package_inits(source) | {"tasks"}
    )
    assert bad == []


def test_worker_state_and_telemetry_never_import_the_task() -> None:
    upper = ("tasks.chat", "tasks.runner", "tasks.intake", "tasks.recovery", "worker.signals", "worker.celery_app")
    bad = sorted(
        (source, target)
        for source, target in _edges()
        if (_within(source, "worker.state") or _within(source, "worker.telemetry")) and target in upper
    )
    assert bad == []


def test_no_floor_holds_more_than_a_dozen_modules() -> None:
    floors: dict[Path, int] = {}
    for path in MODULES.values():
        if path.name != "__init__.py":
            floors[path.parent] = floors.get(path.parent, 0) + 1
    crowded = {str(floor.relative_to(REPO)): count for floor, count in floors.items() if count > MAX_MODULES_PER_FLOOR}
    assert crowded == {}


def test_no_module_grows_past_the_limit() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
