"""The shape of the package: lint, layers that import downward only, no import cycle, documents in reach.

Imports are read from the source (``ast``), lazy ones inside functions included, so an arrow a test run
never executes still counts. The layers and what each may import are docs/architecture.md's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "synthmill"

#: subpackage (or top-level module) -> the ones it may import besides itself
MAY_IMPORT = {
    "cli": {"jobs", "cluster", "distill", "metrics", "models", "sharding", "errors"},
    "jobs": {"cluster", "distill", "metrics", "models", "sharding", "errors"},
    "cluster": {"metrics", "models", "sharding", "errors"},
    "distill": {"metrics", "models", "sharding", "errors"},
    "metrics": {"models", "sharding", "errors"},
    "models": {"sharding", "errors"},
    "sharding": {"errors"},
    "testing": {"models", "sharding", "errors"},
    "errors": set(),
    "": set(),  # synthmill/__init__.py
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _parse(source: str) -> ast.Module:
    """``ast.parse``, again when CPython 3.11 raises "AST constructor recursion depth mismatch": its AST
    conversion keeps that depth in interpreter-wide state, which another thread compiling at the same moment
    (Ray's, moto's, the background smokes') can disturb (CPython issue 106905, fixed in later releases); a parse of the
    same text from a quiet moment is the answer the test wants."""
    for _ in range(5):
        try:
            return ast.parse(source)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e):
                raise
    return ast.parse(source)


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the synthmill modules it imports anywhere in its source (a package counts as its __init__)."""
    edges = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(_parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_downward_only():
    bad = sorted(f"{m} imports {t}" for m, targets in _imports(_modules()).items() for t in targets
                 if _layer(t) != _layer(m) and _layer(t) not in MAY_IMPORT[_layer(m)])
    assert bad == []
    assert set(MAY_IMPORT) >= {_layer(m) for m in _modules()}, "a new subpackage needs its row above"


def test_no_import_cycle():
    edges = _imports(_modules())
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "synthmill", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_documents_a_newcomer_reads():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    first = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first) == 2 and "synthmill run" in first[0] and "pytest" in first[1]
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {n for n in named if f"synthmill/{n}/" not in architecture} == set()
    for page in ("design", "generate", "evaluate", "distill", "storage", "guarantees", "speed"):
        assert (ROOT / "docs" / f"{page}.md").is_file(), page
