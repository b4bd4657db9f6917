"""The package's architecture, read from its own imports: no circle, and no import upward.

Every import in the package counts, those inside functions too (a function-level import hides a
circle from Python, not from the next reader). Each top-level package or module of bigtransfer
sits on one layer of LAYERS; a module may import its own package and the layers below its own,
nothing above and nothing beside it. docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bigtransfer

SRC = Path(bigtransfer.__file__).resolve().parent

# Lowest first. A unit is a top-level module (errors) or a package (models); the package's face
# (bigtransfer/__init__.py, the public API) and `python -m bigtransfer` sit on top.
LAYERS: list[set[str]] = [
    {"errors", "safe_text", "machine", "version"},  # no bigtransfer imports
    {"atomic"},  # the one way files reach the disk
    {"rundir", "metrics"},  # output folders we own; classification meters
    {"models"},  # ResNet-v2 GN+WS, weights files, released models and their downloads
    {"data"},  # sources, transforms, sampling, shards
    {"train"},  # the one loop, a run's lifecycle, checkpoints
    {"report"},  # results files and HTML reports, from results as data (no protocol imported)
    {"recipes"},  # HyperRule and upstream plans; fine-tuning, pre-training, distillation
    {"inference"},  # the one forward path: Predictor and its backends
    {"evaluate", "sharing", "serving", "dedup", "detection"},  # protocols; export/push; serve; Supp. C; 3.7
    {"demo"},  # the offline story, built from everything below
    {"cli"},  # argument parsing and printing
    {"", "__main__"},  # the public face (bigtransfer/__init__.py) and `python -m bigtransfer`
]


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every module below `src` (named `package`)."""
    files = {_module_name(p, src, package): p for p in src.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _module_name(path: Path, src: Path, package: str) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
            origin = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{origin}.{alias.name}" for alias in node.names]  # a module, or a name in `origin`
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _unit(module: str) -> str:
    """The top-level module or package a module belongs to ('' for the package's face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def wrong_way(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Imports of a unit on the same layer or above (the public face may import anything)."""
    layer = {unit: i for i, units in enumerate(layers) for unit in units}
    return sorted(f"{m} -> {t}" for m, imports in graph.items() for t in imports
                  if _unit(t) != _unit(m) and _unit(m) != "" and layer[_unit(t)] >= layer[_unit(m)])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other in a loop (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    units = {_unit(m) for m in import_graph(SRC, "bigtransfer")}
    assert units - set().union(*LAYERS) == set(), "give each new top-level module or package a layer in LAYERS"


def test_no_import_runs_upward_or_sideways():
    assert wrong_way(import_graph(SRC, "bigtransfer"), LAYERS) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph(SRC, "bigtransfer")) == []


def test_the_checks_find_a_hidden_circle_and_an_upward_import(tmp_path):
    """The readers above on a tiny package of their own find what they must find."""
    root = tmp_path / "pkg"
    (root / "low").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "low" / "__init__.py").write_text("")
    (root / "low" / "a.py").write_text("def f():\n    from . import b  # hidden inside a function\n")
    (root / "low" / "b.py").write_text("from .a import f\n\n\ndef g():\n    from ..high import h\n")
    (root / "high.py").write_text("from .low import a\n")
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": set(), "pkg.low": set(), "pkg.low.a": {"pkg.low.b"},
                     "pkg.low.b": {"pkg.low.a", "pkg.high"}, "pkg.high": {"pkg.low.a"}}
    assert circles(graph) == [["pkg.high", "pkg.low.a", "pkg.low.b"]]
    assert wrong_way(graph, [{"low"}, {"high"}, {""}]) == ["pkg.low.b -> pkg.high"]
