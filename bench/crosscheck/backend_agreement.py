"""The same points on the CPU and on another backend (RPC servers, or this build's GPUs), compared number by number.

    python -m bench.crosscheck.backend_agreement --rpc 127.0.0.1:50052 [--n-windows 4] [--out DIR]
    python -m bench.crosscheck.backend_agreement --gpu [--n-windows 4] [--out DIR]

Embedded SmolLM2 on the real WikiText text; each point runs through the sweep's own job (`run_job`) twice, on the
CPU and with every layer offloaded (model.n_gpu_layers=-1), into a fresh store. Prints one table (markdown) and
writes agreement.json / agreement.md under --out. "bit-identical" means every per-window figure (ΔNLL, KLD, top-1,
baseline NLL), the PPLs, the hook calls and the elements changed are equal; otherwise the largest differences are
the measured tolerance. Also compares the first window's raw logits of the unperturbed F32 container.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings, f32_container
from sweep.llama.model_file import embedded_model_path
from sweep.pipeline.config import compose
from sweep.pipeline.job import run_job
from sweep.pipeline.session import Sessions
from sweep.scoring.text import embedded_text_path

# (container, kind, tensor, layer, fmt): a weight point, an activation point, a GGUF-type point, and the native
# container's weight point (a copy with the target in F32)
POINTS = [("f32", "weight", "ffn_down", 15, "int8"), ("f32", "activation", "ffn_out", 15, "int8"),
          ("f32", "weight", "ffn_down", 15, "q4_K"), ("native", "weight", "attn_q", 3, "bf16")]
WINDOWED = ["window_dnll", "window_kld", "window_top1", "window_baseline_nll"]
SCALARS = ["ppl", "baseline_ppl", "delta_nll", "kld_mean", "top1_agree"]
COUNTS = ["hook_calls", "n_changed", "n_elements"]


def job(point, n_windows: int, store: Path, text: str, extra: list[str]) -> dict:
    container, kind, tensor, layer, fmt = point
    cfg = compose([f"model.container={container}", f"kind={kind}", f"tensor={tensor}", f"layer={layer}",
                   f"fmt={fmt}", f"data.path={text}", f"data.n_windows={n_windows}", f"run.store={store}",
                   "run.progress=false", "metrics.generate=false", *extra])
    with Sessions() as sessions:
        return run_job(cfg, sessions)


def largest_difference(a: dict, b: dict) -> float:
    diffs = [abs(a[k] - b[k]) for k in SCALARS if a.get(k) is not None and b.get(k) is not None]
    diffs += [float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in WINDOWED if k in a and k in b]
    return max(diffs) if diffs else math.nan


def compare(point, n_windows: int, text: str, other: list[str], label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="agreement-") as tmp:
        cpu = job(point, n_windows, Path(tmp) / "store", text, [])
        dev = job(point, n_windows, Path(tmp) / "store", text, other)
    same = all(cpu.get(k) == dev.get(k) for k in SCALARS + WINDOWED + COUNTS)
    return {"point": " ".join(map(str, point)), "status": (cpu["status"], dev["status"]), "bit_identical": same,
            "max_abs_difference": 0.0 if same else largest_difference(cpu, dev), "other": label,
            "layer_devices": dev.get("layer_devices"), "devices": dev.get("devices"),
            "cpu": {k: cpu.get(k) for k in SCALARS + COUNTS}, label: {k: dev.get(k) for k in SCALARS + COUNTS},
            "keys_differ": cpu["key"] != dev["key"]}


def logits_check(text_path: str, other: tuple[str, ...], n_ctx: int = 512) -> dict:
    """The first window's raw logits, unperturbed F32 container, CPU vs offloaded."""
    f32 = f32_container(embedded_model_path())
    with Backend(f32, n_ctx, os.cpu_count() or 1, settings=compute_settings("f32")) as cpu:
        tokens = cpu.tokenize(Path(text_path).read_text()[:20000])[:n_ctx]
        mask = np.zeros(n_ctx, dtype=np.int8)
        mask[n_ctx // 2:] = 1
        a = cpu.decode_window(tokens, mask).copy()
    with Backend(f32, n_ctx, os.cpu_count() or 1, settings=compute_settings("f32", -1, *other)) as dev:
        b = dev.decode_window(tokens, mask).copy()
    return {"logits_bit_identical": bool(np.array_equal(a, b)), "logits_max_abs_diff": float(np.max(np.abs(a - b))),
            "logits_max_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(a)))}


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


def table(rows: list[dict], label: str) -> str:
    head = ["point", "backend", "PPL", "ΔNLL", "KLD", "top-1", "hook calls", "n_changed", "bit-identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for side in ("cpu", label):
            m = r[side]
            ident = "yes" if r["bit_identical"] else f"no (max |Δ| {r['max_abs_difference']:.3g})"
            lines.append("| " + " | ".join([r["point"], side, fmt(m["ppl"]), fmt(m["delta_nll"]), fmt(m["kld_mean"]),
                                            fmt(m["top1_agree"]), fmt(m["hook_calls"]), fmt(m["n_changed"]),
                                            ident]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rpc", help="HOST:PORT[,HOST:PORT...] of running RPC servers")
    g.add_argument("--gpu", action="store_true", help="this build's GPUs")
    p.add_argument("--n-windows", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = p.parse_args()
    text = os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path())
    label = "rpc" if args.rpc else "gpu"
    other = ([f"model.rpc={args.rpc}"] if args.rpc else []) + ["model.n_gpu_layers=-1"]
    rows = [compare(pt, args.n_windows, text, other, label) for pt in POINTS]
    logits = logits_check(text, (args.rpc,) if args.rpc else ())
    md = table(rows, label)
    print(md)
    print(f"layers: {rows[0]['layer_devices']}; devices: {rows[0]['devices']}")
    print(f"first window's logits (F32 container, unperturbed): bit-identical {logits['logits_bit_identical']}, "
          f"max |Δ| {logits['logits_max_abs_diff']:.3g}, max |Δ|/max|logit| {logits['logits_max_rel_diff']:.3g}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "agreement.json").write_text(json.dumps({"points": rows, **logits}, indent=1, default=str))
        (args.out / "agreement.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
