"""The scorer follows llama-perplexity's protocol: checked against an independent computation on a tiny model,
and against the figures llama.cpp's own `llama-perplexity` printed for the real model and text."""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pytest
from conftest import make_settings

from sweep.errors import SweepError
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings
from sweep.pipeline.reference import open_reference
from sweep.scoring.perplexity import score
from sweep.scoring.window_math import WindowMath
from sweep.scoring.windows import make_windows
from sweep.testing.tiny_model import write_tiny_model

N_CTX = 64


def independent_ppl(backend: Backend, tokens: np.ndarray, n_ctx: int, n_windows: int) -> tuple[float, float]:
    """PPL ± stderr written from the protocol's description, with every position's logits requested."""
    nll = []
    for c in range(n_windows):
        window = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        if backend.add_bos:
            window[0] = backend.bos
        logits = backend.decode_window(window, np.ones(n_ctx, dtype=np.int8)).astype(np.float64)
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            logsumexp = row.max() + math.log(np.exp(row - row.max()).sum())
            nll.append(logsumexp - row[tokens[c * n_ctx + pos + 1]])
    v = np.array(nll)
    ppl = math.exp(v.mean())
    return ppl, ppl * math.sqrt(v.var() / (len(v) - 1))


@pytest.fixture(scope="module")
def tiny_backend(tiny_model):
    with Backend(tiny_model, N_CTX, 2, settings=compute_settings("native")) as b:
        yield b


@pytest.fixture(scope="module")
def tiny_tokens(tiny_backend, wikitext):
    return tiny_backend.tokenize(wikitext.read_text()[:30000])


def test_scorer_matches_independent_computation(tiny_backend, tiny_tokens):
    windows = make_windows(tiny_tokens, N_CTX, 5, None)
    result = score(tiny_backend, windows, progress=False)
    ppl, stderr = independent_ppl(tiny_backend, tiny_tokens, N_CTX, 5)
    assert result.n_tokens == 5 * (N_CTX // 2 - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-6)
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-5)


def test_only_scored_positions_are_requested_and_they_equal_full_logits(tiny_backend, tiny_tokens):
    windows = make_windows(tiny_tokens, N_CTX, 2, None)
    assert windows.output_mask.sum() == N_CTX // 2 - 1
    scored = tiny_backend.decode_window(windows.tokens[0], windows.output_mask).copy()
    full = tiny_backend.decode_window(windows.tokens[0], np.ones(N_CTX, dtype=np.int8)).copy()
    np.testing.assert_allclose(scored, full[N_CTX // 2:N_CTX - 1], rtol=0, atol=1e-4)


def test_windows_are_independent_of_order(tiny_backend, tiny_tokens):
    """The KV cache is cleared per window: scoring window 3 alone equals window 3 scored after others."""
    windows = make_windows(tiny_tokens, N_CTX, 4, None)
    all_four = score(tiny_backend, windows, progress=False).nll
    from dataclasses import replace
    alone = score(tiny_backend, replace(windows, tokens=windows.tokens[3:]), progress=False).nll
    np.testing.assert_array_equal(all_four[3], alone[0])


def test_score_uses_the_callers_window_math_or_a_temporary_one_it_closes(tiny_backend, tiny_tokens):
    """No pool or buffer outlives a call that was not given one; a caller's WindowMath serves many calls (a
    recomputed baseline's window buffer included) and stays open until the caller closes it."""
    windows = make_windows(tiny_tokens, N_CTX, 2, None)
    threads_before = threading.active_count()
    alone = score(tiny_backend, windows, progress=False)
    assert threading.active_count() == threads_before  # the temporary pool was shut down
    with WindowMath(2) as shared:
        first = score(tiny_backend, windows, progress=False, math=shared)
        again = score(tiny_backend, windows, progress=False, math=shared, unperturbed=contextlib.nullcontext)
        buffer = shared.window_buffer(windows.n_scored, tiny_backend.n_vocab)
        assert buffer is shared.window_buffer(windows.n_scored, tiny_backend.n_vocab)  # allocated once
    for result in (first, again, again.baseline):
        np.testing.assert_array_equal(result.nll, alone.nll)
    assert again.kld is not None and not again.kld.any()  # paired with itself: the same logits
    with pytest.raises(RuntimeError, match="closed"):
        shared(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))


def test_bos_replaces_the_first_token_when_the_vocab_asks(tmp_path, smollm2, wikitext):
    path = write_tiny_model(tmp_path / "bos.gguf", smollm2, add_bos=True)
    with Backend(path, N_CTX, 2, settings=compute_settings("native")) as b:
        assert b.add_bos
        tokens = b.tokenize(wikitext.read_text()[:20000])
        assert tokens[0] == b.bos  # the whole text starts with BOS, as in llama-perplexity
        windows = make_windows(tokens, N_CTX, 3, b.bos)
        assert (windows.tokens[:, 0] == b.bos).all()
        result = score(b, windows, progress=False)
        ppl, _ = independent_ppl(b, tokens, N_CTX, 3)
        assert result.ppl == pytest.approx(ppl, rel=1e-6)


def test_fewer_than_two_windows_is_a_clear_error():
    with pytest.raises(SweepError, match=r"gives 178 tokens but 2 windows of data.n_ctx=512 need 1024"):
        make_windows(np.arange(178), 512, 8, None)


def test_n_windows_is_clamped_to_the_text_and_zero_means_all():
    tokens = np.arange(1000)
    assert make_windows(tokens, 64, 100, None).n_windows == 15
    assert make_windows(tokens, 64, 0, None).n_windows == 15
    assert make_windows(tokens, 64, 3, None).n_windows == 3


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("container, n_windows, ppl, stderr", [
    # `llama-perplexity -c 512 -b 512 --chunks N -t 2 -nr` plus each container's settings (native: -fa on -ctk f16
    # -ctv f16; f32: -fa off -ctk f32 -ctv f32) on the same file and text, built from the llama-cpp-python 0.3.36
    # source package; the f32 row ran it on this project's F32 container of the file.
    ("native", 8, 24.4742, 1.66354),
    ("f32", 8, 24.3706, 1.65361),
])
def test_real_model_matches_llama_perplexity(container, n_windows, ppl, stderr, wikitext, cache_dir):
    with open_reference(make_settings(None, wikitext, 512, n_windows, container, cache_dir)) as ref:
        result = score(ref.backend, ref.windows, progress=False, math=ref.session.math)
    assert round(result.ppl, 4) == ppl
    assert round(result.ppl_stderr, 3) == round(stderr, 3)
    tokens = n_windows * 255
    assert result.summary() == f"PPL = {ppl:.4f} ± {stderr:.5f} ({n_windows} windows, {tokens} tokens, 512 ctx)"
