"""`python -m sweep.recipe RUNS... --types q4_K,q6_K,q8_0 --size 90MB|Q4_K_M|FILE.gguf | --bpw 5.0`

From the gathered tables of finished sweeps (every weight tensor measured at every candidate type) to a
mixed-precision recipe: one type per tensor, minimizing the sum of the tensors' measured damages under a byte
budget (sweep/recipe/solve.py), exported for llama-quantize (recipe.txt) and with its figures (recipe.json);
`--build FILE` writes the GGUF with llama.cpp's own quantizer; `--validate` scores it and llama.cpp's presets on
held-out text (sweep/recipe/validate.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from pathlib import Path

from ..cores import available_cores
from ..errors import SweepError, exit_on_user_error
from ..llama.container import container_path
from ..llama.model_file import embedded_model_path, sha256
from ..quant.imatrix_file import provenance
from .build import PRESETS, build_and_check, check_source_quantizable, preset_file
from .export import write_recipe
from .heldout import check_long_enough, read_heldout_text
from .ladder import ladder_sizes, run_ladder
from .refine import refine
from .sizes import SourceModel, check_type, parse_size
from .solve import Recipe, budget_bytes, make_recipe, missing_measurements
from .table import Table, check_complete, read_table
from .ties import TIE_HELP, tie_cost, tie_patterns
from .validate import validate

log = logging.getLogger("sweep.recipe")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sweep.recipe", description=__doc__.split("\n\n")[1])
    p.add_argument("runs", nargs="+", type=Path, help="sweep directories (hydra.sweep.dir) or record files")
    p.add_argument("--types", default="q4_K,q5_K,q6_K,q8_0", help="candidate GGUF types (comma-separated)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--size", help="file size budget: 90MB, 85.5MiB, a GGUF file's size, or a llama.cpp preset "
                                       "built from the source (Q4_K_M, ...)")
    budget.add_argument("--bpw", type=float, help="bits per weight over every tensor's elements")
    budget.add_argument("--ladder", action="store_true", help="a recipe at every llama.cpp preset size (Q2_K ... "
                                                               "Q5_K_M; IQ2/IQ3 too with --imatrix), each built and "
                                                               "compared with its preset (sweep/recipe/ladder.py)")
    budget.add_argument("--sizes", help="the ladder at these preset sizes only, e.g. Q2_K,Q3_K_M,Q4_K_M")
    p.add_argument("--metric", default="kld_mean", help="damage to minimize (a ranked metric; default kld_mean)")
    p.add_argument("--group", action="append", default=[], metavar="REGEX",
                   help="tensors matching REGEX share one type within each block (repeatable), e.g. 'attn_[qkv]'")
    p.add_argument("--tie", action="append", default=[], metavar="A,B[,C]",
                   help="tensor classes that take one type within each block, as one choice of the solver "
                        "(repeatable): 'gate,up' (fused gate/up kernels), 'q,k,v'; short names " + TIE_HELP)
    p.add_argument("--default-type", action="append", default=[], metavar="[REGEX=]TYPE",
                   help="type of quantizable tensors the tables do not cover (repeatable: 'token_embd=q8_0' for the "
                        "tensors REGEX finds, a plain TYPE for the rest; default q8_0; 'keep' = the source's type)")
    p.add_argument("--source", type=Path, help="the F32/F16 GGUF to build from (default: the F32 container of the "
                                               "model the tables were measured on)")
    p.add_argument("--imatrix", type=Path, help="llama.cpp importance matrix for the build (the tables must have "
                                                "been measured with it: fmt.imatrix=...)")
    p.add_argument("--out", type=Path, default=Path("recipe"), help="directory for recipe.txt, recipe.json, ...")
    p.add_argument("--build", type=Path, metavar="OUT.gguf", help="write the recipe's GGUF with llama.cpp's quantizer")
    p.add_argument("--validate", action="store_true", help="score the built file and llama.cpp's presets on "
                                                            "held-out windows (needs --build)")
    p.add_argument("--presets", default="Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K,Q8_0", help="presets to validate against")
    p.add_argument("--heldout-windows", type=int, default=16, help="held-out windows scored by --validate")
    p.add_argument("--heldout-text", type=Path, metavar="PATH", help="--validate also scores the files on this text "
                                                                     "(UTF-8, at least 2 windows), e.g. not WikiText")
    p.add_argument("--loop-sizes", help="ladder sizes whose recipe goes through the closed loop (joint points "
                                        "measured, the additive model corrected, solved again: sweep/recipe/loop.py)")
    p.add_argument("--loop-budget", type=int, default=40, help="joint points the closed loop may measure per size")
    p.add_argument("--loop-blocks", type=int, default=1, help="consecutive blocks per joint point of the loop")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="tables with the map's predictions (run.estimate=map): measure up to N predicted points "
                        "exactly where a choice rests on overlapping intervals, then solve again "
                        "(sweep/recipe/refine.py)")
    p.add_argument("--speed-reps", type=int, default=5, metavar="N",
                   help="with --validate in the ladder: prompt (pp512) and generation (tg128) throughput of every "
                        "recipe and preset, N repetitions alternated, as llama-bench (0: not measured)")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def default_source(table: Table) -> Path:
    # the model the records name (its path when measured), else the embedded one, if it is the same file
    candidates = [Path(table.model_path)] if table.model_path else []
    candidates.append(embedded_model_path())
    for model in candidates:
        if model.is_file() and model.name == table.model and sha256(model) == table.model_sha256:
            return container_path(model, "f32")
    raise SweepError(f"the tables were measured on {table.model}" + (f" ({table.model_path})" if table.model_path
                     else "") + ", which is not there any more (or changed): give its F32 container or an F32/F16 "
                     "export with --source")


def resolve_size(text: str, args: argparse.Namespace, source: Path, imatrix: Path | None) -> tuple[int, str]:
    """Bytes of the --size budget, and where they came from."""
    if text in PRESETS:
        f = preset_file(args.out, source, text, imatrix, threads(args))
        return f.stat().st_size, f"the size of llama.cpp's {text} built from the same source ({f})"
    if text.lower().endswith(".gguf"):
        f = Path(text)
        if not f.is_file():
            raise SweepError(f"--size {text}: no such file")
        return f.stat().st_size, f"the size of {f}"
    return parse_size(text), text


def threads(args) -> int:
    return args.threads or available_cores()


def run(args: argparse.Namespace) -> dict:
    """The recipe in steps: check the arguments; read the tables and the source; check that nothing is missing
    before anything is written; the byte budget; solve; write recipe.txt/recipe.json; build; validate."""
    types = check_arguments(args)
    table = read_table(args.runs, args.metric, imatrix=args.imatrix is not None)
    source_path = args.source or default_source(table)
    imatrix = args.imatrix  # its values go to the quantizer, its provenance into the header (recipe/build.py)
    source = SourceModel(source_path, provenance(imatrix) if imatrix else ())
    check_before_writing(args, table, source, types)
    other_text = None
    if args.heldout_text is not None:
        other_text = read_heldout_text(args.heldout_text, table.data_sha256)
        check_long_enough(other_text, source_path, table.n_ctx, threads(args))
    if args.ladder or args.sizes:
        return run_ladder(args, table, source, source_path, types, imatrix, recipe_meta(args, table, types, None),
                          threads(args), other_text)
    size, size_from = resolve_size(args.size, args, source_path, imatrix) if args.size is not None else (None, None)
    budget, kind = budget_bytes(size, args.bpw, source)
    def solve(t: Table) -> Recipe:
        return make_recipe(t, source, types, budget, kind, args.default_type, args.group)

    if args.refine:
        def read(runs: list[Path]) -> Table:
            return read_table(runs, args.metric, imatrix=args.imatrix is not None)

        recipe, table, _, _ = refine(solve, read, args.runs, table, source, types, args.refine, args.out / "refine",
                                     threads(args), imatrix)
    else:
        recipe = solve(table)
    meta = recipe_meta(args, table, types, size_from)
    if args.tie:
        untied = make_recipe(table, source, types, budget, kind, args.default_type, args.untied_group)
        meta["ties"] = tie_cost(args.tie, recipe, untied, args.metric)
        print(meta["ties"]["line"])
    txt, js = write_recipe(args.out, recipe, source, meta)
    print(summary(args, recipe, budget, kind, size_from))
    print(f"wrote {txt} and {js}")
    result: dict[str, object] = {"recipe": recipe, "txt": txt, "json": js, "table": table, "source": source}
    built = None
    if args.build:
        built = result["built"] = build_and_check(recipe, source_path, args.build, txt, js, imatrix, threads(args),
                                                  ties=tie_patterns(args.tie))
    if args.validate:
        if built is None:  # (check_arguments refuses --validate without --build)
            raise SweepError("--validate scores the built file: add --build OUT.gguf")
        result["validation"] = validate(table, source_path, recipe, built, imatrix, out_dir=args.out,
                                        presets=[p.strip() for p in args.presets.split(",") if p.strip()],
                                        heldout_windows=args.heldout_windows, threads=threads(args),
                                        other_text=other_text)
    return result


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The candidate types; --default-type's entries checked (a plain q8_0 when none is given)."""
    types = [check_type(t.strip()) for t in args.types.split(",") if t.strip()]
    if not types:
        raise SweepError("--types is empty: give candidate GGUF types, e.g. q4_K,q6_K,q8_0")
    # a tie is a group of the solver; the groups without the ties give the tie's cost (the untied recipe)
    args.untied_group = list(args.group)
    args.group = args.group + tie_patterns(args.tie)
    # the ladder's default: each tensor the tables do not cover keeps the type its size's preset gives it
    args.default_type = args.default_type or ([] if args.ladder or args.sizes else ["q8_0"])
    for entry in args.default_type:
        rx, _, ty = entry.rpartition("=")
        if ty != "keep":
            check_type(ty)
        if rx:
            try:
                re.compile(rx)
            except re.error as e:
                raise SweepError(f"--default-type {entry!r}: {e}") from None
    ladder = args.ladder or args.sizes
    if args.validate and not args.build and not ladder:
        raise SweepError("--validate scores the built file: add --build OUT.gguf")
    if ladder and args.build:
        raise SweepError("--build names one file; the ladder builds OUT/SIZE/recipe.gguf at every size: drop --build")
    if args.heldout_text is not None and not args.validate:
        raise SweepError("--heldout-text is scored by --validate: add --validate")
    if args.loop_sizes and not ladder:
        raise SweepError("--loop-sizes applies to the ladder's sizes: add --ladder or --sizes")
    if args.speed_reps < 0:
        raise SweepError("--speed-reps N: N repetitions of the throughput runs, 0 (none) or more")
    if args.refine < 0:
        raise SweepError("--refine N: N is the most points to measure, 0 or more")
    if args.loop_budget < 1 or args.loop_blocks < 1:
        raise SweepError("--loop-budget and --loop-blocks must be at least 1")
    if ladder:
        ladder_sizes(args.sizes, args.imatrix)
        if args.loop_sizes:
            ladder_sizes(args.loop_sizes, args.imatrix)
    return types


