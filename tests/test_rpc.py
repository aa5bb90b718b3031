"""llama.cpp's RPC backend: a real server process (`sweep rpc-server`) on 127.0.0.1 holds the offloaded
layers' weights and activations, and every read or write of them crosses a socket.

These tests need llama-cpp-python built with CMAKE_ARGS="-DGGML_RPC=ON" (.ci/run builds it in .venv-rpc):
    .venv-rpc/bin/python -m pytest -m rpc tests/test_rpc.py
Without it they are deselected, and said so (conftest.py); asked for explicitly, they fail with that line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg

from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings, f32_container
from sweep.llama.rpc import has_rpc
from sweep.pipeline.job import job_key, run_job
from sweep.pipeline.session import Sessions
from sweep.pipeline.settings import job_settings

pytestmark = pytest.mark.rpc
ROOT = Path(__file__).resolve().parents[1]
NEEDS_RPC = ("these tests need llama-cpp-python built with the RPC backend: run them with .venv-rpc/bin/python "
             "-m pytest -m rpc tests/test_rpc.py (.ci/run builds .venv-rpc with CMAKE_ARGS=-DGGML_RPC=ON)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sweep rpc-server` in its own process, stopped by its PID."""

    def __init__(self, log: Path, port: int | None = None):
        self.endpoint = f"127.0.0.1:{port or free_port()}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "sweep.commands.rpc_server", self.endpoint,
                                      "--threads", "1"], cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        host, port_s = self.endpoint.split(":")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the RPC server exited: {log.read_text()[-2000:]}"
            try:
                socket.create_connection((host, int(port_s)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"the RPC server did not listen at {self.endpoint} within 60 s: {log.read_text()[-2000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not has_rpc():
        pytest.fail(NEEDS_RPC)
    s = Server(tmp_path_factory.mktemp("rpc") / "server.log")
    yield s
    s.stop()


def rpc_args(server) -> list[str]:
    return [f"model.rpc={server.endpoint}", "model.n_gpu_layers=-1"]


def job(tiny_model, wikitext, cache_dir, store, container, kind, tensor, layer, fmt, *extra):
    cfg = make_cfg(tiny_model, wikitext, 64, 3, container, cache_dir, f"kind={kind}", f"tensor={tensor}",
                   f"layer={layer}", f"fmt={fmt}", f"run.store={store}", "metrics.generate=false", *extra)
    with Sessions() as sessions:
        return cfg, run_job(cfg, sessions)


# ---- the device ---------------------------------------------------------------------------------------------------

def test_every_layer_goes_to_the_server_and_decodes_as_on_the_cpu(server, tiny_model, cache_dir):
    f32 = f32_container(tiny_model, cache_dir)
    tokens = np.arange(1, 61, dtype=np.int32) * 7 % 500
    mask = np.ones(len(tokens), dtype=np.int8)
    with Backend(f32, 64, 2, settings=compute_settings("f32")) as cpu:
        on_cpu = cpu.decode_window(tokens, mask).copy()
        assert cpu.placement()["layer_devices"].startswith("blocks 0-2 CPU")
    with Backend(f32, 64, 2, settings=compute_settings("f32", -1, server.endpoint)) as remote:
        on_rpc = remote.decode_window(tokens, mask).copy()
        where = remote.placement()
    dev = f"RPC0[{server.endpoint}]" if "RPC0" in where["layer_devices"] else "RPC"
    assert where["layer_devices"].startswith(f"blocks 0-2 {dev}"), where
    assert server.endpoint in where["devices"] and "MiB free" in where["devices"], where
    assert np.array_equal(on_cpu, on_rpc)  # bit for bit


def test_partial_offload_puts_the_last_blocks_on_the_server(server, tiny_model, cache_dir):
    # llama.cpp offloads the last n_gpu_layers layers (the output layer counts as one): 2 = block 2 and the output
    with Backend(f32_container(tiny_model, cache_dir), 64, 2,
                 settings=compute_settings("f32", 2, server.endpoint)) as b:
        layers = b.placement()["layer_devices"]
    assert layers.startswith("blocks 0-1 CPU; block 2 RPC"), layers


# ---- points: CPU vs RPC ---------------------------------------------------------------------------------------------

SAME = ["ppl", "baseline_ppl", "delta_nll", "kld_mean", "top1_agree", "window_dnll", "window_kld", "window_top1",
        "hook_calls", "n_changed", "n_elements"]


@pytest.mark.parametrize("container, kind, tensor, fmt", [
    ("f32", "weight", "ffn_down", "int8"),
    ("native", "weight", "ffn_down", "int8"),  # kept Q4_1 on the server, (fmt(W) - W)·x added through the callback
    ("f32", "activation", "ffn_out", "int8"),
    ("native", "activation", "l_out", "bf16"),
    ("f32", "weight", "ffn_down", "q4_K"),  # a GGUF type, through ggml's own quantizer
])
def test_a_point_on_the_server_is_the_cpu_point_bit_for_bit(server, tiny_model, wikitext, cache_dir, tmp_path,
                                                             container, kind, tensor, fmt):
    store = tmp_path / "store"
    args = (tiny_model, wikitext, cache_dir, store, container, kind, tensor, 1, fmt)
    cfg_cpu, cpu = job(*args)
    cfg_rpc, rpc = job(*args, *rpc_args(server))
    assert cpu["status"] == rpc["status"] == "ok", (cpu.get("reason"), rpc.get("reason"))
    assert rpc["hook_calls"] == (3 if kind == "activation" else 1) and rpc["n_changed"] > 0
    assert {k: cpu[k] for k in SAME} == {k: rpc[k] for k in SAME}
    assert rpc["rpc"] == server.endpoint and "rpc" not in cpu
    assert rpc["layer_devices"].startswith("blocks 0-2 RPC") and cpu["layer_devices"].startswith("blocks 0-2 CPU")
    # keyed by the backend: two points and two baselines in one store, never one for both
    assert cpu["key"] != rpc["key"]
    assert len(list((store / "baselines").glob("*.npz"))) == 2
    assert job_key(job_settings(cfg_rpc), cpu["model_sha256"], cpu["data_sha256"], (1,), ()) == rpc["key"]


def test_a_tied_embedding_is_perturbed_in_both_of_its_copies(server, tiny_model, wikitext, cache_dir, tmp_path):
    # the output layer offloaded, llama.cpp loads token_embd.weight twice: for the input (CPU) and for the output
    # (the server); a weight point must round both, or its numbers would not be the CPU's
    with Backend(f32_container(tiny_model, cache_dir), 64, 2, writable_weights=True,
                 settings=compute_settings("f32", -1, server.endpoint)) as b:
        assert b.weight_copies("token_embd.weight") == 2
        layers = b.placement()["layer_devices"]
    assert "token_embd CPU" in layers and "token_embd RPC" in layers, layers
    args = (tiny_model, wikitext, cache_dir, tmp_path / "store", "f32", "weight", "token_embd", "null", "int8")
    _, cpu = job(*args)
    _, rpc = job(*args, *rpc_args(server))
    assert cpu["status"] == rpc["status"] == "ok" and rpc["n_changed"] > 0
    assert {k: cpu[k] for k in SAME} == {k: rpc[k] for k in SAME}


# ---- a server that is not there, or dies ------------------------------------------------------------------------

def run_sweep(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def sweep_args(tiny_model, tmp_path, endpoint, *axes, n_windows=3, sweep_dir="sweep"):
    return [f"model.path={tiny_model}", "data.n_ctx=64", f"data.n_windows={n_windows}", "run.progress=false",
            f"run.store={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / sweep_dir}", "metrics.generate=false",
            f"model.rpc={endpoint}", "model.n_gpu_layers=-1", *axes]


def test_no_server_is_one_line_before_any_job(tiny_model, tmp_path, env):
    if not has_rpc():
        pytest.fail(NEEDS_RPC)
    proc = run_sweep(sweep_args(tiny_model, tmp_path, f"127.0.0.1:{free_port()}", "layer=0"), env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no RPC server answers at 127.0.0.1:") and "sweep rpc-server" in lines[0]
    assert not (tmp_path / "store").exists() and not (tmp_path / "sweep").exists()


def test_plan_says_where_each_layer_runs(server, tiny_model, tmp_path, env):
    proc = run_sweep(sweep_args(tiny_model, tmp_path, server.endpoint, "layer=0", "kind=weight") + ["--plan"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  layers      blocks 0-2 RPC" in proc.stdout and f"[{server.endpoint}]" in proc.stdout, proc.stdout
    assert "  devices     " in proc.stdout and "MiB free" in proc.stdout


def test_a_server_lost_mid_sweep_fails_the_point_and_the_rerun_resumes(tiny_model, tmp_path, env):
    if not has_rpc():
        pytest.fail(NEEDS_RPC)
    port = free_port()
    own = Server(tmp_path / "server.log", port)
    axes = ["layer=0,1,2", "kind=activation", "tensor=l_out", "fmt=bf16,int8,fp16"]
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *sweep_args(tiny_model, tmp_path, own.endpoint, *axes,
                                                                         n_windows=8)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        while first and not first.startswith(("[ok]", "[no-op]", "[failed]", "[diverged]")):  # not Hydra's log
            first = proc.stdout.readline()
        # the first point's line: the second one is running now
        own.stop(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        own.stop(signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    assert first.startswith("[ok]"), (first, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 3, err[-3000:]
    assert last.startswith("error: llama.cpp aborted:") and "RPC server" in last and "rerun" in last, last
    records = [json.loads(p.read_text()) for p in (tmp_path / "store" / "points").glob("*.json")]
    status = sorted(r["status"] for r in records)
    assert status == ["failed", "ok"], status  # the point that was running failed, with the reason
    failed = next(r for r in records if r["status"] == "failed")
    assert "llama.cpp aborted" in failed["reason"]
    assert not list((tmp_path / "store").rglob("*.part")) and not list((tmp_path / "store").rglob("*.tmp*"))
    # the server back on the same endpoint: the finished point is kept, the failed one and the rest computed
    again = Server(tmp_path / "server.log", port)
    try:
        rerun = run_sweep(sweep_args(tiny_model, tmp_path, again.endpoint, *axes, n_windows=8, sweep_dir="sweep2"),
                          env)
    finally:
        again.stop()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("already done") == 1
    assert rerun.stdout.count("[ok]") == 9
