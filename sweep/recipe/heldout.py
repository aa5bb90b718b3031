"""`--heldout-text PATH`: another text the built files are scored on besides held-out WikiText, so that a recipe
(and an importance matrix) tuned on one text is seen on another. Checked before anything is written: a missing,
binary or undecodable file, or one too short for 2 windows of the tables' n_ctx, is one line, exit 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import SweepError
from ..llama.backend import Backend
from ..scoring.text import Text
from .validate import SETTINGS

HINT = "give a plain UTF-8 text file of at least 2 windows"


def read_heldout_text(path: Path, tables_sha256: str | None) -> Text:
    """The file as text, or one SweepError line saying what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"--heldout-text {p}: no such file; {HINT}")
    raw = p.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise SweepError(f"--heldout-text {p} is binary (a NUL byte at {nul}); {HINT}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"--heldout-text {p} is not UTF-8 text (undecodable byte at {e.start}); {HINT}") from None
    if not text.strip():
        raise SweepError(f"--heldout-text {p} is empty; {HINT}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest == tables_sha256:
        raise SweepError(f"--heldout-text {p} is the text the tables were measured on: give another text (its "
                         f"held-out windows are scored anyway)")
    return Text(text, str(p.resolve()), digest)


def check_long_enough(text: Text, source: Path, n_ctx: int, threads: int) -> None:
    """At least 2 windows of n_ctx tokens, tokenized by the source model's vocabulary."""
    with Backend(source, n_ctx, threads, settings=SETTINGS) as b:  # quietly: a failed check prints one line
        n = len(b.tokenize(text.text))
    if n < 2 * n_ctx:
        raise SweepError(f"--heldout-text {text.source} gives {n} tokens, fewer than the 2 windows of {n_ctx} tokens "
                         f"(the tables' n_ctx) a score needs ({2 * n_ctx}): give a longer text")
