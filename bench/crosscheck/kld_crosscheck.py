"""Cross-check of KL divergence and top-1 agreement against `llama-perplexity --kl-divergence`.

A large perturbation (every attn_v weight rounded to int4 g32) is written into a GGUF copy of the F32 container;
llama-perplexity scores the container with --kl-divergence-base, then the copy with --kl-divergence. The same
perturbation is then applied in memory by this project. llama-perplexity stores base log-probs in 16 bits, which
is why the perturbation must be large for the comparison to test definitions rather than its rounding.

    python -m bench.crosscheck.kld_crosscheck [--llama-perplexity PATH] [--chunks 8]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

from bench import llama_perplexity
from sweep.llama.container import write_gguf_copy
from sweep.pipeline.config import compose
from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.text import embedded_text_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-perplexity", help="path of a llama-perplexity binary (default: build one)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()))
    args = ap.parse_args()
    binary = llama_perplexity.find(args.llama_perplexity)
    fmt, pattern = make_format("int4", group_size=32), re.compile(r"^blk\.\d+\.attn_v\.weight$")
    cfg = compose(["model.container=f32", f"data.path={args.text}", f"data.n_windows={args.chunks}",
                   f"run.threads={args.threads}"])
    ref = open_reference(job_settings(cfg))
    target = resolve("weight", "attn_v", "all", ref.info)
    ours = record(ref, target, fmt, run_point(ref, target, fmt, progress=True))

    with tempfile.TemporaryDirectory(prefix="kld-crosscheck-") as tmp:
        perturbed = write_gguf_copy(ref.backend.path, Path(tmp) / "attn_v_int4.gguf",
                                    to_f32=lambda name, ty: bool(pattern.match(name)),
                                    transform=lambda name, data: fmt(data))
        base_file = Path(tmp) / "base.kld"
        base = llama_perplexity.run(binary, ref.backend.path, Path(args.text), args.chunks, args.threads,
                                    extra=["--kl-divergence-base", str(base_file)], settings=ref.backend.settings)
        theirs = llama_perplexity.run(binary, perturbed, Path(args.text), args.chunks, args.threads,
                                      extra=["--kl-divergence-base", str(base_file), "--kl-divergence"],
                                      settings=ref.backend.settings)
    print(f"\nperturbation: weight attn_v, all {ref.info.n_layers} layers, {fmt.label}; {args.chunks} windows of 512")
    print(f"{'':28}{'llama-perplexity':>22}{'sweep':>22}")
    print(f"{'baseline PPL':28}{base['ppl']:>22.4f}{ours['baseline_ppl']:>22.4f}")
    print(f"{'mean KLD':28}{theirs['kld_mean']:>14.6f} ± {theirs['kld_mean_stderr']:<7.6f}"
          f"{ours['kld_mean']:>14.6f} ± {ours['kld_stderr']:.6f}")
    print(f"{'same top token (%)':28}{theirs['same_top_p']:>14.3f} ± {theirs['same_top_p_stderr']:<7.3f}"
          f"{100 * ours['top1_agree']:>14.3f} ± {100 * ours['top1_agree_stderr']:.3f}")
    print("(llama-perplexity's ± treats tokens as independent; this project's is from per-window means)")


if __name__ == "__main__":
    main()
