"""Cross-check of `python -m sweep.imatrix` against llama.cpp's own `llama-imatrix` (built from the same sources).

Both run on the embedded model file itself (model.container=native), the same text, the same windows (-c 512,
-b 512 so that llama-imatrix decodes one window per batch, as the sweep does; -nr: no weight repacking). Compared:
the tensors covered, the counts (exactly), the sums of squared activations (relative difference per value), both
of llama-imatrix's file forms (GGUF and the legacy .dat, read by sweep/quant/imatrix_file.py) and, per tensor, the bytes
that ggml's quantizer writes with either imatrix for a few types (identical or not).

    python -m bench.crosscheck.imatrix_crosscheck [--llama-imatrix PATH] [--chunks 8] [--types q4_K,iq3_xxs,iq2_xxs]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import llama_perplexity
from sweep.imatrix.compute import collect
from sweep.llama import quantize as be
from sweep.llama.container import dequantized
from sweep.pipeline.config import compose
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant import ggml_types
from sweep.quant.imatrix_file import Imatrix, read
from sweep.scoring.text import embedded_text_path


def llama_imatrix(binary: Path, model: Path, text: Path, chunks: int, threads: int, out: Path, fmt: str,
                  n_ctx: int = 512) -> float:
    cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks),
           "-t", str(threads), "-nr", "-o", str(out), "--output-format", fmt, "--no-ppl"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-imatrix failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    return time.perf_counter() - t0


def compare(name: str, ours: Imatrix, theirs: Imatrix) -> None:
    assert set(ours.sums) == set(theirs.sums), (set(ours.sums) ^ set(theirs.sums))
    worst, worst_name, counts_equal = 0.0, "", True
    for n in sorted(ours.sums):
        a, b = ours.sums[n].astype(np.float64), theirs.sums[n].astype(np.float64)
        if theirs.legacy:  # llama-imatrix's .dat stores sums / count * ncall; compare what quantizing uses
            a, b = ours.importance()[n].astype(np.float64), theirs.importance()[n].astype(np.float64)
        else:
            counts_equal &= bool(np.array_equal(ours.counts[n], theirs.counts[n]))
        rel = float((np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float32).tiny)).max())
        if rel > worst:
            worst, worst_name = rel, n
    print(f"  vs llama-imatrix {name:<6}: {len(ours.sums)} tensors (same set), counts equal: "
          f"{counts_equal if not theirs.legacy else 'n/a (.dat keeps ncall only)'}, "
          f"max relative difference {worst:.3g} ({worst_name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-imatrix", help="path of a llama-imatrix binary (default: build one)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--types", default="q4_K,iq4_xs,iq3_xxs,iq2_xxs")
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()))
    args = ap.parse_args()
    binary = Path(args.llama_imatrix) if args.llama_imatrix else \
        llama_perplexity.build(targets=("llama-imatrix", "llama-quantize", "llama-perplexity")).parent / "llama-imatrix"
    cfg = compose(["model.container=native", f"data.path={args.text}", f"data.n_windows={args.chunks}",
                   f"run.threads={args.threads}"])
    ref = open_reference(job_settings(cfg))
    t0 = time.perf_counter()
    col = collect(ref.backend, ref.windows.tokens)
    ours_s = time.perf_counter() - t0
    ours = Imatrix(col.sums, col.counts, chunk_count=ref.windows.n_windows, chunk_size=512)
    print(f"model {ref.source.name} (native container), {ref.windows.n_windows} windows of 512; "
          f"sweep.imatrix {ours_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="imatrix-crosscheck-") as tmp:
        forms = {}
        for fmt, suffix in (("gguf", "gguf"), ("dat", "dat")):
            out = Path(tmp) / f"llama.{suffix}"
            secs = llama_imatrix(binary, ref.source, Path(args.text), args.chunks, args.threads, out, fmt)
            forms[fmt] = read(out)
            print(f"  llama-imatrix --output-format {fmt}: {secs:.1f} s")
        for fmt, theirs in forms.items():
            compare(fmt, ours, theirs)

    # Quantizing with either imatrix: the F32 values of every covered tensor, ggml's quantizer, bytes compared.
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(ref.source).tensors}
    mine, theirs = ours.importance(), forms["gguf"].importance()
    print("  type      tensors  identical bytes  (quantized from the F32 values, with our imatrix vs llama-imatrix's)")
    for name in args.types.split(","):
        same = total = 0
        for n in sorted(mine):
            x = dequantized(tensors[n])
            got, _ = ggml_types.type_for_rows(name, x.shape[-1])
            a = be.ggml_quantize(x, got.type_id, mine[n], args.threads)
            b = be.ggml_quantize(x, got.type_id, theirs[n], args.threads)
            same += bool(np.array_equal(a, b))
            total += 1
        print(f"  {name:<9} {total:>7}  {same:>15}")


if __name__ == "__main__":
    main()
