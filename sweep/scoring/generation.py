"""The generation check: greedy completions of a few prompts, compared token by token with the baseline's.

Perplexity and KL say how much the distributions moved; this says whether the text a user would see changed,
and where it first departed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SweepError

if TYPE_CHECKING:
    from ..llama.backend import Backend


@dataclass(frozen=True)
class Completion:
    prompt: str
    tokens: tuple[int, ...]
    text: str


def complete(backend: Backend, prompts: Iterable[str], max_new: int) -> list[Completion]:
    out = []
    for prompt in prompts:
        tokens = backend.tokenize(backend.chat_prompt(prompt), add_special=True)
        room = backend.n_ctx - len(tokens)  # a small data.n_ctx shortens the completions, it does not fail the point
        new = backend.generate_greedy(tokens, min(max_new, room)) if room > 0 else []
        out.append(Completion(prompt, tuple(new), backend.detokenize(new)))
    return out


def first_departure(run: Completion, base: Completion) -> int | None:
    """Index of the first generated token that differs from the baseline's (None: identical)."""
    for i, (a, b) in enumerate(zip(run.tokens, base.tokens)):
        if a != b:
            return i
    return None if len(run.tokens) == len(base.tokens) else min(len(run.tokens), len(base.tokens))


def compare(runs: list[Completion], bases: list[Completion]) -> dict:
    """The record's generation columns: how many completions departed from the baseline's, and where."""
    departures = [first_departure(r, b) for r, b in zip(runs, bases)]
    departed = [d for d in departures if d is not None]
    return {
        "gen_departed": len(departed),  # prompts whose completion changed
        "gen_first_departure": min(departed) if departed else None,
        "generations": json.dumps([{"prompt": r.prompt, "text": r.text, "baseline_text": b.text, "departs_at": d}
                                   for r, b, d in zip(runs, bases, departures)], ensure_ascii=False),
    }


def generation_mode(value) -> int | None:
    """metrics.generate as the number of points that get the check: None for every point (true), 0 for none
    (false), N for `top:N`. Raises SweepError for anything else."""
    if isinstance(value, bool):
        return None if value else 0
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return None if text == "true" else 0
    if text.startswith("top:"):
        try:
            n = int(text[4:])
        except ValueError:
            n = -1
        if n >= 1:
            return n
    raise SweepError(f"metrics.generate={value!r} must be true (every point), false (none) or top:N (the N "
                     f"worst points by metrics.rank_by, checked after the sweep; e.g. top:5)")
