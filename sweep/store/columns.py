"""The columns of a point's record and of the results table, defined once, as data (as `scoring.metrics.METRICS`
defines the metrics): one `Column` each -- its name, type, meaning, which points have it, and its role.

The record (store/record.py) accepts only these names, with these types, and refuses to write or read a record that
lacks a column its kind of point always has; the table (store/records.gather) takes its dtypes and its sort order
from here; docs/columns.md is `markdown()` (tests/test_docs.py checks it), and the column tables of the other pages
name only columns of this registry. The metric columns, their standard errors and tests, and the per-window means
are generated from METRICS and PER_TOKEN: adding a metric adds its columns here.

Adding a column: one `Column` below (or a metric in METRICS), then the value where the point knows it
(pipeline/point.record, or a helper it calls) and docs/columns.md (paste `markdown()`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scoring.metrics import METRICS, NEEDS_LOGITS, PER_TOKEN

OK, NO_OP, DIVERGED, FAILED = "ok", "no-op", "diverged", "failed"
STATUSES = (OK, NO_OP, DIVERGED, FAILED)
EVERY = frozenset(STATUSES)  # every record, a failed point's too
SCORED = frozenset({OK, NO_OP, DIVERGED})  # points that were scored (a record of pipeline/point.record)
MEASURED = frozenset({OK, NO_OP})  # points scored to a number (not diverged)
NONE: frozenset[str] = frozenset()  # only under the column's `when`

# The types of a column's values (JSON's own): a "json" column holds a JSON document as a string, "floats" a list.
TYPES = ("int", "float", "bool", "str", "json", "floats")
# What a column is about: the roles of docs/columns.md, in its order.
ROLES = {
    "point": "Which point: the grid's axes (the table is sorted by them)",
    "input": "What the point was measured on (model, text, settings; most of it is in its store key)",
    "metric": "Metrics against the matching baseline (one `Metric` of `sweep/scoring/metrics.py` each)",
    "measure": "What the perturbation did, besides the metrics",
    "run": "How the point ran: its outcome, time, place and store key",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # one of TYPES
    meaning: str
    always: frozenset[str]  # the statuses whose every record has it
    when: str = ""  # when else a record has it, in words ("": never)
    role: str = "measure"  # one of ROLES
    nullable: bool = False  # may hold null (JSON) / None
    table_dtype: str | None = None  # the table's dtype, where it is not the one pandas infers
    where: str = "record"  # "record": in the record and the table; "file": the JSON file only; "table": added by it

    def points(self) -> str:
        """Which points have it, in words (docs/columns.md)."""
        statuses = "every" if self.always == EVERY else ", ".join(s for s in STATUSES if s in self.always)
        if self.where == "table":
            return "the table: " + self.when
        return f"{statuses}; {self.when}" if statuses and self.when else statuses or self.when


def C(name: str, type_: str, meaning: str, always=SCORED, when: str = "", role: str = "measure", **kw) -> Column:
    return Column(name, type_, meaning, frozenset(always), when, role, **kw)


WINDOW_NAMES = {"base_nll": "baseline_nll"}  # the records' names of per-window means, where they differ


def window_column(quantity: str) -> str:
    """The record's per-window means of a per-token quantity of PER_TOKEN (`window_dnll`, ...)."""
    return f"window_{WINDOW_NAMES.get(quantity, quantity)}"


KLD = "ok, no-op with metrics.kld (the default; a weight no-op always)"


