"""Every command that README.md and docs/ show is parsed by the tool that runs it: a sweep's overrides are composed
with the real conf/ (the first point of its grid), a Hydra tool's with its config, an argparse tool's arguments are
parsed, and the commands that take a second are run. A renamed option or a removed flag fails here, not in a
user's shell."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

import sweep.commands.score_model  # noqa: F401  (likewise for `sweep score`)
import sweep.imatrix.compute  # noqa: F401  (registers the imatrix config's schema, as `sweep imatrix` does)
from sweep.commands.prefix_clean import parser as prefix_clean_parser
from sweep.commands.rpc_server import parse_args as rpc_server_args
from sweep.pipeline.config import compose
from sweep.pipeline.grid import _config_dir, expand
from sweep.recipe.command import parse_args as recipe_args
from sweep.report.__main__ import parse_args as report_args

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for each command line of a page: in ```bash blocks (with `\\` continuations) and in inline
    code that starts like one."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                found.append((page.name, line))
        for span in re.findall(r"`([^`\n]+)`", text):
            found.append((page.name, span))
    commands = []
    for page, line in found:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a shell comment
        line = re.sub(r"\$\([^)]*\)", "0", line)  # $(seq -s, 0 29): one value stands for them
        line = re.sub(r"\s&$", "", line.split(" && ")[-1].split(" & ")[0]).strip()  # the install's last step; `&`
        if re.match(r"(sweep|\S*python3? -m sweep[.\w]*)( |$)", line):
            commands.append((page, line))
    return sorted(set(commands))


COMMANDS = shown_commands()


def tool_and_args(line: str) -> tuple[str, list[str]]:
    words = shlex.split(line)
    if words[0] == "sweep":
        rest = words[1:]
        tool = rest[0] if rest and not ("=" in rest[0] or rest[0].startswith("-")) else ""
        return tool, rest[1:] if tool else rest
    module = words[2]  # python -m sweep[.tool]
    tool = module.removeprefix("sweep").lstrip(".").removesuffix(".__main__").replace("_", "-")
    return {"report.--main--": "report"}.get(tool, tool), words[3:]


def parse_sweep(args: list[str]) -> None:
    args = [a for a in args if a not in ("--plan", "--help", "--cfg", "job", "--hydra-help")]
    jobs = expand(OverridesParser.create().parse_overrides(args))
    with _config_dir():
        compose(jobs[0], with_hydra=True)


def test_the_pages_show_commands():
    assert len(COMMANDS) > 30 and {p for p, _ in COMMANDS} >= {"README.md", "formats.md", "recipes.md"}


NEED_ARGUMENTS = ("recipe", "report", "rpc-server")


@pytest.mark.parametrize("page,line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_shown_command_parses(page, line):
    tool, args = tool_and_args(line)
    if tool in NEED_ARGUMENTS and not args:  # `sweep recipe` named in the prose: nothing to parse
        return
    if tool in ("formats", "--help") or "--help" in args:  # seconds: run it
        proc = subprocess.run([sys.executable, "-m", "sweep.commands.cli", *([tool] if tool else []), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        return
    if tool in ("", "plan"):
        parse_sweep(args)
    elif tool in ("score", "imatrix"):
        compose(args, tool)
    elif tool == "recipe":
        recipe_args(args)
    elif tool == "report":
        report_args(args)
    elif tool == "rpc-server":
        rpc_server_args(args)
    elif tool == "prefix-clean":
        prefix_clean_parser().parse_args(args)
    else:
        pytest.fail(f"{page}: no parser for `{line}` (tool {tool!r}): teach tests/test_docs.py this command")
