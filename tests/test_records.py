"""Records: the column registry (sweep/store/columns.py) covers every column a real point's record has, with its
type; docs/columns.md is the registry; a record of another version, with an unknown column, or without a column its
status always has is refused in one line, by the store and by the table, and never becomes a half row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_settings

from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.store.columns import BY_NAME, COLUMNS, EVERY, markdown, required
from sweep.store.record import RECORD_VERSION, Record, RecordError, read_record, write_record
from sweep.store.records import Store, gather

ROOT = Path(__file__).resolve().parents[1]


def failed(**columns) -> Record:
    """A complete record without a model: a failed point's."""
    return Record(layer=0, layers="0", tensor="ffn_norm", kind="weight", fmt="bf16", status="failed", reason="x",
                  container="f32", model="m.gguf", model_sha256="ab", data_source="embedded", n_windows=3, n_ctx=64,
                  key="k0", started_at=1.0, finished_at=2.0).update(**columns)


# ---- the registry and a real point ---------------------------------------------------------------------------------

def test_every_column_of_real_points_is_registered_with_its_type(tiny_model, wikitext, cache_dir, tmp_path):
    """Points of the tiny model in both containers (a quantized weight kept in its GGUF type, an activation with
    the generation check, a no-op): their records have only registry columns, each of its type (Record checks it
    where it is built), every column their status always has, and read back as written."""
    store = Store(tmp_path / "store")
    seen = set()
    for container, kind, tensor, fmt, prompts in (("native", "weight", "ffn_down", "q4_K", ()),
                                                  ("f32", "activation", "l_out", "int8", ("Hello",)),
                                                  ("f32", "weight", "ffn_norm", "none", ())):
        cfg = make_settings(tiny_model, wikitext, 64, 2, container, cache_dir)
        with open_reference(cfg) as ref:
            target = resolve(kind, tensor, 1, ref.info, ref.backend.nodes)
            out = run_point(ref, target, make_format(fmt), progress=False, store=store, prompts=prompts,
                            max_new_tokens=4)
            rec = record(ref, target, make_format(fmt), out).update(key=fmt, started_at=0.0, finished_at=1.0)
        assert set(rec) <= set(BY_NAME) and not rec.missing(), rec.missing()
        assert rec["status"] == ("no-op" if fmt == "none" else "ok")
        write_record(tmp_path / fmt / "record.json", rec)
        assert json.loads((tmp_path / fmt / "record.json").read_text())["record_version"] == RECORD_VERSION
        again = read_record(tmp_path / fmt / "record.json")
        assert list(again) == list(rec) and json.dumps(again.to_json()) == json.dumps(rec.to_json())
        seen |= set(rec)
    # the columns every such point has, and those of its kind: storage sizes, the native container, generations
    assert set(required("ok")) <= seen and {"bpw_orig", "native_weights", "gen_departed", "window_kld"} <= seen
    table = gather([tmp_path])
    assert len(table) == 3 and set(table.columns) <= set(BY_NAME) and "record_version" not in table
    assert str(table["layer"].dtype) == "Int64"


def test_a_record_refuses_an_unknown_column_or_a_value_of_another_type():
    with pytest.raises(RecordError, match="^has a column 'ppl_typo' that a record does not have"):
        failed(ppl_typo=1.0)
    with pytest.raises(RecordError, match=r"^holds '64' \(str\) in column n_ctx, not int$"):
        failed(n_ctx="64")
    with pytest.raises(RecordError, match=r"^holds True \(bool\) in column layer, not int or null$"):
        failed(layer=True)
    with pytest.raises(RecordError, match="^has a column 'delta_nll_q'"):  # the table adds it, not a record
        failed(delta_nll_q=0.5)
    with pytest.raises(RecordError, match="^lacks ppl, ppl_stderr, .*, which every ok record has$"):
        write_record(Path("/nonexistent/never-written.json"), failed(status="ok"))


def test_docs_columns_page_is_the_registry():
    page = (ROOT / "docs" / "columns.md").read_text()
    assert markdown() in page, "docs/columns.md: paste the output of sweep.store.columns.markdown()"


def test_the_column_tables_of_the_docs_name_registry_columns():
    """Every `| column | meaning |` table of the pages names columns of the registry (a renamed column fails here)."""
    named = []
    for page in sorted(set((ROOT / "docs").glob("*.md")) - {ROOT / "docs" / "columns.md"}):
        for table in re.findall(r"^\| column \|.*\n\|[-| ]+\|\n((?:\|.*\n)+)", page.read_text(), re.M):
            for row in table.splitlines():
                named += [(page.name, n) for n in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert {page for page, _ in named} >= {"moe.md", "prefix.md", "statistics.md"} and len(named) > 20
    assert not [n for n in named if n[1] not in BY_NAME]


def test_the_registry_says_which_points_have_what():
    assert set(required("failed")) == {c.name for c in COLUMNS if c.always == EVERY and c.where == "record"}
    assert {"ppl", "delta_nll", "kld_mean", "window_dnll", "traceback"}.isdisjoint(required("failed"))
    assert "delta_ppl" in required("diverged") and "top1_agree" not in required("diverged")
    assert "kld_mean" not in required("ok") and "top1_agree" in required("ok")  # metrics.kld=false has no KL


# ---- versions and damaged records ------------------------------------------------------------------------------------

def planted(path: Path, **change) -> Path:
    data = {**failed().to_json(), **change}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=1))
    return path


@pytest.mark.parametrize("change, why", [
    ({"record_version": 1}, "is of record version 1, this sweep reads version 2"),
    ({"record_version": None, "n_chunks": 3}, "is of record version 1, this sweep reads version 2"),
    ({"record_version": 3}, "is of record version 3, written by a newer sweep (this one reads version 2)"),
])
def test_a_record_of_another_version_is_refused_in_one_line(change, why, tmp_path, capsys):
    store = Store(tmp_path / "store")
    path = planted(tmp_path / "store" / "points" / "k0.json", status="ok", **change)
    assert store.point("k0") is None and store.point("k0") is None
    said = capsys.readouterr().err.splitlines()
    assert said == [f"warning: the stored record {path} {why}: its point is computed again"]
    job = planted(tmp_path / "sweep" / "0" / "record.json", **change)
    assert gather([tmp_path / "sweep"]).empty
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: the stored record {job} {why}: left out of the table: run its sweep again")


def test_a_planted_unknown_column_or_a_missing_one_is_caught(tmp_path, capsys):
    good = planted(tmp_path / "sweep" / "0" / "record.json", record_version=None)  # as written before the field
    unknown = planted(tmp_path / "sweep" / "1" / "record.json", key="k1", kld_meen=0.1)
    missing = planted(tmp_path / "sweep" / "2" / "record.json", key="k2", model_sha256=None)
    typed = planted(tmp_path / "sweep" / "3" / "record.json", key="k3", n_windows="3")
    df = gather([tmp_path / "sweep"])
    assert list(df["key"]) == ["k0"] and read_record(good) is not None  # one row: no half rows
    said = capsys.readouterr().err.splitlines()
    assert said == [f"warning: the stored record {unknown} has columns this version does not know (kld_meen): "
                    "left out of the table: run its sweep again to compute its point again",
                    f"warning: the stored record {missing} lacks model_sha256, which every failed record has: "
                    "left out of the table: run its sweep again to compute its point again",
                    f"warning: the stored record {typed} holds '3' (str) in column n_windows, not int: left out of "
                    "the table: run its sweep again to compute its point again"]
