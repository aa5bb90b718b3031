"""Prefix reuse changes no number: each point scored with reuse and without, NLL, KL and top-1 of every scored
token compared bit for bit (plus the proofs: elements changed, hook calls).

On the embedded SmolLM2 in its F32 container by default: int8 weight ffn_down and int8 activation l_out at a few
layers (each after a different stage, and one before the first stage, which falls back). Exit status 1 on any
difference.

    python bench/prefix_identity.py [--layers 5,15,29] [--windows 4] [--container f32] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from sweep.config import compose
from sweep.job import prefix_settings
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.reference import open_reference
from sweep.run import run_point

ROOT = Path(__file__).resolve().parents[1]
POINTS = (("weight", "ffn_down"), ("activation", "l_out"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3,5,15,29")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--container", default="f32")
    ap.add_argument("--model", default=None, help="a GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or
                    str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    args = ap.parse_args()
    cfg = compose([f"model.container={args.container}", f"data.path={args.text}", f"data.n_windows={args.windows}",
                   f"run.threads={args.threads}", "run.progress=false",
                   *([f"model.path={args.model}"] if args.model else [])])
    settings = prefix_settings(cfg)
    fmt = make_format("int8")
    failures = 0
    with open_reference(cfg) as ref:
        print(f"{ref.source.name}, {ref.container} container, {ref.windows.n_windows} windows of {ref.windows.n_ctx}; "
              f"stages from run.prefix_stages={settings.n_stages}")
        print(f"{'point':<26}{'reuse':<10}{'stage':>6}{'tokens':>8}  {'NLL':<6}{'KLD':<6}{'top-1':<6}"
              f"{'proof':<6}{'ΔPPL':>12}")
        for kind, tensor in POINTS:
            for layer in map(int, args.layers.split(",")):
                target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
                on = run_point(ref, target, fmt, progress=False, prefix=settings)
                off = run_point(ref, target, fmt, progress=False, prefix=None)
                a, b = on.score, off.score
                same = {"NLL": np.array_equal(a.nll, b.nll), "KLD": np.array_equal(a.kld, b.kld),
                        "top-1": np.array_equal(a.argmax, b.argmax),
                        "proof": (on.proof.n_changed, on.proof.hook_calls) == (off.proof.n_changed,
                                                                              off.proof.hook_calls)}
                failures += not all(same.values())
                r = on.prefix
                print(f"{kind + ' ' + tensor + ' L' + str(layer):<26}{r.status:<10}{r.stage or '-':>6}{a.nll.size:>8}  "
                      + "".join(f"{'same' if v else 'DIFF':<6}" for v in same.values())
                      + f"{a.ppl - on.baseline.ppl:>+12.5f}" + (f"  ({r.reason})" if r.reason else ""))
    print("bit-identical: every token of every point" if not failures else f"{failures} point(s) DIFFER")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