def _metric_columns() -> list[Column]:
    """The columns of METRICS: each metric, its standard error, its test (and the table's q-value of it). ΔNLL-based
    metrics are infinite for a diverged point (its standard errors NaN); the others are left out of it."""
    cols = []
    for m in METRICS:
        logits = any(q in NEEDS_LOGITS for q in m.inputs)
        always = SCORED if m.per_token == "dnll" else NONE if logits else MEASURED
        when = KLD if logits else ""
        cols.append(C(m.column, "float", m.label, always, when, "metric"))
        if m.stderr:
            cols.append(C(m.stderr, "float", f"window-blocked standard error of `{m.column}`", always, when,
                          "metric"))
        if m.test:
            tested = "with 2 or more windows"
            cols += [C(m.test.p, "float", f"two-sided p-value of the point's own test of {m.column} = 0 (t-test over "
                       f"windows); NaN when it stopped early (untested)", NONE, f"ok, no-op {tested}", "metric"),
                     C(m.test.flag, "bool", f"`{m.test.p}` < `alpha`; false when it stopped early", NONE,
                       f"ok, no-op {tested}", "metric"),
                     C(m.test.q, "float", f"Benjamini-Hochberg q-value of `{m.test.p}` over every ok row of the "
                       f"gathered table", NONE, "every row, empty unless ok and tested", "metric", where="table")]
    return cols


def _window_columns() -> list[Column]:
    return [C(window_column(q), "floats", f"per-window means of {meaning} (window i of every point is the same "
              f"text): enough to replay any early-stopping rule", NONE if q in NEEDS_LOGITS else MEASURED,
              KLD if q in NEEDS_LOGITS else "", "measure") for q, meaning in PER_TOKEN.items() if q != "nll"]


MOE = "a MoE model's point, except with metrics.baseline_logits=recompute"
STORAGE = "a weight point in a format with a storage size (the GGUF types, ...)"
RECIPE = "a recipe's joint point (fmt=recipe), not diverged"
PAIRED = RECIPE + ", paired over the recipe's windows"
GENERATION = "the generation check ran (metrics.generate=true: every ok and no-op point; top:N: the N worst)"

