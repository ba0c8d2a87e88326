"""The layers (architecture: config -> flow -> tasks -> fedhq_core): ``fedhq_core`` imports nothing
from ``tasks`` or ``flows`` (and neither Prefect nor MLflow), and ``tasks`` nothing from ``flows``.
Every import statement counts, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"fedhq_core": ("tasks", "flows", "prefect", "mlflow"), "tasks": ("flows",)}


def upward_imports(source: str, package: str) -> list[str]:
    """The modules ``source`` imports that ``package`` may not (absolute imports only: a relative
    import stays inside the package)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        out += [n for n in names if n.split(".")[0] in FORBIDDEN[package]]
    return out


def test_the_check_sees_an_upward_import():
    assert upward_imports("def f():\n    import tasks.training\n", "fedhq_core") == ["tasks.training"]
    assert upward_imports("from flows.cli import write_json\n", "tasks") == ["flows.cli"]
    assert upward_imports("from .records import write_json\nimport torch\n", "fedhq_core") == []


def test_no_upward_imports():
    bad = [f"{path.relative_to(ROOT)}: imports {name}"
           for package in FORBIDDEN for path in sorted((ROOT / package).rglob("*.py"))
           for name in upward_imports(path.read_text(), package)]
    assert not bad, "\n".join(bad)


# --- inside fedhq_core: floors, lowest first. A module imports from its own floor or below, and no
# import circle closes anywhere (function-level imports and TYPE_CHECKING blocks count too). A new
# module is placed on a floor here, or the test says it has none.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "phases", "metrics", "records", "checkpoint", "plugins", "strategies", "config", "hardware.catalog",
     "hardware.trace"),
    ("data", "data.*"),
    ("quant", "quant.*"),
    ("models", "models.*"),
    ("client", "wire", "worker"),
    ("server",),
    ("hardware", "hardware.*"),
    ("allocation", "allocation.*"),
    ("measurements", "measurements.*"),
    ("pricing", "server_state", "dispatch"),
    ("simulation",),
    ("loop", "family_build", "central", "api", ""),      # "": the package's __init__
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_imports(sources: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules of fedhq_core it imports}`` (names relative to ``fedhq_core``; "" is the
    package itself). ``from .x import name`` is an edge to ``x.name`` where that is a module, else
    to ``x``; a package's lazy ``_LAZY = {name: submodule}`` table counts as importing those."""
    packages = {m for m in sources if any(o.startswith(m + ".") for o in sources if m)} | {""}
    edges: dict[str, set[str]] = {}
    for mod, src in sources.items():
        here = mod.split(".") if mod in packages and mod else mod.split(".")[:-1] if mod else []
        out: set[str] = set()
        for node in ast.walk(ast.parse(src)):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "fedhq_core":
                    target = node.module[len("fedhq_core"):].lstrip(".")
                else:
                    continue
                subs = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                targets = [s for s in subs if s in sources] or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name[len("fedhq_core"):].lstrip(".") for a in node.names
                           if a.name.split(".")[0] == "fedhq_core"]
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
                targets = [f"{mod}.{v.value}".lstrip(".") for v in node.value.values if isinstance(v, ast.Constant)]
            for t in targets:
                while t and t not in sources:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t != mod:
                    out.add(t)
        edges[mod] = out
    return edges


def floor_of(mod: str) -> int | None:
    for i, floor in enumerate(FLOORS):
        for pat in floor:
            if mod == pat or (pat.endswith(".*") and mod.startswith(pat[:-1])):
                return i
    return None


def layering_problems(sources: dict[str, str]) -> list[str]:
    edges = core_imports(sources)
    out = [f"fedhq_core.{m}: on no floor (place it in tests/test_layers.py FLOORS)" for m in edges
           if floor_of(m) is None]
    out += [f"fedhq_core.{m or '__init__'} (floor {floor_of(m)}) imports fedhq_core.{t} (floor {floor_of(t)}), "
            f"a floor above it" for m, ts in edges.items() for t in sorted(ts)
            if None not in (floor_of(m), floor_of(t)) and floor_of(t) > floor_of(m)]
    out += [f"import circle: {' -> '.join(c + [c[0]])}" for c in circles(edges)]
    return out


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as a path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for g in groups:                      # a path that closes: follow edges inside the group
        path, seen = [min(g)], {min(g)}
        while True:
            nxt = next((w for w in sorted(edges[path[-1]]) if w in g), None)
            if nxt is None or nxt in seen:
                out.append(path[path.index(nxt):] if nxt in path else path)
                break
            path.append(nxt)
            seen.add(nxt)
    return out


def core_sources() -> dict[str, str]:
    pkg = ROOT / "fedhq_core"
    return {module_name(p, pkg): p.read_text() for p in sorted(pkg.rglob("*.py"))}


def test_fedhq_core_has_no_circles_and_no_floor_reached_upward():
    problems = layering_problems(core_sources())
    assert not problems, "\n".join(problems)


def test_the_floor_check_fails_on_a_deliberate_circle_or_upward_import():
    sources = core_sources()
    circle = dict(sources, client=sources["client"] + "\nfrom .allocation.fedfq import FedFQAllocator\n")
    problems = layering_problems(circle)
    assert any("a floor above it" in p and "client" in p for p in problems)
    assert any(p.startswith("import circle:") and "client" in p for p in problems)
    # a circle on one floor: hardware.trace importing config importing hardware.trace
    flat = dict(sources, **{"hardware.trace": sources["hardware.trace"] + "\nfrom ..config import FIELD_NAMES\n",
                            "config": sources["config"] + "\nfrom .hardware.trace import StepTrace\n"})
    assert any(p.startswith("import circle:") and "config" in p and "hardware.trace" in p
               for p in layering_problems(flat))
    assert "fedhq_core.newthing: on no floor" in "\n".join(layering_problems(dict(sources, newthing="x = 1\n")))
