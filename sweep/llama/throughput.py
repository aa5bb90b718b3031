"""Prompt and generation throughput of GGUF files, measured as llama-bench measures it (pp512, tg128).

llama-bench (tools/llama-bench/llama-bench.cpp of the vendored llama.cpp), per test: one warmup prompt run and a
one-token generation run, then `reps` repetitions, each after clearing the memory. pp: `n_prompt` random tokens (the
BOS first) decoded in batches of `n_batch` with the last token's logits only; tg: `n_gen` tokens decoded one at a
time, each synchronised. Tokens per second = tokens / wall seconds of the run. Its defaults are kept and stated in
every result: batch 2048 (capped at the context, as llama.cpp does), micro-batch 512, F16 K/V cache, flash attention
`auto`, weight repacking as llama.cpp's default (`use_extra_bufts`: the kernels users run, not the sweep's
repack-free ones), the model memory-mapped.

One difference, on purpose: the files compared (a recipe and its preset) are loaded side by side and their
repetitions alternate (A, B, A, B, ...), so that a machine's drift falls on both alike; each file's figure is the
median over repetitions, with the range beside it.

No eval callback is set (sweep/llama/backend.py's hook would call into Python at every node of the graph).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp

from ..errors import SweepError
from .backend import FLASH_ATTN, GGML_TYPES, _init_once, llama_cpp_version, system_info

# the sweep's choices (backend.py) and llama-bench's defaults beside them: flash attention `auto`
FLASH_ATTN_CHOICES = {**FLASH_ATTN, "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}


@dataclass(frozen=True)
class BenchSettings:
    """What the throughput depends on besides the file; llama-bench's defaults except the thread count."""
    threads: int
    n_prompt: int = 512
    n_gen: int = 128
    n_batch: int = 2048
    n_ubatch: int = 512
    kv_type: str = "f16"
    flash_attn: str = "auto"
    repack: bool = True  # llama.cpp's extra buffer types (AArch64/AVX repacks of q4_0, iq4_nl, q8_0...)
    reps: int = 5
    seed: int = 0  # the random tokens (llama-bench: std::rand() unseeded)

    def describe(self) -> dict:
        return {**asdict(self), "system_info": system_info(), "llama_cpp_python": llama_cpp_version(),
                "n_ctx": self.n_prompt + self.n_gen, "method": "llama-bench's pp/tg, runs of the files alternated"}


@dataclass
class Throughput:
    """One file's repetitions: tokens per second of prompt processing and of generation."""
    path: str
    pp: list[float] = field(default_factory=list)
    tg: list[float] = field(default_factory=list)

    def summary(self, n_prompt: int, n_gen: int) -> dict:
        def one(xs: list[float]) -> dict:
            return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs} if xs else {}
        return {"path": self.path, f"pp{n_prompt}": one(self.pp), f"tg{n_gen}": one(self.tg)}


class _Loaded:
    def __init__(self, path: Path, s: BenchSettings):
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = s.repack
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise SweepError(f"llama.cpp cannot load {path} to time it")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = s.n_prompt + s.n_gen
        cparams.n_batch = min(s.n_batch, cparams.n_ctx)
        cparams.n_ubatch = min(s.n_ubatch, cparams.n_batch)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = s.threads
        cparams.type_k = cparams.type_v = GGML_TYPES[s.kv_type]
        cparams.flash_attn_type = FLASH_ATTN_CHOICES[s.flash_attn]
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise SweepError(f"llama.cpp cannot create a context of {cparams.n_ctx} tokens for {path}")
        self.n_batch = cparams.n_batch
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None

    def _decode(self, tokens: list[int]) -> None:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise SweepError(f"llama_decode failed with code {rc} while timing")

    def prompt(self, n: int, rng: random.Random) -> float:
        """Seconds to process `n` random tokens from an empty memory."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), False)
        batches, done = [], 0
        while done < n:
            k = min(n - done, self.n_batch)
            toks = [rng.randrange(self.n_vocab) for _ in range(k)]
            if done == 0 and self.bos is not None:
                toks[0] = self.bos
            batches.append(toks)
            done += k
        t0 = time.perf_counter()
        for toks in batches:
            self._decode(toks)
        llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def generate(self, n: int, rng: random.Random) -> float:
        """Seconds to decode `n` tokens one at a time from an empty memory."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), False)
        toks = [self.bos if self.bos is not None else rng.randrange(self.n_vocab)]
        toks += [rng.randrange(self.n_vocab) for _ in range(n - 1)]
        t0 = time.perf_counter()
        for t in toks:
            self._decode([t])
            llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter() - t0

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None


def measure(paths: list[Path], settings: BenchSettings, progress=None) -> list[Throughput]:
    """pp and tg of every file, repetitions alternated across the files (`progress(text)` after each)."""
    if settings.reps < 1:
        raise SweepError("throughput: at least one repetition")
    _init_once()
    rng = random.Random(settings.seed)
    loaded: list[_Loaded] = []
    try:
        for p in paths:
            loaded.append(_Loaded(Path(p), settings))
        for m in loaded:  # warmup, as llama-bench: a prompt run and one generated token
            m.prompt(settings.n_prompt, rng)
            m.generate(1, rng)
        out = [Throughput(str(p)) for p in paths]
        for rep in range(settings.reps):
            for m, r in zip(loaded, out):
                r.pp.append(settings.n_prompt / m.prompt(settings.n_prompt, rng))
            for m, r in zip(loaded, out):
                r.tg.append(settings.n_gen / m.generate(settings.n_gen, rng))
            if progress:
                progress(f"throughput: repetition {rep + 1}/{settings.reps}")
        return out
    finally:
        for m in loaded:
            m.close()

