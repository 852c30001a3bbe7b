"""The code's layout stays readable: no import circle, no overlong function.

Read from the source with ``ast`` (nothing is imported), over the packages ``search``, ``lsv_core`` and
``dashboards``. Every import counts, also those inside functions and under ``TYPE_CHECKING``: a circle
there is still a notion without an owner (STYLE.md). An import of a package resolves to its
``__init__``, which is not followed (``search/__init__`` re-exports lazily, by name), as in the lead's
check in shared/hooks/before-stop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "lsv_core", "dashboards")
MAX_FUNCTION_LINES = 80


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package by its own name)."""
    mods: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            dotted = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[dotted.removesuffix(".__init__")] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module prefix of ``name`` (``a.b.func`` -> ``a.b``), or None."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules (not package ``__init__``s) it imports anywhere in its file."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
                names = [source] + [f"{source}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, mods)
                if target is not None and target != mod and mods[target].name != "__init__.py":
                    graph[mod].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:function (lines)`` for every function or method longer than ``limit`` lines (def to last line)."""
    out = []
    for path in _modules(root).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root)}:{node.name} ({lines})")
    return sorted(out)


def test_no_import_circle() -> None:
    circles = import_circles(import_graph())
    assert circles == [], "import circles (give the shared notion one module both sides import): " + " | ".join(
        ", ".join(c) for c in circles)


def test_no_function_over_80_lines() -> None:
    assert long_functions() == [], "split these into named steps"


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The checks find a circle through a function-level relative import, and an 81-line function."""
    pkg = tmp_path / "search"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from search.a import x  # the package imports are not followed\n")
    (pkg / "a.py").write_text("from search import b\n\nx = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (pkg / "c.py").write_text("import search\nfrom search import a\n\n\ndef g():\n" + "    y = 1\n" * 80)
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    graph = import_graph(tmp_path)
    assert graph["search.a"] == {"search.b"} and graph["search.b"] == {"search.a"}
    assert graph["search.c"] == {"search.a"}  # `import search` reaches the package only
    assert import_circles(graph) == [["search.a", "search.b"]]
    assert long_functions(tmp_path) == ["search/c.py:g (81)"]
    assert long_functions(tmp_path, limit=81) == []


def test_folders_hold_at_most_12_modules() -> None:
    """A reader guesses the folder of a capability (STYLE.md): no folder of the packages has more than 12
    modules at its top level (``__init__`` and ``__main__`` not counted)."""
    crowded = []
    for top in PACKAGES:
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            modules = [p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
            if len(modules) > 12:
                crowded.append(f"{folder.relative_to(ROOT)} ({len(modules)})")
    assert crowded == [], "group these folders' modules into packages by role"
