"""The floors of docs/architecture.md hold: each module imports only from the floors below its own
(or from its own package), and no modules import each other in a loop. Read from the source with
`ast`, so a violation fails here before anything runs."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. `errors` is a leaf every floor may import; `plots` (notebook figures) reads only math;
# `cluster` (Ray Serve) sits on top, and nothing imports it.
FLOORS = ["errors", "runtime", "math", "session", "operations", "web", "plots", "experiments", "cluster"]
CLUSTER_ONLY = ("ray", "redis", "starlette")  # the optional install (requirements-cluster.txt)
ENTRY_POINTS = {"app", "model_utils", "explorer.__main__"}  # above every floor: the server, facade, runner


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The explorer modules `path` imports (relative imports resolved). `from pkg import name`
    imports the module `pkg.name` when there is one, else the package `pkg` itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return {m for m in found if m in modules and m != name}


def floor(module: str) -> int:
    """A module's floor: the index of its first part under explorer/ in FLOORS."""
    if module in ENTRY_POINTS:
        return len(FLOORS)
    part = module.split(".")[1] if module.count(".") else ""
    return FLOORS.index(part) if part in FLOORS else -1


def graph(paths: list[Path]) -> dict[str, set[str]]:
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that go up a floor (or sideways into another floor), and the modules of each cycle."""
    wrong = [f"{a} (floor {FLOORS[floor(a)] if floor(a) < len(FLOORS) else 'entry'}) imports {b}"
             for a, targets in edges.items() for b in targets
             if a not in ("explorer",) and floor(b) >= 0 and not floor(b) < floor(a)
             and a.split(".")[:2] != b.split(".")[:2]]
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return wrong + [f"import loop: {c}" for c in cycles]


def sources() -> list[Path]:
    return sorted((ROOT / "explorer").rglob("*.py")) + [ROOT / "app.py", ROOT / "model_utils.py"]


def test_every_module_belongs_to_a_floor():
    unplaced = [module_name(p) for p in sources()
                if module_name(p) != "explorer" and floor(module_name(p)) < 0]
    assert not unplaced, f"modules outside the floors of docs/architecture.md: {unplaced}"


def test_imports_go_down_the_floors_and_never_loop():
    assert violations(graph(sources())) == []


def test_only_the_cluster_imports_ray_or_redis():
    """The single server runs without requirements-cluster.txt installed."""
    def outside(path: Path) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found |= {n for n in names if n.split(".")[0] in CLUSTER_ONLY}
        return found
    cluster = ROOT / "explorer" / "cluster"
    wrong = {module_name(p): outside(p) for p in sources() if cluster not in p.parents and outside(p)}
    assert wrong == {}
    assert outside(cluster / "serve.py") >= {"ray.serve.config", "redis"}  # the check sees imports


def test_the_checker_sees_an_upward_import_and_a_loop():
    edges = {"explorer.math.a": {"explorer.session.explorer"}, "explorer.session.explorer": set(),
             "explorer.operations.x": {"explorer.operations.y"}, "explorer.operations.y": {"explorer.operations.x"}}
    found = violations(edges)
    assert any("explorer.math.a (floor math) imports explorer.session.explorer" in v for v in found)
    assert any(v.startswith("import loop:") and "explorer.operations.x" in v for v in found)
