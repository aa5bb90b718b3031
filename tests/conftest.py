from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sweep.llama.model_file import embedded_model_path
from sweep.pipeline.config import compose
from sweep.pipeline.settings import job_settings
from sweep.scoring.text import embedded_text_path
from sweep.testing.tiny_model import write_tiny_model

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


def make_settings(*args, **kw):
    """The settings of a job of `make_cfg(...)` (sweep/pipeline/settings.py): what open_reference takes."""
    return job_settings(make_cfg(*args, **kw))


@pytest.fixture
def env(cache_dir):
    """Environment of a `python -m sweep` subprocess: the text by default (the embedded one), and a cache inside the
    test's tmp."""
    return {**os.environ, "SWEEP_CACHE": str(cache_dir)}


# ---- tiers: a plain `python -m pytest` runs on any machine; what needs more is left out, and said so ---------------

# marker -> (what its tests need, the command that runs them); .ci/run runs every tier.
TIERS = {
    "slow": ("the longest tests: real-model checks and whole sweeps", "python -m pytest -m slow"),
    "slurm": ("root and Debian's SLURM packages", "python -m pytest -m slurm"),
    "rpc": ("an RPC build of llama-cpp-python", ".venv-rpc/bin/python -m pytest -m rpc tests/test_rpc.py"),
}


def _rpc_build() -> bool:
    from sweep.llama.rpc import has_rpc
    return has_rpc()


def _left_out(tier: str, markexpr: str, rpc_build: bool) -> bool:
    """Without -m every tier is left out. Without an RPC build the `rpc` tests are also left out of any -m that does
    not name them; asked for with `-m rpc`, they fail with the line saying which build to use."""
    if not markexpr:
        return True
    return tier == "rpc" and not rpc_build and "rpc" not in markexpr.replace("not rpc", "")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr") or ""
    rpc_build = _rpc_build()
    left_out = {}
    for item in items:
        tier = next((name for name in TIERS if item.get_closest_marker(name)), None)
        if tier and _left_out(tier, markexpr, rpc_build):
            left_out.setdefault(tier, []).append(item)
    if left_out:
        dropped = {id(item) for tier_items in left_out.values() for item in tier_items}
        items[:] = [item for item in items if id(item) not in dropped]
        config.hook.pytest_deselected(items=[item for tier_items in left_out.values() for item in tier_items])
    config._tiers_left_out = {tier: len(tier_items) for tier, tier_items in left_out.items()}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line: each tier left out, what it needs and its command (they never pass silently)."""
    left_out = getattr(config, "_tiers_left_out", {})
    if left_out:
        tiers = "; ".join(f"{n} {tier} ({TIERS[tier][0]}): {TIERS[tier][1]}" for tier, n in left_out.items())
        terminalreporter.write_line(f"deselected tiers -- {tiers}; every tier: bash .ci/run", yellow=True)
