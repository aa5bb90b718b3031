"""The eval callback's registrations stack (sweep/llama/observe.py): several observers and a replacement at once, each
called for its own nodes, in the documented order, and leaving one restores what was there before."""

from __future__ import annotations

import numpy as np
import pytest

from sweep.imatrix.compute import Collector
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings

N_CTX = 64


@pytest.fixture(scope="module")
def backend(tiny_model):
    with Backend(tiny_model, N_CTX, 2, settings=compute_settings("f32")) as b:
        yield b


@pytest.fixture(scope="module")
def window():
    return np.random.default_rng(5).integers(100, 5000, size=N_CTX).astype(np.int32)


MASK = np.r_[np.zeros(N_CTX // 2, np.int8), np.ones(N_CTX // 2 - 1, np.int8), np.zeros(1, np.int8)]


def keeper(seen: dict):
    return lambda name, x: seen.setdefault(name, []).append(x.copy())


def decode(b, window) -> np.ndarray:
    return np.array(b.decode_window(window, MASK))


def test_two_observers_stack_and_the_outer_one_outlives_the_inner(backend, window):
    outer_nodes = {("attn_norm-0", 0), ("l_out-1", 0)}
    inner_nodes = {("ffn_norm-1", 0), ("l_out-1", 0)}  # l_out-1 observed by both
    alone: dict = {}
    with backend.observe_nodes(outer_nodes, keeper(alone)):
        logits_alone = decode(backend, window)

    outer, inner = {}, {}
    with backend.observe_nodes(outer_nodes, keeper(outer)):
        with backend.observe_nodes(inner_nodes, keeper(inner)):
            logits_both = decode(backend, window)
        assert set(outer) == {"attn_norm-0", "l_out-1"} and set(inner) == {"ffn_norm-1", "l_out-1"}
        assert all(len(v) == 1 for v in (*outer.values(), *inner.values()))  # each saw its nodes once
        logits_after = decode(backend, window)  # the inner one is gone, the outer one still observes
    assert all(len(v) == 2 for v in outer.values()) and all(len(v) == 1 for v in inner.values())
    for name, (x,) in alone.items():
        for y in outer[name]:
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(inner["l_out-1"][0], alone["l_out-1"][0])
    np.testing.assert_array_equal(logits_both, logits_alone)  # observing changes nothing
    np.testing.assert_array_equal(logits_after, logits_alone)
    assert not backend._entries and not backend._watching  # all gone: the callback's fast path again


def test_a_matmul_observer_and_a_name_predicate_beside_node_observers(backend, window):
    full = np.ones(N_CTX, np.int8)  # every row, as the importance matrix decodes
    alone = Collector()
    with backend.observe_matmuls(alone):
        backend.decode_window(window, full)
    both, names, nodes = Collector(), [], {}
    with backend.observe_matmuls(both), backend.observe_nodes(lambda n: n.startswith("ffn_out-"),
                                                                lambda n, x: names.append(n)), \
            backend.observe_nodes({("ffn_out-0", 0)}, keeper(nodes)):
        backend.decode_window(window, full)
    assert sorted(both.sums) == sorted(alone.sums)
    for name in alone.sums:
        np.testing.assert_array_equal(both.sums[name], alone.sums[name])
    assert sorted(set(names)) == [f"ffn_out-{i}" for i in range(backend.n_layers)] and set(nodes) == {"ffn_out-0"}


def test_a_replacement_beside_observers_in_the_defined_order(backend, window):
    """Observers see the node as computed, everything downstream sees the replacement; pausing or leaving the
    replacement gives the unperturbed decode back, and two replacements chain in the order entered."""
    watched = {("ffn_norm-0", 0), ("l_out-0", 0)}
    clean: dict = {}
    with backend.observe_nodes(watched, keeper(clean)):
        logits_clean = decode(backend, window)
    seen: dict = {}
    calls = []

    def halve(name, x):
        calls.append(("halve", x.copy()))
        return x * 0.5

    def negate(name, x):
        calls.append(("negate", x.copy()))
        return -x

    with backend.observe_nodes(watched, keeper(seen)):
        with backend.replace_nodes({("ffn_norm-0", 0)}, halve):
            with backend.reading_back() as written:
                logits_replaced = decode(backend, window)
            with backend.replacements_paused():
                logits_paused = decode(backend, window)
            with backend.replace_nodes({("ffn_norm-0", 0)}, negate):
                with backend.reading_back() as chained:
                    decode(backend, window)
        logits_left = decode(backend, window)
    np.testing.assert_array_equal(seen["ffn_norm-0"][0], clean["ffn_norm-0"][0])  # as computed
    assert not np.array_equal(seen["l_out-0"][0], clean["l_out-0"][0])  # downstream: replaced
    [(name, computed, out, read)] = written
    assert name == "ffn_norm-0"
    np.testing.assert_array_equal(computed, clean["ffn_norm-0"][0])
    np.testing.assert_array_equal(read, clean["ffn_norm-0"][0] * np.float32(0.5))
    assert not np.array_equal(logits_replaced, logits_clean)
    np.testing.assert_array_equal(logits_paused, logits_clean)
    np.testing.assert_array_equal(logits_left, logits_clean)
    # halve (entered first) then negate, handed halve's result
    assert [c[0] for c in calls] == ["halve", "halve", "negate"]
    np.testing.assert_array_equal(calls[2][1], calls[1][1] * np.float32(0.5))
    np.testing.assert_array_equal(chained[0][3], -(clean["ffn_norm-0"][0] * np.float32(0.5)))


def test_a_failing_observer_stops_the_decode_and_leaves_the_backend_as_it_was(backend, window):
    logits = decode(backend, window)
    with pytest.raises(ZeroDivisionError):
        with backend.observe_nodes(lambda name: 1 / 0, lambda name, x: None):  # fails when llama.cpp asks
            decode(backend, window)
    with pytest.raises(KeyError):
        with backend.observe_nodes({("l_out-0", 0)}, lambda name, x: {}[name]):  # fails once computed
            decode(backend, window)
    assert not backend._entries
    np.testing.assert_array_equal(decode(backend, window), logits)
