"""llama.cpp's RPC backend: devices on other processes or machines (`rpc-server`'s protocol), and where a loaded
model's layers ended up.

A build of llama-cpp-python with `CMAKE_ARGS="-DGGML_RPC=ON"` ships `llama_cpp/lib/libggml-rpc.so`; without it
every function here that needs the library raises a one-line SweepError saying how to rebuild.

llama.cpp aborts the process (GGML_ABORT) when a server cannot be reached or stops answering. Reachability is
therefore checked here with a plain socket before llama.cpp connects, and a server lost mid-decode goes through
ggml's abort callback: the callbacks registered with `on_server_lost` record the failure, the process prints one
line and exits with EXIT_SERVER_LOST instead of dumping core.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp._ggml import libggml

from ..errors import SweepError

REBUILD = ('rebuild llama-cpp-python with the RPC backend: CMAKE_ARGS="-DGGML_RPC=ON" pip install --no-cache-dir '
           f"--force-reinstall --no-deps llama-cpp-python=={getattr(llama_cpp, '__version__', '0.3.36')}")
EXIT_SERVER_LOST = 3
CONNECT_TIMEOUT_S = 5.0
GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU = 0, 1, 2

for _fn, _args, _res in [
    ("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p),
    ("ggml_backend_dev_description", [ctypes.c_void_p], ctypes.c_char_p),
    ("ggml_backend_dev_memory", [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
     None),
    ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
    ("ggml_backend_dev_count", [], ctypes.c_size_t),
    ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
    ("ggml_backend_dev_by_type", [ctypes.c_int], ctypes.c_void_p),
    ("ggml_backend_device_register", [ctypes.c_void_p], None),
    ("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t),
    ("ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    ("ggml_backend_buffer_get_type", [ctypes.c_void_p], ctypes.c_void_p),
    ("ggml_backend_buft_get_device", [ctypes.c_void_p], ctypes.c_void_p),
    ("ggml_backend_buffer_name", [ctypes.c_void_p], ctypes.c_char_p),
]:
    getattr(libggml, _fn).argtypes, getattr(libggml, _fn).restype = _args, _res


# ---- the library -------------------------------------------------------------------------------------------------

_rpc_lib: ctypes.CDLL | None = None


def rpc_library_path() -> Path:
    return Path(llama_cpp.__file__).resolve().parent / "lib" / "libggml-rpc.so"


def rpc_lib() -> ctypes.CDLL:
    """libggml-rpc of the llama_cpp in use (the one libggml already links when built with GGML_RPC)."""
    global _rpc_lib
    if _rpc_lib is None:
        path = rpc_library_path()
        if not path.exists():
            raise SweepError(f"this llama-cpp-python ({path.parent.parent}) was built without the RPC backend "
                             f"(no {path.name}): {REBUILD}")
        lib = ctypes.CDLL(str(path))
        lib.ggml_backend_rpc_add_server.argtypes, lib.ggml_backend_rpc_add_server.restype = [ctypes.c_char_p], \
            ctypes.c_void_p
        lib.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        lib.ggml_backend_rpc_start_server.restype = None
        _rpc_lib = lib
    return _rpc_lib


def has_rpc() -> bool:
    return rpc_library_path().exists()


# ---- endpoints ---------------------------------------------------------------------------------------------------

def parse_endpoints(text: str | None) -> tuple[str, ...]:
    """`model.rpc`: "HOST:PORT[,HOST:PORT...]" -> the endpoints, checked for form (not reachability)."""
    if not text:
        return ()
    out = []
    for part in str(text).split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SweepError(f"model.rpc: {part!r} is not HOST:PORT (e.g. model.rpc=127.0.0.1:50052 or "
                             f"model.rpc=node1:50052,node2:50052)")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise SweepError(f"model.rpc lists an endpoint twice: {text}")
    return tuple(out)


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the server, closed at once: llama.cpp would abort the process if none answers."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise SweepError(f"no RPC server answers at {endpoint} ({e.strerror or e}): start one there with "
                         f"`sweep rpc-server {endpoint}` (or llama.cpp's rpc-server), or fix model.rpc"
                         ) from None


# ---- devices -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    name: str  # ggml's device name: "CPU", "RPC0", "CUDA0", ...
    description: str  # for an RPC device: its endpoint
    free: int  # bytes, as the device reports them
    total: int

    def describe(self) -> str:
        where = f" {self.description}" if self.description and self.description != self.name else ""
        return f"{self.name}{where} ({self.free / 2**20:,.0f} of {self.total / 2**20:,.0f} MiB free)"


def device_info(dev: int) -> Device:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    libggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device((libggml.ggml_backend_dev_name(dev) or b"?").decode(),
                  (libggml.ggml_backend_dev_description(dev) or b"").decode(), int(free.value), int(total.value))


def local_accelerators() -> list[int]:
    """This process's GPU devices (a CUDA build's CUDA0...), in ggml's order; none in a CPU build."""
    devs = (libggml.ggml_backend_dev_get(i) for i in range(libggml.ggml_backend_dev_count()))
    return [d for d in devs if libggml.ggml_backend_dev_type(d) in (GGML_BACKEND_DEVICE_TYPE_GPU,
                                                                    GGML_BACKEND_DEVICE_TYPE_IGPU)]


