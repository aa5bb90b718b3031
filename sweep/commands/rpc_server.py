"""`sweep rpc-server HOST:PORT [--threads N] [--cpu]`: serve this machine's device to llama.cpp's RPC
clients (a sweep with model.rpc=HOST:PORT, or llama.cpp's own tools with --rpc), until killed.

It serves the machine's GPUs when llama-cpp-python was built with one, else (or with --cpu) its CPU -- through
llama.cpp's own `ggml_backend_rpc_start_server`, as llama.cpp's `rpc-server` tool does. One client at a time.
Security: the protocol has no authentication. The server binds to loopback addresses only unless given
--allow-remote, and then prints llama.cpp's own warning (docs/backends.md).
"""

from __future__ import annotations

import argparse

from ..cores import available_cores
from ..errors import exit_on_user_error
from ..llama.rpc import serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep rpc-server", description=__doc__.split("\n\n")[0])
    p.add_argument("endpoint", help="HOST:PORT to listen on, e.g. 127.0.0.1:50052")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--cpu", action="store_true", help="serve the CPU even when a GPU is present")
    p.add_argument("--allow-remote", action="store_true",
                   help="bind to an address other than loopback (no authentication: a private network only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_user_error(serve, args.endpoint, int(args.threads or available_cores()), args.cpu, args.allow_remote)


if __name__ == "__main__":
    main()
