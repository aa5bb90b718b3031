"""Prefix reuse changes no number: each point scored with reuse and without (in two sessions, so the baseline is
computed twice: once while the residuals are read, once plainly), NLL, KL and top-1 of every scored token compared
bit for bit, plus the proofs (elements changed, hook calls) and the baselines.

On the embedded SmolLM2 in its F32 container by default: int8 weight ffn_down and int8 activation l_out at a few
layers (each after a different stage, and one before the first stage, which falls back). Exit status 1 on any
difference.

    python -m bench.crosscheck.prefix_identity [--layers 5,15,29] [--windows 4] [--container f32] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from sweep.llama.cache import CONTAINERS, STAGES, cache_root
from sweep.pipeline.config import compose
from sweep.pipeline.point import run_point
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.text import embedded_text_path

POINTS = (("weight", "ffn_down"), ("activation", "l_out"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3,5,15,29")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--container", default="f32")
    ap.add_argument("--model", default=None, help="a GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()))
    args = ap.parse_args()
    # a cache of its own for the residuals (the F32 containers and stage files are shared): they are read during
    # this run's baseline, as in a first sweep
    work = Path(tempfile.mkdtemp(prefix="prefix-identity-"))
    for sub in (CONTAINERS, STAGES):
        (cache_root() / sub).mkdir(parents=True, exist_ok=True)
        (work / sub).symlink_to(cache_root() / sub)
    cfg = compose([f"model.container={args.container}", f"data.path={args.text}", f"data.n_windows={args.windows}",
                   f"run.threads={args.threads}", "run.progress=false", f"model.cache_dir={work}",
                   *([f"model.path={args.model}"] if args.model else [])])
    settings = job_settings(cfg).run.prefix
    fmt = make_format("int8")
    failures = 0
    points = [(kind, tensor, layer) for kind, tensor in POINTS for layer in map(int, args.layers.split(","))]
    runs = {}
    for reuse in (True, False):  # two sessions: nothing computed with reuse (the baseline included) serves the other
        with open_reference(job_settings(cfg)) as ref:
            for kind, tensor, layer in points:
                target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
                runs[reuse, kind, tensor, layer] = run_point(ref, target, fmt, progress=False,
                                                             prefix=settings if reuse else None)
            if reuse:
                print(f"{ref.source.name}, {ref.container} container, {ref.windows.n_windows} windows of "
                      f"{ref.windows.n_ctx}; stages from run.prefix_stages={settings.n_stages}; full-model windows "
                      f"decoded for reuse alone: {ref.session.prefixes.extra_windows}")
    print(f"{'point':<26}{'reuse':<10}{'stage':>6}{'tokens':>8}  {'NLL':<6}{'KLD':<6}{'top-1':<6}"
          f"{'proof':<6}{'base':<6}{'ΔPPL':>12}")
    for kind, tensor, layer in points:
        on, off = runs[True, kind, tensor, layer], runs[False, kind, tensor, layer]
        a, b = on.score, off.score
        same = {"NLL": np.array_equal(a.nll, b.nll), "KLD": np.array_equal(a.kld, b.kld),
                "top-1": np.array_equal(a.argmax, b.argmax),
                "proof": (on.proof.n_changed, on.proof.hook_calls) == (off.proof.n_changed, off.proof.hook_calls),
                "base": np.array_equal(on.baseline.nll, off.baseline.nll)
                and np.array_equal(on.baseline.argmax, off.baseline.argmax)}
        failures += not all(same.values())
        r = on.prefix
        print(f"{kind + ' ' + tensor + ' L' + str(layer):<26}{r.status:<10}{r.stage or '-':>6}{a.nll.size:>8}  "
              + "".join(f"{'same' if v else 'DIFF':<6}" for v in same.values())
              + f"{a.ppl - on.baseline.ppl:>+12.5f}" + (f"  ({r.reason})" if r.reason else ""))
    shutil.rmtree(work)
    print("bit-identical: every token of every point" if not failures else f"{failures} point(s) DIFFER")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
