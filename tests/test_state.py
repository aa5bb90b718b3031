"""No module-level mutable state in the package: what a run computes belongs to a `session.Session` (or to the
call), never to a module. Constants and registries may be module-level containers, so the check is twofold:
statically, nothing at module level is a cache, a pool or a global that code rebinds, except the few listed below
with the reason; dynamically, running real points in-process leaves every module-level container as it was."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
from conftest import make_settings

import sweep
from sweep.files import file_memo
from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.store.record import write_record
from sweep.store.records import Store, gather

# (module, name) -> why it is allowed to live at module level
ALLOWED = {
    ("sweep.llama.backend", "_recent_errors"): "llama.cpp's log callback is process-wide: the last errors it reported",
    ("sweep.llama.backend", "_initialised"): "llama_backend_init runs once per process",
    ("sweep.llama.rpc", "_rpc_lib"): "the RPC backend's library, loaded once per process like libggml itself",
    ("sweep.llama.backend", "_blas"): "numpy's BLAS libraries (threadpoolctl's handle), process-wide like the "
                                      "libraries themselves",
    ("sweep.llama.rpc", "_abort_installed"): "ggml's abort callback is process-wide: installed once per process",
}


def modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(sweep.__path__, "sweep.")
            if not m.name.endswith("__main__")]


def test_no_module_caches_pools_or_rebound_globals():
    found = []
    for mod in modules():
        source = Path(mod.__file__).read_text()
        for name, value in vars(mod).items():
            if getattr(value, "__module__", mod.__name__) != mod.__name__ and not isinstance(value, (dict, list, set)):
                continue  # imported from elsewhere: checked in its own module
            if hasattr(value, "file_memo"):
                continue  # sweep.files.file_memo: a pure memo of what a file holds, keyed by its identity and mtime
            cached = hasattr(value, "cache_info")  # functools.cache / lru_cache
            if cached or isinstance(value, (Executor, np.ndarray)):
                found.append((mod.__name__, name))
        for name in re.findall(r"^\s+global\s+(\w+)", source, re.M):
            found.append((mod.__name__, name))
        if re.search(r"^\S.*os\.umask\(", source, re.M):  # changing process state at import
            found.append((mod.__name__, "os.umask at import"))
    unexplained = sorted(set(found) - set(ALLOWED))
    assert not unexplained, f"module-level state (give it an owner, or explain it in ALLOWED): {unexplained}"
    gone = sorted(set(ALLOWED) - set(found) - {("sweep.llama.backend", "_recent_errors")})  # a deque: seen dynamically
    assert not gone, f"ALLOWED lists state that no longer exists: {gone}"


def container_globals() -> dict[tuple[str, str], str]:
    return {(mod.__name__, name): repr(value) for mod in modules() for name, value in vars(mod).items()
            if isinstance(value, (dict, list, set)) and (mod.__name__, name) not in ALLOWED}


def test_running_points_leaves_every_module_level_container_unchanged(tiny_model, wikitext, cache_dir, tmp_path):
    before = container_globals()
    assert before  # the registries are seen
    store = Store(tmp_path / "store")
    cfg = make_settings(tiny_model, wikitext, 64, 2, "f32", cache_dir)
    with open_reference(cfg) as ref:
        for kind, tensor, fmt, logits in (("weight", "ffn_up", "int8", "store"),
                                          ("activation", "l_out", "bf16", "recompute")):
            target = resolve(kind, tensor, 1, ref.info, ref.backend.nodes)
            out = run_point(ref, target, make_format(fmt), progress=False, store=store,
                            prompts=("Hello",), max_new_tokens=4, baseline_logits=logits)
            rec = record(ref, target, make_format(fmt), out)
            write_record(tmp_path / "sweep" / kind / "record.json", rec.update(key=kind, started_at=0, finished_at=0))
    assert len(gather([tmp_path / "sweep"])) == 2
    assert container_globals() == before


def test_a_closed_reference_keeps_nothing(tiny_model, wikitext, cache_dir, tmp_path):
    """Closing a reference closes its model; a new one computes (or reads from the store) its baseline afresh."""
    cfg = make_settings(tiny_model, wikitext, 64, 2, "f32", cache_dir)
    target_args = ("weight", "ffn_up", 1)
    with open_reference(cfg) as ref:
        out = run_point(ref, resolve(*target_args, ref.info), make_format("int8"), progress=False)
        first_baseline = out.baseline
    assert ref.backend.closed
    with open_reference(cfg) as again:
        out = run_point(again, resolve(*target_args, again.info), make_format("int8"), progress=False)
    assert out.baseline is not first_baseline  # not served from the closed session
    np.testing.assert_array_equal(out.baseline.nll, first_baseline.nll)


def test_a_file_memo_reads_the_file_again_once_it_changed(tmp_path):
    """file_memo: one read per unchanged file; a new size or a new mtime reads it again; a missing file is not
    memoised."""
    reads = []

    @file_memo(maxsize=4)
    def words(path: Path) -> list[str]:
        reads.append(path)
        return path.read_text().split()

    f = tmp_path / "f.txt"
    f.write_text("a b")
    assert words(f) == ["a", "b"] and words(str(f)) == ["a", "b"] and len(reads) == 1  # not before it changes
    f.write_text("a b c")  # a new size
    assert words(f) == ["a", "b", "c"] and len(reads) == 2
    st = f.stat()
    f.write_text("x y z")  # the same size, a new mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert words(f) == ["x", "y", "z"] and len(reads) == 3
    assert words(f) == ["x", "y", "z"] and len(reads) == 3
    missing = tmp_path / "missing.txt"
    for _ in range(2):
        try:
            words(missing)
        except FileNotFoundError:
            pass
    assert reads[-2:] == [missing, missing]  # tried each time: the function says what is wrong
