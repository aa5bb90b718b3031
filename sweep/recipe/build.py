"""Build a GGUF with llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs): a recipe's
per-tensor types, or one of llama.cpp's preset mixes (its ftype). Nothing here writes quantized data.

The file is written to a temporary name next to the destination and renamed when complete (atomic), and the
source is never the destination.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gguf import LlamaFileType

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..llama.gguf_reader import gguf_tensor_table
from ..llama.quantize import ggml_type_facts, llama_quantize_file
from ..quant.imatrix_file import load, provenance
from .export import read_recipe_txt, type_id
from .solve import Recipe
from .ties import check_ties

# llama.cpp's own mixes (enum llama_ftype in include/llama.h, gguf's LlamaFileType): the presets a recipe is compared
# with, by name. The ladder's sizes, smallest first (sweep/recipe/ladder.py); the IQ2/IQ3 mixes store types that
# llama.cpp's quantizer makes only with an importance matrix (tools/quantize/quantize.cpp refuses them without one)
LADDER = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")
IMATRIX_LADDER = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")
NEED_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS"}
PRESETS = {name: int(LlamaFileType[f"MOSTLY_{name}"]) for name in (*IMATRIX_LADDER, *LADDER, "Q6_K", "Q8_0")}
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
    if preset in NEED_IMATRIX and imatrix is None:
        raise SweepError(f"llama.cpp builds {preset} only with an importance matrix: add --imatrix FILE")
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


def build_and_check(recipe: Recipe, source_path: Path, dst: Path, txt: Path, js: Path, imatrix: Path | None,
                    threads: int, ties: Sequence[str] = ()) -> Path:
    """The GGUF built from recipe.txt as llama-quantize reads it, every tensor's type and bytes checked, and each
    tie's tensors (patterns of ties.tie_pattern) of one type per block; recipe.json gets the built file's path and
    size."""
    lines = read_recipe_txt(txt)  # the build reads what llama-quantize would read
    built = build_recipe(source_path, dst, lines, imatrix, threads)
    real = built.stat().st_size
    got = stored_types(built)
    want = {c.tensor: (c.type_stored, c.bytes) for c in recipe.choices}
    differ = [n for n, w in want.items() if got.get(n) != w]
    if differ:
        raise SweepError(f"the built file differs from the recipe on {len(differ)} tensor(s), e.g. {differ[0]}: "
                         f"recipe {want[differ[0]]}, file {got.get(differ[0])}")
    n_ties = check_ties({n: t for n, (t, _) in got.items()}, list(ties), str(built))
    print(f"built {built}: {real} bytes ({real / 1e6:.3f} MB; predicted {recipe.predicted_file_bytes}, "
          f"{real - recipe.predicted_file_bytes:+d}); every tensor's type and bytes as the recipe says"
          + (f"; {n_ties} ties of one type each, read back" if ties else ""))
    update_json(js, {"built": {"path": str(built), "file_bytes": real}})
    return built


def update_json(path: Path, extra: dict) -> None:
    data = json.loads(path.read_text())
    data.update(extra)
    atomic_write_bytes(path, json.dumps(data, indent=1, allow_nan=True).encode())
