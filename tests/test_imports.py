"""Imports run one way. Every module of the package is parsed (function-level imports included) and the test fails
on any circle between modules and on a layer violation:
  * the pipeline's lower packages (llama, quant, scoring, store) never import the orchestration at the top (config,
    grid, planning, job, run, session, reference, gencheck), nor the recipe, the imatrix, the report or the commands;
  * nothing but those tools and the commands imports the recipe, the imatrix, the report or the command line;
  * only sweep/llama/ imports llama_cpp;
  * an import inside a function defers llama_cpp, matplotlib or scipy only, and says why (everything else is
    module-level)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import sweep

PACKAGE = Path(sweep.__file__).parent
LOWER = ("sweep.llama", "sweep.quant", "sweep.scoring", "sweep.store")
TOOLS = ("sweep.recipe", "sweep.imatrix", "sweep.report")
COMMANDS = ("sweep.cli", "sweep.__main__", "sweep.score", "sweep.formats", "sweep.rpc_server")
DEFERRABLE = ("llama_cpp", "matplotlib", "scipy")  # slow or heavy libraries a command may not need
# our modules that load them at import: sweep/llama/ (llama_cpp), the figures (matplotlib)
DEFERRABLE_MODULES = ("sweep.llama", "sweep.report.plots")
BASE = ("sweep", "sweep.errors", "sweep.choices", "sweep.cores")  # what every layer may use


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """What an ImportFrom imports: `from .pkg import mod` names the module sweep.pkg.mod, `from .mod import f` the
    module sweep.mod."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return modules if len(modules) == len(node.names) else [base, *modules]


def imports(root: Path) -> dict[str, list[tuple[str, int, str | None]]]:
    """module -> [(imported module, line, None or the line's text when the import is inside a function)]."""
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    found = {}
    for path in paths:
        module = module_name(path, root)
        source = path.read_text()
        tree = ast.parse(source, str(path))
        deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f)}
        lines = source.splitlines()
        out = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = resolve(module, path.name == "__init__.py", node, known)
            else:
                continue
            text = lines[node.lineno - 1] if id(node) in deferred else None
            out += [(n, node.lineno, text) for n in names]
        found[module] = out
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def in_any(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or (p != "sweep" and module.startswith(p + ".")) for p in prefixes)


def violations(root: Path) -> list[str]:
    found = imports(root)
    graph = {m: set() for m in found}
    problems = []
    for module, names in found.items():
        for name, line, deferred in names:
            where = f"{module}:{line}"
            if name.split(".")[0] == "llama_cpp" and not in_any(module, ("sweep.llama",)):
                problems.append(f"{where} imports llama_cpp: only sweep/llama/ talks to llama.cpp")
            target = name if name in found else None
            if deferred is not None and (target or name.split(".")[0] in DEFERRABLE):
                heavy = name.split(".")[0] in DEFERRABLE or in_any(name, DEFERRABLE_MODULES)
                if not heavy:
                    problems.append(f"{where} imports {name} inside a function: import it at module level")
                elif "deferred" not in deferred:
                    problems.append(f"{where} defers {name}: say why in a `# deferred: ...` comment")
            if target is None or target == module:
                continue
            graph[module].add(target)
            if in_any(module, LOWER) and not in_any(target, LOWER + BASE):
                problems.append(f"{where} imports {target}: the pipeline's lower packages never import the layers "
                                f"above them")
            if in_any(target, TOOLS + COMMANDS) and not in_any(module, TOOLS + COMMANDS):
                problems.append(f"{where} imports {target}: only the tools and the commands import these")
    problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def test_imports_run_one_way():
    problems = violations(PACKAGE)
    assert not problems, "\n".join(problems)


def test_a_circle_is_found(tmp_path):
    """The check itself: a copy of the package where the metrics import the module that runs a point (which imports
    the metrics)."""
    copy = tmp_path / "sweep"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    metrics = copy / "scoring" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom ..run import run_point  # noqa\n")
    circles = [p for p in violations(copy) if p.startswith("import circle:")]
    assert circles and "sweep.run" in circles[0] and "sweep.scoring.metrics" in circles[0], circles


@pytest.mark.parametrize("line, why", [("from sweep.recipe import command", "only the tools and the commands"),
                                       ("import llama_cpp", "only sweep/llama/"),
                                       ("from sweep.run import run_point", "lower packages never import")])
def test_a_layer_violation_is_found(tmp_path, line, why):
    copy = tmp_path / "sweep"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    metrics = copy / "scoring" / "metrics.py"
    metrics.write_text(metrics.read_text() + f"\n{line}  # noqa\n")
    assert any(why in p for p in violations(copy))
