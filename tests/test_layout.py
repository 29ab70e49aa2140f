"""The layout's rules (DESIGN.md §2): dependencies point one way, ``cli -> service, embed,
finetune -> models``, and no module imports itself back through others. Every import counts,
also those inside functions and under ``TYPE_CHECKING``: a lazy import still ties two modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service", "embed", "finetune", "cli")
# What each package may import besides itself.
ALLOWED = {
    "models": set(),
    "service": {"models"},
    "embed": {"models"},
    "finetune": {"models"},
    "cli": {"models", "service", "embed", "finetune"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The project modules ``path`` imports (``from pkg import name`` counts as ``pkg.name`` when
    that is a module, else ``pkg``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                found.add(t)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets = set()
        for t in project_imports(path, root):
            while t and t not in files:  # `from pkg import name`: name is not a module
                t = t.rpartition(".")[0]
            if t and t != mod:
                targets.add(t)
        edges[mod] = targets
    return edges


def cycles(edges: dict[str, set[str]], *, skip_init: bool) -> list[list[str]]:
    """Each module that can reach itself, with one path back (Tarjan would do; the graph is small).
    A package's ``__init__`` re-exporting its own modules is not a cycle of the design, so
    ``skip_init`` leaves those edges out."""
    found = []
    for start in sorted(edges):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if skip_init and (nxt == nxt.split(".")[0] or node == node.split(".")[0]):
                    continue
                if nxt == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_packages_import_only_downwards() -> None:
    wrong = [
        f"{mod} imports {t}"
        for mod, targets in graph().items()
        for t in targets
        if t.split(".")[0] != mod.split(".")[0] and t.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    found = cycles(graph(), skip_init=True)
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_checker_sees_what_it_must(tmp_path: Path) -> None:
    """The checker itself, on a made-up tree: an import it could not see, or a cycle it missed,
    would let the tests above pass falsely."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "models" / "a.py").write_text("def f():\n    from service import http\n")
    (tmp_path / "service" / "http.py").write_text("from . import pool\n")
    (tmp_path / "service" / "pool.py").write_text("from .http import x\nimport embed.job\n")
    (tmp_path / "embed" / "job.py").write_text("from models.a import f\n")
    edges = graph(tmp_path)
    assert edges["models.a"] == {"service", "service.http"}
    assert edges["service.pool"] == {"service.http", "embed.job"}
    assert edges["embed.job"] == {"models.a"}
    found = {tuple(c) for c in cycles(edges, skip_init=True)}
    assert ("service.http", "service.pool", "service.http") in found
    assert ("models.a", "service.http", "service.pool", "embed.job", "models.a") in found
