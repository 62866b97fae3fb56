"""The package's shape in numbers: modules, the largest file, internal import edges and cycles.

Run ``python scripts/import_graph.py`` for a summary, ``--edges`` to list every edge.
Every ``import`` counts, lazy ones inside functions too (import-linter counts them).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "serving"


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def edges(mods: dict[str, Path]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base]) if base else ".".join(pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("serving"):
                    found.add((name, target))
    return found


def cycles(mods: dict[str, Path], graph: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    succ: dict[str, list[str]] = {m: [] for m in mods}
    for a, b in graph:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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

    for m in mods:
        if m not in index:
            visit(m)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--edges", action="store_true", help="list every internal import edge")
    args = parser.parse_args()
    mods = modules()
    graph = edges(mods)
    sizes = {m: len(p.read_text().splitlines()) for m, p in mods.items()}
    largest = max(sizes, key=lambda m: sizes[m])
    found = cycles(mods, graph)
    print(f"modules: {len(mods)}")
    print(f"largest: {largest} ({sizes[largest]} lines)")
    print(f"internal import edges: {len(graph)}")
    print(f"cycles (strongly connected groups): {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    if args.edges:
        for a, b in sorted(graph):
            print(f"{a} -> {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
