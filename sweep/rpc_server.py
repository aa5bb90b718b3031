"""`python -m sweep.rpc_server HOST:PORT [--threads N] [--cpu]`: serve this machine's device to llama.cpp's RPC
clients (a sweep with model.rpc=HOST:PORT, or llama.cpp's own tools with --rpc), until killed.

It serves the machine's GPUs when llama-cpp-python was built with one, else (or with --cpu) its CPU -- through
llama.cpp's own `ggml_backend_rpc_start_server`, as llama.cpp's `rpc-server` tool does. One client at a time.
Security: the protocol has no authentication; bind to 127.0.0.1 or a private network only.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

from llama_cpp._ggml import libggml

from .cli import exit_on_user_error
from .errors import SweepError
from .reference import available_cores
from .rpc import GGML_BACKEND_DEVICE_TYPE_CPU, check_reachable, device_info, local_accelerators, parse_endpoints, \
    rpc_lib


def serve(endpoint: str, threads: int, cpu_only: bool) -> None:
    lib = rpc_lib()  # first: a build without RPC is one line, whatever else is wrong
    (endpoint,) = parse_endpoints(endpoint)
    try:
        check_reachable(endpoint, timeout=0.5)
    except SweepError:
        pass  # nobody there: the port is free
    else:
        raise SweepError(f"something already listens at {endpoint}: choose another port")
    import llama_cpp

    llama_cpp.llama_backend_init()  # loads and registers the build's backends
    devs = [] if cpu_only else local_accelerators()
    if not devs:
        devs = [libggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)]
    print(f"serving {', '.join(device_info(d).describe() for d in devs)} at {endpoint} with {threads} threads",
          flush=True)
    arr = (ctypes.c_void_p * len(devs))(*devs)
    # Blocks for the life of the server; returns only if the endpoint cannot be bound.
    lib.ggml_backend_rpc_start_server(endpoint.encode(), None, threads, len(devs), arr)
    raise SweepError(f"llama.cpp's RPC server could not listen at {endpoint} (see its message above)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sweep.rpc_server", description=__doc__.split("\n\n")[0])
    p.add_argument("endpoint", help="HOST:PORT to listen on, e.g. 127.0.0.1:50052")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--cpu", action="store_true", help="serve the CPU even when a GPU is present")
    args = p.parse_args(argv)
    if "," in args.endpoint:
        print("error: the server listens at one HOST:PORT (model.rpc lists several servers)", file=sys.stderr)
        sys.exit(2)
    exit_on_user_error(serve, args.endpoint, int(args.threads or available_cores()), args.cpu)


if __name__ == "__main__":
    main()
