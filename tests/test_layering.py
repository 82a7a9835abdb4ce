"""The layering rule of docs/architecture.md, checked on the source: each layer imports only the
layers above it, and no two modules import each other, directly or through others.

Imports are read with ``ast`` wherever they run, inside functions too (a deferred import is still
a dependency), except under ``if TYPE_CHECKING:``, which only serves annotations.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import clinadapt

PACKAGE = Path(clinadapt.__file__).parent

# Top to bottom; the names are the top-level modules and subpackages of clinadapt.
LAYERS = [
    {"errors", "registry", "config", "paths", "_optional"},
    {"data"},
    {"eval"},
    {"tasks"},
    {"backbones"},
    {"text"},
    {"engine"},
    {"adapt"},
    {"tta"},
    {"ssl"},
    {"runner"},
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _graph() -> dict[str, set[str]]:
    """Module -> the clinadapt modules it imports (``from pkg import name`` counts as ``pkg.name``
    when that is a module, else as ``pkg``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base not in modules:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in modules else base)
        deps.discard(name)
        graph[name] = deps
    return graph


def _layer(module: str) -> int | None:
    """Index in LAYERS of a module's top-level name; None for the package itself."""
    top = module.split(".")[1] if "." in module else None
    if top is None:
        return None
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"clinadapt.{top} belongs to no layer: add it to LAYERS and the docs")


def test_graph_sees_imports_inside_functions_but_not_type_checking_blocks():
    graph = _graph()
    assert "clinadapt.runner.experiment" in graph["clinadapt.cli"]  # imported inside a function
    assert "clinadapt.engine.train_config" in graph["clinadapt.engine.loop"]
    assert "clinadapt.adapt.finetune" not in graph["clinadapt.engine.train"]  # annotations only


def test_each_layer_imports_only_the_layers_above():
    upward = [
        f"{module} imports {dep}"
        for module, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if None not in (_layer(module), _layer(dep)) and _layer(dep) > _layer(module)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(_graph()).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
