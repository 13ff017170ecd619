"""The house holds its shape: no import circle, and every import runs down the layers.

Every `import` and `from ... import` in onnxbn (module level and inside functions alike: an import
deferred into a function is still a dependency) is resolved to the onnxbn module it names. Rules:

1. No cycle among modules (Tarjan's strongly connected components on that graph).
2. Each module belongs to the first layer in LAYERS whose prefix it starts with, and imports only
   modules of its own layer or of the layers listed before it.
3. Every module has a layer: a new file must be placed here, not slip in unchecked.

The top-level package `onnxbn` (the lazy public API; matched exactly, not as a prefix) belongs to the
front layer: code below it imports the module it needs, never the package's re-exports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "onnxbn"

# (layer, module prefixes); a module may import its own layer and the layers above it in this list.
LAYERS = [
    ("foundation", ["onnxbn.errors"]),
    ("io", ["onnxbn.io"]),
    ("graph", ["onnxbn.graph", "onnxbn.points"]),
    ("data", ["onnxbn.data", "onnxbn.distributed", "onnxbn.checkpoints"]),
    ("runtimes", ["onnxbn.runtimes", "onnxbn.feeding"]),
    ("transforms", ["onnxbn.stats", "onnxbn.ranges", "onnxbn.calibration_tables", "onnxbn.insert", "onnxbn.fold",
                    "onnxbn.export", "onnxbn.torch_import", "onnxbn.models"]),
    ("training", ["onnxbn.training", "onnxbn.recalibration"]),
    ("check", ["onnxbn.tolerances", "onnxbn.check.activations", "onnxbn.check.metrics", "onnxbn.check.report",
               "onnxbn.check.inputs", "onnxbn.check.golden", "onnxbn.check.layerwise"]),
    ("compare", ["onnxbn.check.comparison", "onnxbn.check.reduction", "onnxbn.check"]),
    ("workflows", ["onnxbn.quantization", "onnxbn.deploy"]),
    ("demo", ["onnxbn.demo", "onnxbn.demo_data"]),
    ("front", ["onnxbn.cli", "onnxbn.testing", "onnxbn.__main__", "onnxbn"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The onnxbn module `name` refers to (a module, or a name inside one), None outside onnxbn."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved and resolved != module and not module.startswith(resolved + "."):
                found.add(resolved)  # a package's own __init__ above a module is not a dependency
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "onnxbn" and module.startswith(p + ".")) for p in prefixes):
            return i
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scanner_sees_imports_inside_functions():
    """A dependency deferred into a function still counts (cli imports the commands' modules lazily)."""
    assert "onnxbn.deploy" in GRAPH["onnxbn.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert _cycles(GRAPH) == []


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module):
    mine = _layer(module)
    upward = sorted(m for m in GRAPH[module] if (_layer(m) or 0) > (mine or 0))
    assert upward == [], f"{module} ({LAYERS[mine or 0][0]}) imports from a higher layer: {upward}"
