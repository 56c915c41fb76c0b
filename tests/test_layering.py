"""The folders are the architecture: this test keeps the import graph saying so.

Every ``import`` of every module under ``hub/`` and ``device_agent/`` counts, at module level
or inside a function (a lazy import is still a dependency), so a shortcut cannot hide in a
function body. Three rules:

* each layer imports only the layers below it (the table is :data:`MAY_IMPORT`);
* the device agent imports nothing of the hub but ``hub.protocol``;
* no module graph cycle, not even inside a layer.

Like import-linter's layered contracts, but with nothing to install.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: layer -> the layers it may import (besides itself). Read top to bottom:
#: cli -> web -> app -> {mqtt, stores} -> core -> protocol (web: the HTTP side, which reads
#: the service; app knows nothing of it).
MAY_IMPORT: dict[str, set[str]] = {
    "hub": {"app", "core"},  # hub/__init__.py: the public names, imported lazily
    "cli": {"web", "app", "mqtt", "broker", "auth", "stores", "core", "protocol", "process"},
    "web": {"app", "mqtt", "core", "protocol"},
    "app": {"mqtt", "stores", "core", "protocol", "process"},
    "mqtt": {"broker", "auth", "core", "protocol"},
    "broker": {"auth", "protocol"},
    "auth": {"protocol"},
    "stores": {"core", "protocol", "process"},
    "core": {"protocol"},
    "process": set(),
    "protocol": set(),
}

#: what the sans-I/O core may take from the standard library: no sockets, files, tasks,
#: threads or garbage-collector switches (process concerns live in hub.process and the app)
CORE_FORBIDDEN = {"asyncio", "socket", "os", "gc", "threading", "subprocess", "selectors", "ssl"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


ALL = {**_modules("hub"), **_modules("device_agent")}


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports, resolved to the most specific module that exists."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in ALL else target


def _graph() -> dict[str, set[str]]:
    return {
        name: {m for m in _imports(name, path) if m in ALL and m != name}
        for name, path in ALL.items()
    }


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_hub_module_is_in_a_known_layer() -> None:
    unknown = sorted(m for m in ALL if m.startswith("hub") and _layer(m) not in MAY_IMPORT)
    assert not unknown, f"modules outside the layer table (add a folder to MAY_IMPORT): {unknown}"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, targets in _graph().items():
        if not module.startswith("hub"):
            continue
        layer = _layer(module)
        for target in targets:
            if target.startswith("hub") and _layer(target) != layer and (
                    _layer(target) not in MAY_IMPORT[layer]):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_protocol_imports_nothing_else_from_the_hub() -> None:
    wrong = [f"{m} -> {t}" for m, ts in _graph().items() if _layer(m) == "protocol"
             for t in ts if t.startswith("hub") and _layer(t) != "protocol"]
    assert not wrong, wrong


def test_the_device_agent_imports_only_the_protocol_from_the_hub() -> None:
    wrong = sorted(f"{m} -> {t}" for m, ts in _graph().items() if m.startswith("device_agent")
                   for t in ts if t.startswith("hub") and not t.startswith("hub.protocol"))
    assert not wrong, "the agent must install without the hub's stack:\n" + "\n".join(wrong)


def test_the_core_does_no_io() -> None:
    wrong = []
    for name, path in ALL.items():
        if _layer(name) != "core" or not name.startswith("hub"):
            continue
        for target in _imports(name, path):
            if target.split(".")[0] in CORE_FORBIDDEN:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_there_is_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of design: the edge
    # from a submodule to its own package is the only one left out
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycles(graph) == []


@pytest.mark.parametrize("shape", [
    {"a": {"b"}, "b": {"a"}},
    {"a": {"b"}, "b": {"c"}, "c": {"a"}},
])
def test_the_cycle_finder_finds_cycles(shape: dict[str, set[str]]) -> None:
    assert _cycles(shape) == [sorted(shape)]
