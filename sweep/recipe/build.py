"""Build a GGUF with llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs): a recipe's
per-tensor types, or one of llama.cpp's preset mixes (its ftype). Nothing here writes quantized data.

The file is written to a temporary name next to the destination and renamed when complete (atomic), and the
source is never the destination.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gguf import LlamaFileType

from ..errors import SweepError
from ..llama.gguf_reader import gguf_tensor_table
from ..llama.quantize import ggml_type_facts, llama_quantize_file
from ..quant.imatrix_file import load, provenance
from .export import type_id

# llama.cpp's own mixes (enum llama_ftype in include/llama.h, gguf's LlamaFileType): the presets a recipe is compared
# with, by name
PRESETS = {name: int(LlamaFileType[f"MOSTLY_{name}"]) for name in ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                                                                    "Q8_0")}
# any quantized ftype: overrides apply only then; every quantizable tensor has one anyway
BASE_FTYPE = int(LlamaFileType.MOSTLY_Q8_0)


def _check_paths(source: Path, dst: Path) -> None:
    if not source.is_file():
        raise SweepError(f"source {source} does not exist")
    if dst.exists() and dst.resolve() == source.resolve():
        raise SweepError(f"{dst} is the source file: choose another output path (the source is never written)")
    if dst.is_dir():
        raise SweepError(f"{dst} is a directory: give the GGUF file to write")
    if not dst.parent.exists():
        raise SweepError(f"{dst.parent} does not exist: create it or choose another output path")


def _quantize_atomically(source: Path, dst: Path, **kw) -> Path:

    _check_paths(source, dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        llama_quantize_file(source, Path(tmp), **kw)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a built model is meant to be shared
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def check_source_quantizable(source_model) -> None:
    """llama.cpp refuses to requantize (allow_requantize is off, as in llama-quantize by default)."""
    quantized = [t.name for t in source_model.tensors if t.quantizable and t.type_name not in ("f32", "f16", "bf16")]
    if quantized:
        raise SweepError(f"the source {source_model.path.name} holds quantized tensors ({quantized[0]} is "
                         f"{source_model.by_name[quantized[0]].type_name}, {len(quantized)} in all): build from "
                         f"the F32 container (the default --source) or another F32/F16 file")


def _with_imatrix(imatrix: Path | None) -> dict:
    """What llama-quantize does with an imatrix file: its values per tensor for the quantizer, and its provenance
    keys in the header (so that the file, and its size, are llama-quantize's)."""
    if imatrix is None:
        return {"imatrix": None, "metadata": ()}

    return {"imatrix": load(imatrix), "metadata": provenance(imatrix)}


def build_recipe(source: Path, dst: Path, lines: list[tuple[str, str]], imatrix: Path | None = None,
                 threads: int = 1) -> Path:
    """`lines`: (regex pattern, ggml type name), as recipe.txt holds them; `imatrix`: an imatrix file."""
    return _quantize_atomically(source, dst, overrides=[(p, type_id(t)) for p, t in lines], ftype=BASE_FTYPE,
                                pure=False, n_threads=threads, **_with_imatrix(imatrix))


def build_preset(source: Path, dst: Path, preset: str, imatrix: Path | None = None, threads: int = 1) -> Path:
    if preset not in PRESETS:
        raise SweepError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return _quantize_atomically(source, dst, overrides=[], ftype=PRESETS[preset], pure=False, n_threads=threads,
                                **_with_imatrix(imatrix))


def preset_file(out_dir: Path, source: Path, preset: str, imatrix: Path | None = None, threads: int = 1) -> Path:
    """llama.cpp's preset built from `source` into out_dir/presets/, once (rebuilt when the source is newer)."""
    d = out_dir / "presets"
    d.mkdir(parents=True, exist_ok=True)
    dst = d / f"{preset}{'-imatrix' if imatrix else ''}.gguf"
    if not dst.exists() or dst.stat().st_mtime < source.stat().st_mtime:
        build_preset(source, dst, preset, imatrix, threads)
    return dst


def stored_types(path: Path) -> dict[str, tuple[str, int]]:
    """Each tensor's (type name, stored bytes) in a GGUF, read with ggml's own reader."""

    infos, _, _ = gguf_tensor_table(path)
    return {i.name: (ggml_type_facts(i.type_id)["name"], i.nbytes) for i in infos}
