"""The package's shape (ARCHITECTURE.md): layers as folders, imports pointing down, no circles,
one name per module. Read from the source with `ast`, every import counted (also the ones
inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "llava_cli"
# Bottom to top; a module may import from its own layer's folder and from the layers below.
LAYERS = [
    ("artifacts",),
    ("data.text",),
    ("data",),
    ("config",),
    ("model",),
    ("answers",),  # answering and scoring: `llava evaluate`, `generate` and training share it
    ("train", "inspect", "merge", "generation"),  # siblings: none imports another
    ("convert",),  # builds on merge's checks (an original LoRA run is merged on the way in)
    ("demo",),
    ("commands",),
    ("",),  # the package face: cli.py, __main__.py, __init__.py
]


def _modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def _folder(module: str) -> str:
    """The layer folder a module belongs to: its longest matching layer name."""
    names = [name for layer in LAYERS for name in layer]
    matches = [n for n in names if n and (module == n or module.startswith(n + "."))]
    return max(matches, key=len) if matches else ""


def _rank(folder: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if folder in layer)


def _imports(file: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n.removeprefix("llava_cli.") for n in names
                   if n.startswith("llava_cli.") or n == "llava_cli")
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target in _imports(file) if target in modules and target != name}
            for name, file in modules.items()}


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        here = _folder(module)
        for target in targets:
            there = _folder(target)
            if there != here and _rank(there) >= _rank(here):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def test_module_names_say_what_they_hold():
    """No two modules share a file name (`__init__` aside): a name read in a traceback or an
    import names one concept. Module size is advice (`../shared/tools/house.py` prints it),
    never a reason to move code."""
    seen: dict[str, list[str]] = {}
    for file in PACKAGE.rglob("*.py"):
        if file.name != "__init__.py":
            seen.setdefault(file.name, []).append(str(file.relative_to(PACKAGE)))
    shared = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not shared, f"modules sharing a file name: {shared}"


def test_only_the_package_face_sits_at_the_top():
    top = sorted(name for name in _modules() if not _folder(name))
    assert top == ["", "__main__", "cli"], top
