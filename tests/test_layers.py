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