_connected: dict[str, list[int]] = {}


def rpc_devices(endpoints: tuple[str, ...]) -> list[int]:
    """The devices the servers at `endpoints` offer, registered with ggml (once per process and endpoint)."""
    out = []
    for ep in endpoints:
        if ep not in _connected:
            lib = rpc_lib()  # first: without the RPC build, nothing else matters
            check_reachable(ep)
            install_abort_callback()
            reg = lib.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise SweepError(f"the RPC server at {ep} offers no device")
            devs = [libggml.ggml_backend_reg_dev_get(reg, i) for i in range(libggml.ggml_backend_reg_dev_count(reg))]
            for d in devs:
                libggml.ggml_backend_device_register(d)
            _connected[ep] = devs
        out += _connected[ep]
    return out


def offload_devices(endpoints: tuple[str, ...]) -> ctypes.Array | None:
    """`llama_model_params.devices` for model.rpc: the NULL-terminated list of the servers' devices, then this
    machine's GPUs (registering a device is not enough: llama.cpp offloads only to the devices listed here).
    None (llama.cpp's default: every local GPU) without model.rpc."""
    if not endpoints:
        return None
    devs = rpc_devices(endpoints) + local_accelerators()
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


# ---- where a loaded model lives ----------------------------------------------------------------------------------

def buffer_device(buffer: int) -> int | None:
    """The ggml device holding a buffer. A host buffer type that names no device (the CPU's buffers of weights
    loaded without mmap) is the CPU device's memory."""
    if not buffer:
        return None
    dev = libggml.ggml_backend_buft_get_device(libggml.ggml_backend_buffer_get_type(buffer))
    return dev or libggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU) or None


def device_label(dev: int | None) -> str:
    """"CPU", "CUDA0", or "RPC0[127.0.0.1:50052]" (an RPC device's description is its endpoint)."""
    if dev is None:
        return "host"
    d = device_info(dev)
    return d.name if d.description in ("", d.name) or not d.name.startswith("RPC") else f"{d.name}[{d.description}]"


def placement(weight_buffers: list[tuple[str, int]]) -> dict:
    """Where a loaded model's weights are ((weight name, its buffer) for every tensor): the record's `devices` (each
    device used, with its memory as ggml_backend_dev_memory reports it now) and `layer_devices` (blocks per
    device)."""
    devs = [(name, buffer_device(buf)) for name, buf in weight_buffers]
    labels = {d: device_label(d) for d in {d for _, d in devs}}  # once per device: an RPC device answers remotely
    used = sorted((d for d in labels if d is not None), key=lambda d: labels[d])
    return {"devices": "; ".join(device_info(d).describe() for d in used),
            "layer_devices": layer_map([(name, labels[d]) for name, d in devs])}


