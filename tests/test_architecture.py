"""The package's layering (docs/architecture.rst), checked from the installed source.

Every import of a ``celery_flows`` module by another counts: at module level, inside
functions, under ``TYPE_CHECKING``. The graph must have no cycle, every import must go
down the layers (or stay inside one subpackage), nothing below the facade may import
it, and no module may pass ~400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import celery_flows

PACKAGE = Path(celery_flows.__file__).resolve().parent
MAX_LINES = 400

# lower number = lower layer; modules of the same rank in different places may not
# import each other
LAYERS = {
    "celery_flows._version": 0, "celery_flows.errors": 0, "celery_flows.faults": 0,
    "celery_flows.config": 1,
    "celery_flows.define": 2,
    "celery_flows.registry": 3,
    "celery_flows.engine": 4,
    "celery_flows.worker": 5, "celery_flows.observe": 5,
    "celery_flows.core": 6,
    # above the facade: they find it on the app (app.flows), as cli.py does
    "celery_flows.metrics": 7,
    "celery_flows.dashboard": 8,
    "celery_flows.cli": 9, "celery_flows": 9,
    "celery_flows.testing": 10,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The celery_flows modules ``name`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` names a submodule when x is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("celery_flows") and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    """(rank, the layer's name) of a module: its longest entry in LAYERS."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix], prefix
    raise AssertionError(f"{module} is in no layer of LAYERS; add it there and to "
                         "docs/architecture.rst")


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_import_goes_down_the_layers() -> None:
    wrong = []
    for module, targets in sorted(_graph().items()):
        rank, layer = _layer(module)
        for target in sorted(targets):
            target_rank, target_layer = _layer(target)
            if target_layer == layer:
                continue  # inside one subpackage
            if target_rank >= rank:
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_nothing_below_the_facade_imports_it() -> None:
    importers = {m for m, targets in _graph().items() if "celery_flows.core" in targets}
    assert importers <= {"celery_flows", "celery_flows.cli", "celery_flows.metrics",
                         "celery_flows.dashboard", "celery_flows.dashboard.app"}


def test_no_module_is_longer_than_400_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in sorted(PACKAGE.rglob("*")) if p.suffix in (".py", ".lua")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_sees_imports_in_functions_and_type_checking_blocks() -> None:
    """The graph above is only evidence if it sees every kind of import."""
    graph = _graph()
    # cli imports the facade under TYPE_CHECKING and inside a function
    assert "celery_flows.core" in graph["celery_flows.cli"]
    # a function-level import: the cluster client is imported lazily
    assert "celery_flows.registry.cluster" in graph["celery_flows.registry.connection"]
    assert "celery_flows.define.flow" in graph["celery_flows"]
