"""The evaluation text: embedded by default, byte-identical to the hub's rows as joined, and every recorded source
loads the same text again."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest

from sweep.errors import SweepError
from sweep.scoring.text import EMBEDDED_SOURCE, HUB_SOURCE, embedded_text_path, load_text

# sweep/data/wikitext-2-raw/README.md
EMBEDDED_SHA256 = "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a"


def test_the_default_is_the_embedded_file_byte_for_byte():
    text = load_text(None)
    data = embedded_text_path().read_bytes()
    assert text.source == EMBEDDED_SOURCE and text.text.encode("utf-8") == data
    assert text.sha256 == hashlib.sha256(data).hexdigest() == EMBEDDED_SHA256
    assert len(data) == 1_287_656 and data.count(b"\n") == 2891 and b"\r" not in data


def test_a_recorded_source_loads_the_same_text(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Another text .\n")
    for source in (None, "embedded", str(embedded_text_path()), str(other)):
        text = load_text(source)
        assert load_text(text.source) == text
    assert load_text(str(embedded_text_path())).sha256 == EMBEDDED_SHA256  # a path to the same bytes: same text


def test_the_hub_rows_joined_are_the_embedded_text(monkeypatch):
    """The hub gives one row per line ("" for the blank lines between paragraphs); the join drops those."""
    lines = embedded_text_path().read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [row for line in lines for row in ("", line)]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split: {"text": rows}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    text = load_text("hub")
    assert text.source == HUB_SOURCE and text.sha256 == EMBEDDED_SHA256
    assert load_text(HUB_SOURCE) == text


def test_an_unreachable_hub_points_at_the_embedded_copy(monkeypatch):
    fake = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nmore")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(SweepError, match=r"^cannot load Salesforce/wikitext/wikitext-2-raw-v1 from the hub \(Couldn't "
                                         r"reach the hub\); leave data.path unset for the embedded copy"):
        load_text("hub")


def test_a_missing_file_says_what_data_path_takes(tmp_path):
    with pytest.raises(SweepError, match="text file not found: .*nope.txt \\(data.path takes a UTF-8 text file, `hub`"):
        load_text(tmp_path / "nope.txt")