def layer_map(weight_devices: list[tuple[str, str]]) -> str:
    """Compact "where each layer ran": runs of blocks on one device, then the weights outside the blocks.
    `weight_devices`: (weight name, device) of every tensor (a block's weights all go to its layer's device)."""
    blocks: dict[int, set[str]] = {}
    other: dict[str, set[str]] = {}
    for name, dev in weight_devices:
        parts = name.split(".")
        if parts[0] == "blk" and parts[1].isdigit():
            blocks.setdefault(int(parts[1]), set()).add(dev)
        else:
            other.setdefault(dev, set()).add(parts[0])
    runs: list[tuple[int, int, str]] = []
    for b in sorted(blocks):
        dev = "+".join(sorted(blocks[b]))
        if runs and runs[-1][2] == dev and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b, dev)
        else:
            runs.append((b, b, dev))
    text = [f"blocks {a}-{b} {d}" if a != b else f"block {a} {d}" for a, b, d in runs]
    text += [f"{','.join(sorted(names))} {dev}" for dev, names in sorted(other.items())]
    return "; ".join(text)


# ---- serving this machine's devices -----------------------------------------------------------------------------

REMOTE_WARNING = ("WARNING: Host ('{host}') is != '127.0.0.1'\n"
                  "         Never expose the RPC server to an open network!\n"
                  "         This is an experimental feature and is not secure!")  # llama.cpp's rpc-server, verbatim


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def serve(endpoint: str, threads: int, cpu_only: bool, allow_remote: bool = False) -> None:
    """Serve this machine's GPUs (or, with none or `cpu_only`, its CPU) at one HOST:PORT until killed. Anything but
    a loopback address needs `allow_remote`: llama.cpp's RPC protocol has no authentication, and a server reached
    from the network runs whatever graph a client sends."""
    if "," in endpoint:
        raise SweepError("the server listens at one HOST:PORT (model.rpc lists several servers)")
    host = endpoint.rpartition(":")[0]
    if not is_loopback(host):
        if not allow_remote:
            raise SweepError(f"{host} is not a loopback address: llama.cpp's RPC server has no authentication, so "
                             f"anyone who reaches {endpoint} can use this machine; serve 127.0.0.1:PORT (reached "
                             f"through an SSH tunnel), or pass --allow-remote on a private network you trust")
        print(REMOTE_WARNING.format(host=host), file=sys.stderr, flush=True)
    lib = rpc_lib()  # a build without RPC is one line, whatever else is wrong
    (endpoint,) = parse_endpoints(endpoint)
    try:
        check_reachable(endpoint, timeout=0.5)
    except SweepError:
        pass  # nobody there: the port is free
    else:
        raise SweepError(f"something already listens at {endpoint}: choose another port")
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


# ---- a server lost mid-decode ------------------------------------------------------------------------------------

_lost_handlers: list[Callable[[str], None]] = []
_ABORT_CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@_ABORT_CB
def _on_abort(message: bytes) -> None:
    text = " ".join((message or b"").decode("utf-8", "replace").split())
    text = re.sub(r"^\S*/(\S+:\d+: )", r"\1", text)  # the build's source path: only the file name and line
    reason = f"llama.cpp aborted: {text}"
    for handler in list(_lost_handlers):
        try:
            handler(reason)
        except BaseException:  # noqa: BLE001 -- the process ends anyway; the message below still goes out
            pass
    hint = (" (the RPC server stopped or cannot be reached: restart it and rerun the same command; finished points "
            "are kept and this one is retried)") if "RPC" in text or "connect" in text.lower() else ""
    print(f"error: {reason}{hint}", file=sys.stderr, flush=True)
    os._exit(EXIT_SERVER_LOST)


_abort_installed = False


def install_abort_callback() -> None:
    global _abort_installed
    if not _abort_installed:
        libggml.ggml_set_abort_callback.argtypes, libggml.ggml_set_abort_callback.restype = [_ABORT_CB], ctypes.c_void_p
        libggml.ggml_set_abort_callback(_on_abort)
        _abort_installed = True


@contextlib.contextmanager
def on_server_lost(handler: Callable[[str], None]) -> Iterator[None]:
    """While inside: if llama.cpp aborts (an RPC server lost mid-decode), `handler(reason)` runs before the process
    exits -- e.g. to record the point as failed, so that the rerun retries it."""
    _lost_handlers.append(handler)
    try:
        yield
    finally:
        _lost_handlers.remove(handler)
