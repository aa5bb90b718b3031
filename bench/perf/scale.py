"""A sweep of a model at the size people quantize, on this machine: `--plan`, native weight and activation points,
peak RSS, disk written, model loads, and the time per point against llama-perplexity on the same file.

    python -m bench.models.shaped_model 7b /tmp/llama7b.Q4_K_M.gguf    # once: F16 written, then llama.cpp's Q4_K_M
    python -m bench.perf.scale /tmp/llama7b.Q4_K_M.gguf [--n-ctx 512] [--windows 2] [--llama-perplexity PATH]

The sweep runs as `python -m sweep` in a child process whose exit hook reports its peak resident set (VmHWM) and the
bytes it wrote (/proc/self/io write_bytes: files, the store included; not the page cache of reads). The grid is 4
weight points (ffn_down and attn_v int4 in the first and the last block, each on a quantized tensor: kept as the
file stores it, with (fmt(W) - W)·x added) and 2 activation points (l_out int8 in the same blocks), in the native
container (the plan shows what model.container=auto would choose), the generation check off. llama-perplexity runs
on the same file with the same context, windows, threads and compute flags (`-nr -fa on -ctk f16 -ctv f16`).
Nothing else may run on the machine meanwhile: two llama.cpp processes on the same cores slow each other ~10x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench import llama_perplexity
from sweep.llama.capacity import gb
from sweep.llama.container import compute_settings
from sweep.llama.model_file import model_info
from sweep.scoring.text import embedded_text_path
from sweep.store.records import gather

ROOT = Path(__file__).resolve().parents[2]

# The child: `python -m sweep ARGS`, reporting its own peak memory and writes when it exits.
CHILD = """
import atexit, json, runpy, sys
out = sys.argv[1]
def report():
    status = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    io = dict(l.split(': ') for l in open('/proc/self/io'))
    with open(out, 'w') as f:
        json.dump({'vmhwm_kb': int(status['VmHWM'].split()[0]), 'write_bytes': int(io['write_bytes'])}, f)
atexit.register(report)
sys.argv = ['sweep', *sys.argv[2:]]
runpy.run_module('sweep', run_name='__main__', alter_sys=True)
"""


def sweep(args: list[str], env: dict, report: Path) -> tuple[str, dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(report), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr, json.loads(report.read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--llama-perplexity", help="the binary (default: built from llama-cpp-python's sources)")
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()))
    args = ap.parse_args()
    info = model_info(args.model)
    last = info.n_layers - 1
    work = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    env = {**os.environ, "SWEEP_WIKITEXT": args.text, "SWEEP_CACHE": str(work / "cache")}
    common = [f"model.path={args.model}", f"data.n_ctx={args.n_ctx}", f"data.n_windows={args.windows}",
              f"run.threads={args.threads}", "metrics.generate=false", f"run.store={work / 'store'}"]
    print(f"# {args.model.name}: {info.arch}, {info.n_layers} blocks, vocabulary {info.n_vocab:,}, "
          f"{gb(args.model.stat().st_size)}; {args.windows} windows of {args.n_ctx}, {args.threads} threads")
    print(f"# types: {dict(pd.Series(info.tensor_types).value_counts())}")

    plan_out, _, _ = sweep([*common, f"layer=0,{last}", "tensor=ffn_down,attn_v", "kind=weight",
                                          "fmt=int4", f"hydra.sweep.dir={work / 'plan'}", "--plan"], env,
                                         work / "plan.json")
    print("\n## --plan (weight points)\n" + plan_out.strip())

    t0 = time.perf_counter()
    # the file as it is, whatever auto chose above (llama-perplexity's); no prefix reuse: its stage, loaded beside
    # the model, is a memory-for-decode trade of its own (docs/prefix.md), not what this measures
    common += ["model.container=native", "run.prefix_reuse=false"]
    out_w, io_w, wall_w = sweep([*common, f"layer=0,{last}", "tensor=ffn_down,attn_v", "kind=weight", "fmt=int4",
                                 f"hydra.sweep.dir={work / 'w'}"], env, work / "w.json")
    out_a, io_a, wall_a = sweep([*common, f"layer=0,{last}", "tensor=l_out", "kind=activation", "fmt=int8",
                                 f"hydra.sweep.dir={work / 'a'}"], env, work / "a.json")
    print(f"\n## sweep: 4 weight points + 2 activation points ({time.perf_counter() - t0:.0f} s in all)")
    for label, out, io, wall in (("weights", out_w, io_w, wall_w), ("activations", out_a, io_a, wall_a)):
        loads = re.findall(r"loading (\S+) \(n_ctx", out)
        chosen = re.search(r"model\.container=auto: .*", out)
        print(f"{label}: wall {wall:.0f} s, peak RSS {gb(io['vmhwm_kb'] * 1024)}, written {gb(io['write_bytes'])}, "
              f"model loads {len(loads)} {loads}; {chosen[0] if chosen else ''}")
    df = gather([work / "w", work / "a"])
    cols = ["kind", "tensor", "layer", "fmt", "status", "container", "baseline_ppl", "kld_mean", "delta_calls",
            "hook_calls", "seconds", "decode_seconds"]
    print(df[cols].to_string(index=False))
    per_point = df["seconds"].median()

    lp = llama_perplexity.find(args.llama_perplexity)
    t0 = time.perf_counter()
    ref = llama_perplexity.run(lp, args.model, Path(args.text), args.windows, args.threads, args.n_ctx,
                               settings=compute_settings("native"))
    lp_wall = time.perf_counter() - t0
    print(f"\n## llama-perplexity on the same file: PPL {ref.get('ppl')} ± {ref.get('ppl_stderr')}, scoring "
          f"{ref.get('score_seconds', float('nan')):.1f} s for {args.windows} windows (process {lp_wall:.0f} s with "
          f"its load)")
    base = df["baseline_ppl"].iloc[0]
    print(f"sweep baseline PPL {base:.4f} vs llama-perplexity {ref.get('ppl')}")
    print(f"time per point (median of {len(df)}): {per_point:.1f} s = {per_point / ref['score_seconds']:.2f} x "
          f"llama-perplexity's scoring of the same windows")
    budget = args.model.stat().st_size
    print(f"peak RSS vs the file: {gb(max(io_w['vmhwm_kb'], io_a['vmhwm_kb']) * 1024)} vs file {gb(budget)}")
    print(f"(work directory {work}: remove it when done)")


if __name__ == "__main__":
    main()
