"""Per-point overhead, per-window math and peak memory against the vocabulary size: 49k (the embedded SmolLM2)
and 262k (a random-weight model with Gemma 3's vocabulary size).

    python -m bench.perf.vocab [--vocab 49152,262144] [--shape tiny|gemma] [--windows 4] [--points 4] [--threads N]
                          [--no-rss] [--recompute] [--generation] [--against REV] [--rounds 2] [--repeat 9]
                          [--math-only]

For 262,144 tokens the model is written with gguf's writer (sweep/testing/tiny_model.py): SmolLM2's tokenizer padded
with unique unused tokens, n_embd 640 (Gemma-3-270M's width, so the tied output matmul has the real size), and either
3 llama blocks (--shape tiny: its decode is much cheaper than a real model's, so the overhead *share* on it is
pessimistic, and the math section scales it to a real model's decode) or Gemma-3-270M's shape (--shape gemma:
18 gemma3 blocks, 4 query heads and 1 K/V head of 256, FFN 2048: a real model's decode, with random weights).
Every figure is measured in this invocation, F32 container, baseline stored before the timed points.

--against REV times the window math (sweep/scoring/window_math.py) as it was at git revision REV in the same process,
alternating old and new on the same logits (a shared machine's load then weighs on both alike); every version's
numbers are compared with a float64 computation from the same float32 logits. Then the whole point: REV's tree
(git archive) and this one run the same points in child processes, alternating round by round (--rounds), each
reporting per point its wall time, the time inside llama_decode and the time in the window math.
--generation: also points with the generation check in each job, and the peak RSS of a 2-point sweep with
metrics.generate=top:2 against false (the check must not load a second copy of the model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from scipy.special import logsumexp

from sweep.llama.cache import cache_root
from sweep.llama.container import container_path
from sweep.llama.model_file import embedded_model_path
from sweep.pipeline.config import compose
from sweep.pipeline.point import run_point
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant.apply import applied
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring import window_math
from sweep.store.records import Store

ROOT = Path(__file__).resolve().parents[2]

POINTS = [("weight", "ffn_down", 1, "int8"), ("activation", "l_out", 2, "int8"), ("weight", "attn_q", 0, "bf16"),
          ("activation", "ffn_norm", 1, "fp8_e4m3"), ("weight", "ffn_up", 2, "int4"), ("activation", "kqv_out", 0,
                                                                                        "bf16")]
# Gemma-3-270M Q4_K_M in its F32 container on 2 cores (issue 16): a 4-window point took 14.2 s, 15.6% of it outside
# llama_decode, 3.4 s of it in the generation check (all decode): 14.2 * 0.844 - 3.4 = 8.6 s of scoring decode.
REAL_DECODE_S_PER_WINDOW = (14.2 * (1 - 0.156) - 3.4) / 4
# FLOPs of one 512-token window: Gemma-3-270M (18 blocks of width 640, FFN 2048, the 262k output matmul for the 255
# scored rows) against this benchmark's tiny 262k model (3 blocks, same width and output): ~190 vs ~98 GFLOP.
GEMMA_TO_TINY_DECODE = 190 / 98


# Gemma-3-270M's shape (issue 22): 18 gemma3 blocks of width 640, 4 query heads and 1 K/V head of 256, FFN 2048,
# a sliding window of 512 on five blocks of six, and its 262,144-token vocabulary (tied output).
GEMMA_SHAPE = {"arch": "gemma3", "n_embd": 640, "n_ff": 2048, "n_layers": 18, "n_head": 4, "n_head_kv": 1,
               "head_dim": 256, "sliding_window": 512, "matmul_type": GGMLQuantizationType.Q8_0}


def model_for(n_vocab: int, shape: str = "tiny") -> Path:
    """The model of a vocabulary size: 49,152 is the embedded SmolLM2; otherwise a random-weight model written once
    into the cache: "tiny" (3 llama blocks, width 640) or "gemma" (GEMMA_SHAPE: a real model's decode)."""
    if n_vocab == 49152 and shape == "tiny":
        return embedded_model_path()
    name = f"tiny-llama-v{n_vocab}-e640.gguf" if shape == "tiny" else f"gemma3-270m-shaped-v{n_vocab}.gguf"
    path = cache_root() / "bench-models" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        extra = GEMMA_SHAPE if shape == "gemma" else {"n_embd": 640}
        # here: an --against child runs this file on an older sweep, which has no sweep.testing
        from sweep.testing.tiny_model import write_tiny_model

        write_tiny_model(tmp, embedded_model_path(), n_vocab=n_vocab, n_ctx_train=4096, **extra)
        tmp.rename(path)
    return path


def settings(model: Path, n_windows: int, threads: int, text: str):
    """The settings of the configuration `python -m sweep` composes (the real conf/)."""
    return job_settings(compose([f"model.path={model}", "model.container=f32", f"data.path={text}",
                                 f"data.n_windows={n_windows}", f"run.threads={threads}", "run.progress=false"]))


def row(*cells, widths=(46, 14, 14, 14, 14)):
    print("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))


def perplexity_at(rev: str):
    """The window math (sweep/scoring/window_math.py; sweep/perplexity.py before the subpackages) as it was at git
    revision `rev`, imported beside the current one."""
    for path, package in (("sweep/scoring/window_math.py", "sweep.scoring"), ("sweep/perplexity.py", "sweep")):  # noqa: B007
        got = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if got.returncode == 0:
            break
    else:
        raise SystemExit(f"no window math at git revision {rev}")
    name = f"{package}._window_math_at_{rev}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = package
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(got.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def paired_call(module, math, logits, targets, baseline) -> dict:
    """One window through `module`'s WindowMath; before BaselineWindow it took the baseline's arrays in a row."""
    if baseline is None:
        return math(logits, targets)
    if hasattr(module, "BaselineWindow"):
        return math(logits, targets, None, module.BaselineWindow(*baseline))
    return math(logits, targets, None, *baseline)


def window_math_ms(ref, store_root: Path, versions: dict, repeat: int) -> dict:
    """ms per window of the math alone, per version of the module, alternating between them round by round:
    unpaired (a baseline's), paired with a baseline in memory and paired with a stored one (read with pread).
    Each is timed twice: wall time on the job's threads (as a sweep runs it), and CPU time on one thread
    (time.thread_time: what a busy machine's other processes take from the wall time does not count)."""
    be, w = ref.backend, ref.windows
    base = run_point(ref, resolve("weight", POINTS[0][1], POINTS[0][2], ref.info), make_format("none"),
                     progress=False, store=Store(store_root)).baseline
    target = resolve("activation", "l_out", 1, ref.info, ref.backend.nodes)
    with applied(be, target, make_format("int8")):  # a real perturbation: the logits the paired math meets
        logits = np.array(be.decode_window(w.tokens[0], w.output_mask))  # a copy: the math overwrites its input
    in_memory = np.array(base.logits[0])
    maths = {(v, clock): m.WindowMath(be.n_threads if clock == "wall" else 1)
             for v, m in versions.items() for clock in ("wall", "cpu")}
    cases = {"unpaired": lambda m: None, "paired, in memory": lambda m: (in_memory, base.lse[0], base.nll[0]),
             "paired, stored": lambda m: (m.StoredLogits(base.logits)[0], base.lse[0], base.nll[0])}
    clocks = {"wall": time.perf_counter, "cpu": time.thread_time}
    work = np.empty_like(logits)
    times = {(c, v, clock): [] for c in cases for v in versions for clock in clocks}
    decodes = []
    results = {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        be.decode_window(w.tokens[0], w.output_mask)  # the same window's decode, under the same load
        decodes.append(time.perf_counter() - t0)
        for case, baseline in cases.items():
            for v, module in versions.items():
                for clock, now in clocks.items():
                    np.copyto(work, logits)
                    t0 = now()
                    results[case, v] = paired_call(module, maths[v, clock], work, w.targets[0], baseline(module))
                    times[case, v, clock].append(now() - t0)
    for math in maths.values():
        if hasattr(math, "close"):
            math.close()
    exact = exact_window(logits, in_memory, w.targets[0])
    errors = {}
    for (case, v), got in results.items():  # every version against float64
        np.testing.assert_array_equal(got["argmax"], exact["argmax"], err_msg=f"{case}: argmax of {v}")
        errors[case, v] = {"nll": np.abs(got["nll"] - exact["nll"]).max(),
                           **({"kld": (np.abs(got["kld"] - exact["kld"]) / exact["kld"]).max()}
                              if "kld" in got else {})}
    out = {v: {(c, clock): (1e3 * min(times[c, v, clock]), 1e3 * statistics.median(times[c, v, clock]))
               for c in cases for clock in clocks} for v in versions}
    out["decode"] = 1e3 * min(decodes), 1e3 * statistics.median(decodes)
    out["errors"] = errors
    return out


def exact_window(z: np.ndarray, y: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """NLL, KL(baseline || run) and argmax of one window in float64 from the float32 logits, a row at a time."""
    out = {"nll": np.empty(len(z)), "kld": np.empty(len(z)), "argmax": z.argmax(axis=1)}
    for r in range(len(z)):
        lp_z, lp_y = z[r].astype(np.float64), y[r].astype(np.float64)
        lp_z -= logsumexp(lp_z)
        lp_y -= logsumexp(lp_y)
        out["nll"][r] = -lp_z[targets[r]]
        out["kld"][r] = np.dot(np.exp(lp_y), lp_y - lp_z)
    return out


def overhead(ref, store_root: Path, n_points: int, prompts: tuple[str, ...]) -> dict[str, float]:
    walls, decodes = [], []
    store = Store(store_root)
    run_point(ref, resolve("weight", "ffn_norm", 0, ref.info), make_format("bf16"), progress=False, store=store)
    if prompts:  # the baseline's completions, once per sweep, outside the timing
        run_point(ref, resolve("weight", "ffn_norm", 0, ref.info), make_format("bf16"), progress=False,
                  store=store, prompts=prompts)
    for kind, tensor, layer, fmt in POINTS[:n_points]:
        target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
        out = run_point(ref, target, make_format(fmt), progress=False, store=store, prompts=prompts)
        walls.append(out.seconds)
        decodes.append(out.decode_seconds)
    return {"wall": sum(walls), "decode": sum(decodes), "share": 1 - sum(decodes) / sum(walls)}


def point_seconds(model: Path, n_windows: int, threads: int, text: str, store_root: Path, n_points: int) -> list:
    """In this process: POINTS[:n_points] on `model`, baseline stored first (untimed, or read from `store_root`);
    per point its wall time, the time inside llama_decode and the time in the window math (WindowMath calls)."""
    import sweep.scoring.window_math as wm  # the tree on sys.path: this one, or --against's REV in a child

    spent = [0.0]
    call = wm.WindowMath.__call__

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return call(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    wm.WindowMath.__call__ = timed
    ref = open_reference(settings(model, n_windows, threads, text))
    store = Store(store_root)
    run_point(ref, resolve("weight", "ffn_norm", 0, ref.info), make_format("bf16"), progress=False, store=store)
    out = []
    for kind, tensor, layer, fmt in POINTS[:n_points]:
        spent[0] = 0.0
        target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
        o = run_point(ref, target, make_format(fmt), progress=False, store=store)
        out.append({"point": f"{kind} {tensor} L{layer} {fmt}", "wall": o.seconds, "decode": o.decode_seconds,
                    "math": spent[0], "windows": o.score.n_windows})
    ref.backend.close()
    return out


def export_tree(rev: str, into: Path) -> Path:
    """The package, its config and plugins as they were at git revision `rev`, unpacked under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "sweep", "conf", "hydra_plugins"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def whole_points_against(rev: str, model: Path, args, store_root: Path, rounds: int) -> None:
    """The whole point (POINTS[:args.points], baseline stored) at `rev` and now, in child processes that alternate
    round by round (each imports its own tree; a shared machine's load weighs on both alike)."""
    trees = {rev: export_tree(rev, store_root.parent / "tree-at-rev"), "now": ROOT}
    got = {v: [] for v in trees}
    for _ in range(rounds):
        for version, tree in trees.items():
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-points", str(model),
                                    str(args.windows), str(args.threads), args.text, str(store_root), str(args.points)],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                                   text=True)
            if child.returncode != 0:
                raise SystemExit(f"{version}: {child.stderr[-2000:]}")
            got[version].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"   whole point, {args.points} points x {args.windows} windows, baseline stored, {rounds} rounds "
          f"alternating {rev} and now (each in its own process); per round: sums over the points")
    widths = (34, 10, 10, 10, 10, 14)
    row("   version, round", "wall s", "decode s", "outside", "s/window", "math s/window", widths=widths)
    for version, runs in got.items():
        for r, points in enumerate(runs):
            wall, decode, math = (sum(p[k] for p in points) for k in ("wall", "decode", "math"))
            n = sum(p["windows"] for p in points)
            row(f"   {version}, {r + 1}", f"{wall:.2f}", f"{decode:.2f}", f"{100 * (wall - decode) / wall:.2f}%",
                f"{(wall - decode) / n:.4f}", f"{math / n:.4f}", widths=widths)


def peak_rss(model: Path, n_windows: int, tmp: Path, text: str, mode: str = "store", generate: str = "false",
             grid: tuple[str, ...] = ("layer=0,1", "kind=weight,activation")) -> tuple[float, float]:
    env = {**os.environ, "SWEEP_WIKITEXT": text}
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, "-m", "sweep", f"model.path={model}",
                           *grid, "fmt=int8", "tensor=ffn_norm", "model.container=f32",
                           f"data.n_windows={n_windows}", f"metrics.generate={generate}", f"run.store={tmp / 'store'}",
                           f"metrics.baseline_logits={mode}",
                           f"hydra.sweep.dir={tmp / 'sweep'}", "run.progress=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    peak_mb = int(proc.stderr.rsplit("MAXRSS", 1)[1].split()[0]) / 1024
    return peak_mb, container_path(model, "f32").stat().st_size / 2**20


def math_table(ms: dict, n_vocab: int, threads: int, scaled: bool = True) -> None:
    """scaled: the model is the 3-block tiny one, so its decode is also scaled to Gemma-3-270M's (by FLOPs, and the
    issue's measured one); a Gemma-shaped model's decode is its own."""
    versions = [v for v in ms if v not in ("decode", "errors")]
    widths = (34, *[22] * (2 * len(versions)))
    row("window math, ms (min / median)", *(f"{v} {clock}" for v in versions for clock in (f"wall {threads} thr",
                                                                                            "cpu 1 thr")),
        widths=widths)
    for case, _ in ms[versions[0]]:
        if _ == "wall":
            row(f"  {case}", *(f"{ms[v][case, clock][0]:.1f} / {ms[v][case, clock][1]:.1f}" for v in versions
                               for clock in ("wall", "cpu")), widths=widths)
    print("   error against float64 (max over the window): "
          + "; ".join(f"{v} {case}: NLL {e['nll']:.1e}" + (f", KL rel {e['kld']:.1e}" if "kld" in e else "")
                      for (case, v), e in ms["errors"].items()))
    decode = ms["decode"][0]
    print(f"   the same window's decode, same process: {decode:.0f} ms (min; median {ms['decode'][1]:.0f})")
    for v in versions:
        wall, cpu = ms[v]["paired, stored", "wall"][0], ms[v]["paired, stored", "cpu"][0]
        line = f"   {v}: paired stored math, wall {100 * wall / (decode + wall):.1f}% of a window on this model"
        if n_vocab > 49152 and scaled:
            gemma = decode * GEMMA_TO_TINY_DECODE
            real = 1e3 * REAL_DECODE_S_PER_WINDOW
            split = cpu / threads  # the one-thread CPU time shared by the job's threads, as on an idle machine
            line += (f"; vs a Gemma-3-270M decode scaled by FLOPs ({gemma:.0f} ms): {100 * wall / (gemma + wall):.1f}%"
                     f"; cpu/{threads} vs the issue's {real:.0f} ms: {100 * split / (real + split):.1f}%"
                     f" (cpu on 1 thread: {100 * cpu / (real + cpu):.1f}%)")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="49152,262144")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--recompute", action="store_true", help="also the peak RSS with metrics.baseline_logits=recompute")
    ap.add_argument("--generation", action="store_true", help="also time points with the generation check")
    ap.add_argument("--against", help="also time the window math and the whole point at this git revision")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the whole-point comparison (--against)")
    ap.add_argument("--shape", choices=("tiny", "gemma"), default="tiny",
                    help="the large-vocabulary model: 3 llama blocks (tiny) or Gemma-3-270M's 18 gemma3 blocks")
    ap.add_argument("--child-points", nargs=6, help=argparse.SUPPRESS)  # a whole-point child (whole_points_against)
    ap.add_argument("--repeat", type=int, default=9, help="rounds of the window-math timing")
    ap.add_argument("--math-only", action="store_true", help="only the window math (no points, no RSS)")
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT"), help="default: the embedded WikiText-2")
    args = ap.parse_args()
    if not args.text:
        from sweep.scoring.text import embedded_text_path  # here: an --against child runs this file on an older sweep

        args.text = str(embedded_text_path())
    if args.child_points:
        model, windows, threads, text, store, points = args.child_points
        print(json.dumps(point_seconds(Path(model), int(windows), int(threads), text, Path(store), int(points))))
        return
    print(f"# vocabulary benchmark: {os.cpu_count()} cores, {args.threads} threads, {args.windows} windows of 512, "
          f"F32 container, {args.points} points (weight + activation), baseline stored; "
          f"load average {os.getloadavg()[0]:.1f}")
    versions = {"now": window_math}
    if args.against:
        versions = {args.against: perplexity_at(args.against), **versions}
    for n_vocab in map(int, args.vocab.split(",")):
        model = model_for(n_vocab, args.shape)
        ref = open_reference(settings(model, args.windows, args.threads, args.text))
        print(f"\n## vocab {ref.backend.n_vocab} ({model.name})")
        with tempfile.TemporaryDirectory() as tmp:
            math_table(window_math_ms(ref, Path(tmp) / "store", versions, args.repeat), n_vocab, args.threads,
                       scaled=args.shape == "tiny")
            print(f"   load average now {os.getloadavg()[0]:.1f}")
            if args.math_only:
                ref.backend.close()
                continue
            if args.against:
                ref.backend.close()  # the children load it, one at a time
                whole_points_against(args.against, model, args, Path(tmp) / "store", args.rounds)
                ref = open_reference(settings(model, args.windows, args.threads, args.text))
            o = overhead(ref, Path(tmp) / "store", args.points, ())
            decode_per_window = o["decode"] / (args.points * args.windows)
            outside_per_window = (o["wall"] - o["decode"]) / (args.points * args.windows)
            row("per point", "wall s", "decode s", "outside", "s/window")
            row(f"{args.points} points, generation off", f"{o['wall']:.2f}", f"{o['decode']:.2f}",
                f"{100 * o['share']:.1f}%", f"{outside_per_window:.3f}")
            if args.generation:
                g = overhead(ref, Path(tmp) / "store", args.points, ("What is the capital of France?",
                                                                    "What is 17 * 23?"))
                row(f"{args.points} points, generation on", f"{g['wall']:.2f}", f"{g['decode']:.2f}",
                    f"{100 * g['share']:.1f}%", f"gen {100 * (g['wall'] - o['wall']) / g['wall']:.1f}%")
            print(f"   decode {decode_per_window:.3f} s/window on this model; outside decode "
                  f"{outside_per_window:.3f} s/window")
            if n_vocab > 49152 and args.shape == "tiny":
                real = outside_per_window / (outside_per_window + REAL_DECODE_S_PER_WINDOW)
                print(f"   scaled to a real Gemma-3-270M decode of {REAL_DECODE_S_PER_WINDOW:.2f} s/window: "
                      f"{100 * real:.1f}% outside decode")
        ref.backend.close()
        for mode in () if args.no_rss or args.math_only else ("store", "recompute") if args.recompute else ("store",):
            with tempfile.TemporaryDirectory() as tmp:
                peak, size = peak_rss(model, args.windows, Path(tmp), args.text, mode)
            row(f"peak RSS MB (python -m sweep, 4 points, {mode})", f"{peak:.0f}", f"model {size:.0f}",
                f"limit {size + 1536:.0f}")
        if args.generation and not (args.no_rss or args.math_only):  # issue 22: the check holds no second model
            for generate in ("false", "top:2"):
                with tempfile.TemporaryDirectory() as tmp:
                    peak, size = peak_rss(model, args.windows, Path(tmp), args.text, generate=generate,
                                          grid=("layer=0,1", "kind=weight"))
                row(f"peak RSS MB (2 points, metrics.generate={generate})", f"{peak:.0f}", f"model {size:.0f}")


if __name__ == "__main__":
    main()
