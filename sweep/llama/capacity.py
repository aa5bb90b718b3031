"""What a job holds in memory in each container, what this machine (or a SLURM task) has, and which container
`model.container=auto` (the default) runs: the F32 container where it fits with room, else the file as it is.

The F32 container costs 4 bytes per parameter (TinyLlama-1.1B: 4.4 GB; an 8B model: 32 GB; 70B: 280 GB), the native
one what the file costs (a 4-bit 8B model: ~4.9 GB). Both hold, beside the weights, llama.cpp's K/V cache, the
window logit buffers, the runtime, and the largest weight target of the sweep twice in F32 (read and rounded, or the
delta of a quantized tensor: sweep/quant/apply.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import Keys

from ..choices import LauncherKind, launcher_kind
from ..cores import available_memory
from ..files import file_memo
from .container import f32_container_path
from .model_file import header, model_info

RUNTIME_BYTES = 400_000_000  # Python, numpy, pandas, Hydra and llama.cpp's code in a job (0.34-0.40 GB measured)
KV_BYTES = {"f32": 4, "f16": 2}  # bytes per K/V cache element, by the container's compute settings
ROOM = 0.8  # auto takes the F32 container only where one job needs at most this share of the memory available
DISK_ROOM = 0.9  # ... and the container to build at most this share of the cache's free disk


@file_memo(maxsize=8)
def gguf_sizes(path: Path) -> tuple[int, dict[str, tuple[int, int]], dict]:
    """File size, {tensor: (bytes stored, elements)}, and the metadata fields, read without loading the model."""
    h = header(path)
    tensors = {t.name: (t.nbytes, int(np.prod(t.ne))) for t in h.tensors}
    return Path(path).stat().st_size, tensors, {k: v for k, v in h.meta.items() if not k.startswith("tokenizer.")}


def as_f32(file_bytes: int, tensors: dict[str, tuple[int, int]], names) -> int:
    """Size of the file with `names` stored as F32 (a container or a native matched copy)."""
    return file_bytes + sum(4 * n - b for name, (b, n) in tensors.items() if name in names)


def kv_bytes(meta: dict, arch: str, n_ctx: int, kv_type: str) -> int:
    def first(key, default):
        value = meta.get(key.format(arch=arch), default)
        return max(value) if isinstance(value, list) else value

    n_layers = int(first(Keys.LLM.BLOCK_COUNT, 0))
    n_head = int(first(Keys.Attention.HEAD_COUNT, 1)) or 1
    n_head_kv = int(first(Keys.Attention.HEAD_COUNT_KV, n_head))
    n_embd = int(first(Keys.LLM.EMBEDDING_LENGTH, 0))
    k = int(first(Keys.Attention.KEY_LENGTH, n_embd // n_head))
    v = int(first(Keys.Attention.VALUE_LENGTH, n_embd // n_head))
    return n_ctx * n_layers * n_head_kv * (k + v) * KV_BYTES[kv_type]


@dataclass(frozen=True)
class Need:
    """One job's memory in a container (bytes)."""

    container: str
    model: int  # the loaded weights: the container's file (no mmap: writable)
    kv: int
    windows: int  # 5 window-sized logit buffers: 2 in llama.cpp, 3 in the per-window math
    work: int  # the largest weight tensor twice in F32 (read and rounded, or a delta)

    @property
    def total(self) -> int:
        return self.model + self.kv + self.windows + self.work + RUNTIME_BYTES

    def describe(self) -> str:
        return (f"{gb(self.total)} (model {gb(self.model)} + KV cache {gb(self.kv)} + window logits "
                f"{gb(self.windows)} + largest weight x2 in F32 {gb(self.work)} + runtime ~{gb(RUNTIME_BYTES)})")


def need(source: Path, container: str, arch: str, n_vocab: int, n_ctx: int) -> Need:
    file_bytes, tensors, meta = gguf_sizes(source)
    model = as_f32(file_bytes, tensors, tensors) if container == "f32" else file_bytes
    n_scored = n_ctx - 1 - n_ctx // 2
    work = 2 * 4 * max((n for _, n in tensors.values()), default=0)
    return Need(container, model, kv_bytes(meta, arch, n_ctx, "f32" if container == "f32" else "f16"),
                5 * n_scored * n_vocab * 4, work)


def memory_limit(launcher_cfg=None, available: int | None = None) -> tuple[int | None, str]:
    """The memory one job may use, and where the figure comes from: a SLURM task's mem_gb, else what is available
    on this machine (`available`, or read now)."""
    mem_gb = launcher_cfg.get("mem_gb") if launcher_kind(launcher_cfg) == LauncherKind.slurm else None
    if mem_gb:
        return int(mem_gb * 2**30), f"hydra.launcher.mem_gb={mem_gb}"
    return available if available is not None else available_memory(), "available on this machine now"


def choose(source: Path, arch: str, n_vocab: int, n_ctx: int, cache_dir: Path | None = None,
           launcher_cfg=None, offloaded: bool = False) -> tuple[str, str]:
    """model.container=auto: ("f32" | "native", why, in words)."""
    f32 = need(source, "f32", arch, n_vocab, n_ctx)
    limit, where = memory_limit(launcher_cfg)
    built = f32_container_path(source, cache_dir)
    if not built.exists():
        free = _free_disk(built.parent)
        if f32.model > DISK_ROOM * free:
            return "native", (f"its F32 container ({gb(f32.model)}) does not fit the {gb(free)} free in "
                              f"{built.parent}")
    if offloaded:  # device memory cannot be read portably: the weights' host share is not the question here
        return "f32", "layers are offloaded (model.n_gpu_layers): the F32 container, as for any model that fits"
    if limit is None:
        return "f32", "the memory available cannot be read here"
    if f32.total > ROOM * limit:
        native = need(source, "native", arch, n_vocab, n_ctx)
        return "native", (f"one job in the F32 container needs {gb(f32.total)}, more than {ROOM:.0%} of the "
                          f"{gb(limit)} {where}; the file as it is needs {gb(native.total)}")
    return "f32", f"one job in the F32 container needs {gb(f32.total)} of the {gb(limit)} {where}"


def auto_container(source: Path, n_ctx: int, cache_dir: Path | None = None, launcher_cfg=None,
                   offloaded: bool = False) -> tuple[str, str]:
    """model.container=auto's choice for this model file and window, and why, in words."""
    info = model_info(source)
    return choose(info.path, info.arch, info.n_vocab, n_ctx, cache_dir, launcher_cfg, offloaded=offloaded)


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a directory still to create will be)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_disk(directory: Path) -> int:
    return shutil.disk_usage(nearest_existing(directory)).free


def gb(n: float) -> str:
    """Bytes in decimal units, as `df -H` and the docs' budgets count them."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB" if n else "0"