COLUMNS: tuple[Column, ...] = (
    # which point
    C("layer", "int", "the block of a single-layer point; empty for a point over several blocks or none", EVERY,
      role="point", nullable=True, table_dtype="Int64"),
    C("layers", "str", "every block the point touches (`-`: none)", EVERY, role="point"),
    C("tensor", "str", "the `tensor` axis: a weight's or a node's name without its layer, or `all`", EVERY,
      role="point"),
    C("kind", "str", "`weight` or `activation`", EVERY, role="point"),
    C("fmt", "str", "the format's label (docs/formats.md)", EVERY, role="point"),
    C("expert", "str", "the `expert` axis: `all`, or the experts targeted", when="a MoE model's point",
      role="point", always=()),
    # the outcome
    C("status", "str", "`ok`, `no-op` (nothing measurable changed), `diverged` (non-finite logits) or `failed`", EVERY,
      role="run"),
    C("reason", "str", "why the point is not `ok`", EVERY, role="run", nullable=True),
    C("traceback", "str", "the end of the traceback of a point failed by an exception", (), "failed by an exception",
      role="run"),
    C("ppl", "float", "perplexity of the perturbed model on the scored tokens"),
    C("ppl_stderr", "float", "its standard error (llama-perplexity's)"),
    C("baseline_ppl", "float", "perplexity of the matching baseline on the same tokens"),
    C("baseline_ppl_stderr", "float", "its standard error"),
    *_metric_columns(),
    C("gen_departed", "int", "prompts whose greedy completion departed from the baseline's", (), GENERATION),
    C("gen_first_departure", "int", "the first token index at which a completion departs", (), GENERATION,
      nullable=True),
    C("generations", "json", "the completions: prompt, text, baseline_text, departs_at", (), GENERATION),
    C("generation_checked", "str", "`top`: checked after the sweep as one of the N worst (metrics.generate=top:N)", (),
      "metrics.generate=top:N, the N worst"),
    C("alpha", "float", "the significance level of `significant` (metrics.alpha)", role="input"),
    C("n_elements", "int", "elements the format was applied to (activations: summed over every hook call)"),
    C("n_changed", "int", "elements whose value changed"),
    C("frac_changed", "float", "n_changed / n_elements"),
    C("rel_mse", "float", "squared error of the changed values relative to their squared norm"),
    C("sqnr_db", "float", "signal-to-quantization-noise ratio, dB"),
    C("max_abs_err", "float", "the largest absolute change of a value"),
    C("n_overflow", "int", "finite values the format turned into inf/NaN"),
    C("hook_calls", "int", "weights: tensors written; activations: times the hook rounded a node"),
    C("delta_calls", "int", "node outputs corrected by (fmt(W) - W)·x (a quantized weight of the native container)"),
    C("ggml_type", "str", "the GGUF type the target is stored in", (), STORAGE, nullable=True),
    C("fallback_from", "str", "the type asked for, where llama.cpp's row fallback stored another", (), STORAGE,
      nullable=True),
    C("bytes", "float", "the target's size in the format (a GGUF type's exact bytes; else from the format's bits per "
      "element and scales, NaN where unknown)", (), STORAGE),
    C("bpw", "float", "bits per weight in the format", (), STORAGE),
    C("imatrix_used", "bool", "whether every GGUF type of it was given an imatrix entry", (), STORAGE +
      " given an imatrix"),
    C("imatrix_missing", "str", "the tensors quantized without an imatrix entry", (), "imatrix_used is false"),
    C("bytes_orig", "int", "the target's size in the user's file", (), STORAGE),
    C("bpw_orig", "float", "bits per weight in the user's file", (), STORAGE),
    C("kld_per_bit_saved", "float", "kld_mean per bit per weight saved against the file (NaN: none saved)", (),
      STORAGE),
    C("routing", "json", "per targeted layer and expert: routed_tokens and router_share (docs/moe.md)", (), MOE),
    C("routed_tokens", "int", "scored tokens routed to the targeted experts, summed over them and the layers", (),
      MOE),
    C("router_share", "float", "the targeted experts' share of the selected experts' router weight", (), MOE),
    C("scored_tokens", "int", "scored tokens of the point", (), MOE),
    C("routing_changed", "int", "scored tokens whose selected experts changed in any layer", (),
      MOE + ", decoded perturbed"),
    C("routing_changed_by_layer", "json", "the same per layer", (), MOE + ", decoded perturbed"),
    C("targets", "str", "the weights or nodes the format was applied to, comma-separated"),
    C("baseline", "str", "what the matching baseline is, in words"),
    C("container", "str", "`f32` (every tensor dequantized once) or `native` (the file as it is)", EVERY,
      role="input"),
    C("native_weights", "str", "`delta` or `copy`: how a quantized weight is perturbed (model.native_weights)", (),
      "the native container", role="input"),
    C("kv_type", "str", "the K and V cache type", role="input"),
    C("flash_attn", "str", "`on` or `off`", role="input"),
    C("n_gpu_layers", "int", "blocks offloaded (model.n_gpu_layers)", role="input"),
    C("extra_bufts", "bool", "weight repacking into extra buffer types (always off)", role="input"),
    C("rpc", "str", "the RPC servers that took the offloaded layers", (), "model.rpc set", role="input"),
    C("system_info", "str", "llama.cpp's system info: CPU features, backends", role="input"),
    C("llama_cpp_python", "str", "llama-cpp-python's version", role="input"),
    C("sweep_version", "str", "this package's version", role="input"),
    C("devices", "str", "each device that holds weights, with its memory", role="run"),
    C("layer_devices", "str", "which blocks ran on which device", role="run"),
    C("model", "str", "the model file's name", EVERY, role="input"),
    C("model_path", "str", "the model file", role="input"),
    C("model_sha256", "str", "the model file's SHA-256", EVERY, role="input"),
    C("data_source", "str", "where the text came from", EVERY, role="input"),
    C("data_sha256", "str", "the text's SHA-256", role="input"),
    C("n_windows", "int", "windows scored (failed: data.n_windows; fewer when it stopped early)", EVERY,
      role="input"),
    C("stopped_early", "bool", "stopped by metrics.early_stop before the last window", role="run"),
    C("n_ctx", "int", "tokens per window (data.n_ctx)", EVERY, role="input"),
    C("n_tokens", "int", "tokens scored (the second half of each window)", role="input"),
    C("seconds", "float", "the point's wall time", role="run"),
    C("score_seconds", "float", "of which scoring", role="run"),
    C("decode_seconds", "float", "of which inside llama_decode", role="run"),
    C("baseline_logits", "str", "`store` (paired with stored baseline logits) or `recompute`", role="input"),
    C("prefix_reuse", "str", "`ok` (decoded on a stage), `fallback` or `off` (docs/prefix.md)", role="run"),
    C("prefix_stage", "int", "the stage's first block (empty unless `ok`)", role="run", nullable=True),
    C("prefix_reason", "str", "why the full model was decoded", role="run", nullable=True),
    C("decoded_blocks", "int", "blocks each perturbed window went through", role="run"),
    *_window_columns(),
    C("additivity_metric", "str", "the recipe's metric", (), RECIPE),
    C("predicted", "float", "the sum of the tables' single-tensor damages of its tensors", (), RECIPE),
    C("predicted_tensors", "int", "tensors in the prediction", (), RECIPE),
    C("not_predicted", "str", "quantized tensors the tables never measured", (), RECIPE, nullable=True),
    C("additivity_note", "str", "why there is no paired residual", (), RECIPE + ", not paired"),
    C("predicted_stderr", "float", "standard error of the prediction over windows", (), PAIRED),
    C("additivity_residual", "float", "measured - predicted, paired over windows", (), PAIRED),
    C("additivity_residual_stderr", "float", "its standard error", (), PAIRED),
    C("additivity_residual_lo", "float", "its 95% t-interval, low end", (), PAIRED),
    C("additivity_residual_hi", "float", "its 95% t-interval, high end", (), PAIRED),
    # the map's (run.estimate=map, docs/estimate.md): added by the table, never in a record
    C("estimated", "bool", "the row is the map's prediction, not a measured point", NONE, "every row", "run",
      where="table"),
    C("estimate_lo", "float", "a predicted row's 95% prediction interval of `kld_mean`, low end", NONE,
      "estimated rows", "metric", where="table"),
    C("estimate_hi", "float", "its high end", NONE, "estimated rows", "metric", where="table"),
    C("calibrated_by", "str", "the exact point a predicted row was scaled from: its format and store key", NONE,
      "estimated rows", "run", where="table"),
    # the store's
    C("key", "str", "the point's store key: every input that determines its result", EVERY, role="run"),
    C("started_at", "float", "when the point started (Unix time)", EVERY, role="run"),
    C("finished_at", "float", "when it finished: the newest record of a point wins in the table", EVERY, role="run"),
    C("record_version", "int", "the record's version (store/record.py); in the file, not the table", EVERY,
      role="run", where="file"),
)
BY_NAME = {c.name: c for c in COLUMNS}
assert len(BY_NAME) == len(COLUMNS), "a column is defined twice"
assert all(c.type in TYPES and c.role in ROLES for c in COLUMNS)
SORT = ("kind", "tensor", "fmt", "layer", "expert")  # the table's row order
assert set(SORT) <= set(BY_NAME)


def required(status: str) -> tuple[str, ...]:
    """The columns every record of a point with this status has."""
    return tuple(c.name for c in COLUMNS if status in c.always and c.where == "record")


def markdown() -> str:
    """docs/columns.md's tables: one per role, every column of the registry in its order."""
    out = []
    for role, title in ROLES.items():
        out += [f"### {title}", "", "| column | type | points | meaning |", "|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.type}{' or null' if c.nullable else ''} | {c.points()} | {c.meaning} |"
                for c in COLUMNS if c.role == role]
        out.append("")
    return "\n".join(out)
