"""The pipeline's layering, checked on the source: core -> train -> export -> plugins -> deploy.

No stage imports a later one (a CLI module may: it orchestrates the stages), and imports form no
cycle (module-level ones, nor all of them). Imports are read with `ast` (module level and inside functions, relative
ones resolved), so the check needs no import of the package and names the file:line at fault.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tokenskip"
# pipeline order: a stage may import its own and earlier stages only (deploy's subpackages are one stage)
STAGES = ("tokenskip", "tokenskip.train", "tokenskip.export", "tokenskip.plugins", "tokenskip.deploy")
# modules that orchestrate the whole pipeline: any `cli.py` or `*_cli.py`, the pipeline and the entry point
CLI_MODULES = {"tokenskip.__main__", "tokenskip.pipeline"}


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name, as far as the statement names it (`from a import b` -> "a.b")
    line: int
    top_level: bool  # runs when the module is imported (not inside a function, not under TYPE_CHECKING)


def package_dirs() -> dict[str, Path]:
    """{"tokenskip": ROOT/core, "tokenskip.train": ROOT/train, ...} from pyproject.toml's package-dir."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {pkg: ROOT / d for pkg, d in cfg["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file. A folder belongs to the longest package
    (by folder) that holds it, so deploy/serve/x.py is tokenskip.deploy.serve.x, not listed twice."""
    dirs = package_dirs()
    out: dict[str, Path] = {}
    for pkg, d in dirs.items():
        for f in d.rglob("*.py"):
            owner = max((p for p, pd in dirs.items() if f.is_relative_to(pd)), key=lambda p: len(str(dirs[p])))
            if owner != pkg:
                continue
            parts = list(f.relative_to(d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def stage_of(module: str) -> int:
    """Index in STAGES of the longest stage prefix of `module`."""
    return max(i for i, s in enumerate(STAGES) if module == s or module.startswith(s + "."))


def is_cli(module: str, path: Path) -> bool:
    return path.stem == "cli" or path.stem.endswith("_cli") or module in CLI_MODULES


def imports(module: str, path: Path) -> list[Import]:
    """The package-internal imports of one module, relative ones resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    head = base[:len(base) - (child.level - 1)]
                    mod = ".".join(head + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.extend(Import(f"{mod}.{a.name}" if a.name != "*" else mod, child.lineno, top)
                             for a in child.names)
            # `if TYPE_CHECKING:` imports never run, but they still say what the module depends on
            visit(child, inner and not (isinstance(child, ast.If) and _is_type_checking(child.test)))

    visit(tree, True)
    return [i for i in found if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module an import loads: `a.b.name` is module a.b.name if that exists, else a.b."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def test_modules_are_found():
    mods = modules()
    assert "tokenskip.cli" in mods and "tokenskip.train.fit" in mods and "tokenskip.deploy.serve.cli" in mods
    assert stage_of("tokenskip.routed") == 0 and stage_of("tokenskip.deploy.serve.engine") == 4
    assert resolve("tokenskip.kv_buffer.KVBuffer", mods) == "tokenskip.kv_buffer"
    cli = {m for m, p in mods.items() if is_cli(m, p)}
    assert {"tokenskip.cli", "tokenskip.pipeline", "tokenskip.evaluate_cli", "tokenskip.deploy.engine.cli"} <= cli
    assert "tokenskip.evaluate" not in cli and "tokenskip.deploy.serve.launch" not in cli


def test_resolves_relative_and_function_level_imports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from .a import b\nfrom ..deploy import serve\n\ndef f():\n    from tokenskip.export import x\n"
                   "if TYPE_CHECKING:\n    import tokenskip.plugins\nimport numpy\n")
    got = imports("tokenskip.train.mod", src)
    assert [(i.target, i.line, i.top_level) for i in got] == [
        ("tokenskip.train.a.b", 1, True), ("tokenskip.deploy.serve", 2, True), ("tokenskip.export.x", 5, False),
        ("tokenskip.plugins", 7, False)]


def test_no_stage_imports_a_later_stage():
    mods = modules()
    bad = []
    for mod, path in sorted(mods.items()):
        if is_cli(mod, path):
            continue
        own = stage_of(mod)
        for imp in imports(mod, path):
            target = resolve(imp.target, mods) or imp.target
            if stage_of(target) > own:
                bad.append(f"{path.relative_to(ROOT)}:{imp.line}: {STAGES[own]} imports {target} "
                           f"(a later stage, {STAGES[stage_of(target)]})")
    assert not bad, "layering violations (no stage imports a later one):\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), each as the
    cycle a DFS finds inside it: [a, b, ..., a]. Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph[node]:
                    comps.append(sorted(comp))
    return [_cycle_in(graph, set(c)) for c in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One concrete cycle through the smallest module of a strongly connected component (BFS back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for n in frontier:
            for m in sorted(graph[n] & comp):
                if m == start:
                    path = [n]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if n != start else [start, start]
                if m not in prev:
                    prev[m] = n
                    nxt.append(m)
        frontier = nxt
    raise AssertionError(f"no cycle in component {sorted(comp)}")


def test_find_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert find_cycles(g) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycles(module_level_only):
    """No cycle among module-level imports (those fail at import time, order-dependently), nor
    among all imports: a function-level import only hides a cycle that still ties the two
    modules together (e.g. kv_buffer <-> cuda_graphs, broken by moving decode_cache)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for imp in imports(mod, path):
            target = resolve(imp.target, mods)
            # importing a package's own submodule from its __init__ (or a parent package) is no cycle
            if (imp.top_level or not module_level_only) and target and target != mod \
                    and not target.startswith(mod + "."):
                graph[mod].add(target)
    cycles = find_cycles(graph)
    kind = "module-level imports" if module_level_only else "imports (module- or function-level)"
    assert not cycles, f"import cycles among {kind}:\n" + "\n".join(" -> ".join(c) for c in cycles)
