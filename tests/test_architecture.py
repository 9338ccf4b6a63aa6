"""The layer diagram in docs/architecture.md is the rule: no module imports from a layer above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def documented_layers() -> dict[str, int]:
    """Module path or package folder (``dpokit/data/``) -> layer number, from the table in docs/architecture.md."""
    layers = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\| (\d) \w+ \| (.*?) \|", line)
        if row:
            for path in re.findall(r"`([^`]+)`", row[2]):
                layers[path] = int(row[1])
    return layers


def layer_of(path: str, layers: dict[str, int]) -> int:
    if path in layers:
        return layers[path]
    folder = next((f for f in layers if f.endswith("/") and path.startswith(f)), None)
    assert folder is not None, f"{path} is not placed in docs/architecture.md's layer table"
    return layers[folder]


def module_path(name: str) -> str:
    """``dpokit.data.prepared`` -> ``dpokit/data/prepared.py`` (a package -> its ``__init__.py``)."""
    base = REPO / name.replace(".", "/")
    return f"{name.replace('.', '/')}/__init__.py" if base.is_dir() else f"{name.replace('.', '/')}.py"


def dpokit_imports(path: Path) -> set[str]:
    """Every dpokit module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpokit":
            names.add(node.module)
            names.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if (REPO / node.module.replace(".", "/") / a.name).exists()
                or (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists()
            )
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "dpokit")
    return names


def source_files() -> list[Path]:
    return sorted([*REPO.glob("dpokit/**/*.py"), REPO / "recipes" / "dpo.py"])


def test_every_module_is_placed_in_a_layer():
    layers = documented_layers()
    for path in source_files():
        layer_of(path.relative_to(REPO).as_posix(), layers)


def test_the_import_reader_sees_imports_inside_functions():
    imports = dpokit_imports(REPO / "dpokit" / "cli.py")  # cli imports each command's module lazily
    assert {"dpokit.reference.compute", "dpokit.launch", "dpokit.data.pipeline"} <= imports


def test_no_module_imports_from_a_layer_above_its_own():
    layers = documented_layers()
    upward = []
    for path in source_files():
        relative = path.relative_to(REPO).as_posix()
        own = layer_of(relative, layers)
        for name in dpokit_imports(path) - {"dpokit"}:
            theirs = layer_of(module_path(name), layers)
            if theirs > own:
                upward.append(f"{relative} (layer {own}) imports {name} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycles():
    graph = {}
    for path in source_files():
        relative = path.relative_to(REPO).as_posix()
        graph[relative] = {module_path(name) for name in dpokit_imports(path) if name != "dpokit"}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(
                    f"import cycle: {' -> '.join(trail[trail.index(nxt) :] + [nxt]) if nxt in trail else nxt}"
                )
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
