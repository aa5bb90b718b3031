"""Float containers: copies of a GGUF with chosen tensors dequantized to F32.

Why: a quantized tensor (Q4_1, Q4_K, ...) cannot hold bf16/int8/... values, and inside a quantized model llama.cpp
also requantizes activations, which amplifies any small perturbation into a noise floor larger than most
single-tensor effects. The sweep's reference model is therefore the whole model in F32 (`model.container=f32`),
made once per source file and cached under its SHA-256. F32 holds every format this project simulates exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .. import __version__
from ..choices import Container
from ..errors import SweepError
from ..files import atomic_path
from .backend import ComputeSettings, llama_cpp_version, system_info
from .cache import cache_root, container_file
from .model_file import sha256
from .rpc import parse_endpoints

log = logging.getLogger(__name__)

# A tensor transform gets (name, dequantized float32 data) and returns the new float32 data.
Transform = Callable[[str, np.ndarray], np.ndarray]


def dequantized(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy (row-major) shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32)
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def write_gguf_copy(
    src: Path,
    dst: Path,
    to_f32: Callable[[str, str], bool],
    transform: Transform | None = None,
) -> Path:
    """Copy `src` to `dst` with every tensor for which `to_f32(name, type_name)` holds stored as F32.

    `transform`, when given, is applied to those tensors' dequantized data. The write is atomic: `dst` appears
    complete or not at all. `src` is only read.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader = GGUFReader(src)
    arch_field = reader.get_field(Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise SweepError(f"{src} has no {Keys.General.ARCHITECTURE}: not a llama.cpp model file")
    arch = arch_field.contents()
    with atomic_path(dst, suffix=".part") as tmp:
        writer = GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)

        chosen = {t.name for t in reader.tensors if to_f32(t.name, t.tensor_type.name)}
        for t in reader.tensors:
            if t.name in chosen:
                shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne -> numpy shape
                writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(t.n_elements),
                                       GGMLQuantizationType.F32)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in chosen:
                data = dequantized(t).reshape(tuple(int(n) for n in reversed(t.shape)))
                if transform is not None:
                    data = np.ascontiguousarray(transform(t.name, data), dtype=np.float32)
                writer.write_tensor_data(data)
            else:
                writer.write_tensor_data(t.data)
        writer.close()
    return dst


def f32_container_path(src: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the F32 container of `src` is cached (built or not)."""
    return container_file(cache_root(cache_dir), sha256(src))


def f32_container(src: Path, cache_dir: str | Path | None = None) -> Path:
    """The whole model with every tensor in F32, cached by the source file's SHA-256."""
    dst = f32_container_path(src, cache_dir)
    if not dst.exists():
        log.info("building the F32 container of %s (once per model file) -> %s", src.name, dst)
        try:
            write_gguf_copy(src, dst, to_f32=lambda name, ty: True)
        except OSError as e:
            raise SweepError(f"cannot write the F32 container to {dst.parent}: {e.strerror} "
                             f"(set SWEEP_CACHE or model.cache_dir to a writable directory)") from e
    return dst


def compute_settings(container: str, n_gpu_layers: int = 0, rpc: str | None = None) -> ComputeSettings:
    """How llama.cpp computes in each container, stated instead of left to its defaults.

    f32: everything that can be F32 is -- an F32 K/V cache and no flash attention (CPU flash attention converts Q
    and an F16 cache stores K/V in F16, which would absorb any K/V/Q perturbation at or below fp16 precision).
    native: llama.cpp's own defaults as they resolve on a CPU (F16 cache, flash attention on), so the file scores
    as llama-perplexity scores it.
    rpc: model.rpc, the RPC servers that take the offloaded layers (sweep/llama/rpc.py)."""
    endpoints = parse_endpoints(rpc)
    if endpoints and not n_gpu_layers:
        raise SweepError(f"model.rpc={rpc} offloads nothing with model.n_gpu_layers=0: give the layers to offload "
                         f"(model.n_gpu_layers=-1 for all)")
    if container == "f32":
        return ComputeSettings(kv_type="f32", flash_attn="off", n_gpu_layers=n_gpu_layers, rpc=endpoints)
    if container == "native":
        return ComputeSettings(kv_type="f16", flash_attn="on", n_gpu_layers=n_gpu_layers, rpc=endpoints)
    raise SweepError(f"unknown model.container={container!r}; valid: {', '.join(Container)}")


def runtime_identity(settings: ComputeSettings) -> dict:
    """Everything besides the inputs that can change a number: part of every store key and every record, so that a
    shared store never pairs a run with a baseline computed by other kernels (CPU features, backend, versions)."""
    return {**settings.as_dict(), "system_info": system_info(), "llama_cpp_python": llama_cpp_version(),
            "sweep_version": __version__}


def container_path(src: Path, container: str, cache_dir: str | Path | None = None) -> Path:
    """The file the backend loads for `model.container`."""
    if container == "native":
        return src
    if container == "f32":
        return f32_container(src, cache_dir)
    raise SweepError(f"unknown model.container={container!r}; valid: {', '.join(Container)}")


def tensors_to_f32(src: Path, names: Iterable[str], dst: Path) -> Path:
    """A copy of `src` with only `names` dequantized to F32: the native container's matched baseline."""
    wanted = set(names)
    return write_gguf_copy(src, dst, to_f32=lambda name, ty: name in wanted)
