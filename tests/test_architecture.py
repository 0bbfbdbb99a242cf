"""The shape of the code: rooms depend one way, no import circles, no oversized modules.

Read from the source with `ast` (nothing is imported), so a new circle or a room reaching into
another fails here, with the modules named, before it fails anyone's review.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "ember"
MAX_LINES = 500

ROOMS = {
    "deployments",
    "jobs",
    "dispatch",
    "scaling",
    "workers",
    "governance",
    "secrets",
    "tokens",
    "meter",
    "audit",
    "logs",
    "cluster",
    "webhooks",
    "series",
}
"""The rooms of `ember.control`: each owns one kind of state and imports no other room."""
SHARED = {"records", "errors", "settings"}
"""What every room may import from `ember.control`."""
HELPERS = {
    "governance": {"policies"},
    "secrets": {"vault"},
    "deployments": {"manifest"},
    "meter": {"rollups"},
    "jobs": {"job_rows"},
    "cluster": {"lease", "standby"},
}
"""The private helper modules of a room."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ember modules `name` imports, at the top or inside functions alike."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            # `from ember.control import jobs` names a module; `from ember.x import f` a name in one
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "ember":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_src() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_rooms_import_no_other_room_and_nothing_above_them() -> None:
    edges = graph()
    wrong = []
    for room in sorted(ROOMS):
        name = f"ember.control.{room}"
        assert name in edges, f"{name} is listed as a room but does not exist"
        allowed = {f"ember.control.{m}" for m in SHARED | HELPERS.get(room, set())}
        for target in sorted(edges[name]):
            above = target.startswith(("ember.api", "ember.cli", "ember.server"))
            if above or (target.startswith("ember.control.") and target not in allowed):
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_only_the_plane_knows_the_rooms() -> None:
    """Outside `ember.control`, only the API (the plane's callers) imports the control plane."""
    edges = graph()
    wrong = [
        f"{name} imports {target}"
        for name, targets in sorted(edges.items())
        if not name.startswith(("ember.control", "ember.api", "ember.server"))
        for target in sorted(targets)
        if target.startswith("ember.control")
    ]
    assert wrong == []


def test_the_api_reads_and_writes_no_table() -> None:
    edges = graph()
    wrong = [
        f"{name} imports {target}"
        for name, targets in sorted(edges.items())
        if name.startswith("ember.api")
        for target in sorted(targets)
        if target.startswith("ember.store") and target != "ember.store.db"
    ]
    assert wrong == []


def test_no_module_is_over_500_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
