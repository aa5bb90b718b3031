"""The `sweep` command: one entry point for every tool, one `--help`, one error convention (a SweepError is one
`error: ...` line on stderr and exit status 2, sweep/errors.py). Each tool is also `python -m sweep.<tool>`."""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, what it does); the sweep itself takes no name
COMMANDS = {
    "plan": ("sweep.__main__", "what the sweep AXIS=VALUES... would cost (points, disk, memory, time); runs nothing"),
    "score": ("sweep.commands.score_model", "perplexity of the reference model as configured, no perturbation"),
    "report": ("sweep.report.__main__", "rebuild the results table, the ranking and the figures from sweep dirs"),
    "recipe": ("sweep.recipe.command", "a mixed-precision recipe from finished sweeps; build and validate its GGUF"),
    "imatrix": ("sweep.imatrix.compute", "llama.cpp's importance matrix, computed inside llama.cpp's own graph"),
    "formats": ("sweep.commands.list_formats", "the tables of the formats fmt= accepts"),
    "rpc-server": ("sweep.commands.rpc_server",
                   "serve this machine's devices to llama.cpp's RPC backend (model.rpc=HOST:PORT)"),
    "prefix-clean": ("sweep.commands.prefix_clean", "remove prefix reuse's stage files and residuals from the cache"),
}
USAGE = """usage: sweep [AXIS=VALUES ...]         the sensitivity sweep (python -m sweep): one job per point of the grid
       sweep COMMAND [ARGS ...]

  e.g. sweep layer='range(0,22)' fmt=bf16,int8 tensor=ffn_down kind=weight

commands:
{commands}

`sweep COMMAND --help` says more about each; `sweep --hydra-help` lists Hydra's own flags for the sweep.
A bad argument is one line `error: ...` and exit status 2."""


def usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<12} {doc}" for name, (_, doc) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["--help"], ["-h"], ["help"]):
        print(usage())
        return
    if not args or args[0] not in COMMANDS:
        return importlib.import_module("sweep.__main__").main(args, prog="sweep")
    name, rest = args[0], args[1:]
    tool = importlib.import_module(COMMANDS[name][0])  # by name: `sweep --help` loads no tool (nor llama.cpp)
    if name == "plan":
        return tool.main([*rest, tool.PLAN_FLAG], prog="sweep plan")
    sys.argv = [f"sweep {name}", *rest]  # the program name in Hydra's and argparse's messages
    status = tool.main(rest)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
