"""The evaluation text: WikiText-2 raw, test split, embedded in the package (the default), through `datasets` from
the hub (`data.path=hub`), or any local UTF-8 file (`data.path=/path/to/text`).

A text's `source` is what a record stores, and `load_text(source)` loads the same text again (the recipe's
validation and closed loop reload the tables' text that way).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SweepError

HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
HUB_SOURCE = "hub:{}/{}/{}".format(*HUB_DATASET)
EMBEDDED_SOURCE = "embedded:wikitext-2-raw-v1/test"
# sweep/data/wikitext-2-raw/README.md: where the file comes from, its licence, and why it equals the hub's rows.
EMBEDDED_FILE = Path(__file__).resolve().parents[1] / "data" / "wikitext-2-raw" / "wiki.test.raw"
HINT = "data.path takes a UTF-8 text file, `hub`, or nothing for the embedded WikiText-2"


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # EMBEDDED_SOURCE, HUB_SOURCE or a file's resolved path: load_text(source) gives this text again
    sha256: str


def embedded_text_path() -> Path:
    """The embedded WikiText-2 test split as a file (for tools that read a path, such as llama-perplexity -f)."""
    if not EMBEDDED_FILE.is_file():
        raise SweepError(f"the embedded WikiText-2 is missing from this install ({EMBEDDED_FILE}): reinstall sweep, "
                         f"or pass a text with data.path=/path/to/wiki.test.raw")
    return EMBEDDED_FILE


def load_text(path: str | os.PathLike | None) -> Text:
    """The embedded text when `path` is unset, the hub's for `hub`, otherwise the file at `path`."""
    if path in (None, "", "embedded", EMBEDDED_SOURCE):
        return _embedded()
    if path in ("hub", HUB_SOURCE):
        return _from_hub()
    return _from_file(Path(os.path.expanduser(str(path))))


def _embedded() -> Text:
    text = embedded_text_path().read_bytes().decode("utf-8")  # bytes as shipped: no newline translation
    return Text(text, EMBEDDED_SOURCE, _digest(text))


def _from_file(path: Path) -> Text:
    if not path.is_file():
        raise SweepError(f"text file not found: {path} ({HINT})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"text file is not UTF-8 text: {path} (byte {e.start})") from e
    if not text.strip():
        raise SweepError(f"text file is empty: {path} ({HINT})")
    return Text(text, str(path.resolve()), _digest(text))


def _from_hub() -> Text:
    name, config, split = HUB_DATASET
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # offline, hub down, proxy: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot load {name}/{config} from the hub ({first[:120]}); leave data.path unset for the "
                         f"embedded copy of the same text, or pass a file with data.path=/path/to/wiki.test.raw") from e
    # The rows in order, empty rows dropped (each row ends in "\n"): the embedded file is this text, byte for byte.
    text = "".join(r for r in rows if r)
    return Text(text, HUB_SOURCE, _digest(text))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
