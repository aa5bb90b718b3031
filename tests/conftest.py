from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from tiny_model import write_tiny_model

from sweep.config import compose
from sweep.llama.model_file import embedded_model_path
from sweep.scoring.text import embedded_text_path

# The tests score the embedded text whatever the shell sets: their expected figures are that text's.
os.environ.pop("SWEEP_WIKITEXT", None)


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """The embedded WikiText-2 test split, as a file (the package's own copy: no network, no sibling folder)."""
    return embedded_text_path()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session", autouse=True)
def embedded_model_is_never_written(smollm2):
    """Every test session ends by checking the user's (here: the embedded) model file byte for byte."""
    before = hashlib.sha256(smollm2.read_bytes()).hexdigest()
    yield
    assert hashlib.sha256(smollm2.read_bytes()).hexdigest() == before, f"{smollm2} was modified"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf", smollm2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Containers built by tests go here, never into the user's cache."""
    return tmp_path_factory.mktemp("cache")


def make_cfg(model: Path | None, text: Path, n_ctx: int, n_windows: int, container: str = "f32",
             cache_dir: Path | None = None, *overrides: str):
    """The configuration `python -m sweep` composes for these settings (the real conf/, through Hydra)."""
    return compose([f"model.path={model}" if model else "model.path=null", f"model.container={container}",
                    f"model.cache_dir={cache_dir}" if cache_dir else "model.cache_dir=null", f"data.path={text}",
                    f"data.n_ctx={n_ctx}", f"data.n_windows={n_windows}", "run.threads=2", "run.progress=false",
                    *overrides])


@pytest.fixture
def env(cache_dir):
    """Environment of a `python -m sweep` subprocess: the text by default (the embedded one), and a cache inside the
    test's tmp."""
    return {**os.environ, "SWEEP_CACHE": str(cache_dir)}


# ---- the RPC tests (tests/test_rpc.py) need an RPC build ----------------------------------------------------------

def _rpc_build() -> bool:
    from sweep.llama.rpc import has_rpc
    return has_rpc()


def pytest_collection_modifyitems(config, items):
    """Without an RPC build the `rpc` tests are deselected -- unless asked for with `-m rpc`, where they fail with the
    line saying which build to use -- and the summary says so: they never pass silently."""
    if _rpc_build() or "rpc" in (config.getoption("markexpr") or "").replace("not rpc", ""):
        return
    rpc = [item for item in items if item.get_closest_marker("rpc")]
    if rpc:
        items[:] = [item for item in items if not item.get_closest_marker("rpc")]
        config.hook.pytest_deselected(items=rpc)
        config._rpc_deselected = len(rpc)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_rpc_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} RPC tests deselected: this llama-cpp-python has no RPC backend; run them "
                                    f"with .venv-rpc/bin/python -m pytest -m rpc tests/test_rpc.py (see .ci/run)",
                                    yellow=True)
