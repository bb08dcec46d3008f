"""The package's import graph, read from the source (function-level imports included), for the boundary
tests and docs/architecture.md: `python tools/imports.py` prints cycles and the imports between folders."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG_DIRS = {"worldserve": ROOT / "service", "worldserve.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PKG_DIRS.items():
        for p in d.rglob("*.py"):
            if "gen" in p.relative_to(d).parts:
                continue
            rel = p.relative_to(d).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join([pkg, *rel])
            if pkg == "worldserve" and rel[:1] == ("kernels",):
                continue
            out[name] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                mod = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: {t for t in imports_of(n, p, known) if t not in _ancestors(n)} for n, p in mods.items()}


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def folder(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["worldserve", "kernels"]:
        return "kernels"
    return parts[1] if len(parts) > 2 else "(root)"


if __name__ == "__main__":
    g = graph()
    print("cycles:", cycles(g) or "none")
    edges: dict[str, set[str]] = {}
    for a, ts in g.items():
        for b in ts:
            if folder(a) != folder(b):
                edges.setdefault(folder(a), set()).add(folder(b))
    for a in sorted(edges):
        print(f"{a:10s} -> {', '.join(sorted(edges[a]))}")
