"""Throughput as llama-bench measures it (sweep/llama/throughput.py): prompt and generation tokens per second of
real files through llama.cpp, the files' repetitions alternated, the settings stated. Figures are not asserted (a
shared machine's timings are no test); what the result holds, and that it is llama.cpp's work, is."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType

from sweep.errors import SweepError
from sweep.llama.throughput import BenchSettings, measure
from sweep.testing.tiny_model import write_tiny_model


def test_pp_and_tg_of_two_files_alternated_with_their_settings(tiny_model, smollm2, tmp_path):
    f32 = write_tiny_model(tmp_path / "tiny-f32.gguf", smollm2, matmul_type=GGMLQuantizationType.F32)
    settings = BenchSettings(threads=2, n_prompt=96, n_gen=12, reps=3)
    seen = []
    got = measure([tiny_model, f32], settings, progress=seen.append)
    assert seen == [f"throughput: repetition {i}/3" for i in (1, 2, 3)]  # each repetition times both files
    for path, t in zip((tiny_model, f32), got):
        s = t.summary(settings.n_prompt, settings.n_gen)
        assert s["path"] == str(path) and set(s) == {"path", "pp96", "tg12"}
        for key in ("pp96", "tg12"):
            runs = s[key]["runs"]
            assert len(runs) == 3 and all(x > 0 for x in runs)
            assert s[key]["min"] <= s[key]["median"] <= s[key]["max"]
    d = settings.describe()
    assert d["n_ctx"] == 108 and d["repack"] is True and d["kv_type"] == "f16" and d["flash_attn"] == "auto"
    assert "CPU" in d["system_info"] and d["llama_cpp_python"]
    with pytest.raises(SweepError, match="cannot load"):
        measure([tmp_path / "missing.gguf"], settings)
