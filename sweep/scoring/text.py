"""The evaluation text: WikiText-2 raw, test split, from a local file or through `datasets`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SweepError

HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
LOCAL_HINT = "pass a local copy with data.path=/path/to/wiki.test.raw (or set SWEEP_WIKITEXT)"


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # a file path or "hub:Salesforce/wikitext/wikitext-2-raw-v1/test"
    sha256: str


def load_text(path: str | os.PathLike | None) -> Text:
    """The text from `path`, or from the hub when no path is given."""
    if path not in (None, ""):
        return _from_file(Path(os.path.expanduser(str(path))))
    return _from_hub()


def _from_file(path: Path) -> Text:
    if not path.is_file():
        raise SweepError(f"text file not found: {path} ({LOCAL_HINT})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"text file is not UTF-8 text: {path} (byte {e.start})") from e
    if not text.strip():
        raise SweepError(f"text file is empty: {path} ({LOCAL_HINT})")
    return Text(text, str(path.resolve()), _digest(text))


def _from_hub() -> Text:
    name, config, split = HUB_DATASET
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # offline, hub down, proxy: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot load {name}/{config} from the hub ({first[:120]}); {LOCAL_HINT}") from e
    # Same text as the shared local copy: the rows in order, empty rows dropped (each row ends in "\n").
    text = "".join(r for r in rows if r)
    return Text(text, f"hub:{name}/{config}/{split}", _digest(text))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
