"""bench/ is a suite: every script is listed in bench/README.md by the command that runs it, imports as a module of
the `bench` package from the repository root, and edits no sys.path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HELPERS = {"__init__", "llama_perplexity"}  # imported by the scripts, not run


def scripts() -> list[Path]:
    return sorted(p for p in BENCH.rglob("*") if p.suffix in (".py", ".sh") and p.stem not in HELPERS)


def command(script: Path) -> str:
    relative = script.relative_to(ROOT)
    if script.suffix == ".sh":
        return f"bash {relative}"
    return "python -m " + ".".join(relative.with_suffix("").parts)


def test_the_index_lists_every_script_by_its_command():
    index = (BENCH / "README.md").read_text()
    assert len(scripts()) >= 18  # the 19 flat scripts of before, less llama_perplexity.py (a helper)
    missing = [command(s) for s in scripts() if f"`{command(s)}" not in index]
    assert not missing, f"bench/README.md does not list {missing}"


def test_no_script_edits_sys_path():
    edits = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\[|\+=|=[^=])")
    assert not [p for p in BENCH.rglob("*.py") if edits.search(p.read_text())]


def test_every_script_imports_as_a_module_from_the_root():
    modules = [command(s).removeprefix("python -m ") for s in scripts() if s.suffix == ".py"]
    load = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    proc = subprocess.run([sys.executable, "-c", load, *modules], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
