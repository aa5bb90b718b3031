"""Speed with every layer offloaded (model.n_gpu_layers=-1): the sweep's scorer vs llama-perplexity -ngl 99 built from
the same source, and where a point's time goes outside llama_decode. Run by bench/perf/device_check.sh on a GPU machine.

    python -m bench.perf.device_speed --llama-perplexity PATH [--model GGUF] [--n-windows 16] [--out DIR]

On a GPU the decode is fast and the per-window math on the CPU (log-softmax over the 49k vocabulary, NLL, KL against
the stored baseline, top-1) may dominate a point: the "outside decode" share below measures it. What would move it:
computing log-softmax/KL on the device (a ggml graph over the logits) or fewer scored positions per window.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench import llama_perplexity
from sweep.pipeline.config import compose
from sweep.pipeline.point import run_point
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.perplexity import score
from sweep.scoring.text import embedded_text_path
from sweep.store.records import Store

POINTS = [("weight", "ffn_down", 5, "int8"), ("activation", "l_out", 10, "int8"), ("weight", "attn_q", 3, "bf16"),
          ("activation", "ffn_norm", 29, "bf16")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-perplexity", type=Path, required=True)
    p.add_argument("--n-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    p.add_argument("--model", help="unused: the embedded model is what the sweep's default config loads")
    args = p.parse_args()
    text = os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path())
    lines = [f"# every layer offloaded, {args.n_windows} windows of 512, {args.threads} CPU threads"]
    result = {}
    for container in ("native", "f32"):
        cfg = compose([f"model.container={container}", "model.n_gpu_layers=-1", f"data.path={text}",
                       f"data.n_windows={args.n_windows}", f"run.threads={args.threads}", "run.progress=false"])
        with open_reference(job_settings(cfg)) as ref:
            placement = ref.backend.placement()
            ours = [score(ref.backend, ref.windows, progress=False, math=ref.session.math) for _ in range(2)][-1]
            theirs = llama_perplexity.run(args.llama_perplexity, ref.backend.path, Path(text), args.n_windows,
                                          args.threads, extra=["-ngl", "99"], settings=ref.backend.settings)
            their_tps = args.n_windows * 512 / theirs["score_seconds"]
            lines.append(f"{container}: sweep {ours.tokens_per_second:.1f} tokens/s, llama-perplexity -ngl 99 "
                         f"{their_tps:.1f} tokens/s (ratio {ours.tokens_per_second / their_tps:.3f}); PPL "
                         f"{ours.ppl:.4f} vs {theirs.get('ppl')}")
            lines.append(f"   layers: {placement['layer_devices']}")
            lines.append(f"   devices: {placement['devices']}")
            result[container] = {"sweep_tokens_per_s": ours.tokens_per_second, "llama_perplexity_tokens_per_s":
                                 their_tps, "ppl": ours.ppl, "llama_perplexity_ppl": theirs.get("ppl"), **placement}
            if container == "f32":  # per point: wall vs decode (the baseline is computed first, outside)
                with tempfile.TemporaryDirectory() as tmp:
                    store = Store(Path(tmp))
                    run_point(ref, resolve("weight", "ffn_norm", 0, ref.info), make_format("bf16"), progress=False,
                              store=store)
                    rows = []
                    for kind, tensor, layer, fmt in POINTS:
                        target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
                        t0 = time.perf_counter()
                        out = run_point(ref, target, make_format(fmt), progress=False, store=store)
                        wall = time.perf_counter() - t0
                        rows.append({"point": f"{kind} {tensor} L{layer} {fmt}", "wall_s": wall,
                                     "decode_s": out.decode_seconds, "outside_decode_s": wall - out.decode_seconds,
                                     "per_window_outside_s": (wall - out.decode_seconds) / args.n_windows})
                        lines.append(f"   point {rows[-1]['point']}: wall {wall:.3f} s, decode "
                                     f"{out.decode_seconds:.3f} s, outside decode {wall - out.decode_seconds:.3f} s "
                                     f"({100 * (1 - out.decode_seconds / wall):.0f}%)")
                    result["points"] = rows
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.txt").write_text("\n".join(lines) + "\n")
        (args.out / "speed.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
