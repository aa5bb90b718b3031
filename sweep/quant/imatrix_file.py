"""llama.cpp importance-matrix files: read both forms llama-quantize reads, write the GGUF form llama-imatrix writes.

Formats as in the vendored llama.cpp (common/imatrix-loader.cpp, tools/imatrix/imatrix.cpp, tools/quantize):
  * GGUF: per weight `<name>.in_sum2` (F32, ne = [n_cols, n_mat]: sums of squared input activations) and
    `<name>.counts` (F32, ne = [1, n_mat]: activation rows seen), keys imatrix.datasets / chunk_count / chunk_size.
  * legacy `.dat`: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval, nval float32
    (already averaged: sums / count * ncall); then optionally int32 chunk count, int32 length, dataset name.
The values handed to the quantizer (what `load` returns) are llama-quantize's: GGUF sums / counts (1 where a count
is 0), legacy values / ncall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SweepError
from ..files import atomic_path, file_memo

KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 (n_mat, n_cols)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64 (n_mat,)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    legacy: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        """Per weight, the values llama-quantize passes to the quantizer (flat float32, n_mat * n_cols)."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name]
            if self.legacy:
                ncall = int(counts[0]) if counts.size else 0
                out[name] = (sums / np.float32(ncall) if ncall > 0 else sums).astype(np.float32).ravel()
            else:
                c = counts.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[name] = np.where(c > 0, sums / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).ravel()
        return out


def read(path: Path | str) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"imatrix file {path} does not exist; make one with `python -m sweep.imatrix out={path}`")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except SweepError:
        raise
    except Exception as e:  # the readers raise assorted errors on damaged files
        raise SweepError(f"cannot read imatrix file {path}: {type(e).__name__}: {e}") from None


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    r = GGUFReader(path)
    keys = {f.name: f for f in r.fields.values()}
    if not all(k in keys for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        raise SweepError(f"{path} is a GGUF file without imatrix metadata (imatrix.datasets, chunk_count, "
                         f"chunk_size): not an imatrix written by llama-imatrix or `python -m sweep.imatrix`")
    im = Imatrix(chunk_count=int(keys[KEY_CHUNK_COUNT].contents()), chunk_size=int(keys[KEY_CHUNK_SIZE].contents()),
                 datasets=list(keys[KEY_DATASETS].contents()))
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname.removesuffix(".in_sum2")
        c = tensors.get(name + ".counts")
        if c is None or t.tensor_type != GGMLQuantizationType.F32 or c.tensor_type != GGMLQuantizationType.F32:
            raise SweepError(f"{path}: {name} lacks F32 sums and counts")
        n_cols, n_mat = int(t.shape[0]), int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        im.sums[name] = np.array(t.data, dtype=np.float32).reshape(n_mat, n_cols)
        im.counts[name] = np.rint(np.array(c.data, dtype=np.float64).ravel()).astype(np.int64)  # std::lround
    if not im.sums:
        raise SweepError(f"{path} holds no imatrix entries")
    return im


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise SweepError(f"{path} is neither a GGUF nor a legacy .dat imatrix file (no entries)")
    im = Imatrix(legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos:pos + length].decode()
        pos += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise SweepError(f"{path}: entry {name} has {nval} values")
        im.sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32).reshape(1, nval)
        pos += 4 * nval
        im.counts[name] = np.array([ncall], dtype=np.int64)
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                im.datasets.append(data[pos:pos + length].decode(errors="replace"))
    return im


def write_gguf(path: Path | str, im: Imatrix) -> Path:
    """The GGUF form llama-imatrix writes (tensor order: names sorted, sums before counts)."""
    from gguf import GGUFWriter

    path = Path(path)
    with atomic_path(path, suffix=".part") as tmp:
        w = GGUFWriter(tmp, "imatrix")  # gguf's writer always adds general.architecture; readers ignore it
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, list(im.datasets))
        w.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
        w.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
        for name in sorted(im.sums):
            sums = np.ascontiguousarray(im.sums[name], dtype=np.float32)
            w.add_tensor(f"{name}.in_sum2", sums.reshape(-1, sums.shape[-1]))
            w.add_tensor(f"{name}.counts", im.counts[name].astype(np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


@file_memo(maxsize=4)
def load(path: Path) -> dict[str, np.ndarray]:
    """The importance values per weight name, as llama-quantize hands them to the quantizer (cached per file; its
    messages name the file resolved)."""
    return read(path.resolve()).importance()


def provenance(path: Path | str) -> list[tuple[str, str | int]]:
    """The keys llama-quantize writes into a file it quantizes with this imatrix, in its order and with its values
    (tools/quantize/quantize.cpp): the path as given, the first dataset, the number of entries, the chunk count."""
    im = read(path)
    keys: list[tuple[str, str | int]] = [("quantize.imatrix.file", str(path))]
    if im.datasets:
        keys.append(("quantize.imatrix.dataset", im.datasets[0]))
    keys.append(("quantize.imatrix.entries_count", len(im.sums)))
    if im.chunk_count > 0:
        keys.append(("quantize.imatrix.chunks_count", im.chunk_count))
    return keys
