"""Bad input is one clear line and a non-zero exit with nothing written; run-time faults are recorded and survived."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings
from gguf import GGUFWriter
from test_sweep import ROOT, read_table, run_sweep, tiny_args

from sweep.llama.model_file import resolve_model_path
from sweep.pipeline.point import describe, record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.targets import resolve
from sweep.scoring.perplexity import score


def unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits: only a path the kernel refuses will do
        return Path("/proc/1/sweep-runs")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return d / "runs"


def bad_inputs(tmp_path: Path, tiny_model: Path) -> dict[str, tuple[list[str], dict, str]]:
    """name -> (overrides, extra env, expected message)"""
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 3])
    cut = tmp_path / "cut.gguf"  # the header whole, the last tensor's data short: a download that stopped
    cut.write_bytes(tiny_model.read_bytes()[:-1000])
    alien = tmp_path / "alien.gguf"
    w = GGUFWriter(alien, "martian")
    w.add_block_count(2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text , far fewer than two windows need .\n" * 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    model = f"model.path={tiny_model}"
    return {
        "missing model": (["model.path=/models/nope.gguf"], {}, "model file not found: /models/nope.gguf"),
        "not GGUF": ([f"model.path={not_gguf}"], {}, "not a GGUF file (starts with b'hell'"),
        "truncated GGUF": ([f"model.path={truncated}"], {}, "cannot read GGUF file"),
        "GGUF cut in its data": ([f"model.path={cut}"], {}, "bytes but its tensors end at byte"),
        "unloadable architecture": ([f"model.path={alien}"], {}, "llama.cpp cannot load"),
        "layer out of range": ([model, "layer=3"], {}, "layer 3 is out of range: the model has 3 blocks"),
        "unknown tensor": ([model, "layer=0", "kind=weight", "tensor=fnn_norm"], {}, "unknown weight tensor"),
        "unknown node": ([model, "layer=0", "kind=activation", "tensor=ffn_sum"], {}, "graph has no node"),
        "unknown format": ([model, "layer=0", "fmt=bf8"], {}, "Could not find 'fmt/bf8'"),
        "bad format parameter": ([model, "layer=0", "fmt=int4", "fmt.group_size=0"], {}, "bad group_size 0"),
        "text too short": ([model, "layer=0", f"data.path={short}"], {}, "2 windows of data.n_ctx=64 need 128"),
        "empty text": ([model, "layer=0", f"data.path={empty}"], {}, "text file is empty"),
        "hub unreachable": ([model, "layer=0", "data.path=hub"], {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                            "leave data.path unset for the embedded copy of the same text"),
        "unwritable runs dir": ([model, "layer=0", f"run.store={unwritable_dir(tmp_path)}"], {}, "cannot write to"),
        "unwritable sweep dir": ([model, "layer=0", "hydra.sweep.dir=/proc/nope"], {}, "cannot write to /proc/nope"),
    }


CASES = ["missing model", "not GGUF", "truncated GGUF", "GGUF cut in its data", "unloadable architecture",
         "layer out of range", "unknown tensor", "unknown node", "unknown format", "bad format parameter",
         "text too short", "empty text", "hub unreachable", "unwritable runs dir", "unwritable sweep dir"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_nonzero_exit_and_nothing_written(case, tmp_path, tiny_model, env):
    overrides, extra_env, message = bad_inputs(tmp_path, tiny_model)[case]
    args = tiny_args(tiny_model, tmp_path, *overrides)
    if case == "unwritable sweep dir":  # the case's own sweep dir replaces the test's
        args = [a for a in args if a != f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_sweep(args, {**env, **extra_env}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "store").exists()


def test_score_command_has_the_same_one_line_errors(tmp_path, env):
    proc = subprocess.run([sys.executable, "-m", "sweep.commands.score_model", "model.path=/models/nope.gguf"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: model file not found: /models/nope.gguf (set model.path=/path/to/model.gguf)"


class NaNFormat:
    """A perturbation that plants one NaN: llama.cpp's logits turn non-finite downstream."""

    label = "nan-debug"
    recipe = None  # not a recipe (sweep.quant.formats.Format's field)

    def __call__(self, x):
        y = np.array(x, dtype=np.float32)
        y.flat[17] = np.nan
        return y


def test_non_finite_logits_are_recorded_as_diverged_and_the_model_stays_usable(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 4, "f32", cache_dir))
    target = resolve("activation", "ffn_out", 1, ref.info, ref.backend.nodes)
    before = score(ref.backend, ref.windows, progress=False).nll
    out = run_point(ref, target, NaNFormat(), progress=False)
    rec = record(ref, target, NaNFormat(), out)
    assert rec["status"] == "diverged" and rec["reason"] == "non-finite logits in window 0 at position 32"
    assert "DIVERGED" in describe(rec) and rec["delta_ppl"] == float("inf")
    # usable: the same model, unperturbed, scores exactly what it scored before the divergence
    np.testing.assert_array_equal(score(ref.backend, ref.windows, progress=False).nll, before)


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tiny_model, tmp_path, env):
    # int4 needs rows divisible by its group: a 64-wide activation with group_size=48 fails at run time,
    # after validation, in the activation points only.
    proc = run_sweep(tiny_args(tiny_model, tmp_path, "layer=0,1", "fmt=int4", "fmt.group_size=48",
                               "kind=activation", "tensor=ffn_norm"), env)
    df = read_table(tmp_path / "sweep")
    assert list(df["status"]) == ["failed", "failed"]
    assert df["reason"].str.contains("not divisible by group_size 48").all()
    assert "FAILED" in proc.stdout


