"""Whether llama.cpp can run a stage file at all, found out before the sweep's own process loads it.

Some stages make llama.cpp stop the whole process (GGML_ASSERT aborts; Python cannot catch them) while it builds
the stage's cache. Two guards, so that such a stage becomes a recorded fallback and never the death of a sweep:
  * `stage_refusal`: the preconditions read from the model's metadata, checked before a stage is planned or written.
    The one known in this llama.cpp (src/llama-model.cpp, `llama_model::create_memory`): an architecture with
    sliding-window attention (gemma2, gemma3, cohere2, ...) needs at least one sliding-window block
    (`GGML_ASSERT(hparams.is_swa_any())`), so a gemma3 stage holding only its last, global block aborts.
  * `probe_stage`: whatever cannot be read from the metadata, found by loading the stage once in a child process
    (`python -m sweep.llama.stage_check FILE ...`) and decoding a few rows from embeddings; an abort there ends
    the child only, and its last line of llama.cpp's output becomes the reason. The verdict is kept beside the
    stage file (`<stage>.gguf.probe.json`), so a stage file is probed once, not once per sweep.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .backend import ComputeSettings
from .cache import probe_file
from .embd import EmbeddingBackend
from .model_file import header
from .stage_file import effective_swa_pattern

PROBE_TIMEOUT_S = 600  # a load that takes longer is not worth waiting for: the points decode the full model


def sliding_layers(path: Path) -> list[bool] | None:
    """Per block, whether llama.cpp gives it sliding-window attention (the file's per-layer array, else the
    architecture's built-in period), or None for a model without sliding windows."""
    from gguf import Keys

    h = header(path)
    arch = h.meta[Keys.General.ARCHITECTURE]
    n_layers = int(h.meta[Keys.LLM.BLOCK_COUNT.format(arch=arch)])
    pattern = h.meta.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if isinstance(pattern, list):
        flags = [bool(v) for v in pattern]
        return flags if len(flags) == n_layers else None
    scalars = {k: v for k, v in h.meta.items() if k not in h.array_lengths}
    return effective_swa_pattern(arch, n_layers, scalars)


def stage_refusal(path: Path, start: int) -> str | None:
    """Why llama.cpp would stop the process on the stage of `path` that starts at block `start` (read from the
    metadata of `path`, the loaded model), or None when nothing known forbids it."""
    flags = sliding_layers(path)
    if flags and any(flags) and not any(flags[start:]):
        last = len(flags) - 1
        blocks = f"block {start}" if start == last else f"blocks {start}..{last}"
        return (f"stage {start} would hold only global-attention blocks ({blocks}): llama.cpp cannot build the cache "
                f"of a sliding-window model without a sliding-window block (it aborts in create_memory)")
    return None


def probe_stage(path: Path, n_ctx: int, threads: int, settings: ComputeSettings) -> str | None:
    """None when a child process loads the stage file with these settings and decodes from embeddings; else why
    not, in one line. Kept beside the file for the same file (size, mtime) and settings.

    The child runs on the CPU whatever the sweep's devices (the same cache type and flash attention): this process
    holds the GPU's memory, and an RPC server serves one client at a time -- a child connecting to the servers this
    process holds would wait for ever. What the probe guards against (llama.cpp's asserts while it builds the
    model's cache) does not depend on the device."""
    settings = ComputeSettings(settings.kv_type, settings.flash_attn, 0, ())
    memo = probe_file(path)
    st = path.stat()
    ident = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "n_ctx": n_ctx, "settings": settings.as_dict()}
    try:
        kept = json.loads(memo.read_text())
        if kept.get("ident") == ident:
            return kept["verdict"]
    except (OSError, ValueError, KeyError):
        pass
    cmd = [sys.executable, "-m", "sweep.llama.stage_check", str(path), str(n_ctx), str(threads),
           json.dumps(settings.as_dict())]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"loading stage file {path.name} in a child process took more than {PROBE_TIMEOUT_S} s"
    verdict = None if r.returncode == 0 else _why(path, r)
    try:
        atomic_write_bytes(memo, json.dumps({"ident": ident, "verdict": verdict}).encode())
    except OSError:
        pass  # a read-only cache: probed again next time
    return verdict


def _why(path: Path, r: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (r.stderr or "").splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "GGML_ASSERT" in line or "error" in line.lower()),
                lines[-1] if lines else "no output")
    how = (f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}")
    return f"llama.cpp stopped loading stage file {path.name} in a child process ({how}): {said[:300]}"


def main(argv: list[str] | None = None) -> int:
    """The child: load the stage as a sweep would and decode a few rows of zeros from embeddings."""
    path, n_ctx, threads, settings = (argv if argv is not None else sys.argv[1:])
    kw = json.loads(settings)
    rpc = tuple(s for s in kw.get("rpc", "").split(",") if s)
    cs = ComputeSettings(kw["kv_type"], kw["flash_attn"], int(kw["n_gpu_layers"]), rpc)
    stage = EmbeddingBackend(Path(path), int(n_ctx), int(threads), settings=cs)
    with stage:
        n = min(8, stage.n_ctx)
        stage.decode_rows(np.zeros((n, stage.n_embd), np.float32), np.ones(n, np.int8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
