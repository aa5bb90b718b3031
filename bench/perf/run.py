"""Speed and memory of the scorer and of sweeps, side by side with llama.cpp's own llama-perplexity.

    python -m bench.perf.run [--quick] [--llama-perplexity PATH] [--threads N]

Every figure is measured in this invocation, on this machine; ratios compare runs made minutes apart on the same
machine. --quick (smaller slices, fewer points) takes about three minutes once llama-perplexity is built.
The last line is `throughput ratio (sweep / llama-perplexity, the median round, the lower container): X.XX`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import llama_perplexity
from sweep.pipeline.config import compose
from sweep.pipeline.point import run_point
from sweep.pipeline.reference import open_reference
from sweep.pipeline.session import Session
from sweep.pipeline.settings import job_settings
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.perplexity import score
from sweep.scoring.text import embedded_text_path
from sweep.store.records import Store

ROOT = Path(__file__).resolve().parents[2]
POINTS = [("weight", "ffn_down", 5, "int8"), ("activation", "l_out", 10, "int8"), ("weight", "attn_q", 3, "bf16"),
          ("activation", "ffn_norm", 29, "bf16"), ("weight", "ffn_up", 12, "int4"), ("activation", "attn_norm", 7,
                                                                                        "fp8_e4m3"),
          ("weight", "attn_output", 20, "mxfp4"), ("activation", "ffn_out", 2, "int8"), ("weight", "ffn_gate", 25,
                                                                                          "fp16"),
          ("activation", "kqv_out", 15, "bf16")]


def settings(container: str, n_windows: int, threads: int, text: str):
    """The settings of the configuration `python -m sweep` composes (the real conf/)."""
    return job_settings(compose([f"model.container={container}", f"data.path={text}", f"data.n_windows={n_windows}",
                                 f"run.threads={threads}", "run.progress=false"]))


def row(*cells, widths=(44, 18, 18, 12)):
    print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))


def throughput(binary: Path, text: str, n_windows: int, threads: int, rounds: int) -> float:
    """Tokens/s of the scorer and of llama-perplexity, in alternating rounds (ours, theirs, ours, ...) with the model
    loaded once on our side: on a shared VM the speed of both drifts by +-10% over minutes, so one run of each,
    minutes apart, compared the machine's drift as much as the scorers. The ratio is the median of the rounds' own
    ratios (each ours over the llama-perplexity run right after it): a drift over the rounds cancels within a pair;
    the ratio of the two medians is printed beside it."""
    print(f"\n## Scorer vs llama-perplexity ({n_windows} windows of 512, {threads} threads, {rounds} alternating "
          f"rounds; load and tokenization excluded from both)")
    row("model", "llama-perplexity", "sweep", "ratio")
    ratios = []
    for container in ("native", "f32"):
        with open_reference(settings(container, n_windows, threads, text)) as ref:
            # the first run warms caches, as llama-perplexity's warm-up decode does
            score(ref.backend, ref.windows, progress=False, math=ref.session.math)
            ours, theirs = [], []
            for _ in range(rounds):
                ours.append(score(ref.backend, ref.windows, progress=False, math=ref.session.math))
                theirs.append(llama_perplexity.run(binary, ref.backend.path, Path(text), n_windows, threads,
                                                   settings=ref.backend.settings))
        our_tps = statistics.median(o.tokens_per_second for o in ours)
        their_tps = statistics.median(n_windows * 512 / t["score_seconds"] for t in theirs)
        paired = [o.tokens_per_second * t["score_seconds"] / (n_windows * 512) for o, t in zip(ours, theirs)]
        ratio = statistics.median(paired)
        ratios.append(ratio)
        row(f"{ref.source.name[:20]} [{container}] tokens/s", f"{their_tps:.1f}", f"{our_tps:.1f}", f"{ratio:.3f}")
        row(f"   per round: {', '.join(f'{r:.3f}' for r in paired)}; ratio of the medians "
            f"{our_tps / their_tps:.3f}", "", "", "")
        same = f"PPL {ours[-1].ppl:.4f} vs {theirs[-1]['ppl']:.4f}"
        row(f"   {same}" + ("  (identical)" if round(ours[-1].ppl, 4) == theirs[-1]["ppl"] else "  (DIFFERENT)"),
            "", "", "")
    return min(ratios)


def overhead(text: str, n_windows: int, threads: int, n_points: int) -> None:
    print(f"\n## Per-point overhead (F32 container, {n_windows} windows; baseline already stored)")
    ref = open_reference(settings("f32", n_windows, threads, text))  # its session keeps the baseline in memory
    run_point(ref, resolve("weight", "ffn_norm", 0, ref.info), make_format("bf16"), progress=False)  # baseline
    row("point", "wall s", "decode s", "overhead")
    for generate in (False, True):
        walls, decodes = [], []
        for kind, tensor, layer, fmt in POINTS[:n_points]:
            target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
            prompts = ("What is the capital of France?", "What is 17 * 23?") if generate else ()
            out = run_point(ref, target, make_format(fmt), progress=False, prompts=prompts)
            walls.append(out.seconds)
            decodes.append(out.decode_seconds)
        share = 1 - sum(decodes) / sum(walls)
        row(f"{n_points} points, KLD on, generation {'on' if generate else 'off'}", f"{sum(walls):.2f}",
            f"{sum(decodes):.2f}", f"{100 * share:.1f}%")


def reuse_vs_reload(text: str, n_windows: int, threads: int, n_points: int) -> None:
    print(f"\n## {n_points}-point sweep: one loaded model vs a reload per point (F32, {n_windows} windows)")
    with tempfile.TemporaryDirectory() as tmp, open_reference(settings("f32", n_windows, threads, text)) as ref:
        store = Store(Path(tmp))  # both variants read the baseline from the store, as a sweep's jobs do
        targets = [(resolve(k, t, layer, ref.info, ref.backend.nodes), make_format(f)) for k, t, layer, f in
                   POINTS[:n_points]]
        run_point(ref, targets[0][0], make_format("none"), progress=False, store=store)  # the baseline, outside
        t0 = time.perf_counter()
        for target, fmt in targets:
            run_point(ref, target, fmt, progress=False, store=store)
        reuse = time.perf_counter() - t0
        t0 = time.perf_counter()
        for target, fmt in targets:
            ref.session.close()
            ref.session = Session(*ref.session.identity)  # a fresh load: nothing in memory but the text's windows
            run_point(ref, target, fmt, progress=False, store=store)
        reload = time.perf_counter() - t0
    row("", "reuse s", "reload s", "saved")
    row(f"{n_points} points", f"{reuse:.1f}", f"{reload:.1f}", f"{100 * (1 - reuse / reload):.1f}%")


def sweep_rss(text: str, n_windows: int, points: str, tmp: Path) -> None:
    print(f"\n## Peak memory of a sweep process (`python -m sweep`, {n_windows} windows, layers {points}, "
          f"int8, ffn_norm weight + activation; GNU time's maximum resident set size)")
    row("container", "peak RSS MB", "model MB", "limit MB")
    from sweep.llama.container import container_path
    from sweep.llama.model_file import embedded_model_path

    env = {**os.environ, "SWEEP_WIKITEXT": text}
    for container in ("native", "f32"):
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "sweep", f"layer={points}",
                               "fmt=int8", "kind=weight,activation", "tensor=ffn_norm", f"data.n_windows={n_windows}",
                               f"model.container={container}", f"run.store={tmp / container}",
                               f"hydra.sweep.dir={tmp / ('sweep-' + container)}", "run.progress=false"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        peak_mb = int(proc.stderr.rsplit("MAXRSS", 1)[1].split()[0]) / 1024
        size = container_path(embedded_model_path(), container).stat().st_size / 2**20
        row(container, f"{peak_mb:.0f}", f"{size:.0f}", f"{size + 1536:.0f}")
        print(f"   wall {wall:.1f} s for {len(list((tmp / f'sweep-{container}').glob('*/record.json')))} points")


def splits(text: str, n_windows: int, layers: str, tmp: Path) -> None:
    cores = os.cpu_count() or 1
    configs = sorted({(1, cores), (cores, 1), (1, 1), (cores, cores), (2, max(1, cores // 2))})
    print(f"\n## Parallel jobs x llama.cpp threads on {cores} cores (`python -m sweep`, layers {layers}, l_out int8 "
          f"activation, {n_windows} windows, F32, default metrics; baseline already stored; model loads included)")
    row("n_jobs x threads", "wall s", "points/min", "vs 1 x all")
    env = {**os.environ, "SWEEP_WIKITEXT": text}
    base = [sys.executable, "-m", "sweep", "tensor=l_out", "kind=activation", "fmt=int8", f"data.n_windows={n_windows}",
            "run.progress=false"]
    warm = tmp / "warm"  # the baseline, computed once and hard-linked into each configuration's store
    subprocess.run([*base, "layer=0", "fmt=none", f"run.store={warm}", f"hydra.sweep.dir={tmp / 'warm-sweep'}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    reference = None
    for n_jobs, threads in sorted(configs, key=lambda c: (c != (1, cores), c)):
        store = tmp / f"store-{n_jobs}x{threads}"
        shutil.copytree(warm / "baselines", store / "baselines", copy_function=os.link)
        launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={n_jobs}"] if n_jobs > 1 else []
        t0 = time.perf_counter()
        proc = subprocess.run([*base, f"layer={layers}", f"run.threads={threads}", *launcher, f"run.store={store}",
                               f"hydra.sweep.dir={tmp / f'sweep-{n_jobs}x{threads}'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        n_points = len(list((store / "points").glob("*.json")))
        reference = reference or wall
        row(f"{n_jobs} x {threads}" + ("  (default)" if threads == max(1, cores // n_jobs) else ""), f"{wall:.1f}",
            f"{60 * n_points / wall:.2f}", f"{reference / wall:.2f}x")


def scaling(text: str, threads: int, sizes: list[int]) -> None:
    print("\n## Wall time vs slice size (one activation point, F32)")
    row("windows", "point s", "s / window", "")
    for n in sizes:
        ref = open_reference(settings("f32", n, threads, text))
        target = resolve("activation", "l_out", 10, ref.info, ref.backend.nodes)
        run_point(ref, target, make_format("none"), progress=False)  # the baseline of this slice
        out = run_point(ref, target, make_format("int8"), progress=False)
        row(str(n), f"{out.seconds:.2f}", f"{out.seconds / n:.3f}", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small slices and few points (about three minutes)")
    ap.add_argument("--llama-perplexity", help="path of a llama-perplexity binary (default: build one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()),
                    help="the text (default: the embedded WikiText-2, or SWEEP_WIKITEXT)")
    args = ap.parse_args()
    binary = llama_perplexity.find(args.llama_perplexity)
    n_windows, n_points = (4, 3) if args.quick else (16, 10)
    print(f"# sweep benchmark on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {'quick' if args.quick else 'full'}")
    ratio = throughput(binary, args.text, n_windows, args.threads, 7 if args.quick else 9)
    overhead(args.text, n_windows, args.threads, n_points)
    if not args.quick:
        reuse_vs_reload(args.text, 4, args.threads, n_points)
        with tempfile.TemporaryDirectory() as tmp:
            sweep_rss(args.text, 4, "0,15,29", Path(tmp))
        with tempfile.TemporaryDirectory() as tmp:
            splits(args.text, 8, "range(0,8)", Path(tmp))
        scaling(args.text, args.threads, [2, 4, 8, 16])
    print(f"\nthroughput ratio (sweep / llama-perplexity, the median round, the lower container): {ratio:.2f}")


if __name__ == "__main__":
    main()