@pytest.mark.slow
def test_two_sweeps_into_the_same_runs_dir_at_once(tiny_model, tmp_path, env):
    common = ["data.n_windows=6", "kind=activation", "tensor=l_out", f"run.store={tmp_path / 'store'}"]
    grids = [["layer=0,1,2", "fmt=bf16,int8"], ["layer=1,2", "fmt=int8,fp16"]]  # they share two points
    results = {}

    def go(i):
        args = [f"model.path={tiny_model}", "data.n_ctx=64", "run.progress=false", *common, *grids[i],
                f"hydra.sweep.dir={tmp_path / f'sweep{i}'}"]
        results[i] = subprocess.run([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r.returncode == 0 for r in results.values()), [r.stderr[-2000:] for r in results.values()]
    a, b = read_table(tmp_path / "sweep0"), read_table(tmp_path / "sweep1")
    assert len(a) == 6 and len(b) == 4 and a["key"].is_unique and b["key"].is_unique
    shared = a.merge(b, on="key", suffixes=("_a", "_b"))
    assert len(shared) == 2 and (shared["ppl_a"] == shared["ppl_b"]).all()
    assert len(list((tmp_path / "store" / "points").glob("*.json"))) == 8
    assert not list((tmp_path / "store").rglob("*.tmp"))


def test_sweep_dir_carries_the_launching_process_id():
    from hydra import compose, initialize_config_dir

    from sweep.pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        assert cfg.hydra.sweep.dir.endswith(f"_{os.getpid()}")


@pytest.mark.slow
def test_model_file_unchanged_by_every_kind_of_run(tiny_model, tmp_path, env):
    before = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    for container in ("f32", "native"):
        run_sweep(tiny_args(tiny_model, tmp_path, "layer=0,2", "fmt=int8,zero", "kind=weight,activation",
                            "tensor=ffn_norm", f"model.container={container}", sweep_dir=f"s-{container}"), env)
    run_sweep(tiny_args(tiny_model, tmp_path, "layer=null", "fmt=int4", "kind=weight", "tensor=token_embd",
                        "model.container=native", sweep_dir="s-embd"), env)
    assert hashlib.sha256(tiny_model.read_bytes()).hexdigest() == before
    assert resolve_model_path(tiny_model) == tiny_model.resolve()


@pytest.mark.slow
def test_kill_9_of_a_joblib_sweep_then_rerun(tiny_model, tmp_path, env):
    import signal
    import time

    axes = ["layer=0,1,2", "fmt=bf16,int8,fp16,int4", "kind=activation", "tensor=l_out", "data.n_windows=40",
            "hydra/launcher=parallel"]
    points = tmp_path / "store" / "points"
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *tiny_args(tiny_model, tmp_path, *axes)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not points.exists() or len(list(points.glob("*.json"))) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # loky workers notice their parent is gone
    before = len(list(points.glob("*.json")))
    assert 3 <= before < 12
    for p in points.glob("*.json"):
        assert json.loads(p.read_text())["status"] == "ok"  # every visible record is complete
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, sweep_dir="rerun"), env)
    df = read_table(tmp_path / "rerun")
    assert len(df) == 12 and df["key"].is_unique and set(df["status"]) == {"ok"}
    assert len(list(points.glob("*.json"))) == 12



def test_the_rpc_server_binds_to_loopback_unless_told_otherwise(env, monkeypatch, capsys):
    """llama.cpp's RPC protocol has no authentication: any other address is one line and exit 2 without
    --allow-remote, and with it llama.cpp's own warning is printed before anything is served."""
    proc = subprocess.run([sys.executable, "-m", "sweep.commands.rpc_server", "0.0.0.0:50052"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: 0.0.0.0 is not a loopback address: llama.cpp's RPC server has no "
                               "authentication") and "--allow-remote" in lines[0]
    from sweep.llama import rpc
    assert rpc.is_loopback("127.0.0.1") and rpc.is_loopback("127.3.2.1") and rpc.is_loopback("[::1]")
    assert rpc.is_loopback("localhost") and not rpc.is_loopback("0.0.0.0") and not rpc.is_loopback("gpu-node-3")

    def stop(*_):  # stands where the server would start: nothing is bound in this test
        raise rpc.SweepError("stopped before serving")
    monkeypatch.setattr(rpc, "rpc_lib", stop)
    with pytest.raises(rpc.SweepError, match="stopped before serving"):
        rpc.serve("0.0.0.0:50052", 1, True, allow_remote=True)
    assert "Never expose the RPC server to an open network!" in capsys.readouterr().err


def test_an_unreadable_record_is_said_and_computed_again(tiny_model, tmp_path, env):
    args = tiny_args(tiny_model, tmp_path, "layer=1", "kind=weight", "tensor=ffn_down", "fmt=int8",
                     "metrics.generate=false")
    run_sweep(args, env)
    (record,) = (tmp_path / "store" / "points").glob("*.json")
    record.write_text(record.read_text()[:100])  # truncated, as by a full disk
    proc = run_sweep([*args, f"hydra.sweep.dir={tmp_path / 'again'}"], env)
    said = [line for line in proc.stderr.splitlines() if "cannot be read" in line]
    assert len(said) == 1 and said[0].endswith("): its point is computed again"), proc.stderr  # once, in one line
    assert said[0].startswith(f"warning: the stored record {record} cannot be read (not JSON: Unterminated string")
    assert json.loads(record.read_text())["status"] == "ok"
