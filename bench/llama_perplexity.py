"""llama.cpp's own `llama-perplexity`, the reference this project is measured against.

Built on demand from the llama-cpp-python source package (the same llama.cpp that the bindings vendor) into a
cache directory; nothing of llama.cpp is kept in this repository. `--llama-perplexity PATH` skips the build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

from sweep.llama.cache import cache_root

CACHE = cache_root() / "llama-perplexity"


def build(cache: Path = CACHE, targets: tuple[str, ...] = ("llama-perplexity",)) -> Path:
    """Path of the first of `targets` (llama.cpp tools: llama-perplexity, llama-imatrix, llama-quantize), built from
    llama-cpp-python's source package into one shared build tree (about 5-15 minutes once; later targets reuse it)."""
    ver = version("llama-cpp-python")
    binaries = [cache / ver / "build" / "bin" / t for t in targets]
    if all(b.exists() for b in binaries):
        return binaries[0]
    src = cache / ver
    src.mkdir(parents=True, exist_ok=True)
    if not any(src.glob("llama_cpp_python-*/vendor/llama.cpp")):
        if not any(src.glob("llama_cpp_python-*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={ver}", "-d", str(src)], check=True)
        archive = next(src.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    llama = next(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not (src / "build" / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(llama), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", *targets,
                    "-j", str(os.cpu_count() or 2)], check=True)
    return binaries[0]


def find(path: str | None) -> Path:
    if path:
        return Path(path)
    on_path = shutil.which("llama-perplexity")
    return Path(on_path) if on_path else build()


def settings_flags(settings) -> list[str]:
    """The command-line flags that make llama-perplexity compute as a sweep with these ComputeSettings does: no
    weight repacking (-nr: both sides run the same kernels, and AMX CPUs do not crash), the same flash-attention
    choice and K/V cache type."""
    return ["-nr", "-fa", settings.flash_attn, "-ctk", settings.kv_type, "-ctv", settings.kv_type]


def run(binary: Path, model: Path, text: Path, n_windows: int, threads: int, n_ctx: int = 512,
        extra: list[str] = (), settings=None) -> dict:
    """Run it with the sweep's compute settings (default: those of the native container); return its final figures
    (PPL, stderr, and the KL block when asked) and its own timings."""
    if settings is None:
        from sweep.llama.container import compute_settings

        settings = compute_settings("native")
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
           "--chunks", str(n_windows), "-t", str(threads), *settings_flags(settings), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({proc.returncode}): {log[-2000:]}")
    out = {"log": log}
    if m := re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log):
        out["ppl"], out["ppl_stderr"] = float(m[1]), float(m[2])
    # Log lines start with a timestamp M.SS.mmm.uuu: scoring runs from the end of tokenization to the final line.
    # (the timestamp right before the text: llama-perplexity's "ETA" line has no newline before the final one)
    stamps = {key: re.search(rf"(\d+)\.(\d+)\.(\d+)\.(\d+) I (?:\w+: )?{text}", log)
              for key, text in {"tokenized": "tokenization took", "final": "Final estimate"}.items()}
    if all(stamps.values()):
        at = {k: int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6 for k, m in stamps.items()}
        out["score_seconds"] = at["final"] - at["tokenized"]
    for key, pattern in {"kld_mean": r"Mean\s+KLD:\s+([\d.eE+-]+)\s+±\s+([\d.eE+-]+)",
                         "same_top_p": r"Same top p:\s+([\d.]+)\s+±\s+([\d.]+)\s*%"}.items():
        if m := re.search(pattern, log):
            out[key], out[f"{key}_stderr"] = float(m[1]), float(m[2])
    return out