def check_before_writing(args: argparse.Namespace, table: Table, source: SourceModel, types: list[str]) -> None:
    """Every measurement the solver needs is in the tables, and --build would not overwrite the source."""
    check_complete(table, missing_measurements(table, source, types))
    if args.build:
        check_source_quantizable(source)
        if args.build.exists() and args.build.resolve() in (source.path.resolve(), embedded_model_path().resolve()):
            raise SweepError(f"--build {args.build} is the source model: choose another path")


def recipe_meta(args: argparse.Namespace, table: Table, types: list[str], size_from: str | None) -> dict:
    """What recipe.json says about how it was made and what the tables were measured on."""
    return {"command": "python -m sweep.recipe " + shlex.join(sys.argv[1:]), "metric": args.metric,
            "types": types, "groups": args.untied_group, "tie": args.tie, "default_type": args.default_type,
            "budget_from": size_from or
            f"{args.bpw} bits per weight", "model": table.model, "model_sha256": table.model_sha256,
            "measured_on": {"container": table.container, "n_ctx": table.n_ctx, "n_windows": table.n_windows,
                            "imatrix": table.imatrix, "data_source": table.data_source,
                            "data_sha256": table.data_sha256},
            "imatrix": str(args.imatrix) if args.imatrix else None}


def summary(args: argparse.Namespace, recipe: Recipe, budget: int, kind: str, size_from: str | None) -> str:
    return (f"recipe: {len([c for c in recipe.choices if c.type_asked])} measured tensors, predicted "
            f"{args.metric} {recipe.damage:.4g} ± {recipe.damage_stderr:.2g} (sum of single-tensor damages), "
            f"predicted file {recipe.predicted_file_bytes} bytes ({recipe.predicted_file_bytes / 1e6:.3f} MB), "
            f"{recipe.bpw:.4f} bpw; budget {budget} bytes ({'file' if kind == 'file' else 'tensors'}, "
            f"{size_from or str(args.bpw) + ' bpw'}); types {json.dumps(_counts(recipe))}; "
            f"solver: {recipe.solver.get('message', 'trivial')}")


def _counts(recipe: Recipe) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in recipe.choices:
        out[c.type_stored] = out.get(c.type_stored, 0) + 1
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    exit_on_user_error(run, args)
