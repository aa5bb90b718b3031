"""Imports run one way: the packages of sweep/ stand in one order (docs/architecture.md), and a module imports only
from its own package or from packages below it. Every module is parsed (function-level imports included) and the
test fails on an import against the order (so on any circle between packages), on a circle between modules, and:
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
# The packages, lowest first: the basics, then the pipeline's stages from the C library up to the commands.
ORDER = (
    ("sweep", "sweep.errors", "sweep.choices", "sweep.cores", "sweep.files"),  # basics: what every package may use
    ("sweep.llama",),  # llama.cpp: the one owner of llama_cpp, and what llama.cpp needs in bytes
    ("sweep.quant",),  # which format, which tensor, how it is applied
    ("sweep.scoring",),  # the text, its windows, the metrics
    ("sweep.store",),  # records, keys, the table, atomic files
    ("sweep.estimate",),  # the sensitivity map: weight errors, the response law, predicted rows
    ("sweep.prefix",),  # prefix reuse: its plan, stage files, residuals
    ("sweep.pipeline",),  # config -> grid -> costs -> job -> point
    ("sweep.cluster",),  # the launchers' side: the checks before launch, SLURM's time limit and incomplete sweeps
    ("sweep.report",),  # the table, ranked and plotted
    ("sweep.recipe", "sweep.imatrix"),  # the tools built on sweeps
    ("sweep.commands", "sweep.__main__", "sweep.testing"),  # the command line; tiny models for tests and benchmarks
)
DEFERRABLE = ("llama_cpp", "matplotlib", "scipy")  # slow or heavy libraries a command may not need
# our modules that load them at import: sweep/llama/ (llama_cpp), the figures (matplotlib)
DEFERRABLE_MODULES = ("sweep.llama", "sweep.report.plots")


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


def rank(module: str) -> tuple[int, str]:
    """The module's place in ORDER and its package's name."""
    found = [(i, p) for i, packages in enumerate(ORDER) for p in packages if in_any(module, (p,))]
    assert found, f"{module} is in no package of ORDER: add its package there and to docs/architecture.md"
    return max(found, key=lambda f: len(f[1]))


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
            (mine, package), (theirs, other) = rank(module), rank(target)
            if theirs > mine:
                problems.append(f"{where} imports {target}: {package} stands below {other} in the package order "
                                f"(tests/test_imports.py ORDER, docs/architecture.md)")
    problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def test_imports_run_one_way():
    problems = violations(PACKAGE)
    assert not problems, "\n".join(problems)


def planted(tmp_path, module: str, line: str) -> list[str]:
    """The violations of a copy of the package with `line` appended to `module` (a path under sweep/)."""
    copy = tmp_path / "sweep"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return violations(copy)


def test_a_circle_inside_a_package_is_found(tmp_path):
    """The window math imports the perplexity protocol, which imports the window math: one package, so only the
    circle check sees it."""
    circles = [p for p in planted(tmp_path, "scoring/window_math.py", "from .perplexity import score")
               if p.startswith("import circle:")]
    assert circles and "sweep.scoring.window_math" in circles[0] and "sweep.scoring.perplexity" in circles[0], circles


@pytest.mark.parametrize("module, line, why", [
    # a package-level circle: the pipeline imports the scoring, and now the scoring the pipeline
    ("scoring/metrics.py", "from ..pipeline.point import run_point",
     "sweep.scoring stands below sweep.pipeline in the package order"),
    ("llama/vocab.py", "from ..store.records import Store", "sweep.llama stands below sweep.store"),
    ("pipeline/job.py", "from sweep.commands import cli", "sweep.pipeline stands below sweep.commands"),
    ("scoring/metrics.py", "import llama_cpp", "only sweep/llama/"),
])
def test_an_import_against_the_order_is_found(tmp_path, module, line, why):
    problems = planted(tmp_path, module, line)
    assert any(why in p for p in problems), problems
