"""model.container=auto (the default): the F32 container where one job fits with room, else the file as it is; a
container that cannot fit stops the sweep before any job with one line naming the way out."""

from __future__ import annotations

import pytest
from test_sweep import tiny_args

from sweep.cluster.preflight import checks
from sweep.errors import SweepError
from sweep.llama import capacity
from sweep.llama.model_file import model_info
from sweep.pipeline import costs as planning
from sweep.pipeline.grid import plan


def grid(tiny_model, tmp_path, wikitext, *axes):
    return plan([*tiny_args(tiny_model, tmp_path, "run.threads=1", "layer=0", "kind=weight", "tensor=ffn_down",
                            "fmt=int8", *axes), f"data.path={wikitext}"])


def needs(tiny_model):
    info = model_info(tiny_model)
    return {c: capacity.need(tiny_model, c, info.arch, info.n_vocab, 64).total for c in ("f32", "native")}


def test_auto_takes_the_f32_container_where_it_fits(tiny_model, tmp_path, wikitext, cache_dir, capsys):
    p = grid(tiny_model, tmp_path, wikitext, f"model.cache_dir={cache_dir}")
    assert p.points[0][0].model.container == "f32" and "model.container=f32" in p.launch[0]
    out = capsys.readouterr().out
    assert f"model.container=auto: f32 for {tiny_model.name} (one job in the F32 container needs" in out


def test_auto_takes_the_file_as_it_is_where_the_f32_container_does_not_fit(tiny_model, tmp_path, wikitext,
                                                                           cache_dir, monkeypatch, capsys):
    need = needs(tiny_model)
    assert need["native"] < need["f32"]
    room = (need["native"] + need["f32"]) // 2  # the native job fits, the F32 one not with room
    monkeypatch.setattr(capacity, "available_memory", lambda: room)
    p = grid(tiny_model, tmp_path, wikitext, f"model.cache_dir={cache_dir}")
    cfg = p.points[0][0]
    assert cfg.model.container == "native" and "model.container=native" in p.launch[0]
    out = capsys.readouterr().out
    assert (f"model.container=auto: native for {tiny_model.name} (one job in the F32 container needs "
            f"{planning.gb(need['f32'])}, more than 80% of the {planning.gb(room)}") in out
    # the container to build counts against the cache's disk as well
    monkeypatch.setattr(capacity, "available_memory", lambda: 10**12)
    monkeypatch.setattr(capacity, "_free_disk", lambda d: 1000)
    chosen, why = capacity.choose(tiny_model, "llama", 100, 64, tmp_path / "empty-cache")
    assert chosen == "native" and why.startswith("its F32 container (") and "does not fit the 1 kB free" in why


def test_a_container_that_cannot_fit_is_refused_in_one_line(tiny_model, tmp_path, wikitext, cache_dir, monkeypatch):
    base = [*tiny_args(tiny_model, tmp_path, "run.threads=1", "layer=0", "kind=weight", "tensor=ffn_down",
                       "run.prefix_reuse=false"), f"data.path={wikitext}", f"model.cache_dir={cache_dir}"]
    job = {c: planning.costs(plan([*base, f"model.container={c}"])).job_memory for c in ("f32", "native")}
    assert job["native"] < job["f32"]
    monkeypatch.setattr(capacity, "available_memory", lambda: job["native"] + 1000)  # f32 too big, native fits
    with pytest.raises(SweepError) as e:
        checks([*base, "model.container=f32"], [])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"one job of {tiny_model.name} in the f32 container needs about ")
    assert str(e.value).endswith("available on this machine now: use model.container=native (the file as it is) "
                                 "or model.container=auto")
    checks([*base, "model.container=native"], [])  # fits
    checks(base, [])  # auto: native
    monkeypatch.setattr(capacity, "available_memory", lambda: 10**6)
    with pytest.raises(SweepError, match=r"in the native container needs about .* use model.n_gpu_layers=-1 \(a "
                                         r"GPU\) or model.rpc=HOST:PORT \(RPC servers\)"):
        checks([*base, "model.container=native"], [])
    assert not (tmp_path / "store").exists() and not (tmp_path / "sweep").exists()
