"""Cross-check of the ladder's throughput (sweep/llama/throughput.py) against llama.cpp's own `llama-bench`.

For each file: llama-bench (built on demand from the same llama.cpp sources, bench/llama_perplexity.py) with its
defaults and the same threads, then sweep's measurement with its own defaults (llama-bench's), alternated per file;
prints pp512 and tg128 in tokens/s, median over repetitions, and the ratio ours / llama-bench's. Run it on an idle
machine: two timing processes on the same cores slow each other.

    python -m bench.crosscheck.speed_crosscheck FILE.gguf [FILE.gguf ...] [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from bench import llama_perplexity
from sweep.cores import available_cores
from sweep.llama.throughput import BenchSettings, measure


def llama_bench(binary: Path, model: Path, threads: int, reps: int) -> dict[str, float]:
    proc = subprocess.run([str(binary), "-m", str(model), "-p", "512", "-n", "128", "-t", str(threads),
                           "-r", str(reps), "-o", "json"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = {}
    for test in json.loads(proc.stdout):
        key = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        out[key] = statistics.median(test["samples_ts"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--llama-bench", help="path of a llama-bench binary (default: build one)")
    args = ap.parse_args()
    binary = Path(args.llama_bench) if args.llama_bench else llama_perplexity.build(targets=("llama-bench",))
    settings = BenchSettings(args.threads, reps=args.reps)
    print(f"llama-bench -p 512 -n 128 -t {args.threads} -r {args.reps} (its defaults) against sweep's "
          f"{ {k: v for k, v in settings.describe().items() if k not in ('system_info', 'runs')} }")
    print(f"{'file':<40} {'test':>6} {'sweep t/s':>10} {'llama-bench t/s':>16} {'ratio':>6}")
    for f in args.files:
        theirs = llama_bench(binary, f, args.threads, args.reps)
        ours = measure([f], settings)[0].summary(512, 128)
        for key in ("pp512", "tg128"):
            print(f"{f.name:<40} {key:>6} {ours[key]['median']:>10.1f} {theirs[key]:>16.1f} "
                  f"{ours[key]['median'] / theirs[key]:>6.3f}")


if __name__ == "__main__":
    main()
