"""The floor plan (docs/architecture.md) holds: every import points down the layers, never up, and no
modules import each other in a cycle. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "alignlab"

# Lowest first. A module may import its own layer and those before it.
LAYERS = ("errors", "registry", "tools", "losses", "data", "models", "online", "runner", "algorithms", "entry")
ENTRY_POINTS = {
    "__init__",
    "__main__",
    "train",
    "results",
    "score",
    "generate",
    "evaluate",
    "errors",
    "registry",
    "vllm_serve",
}


def layer(module: str) -> str:
    """alignlab.<layer>.x → its layer; the modules at the root are entry points (errors is the floor)."""
    parts = module.split(".")[1:]
    if parts[0] in ("errors", "registry"):
        return parts[0]
    return parts[0] if parts[0] in LAYERS else "entry"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the alignlab modules it imports}, from each file's syntax tree."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, names = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("alignlab.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignlab"):
                names.add(node.module)
        found[name] = names
    return found


def test_only_entry_points_live_at_the_package_root():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ENTRY_POINTS
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {
        "errors",
        "registry",
        "entry",
    }


def test_every_import_points_down_the_layers():
    upward = []
    for module, targets in imports().items():
        for target in targets:
            if target == "alignlab":
                continue
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert upward == []


def test_no_import_cycles():
    graph = {m: {t for t in targets if t in imports_cache} for m, targets in imports_cache.items()}
    # Packages import their own modules (alignlab.data re-exports the DataModules): not a cycle.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" → ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


imports_cache = imports()
