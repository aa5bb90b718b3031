"""A llama.cpp context and its decode (through llama-cpp-python's low-level API); sweep/llama/ is the only package
that talks to llama.cpp.

It offers three mechanisms and no policy:
  * `decode_window`: one window of tokens in, the logits of the requested positions out;
  * observers and replacements of graph nodes, called with a node's data right after llama.cpp computed it (a
    replacement's result is written back before anything downstream reads it): the context's eval callback,
    registered through context managers that stack (observe.py);
  * weight access: read/write of the model's weight tensors in place (model loaded without mmap: `writable_weights`;
    a model memory-mapped from its file loads faster and can only be read).
Reads and writes go through ggml_backend_tensor_get/set, never through `tensor->data`, so GPU backends work too.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp._ggml import libggml
from threadpoolctl import ThreadpoolController

from ..errors import SweepError
from .ggml_tensor import GGML_TYPE_F32, GGMLTensor
from .observe import NodeHooks, read_f32, shape_of, write_f32
from .rpc import offload_devices, placement
from .vocab import tokenize
from .weight_delta import consumed_weight

log = logging.getLogger(__name__)

# A weight tensor's name in the graph is its GGUF name, e.g. "blk.3.ffn_down.weight".
_WEIGHT_NAME = re.compile(r"^[\w.]+\.(weight|bias)$")
# Tokens of the probe decode: all of them produce logits, so every block (the last included) computes all rows and
# the token axis of a node is the one of this length (a prime, unlikely to equal a head count or a head size).
PROBE_TOKENS = 11
GGML_TYPES = {"f32": 0, "f16": 1}
FLASH_ATTN = {"off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED}


@dataclass(frozen=True)
class ComputeSettings:
    """The code paths of llama.cpp that change the numbers, set explicitly instead of left to the build's defaults.

    Weight repacking into "extra buffer types" (AMX, AArch64 repacks) is always off: this llama.cpp's AMX matmul
    segfaults (ggml-org/llama.cpp #20824) and repacked buffers cannot be read back (#11115). Sweeps then run the
    same kernels on every CPU, as `llama-perplexity -nr` does.
    """

    kv_type: str = "f16"  # K and V cache element type: f32 | f16
    flash_attn: str = "on"  # off | on
    n_gpu_layers: int = 0
    rpc: tuple[str, ...] = ()  # RPC servers (HOST:PORT) whose devices take the offloaded layers (sweep/llama/rpc.py)

    def as_dict(self) -> dict:
        # "rpc" only when set: CPU runs keep the keys (and stored baselines) they always had
        return {"kv_type": self.kv_type, "flash_attn": self.flash_attn, "n_gpu_layers": self.n_gpu_layers,
                "extra_bufts": False, **({"rpc": ",".join(self.rpc)} if self.rpc else {})}


@dataclass(frozen=True)
class NodeOccurrence:
    """One node of the graph: llama.cpp gives several nodes the same name (a matmul output, its reshape view, the
    RoPE output are all `Qcur-N`), and the eval callback sees each of them."""

    name: str  # full node name, e.g. "Qcur-3"
    index: int  # position among the nodes of that name, in graph order (views included)
    op: str  # ggml's op description, lower case: "mul_mat", "rope", "reshape", "rms_norm", ...
    shape: tuple[int, ...]  # numpy shape in the probe decode (PROBE_TOKENS tokens)
    view_of: str  # the node whose memory a view shares ("" for a computed node): rounding a view rounds it again
    ggml_type: int = GGML_TYPE_F32  # integer nodes (expert ids) cannot be rounded

    @property
    def view(self) -> bool:
        return bool(self.view_of)

    @property
    def describe(self) -> str:
        return f"{self.op}{f' (view of {self.view_of})' if self.view else ''} {'x'.join(map(str, self.shape))}"


def system_info() -> str:
    """llama.cpp's own description of the CPU features and backends it was built for and runs with."""
    _init_once()
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def llama_cpp_version() -> str:
    return getattr(llama_cpp, "__version__", "unknown")

# llama.cpp's log lines are dropped unless they are errors; the last few explain a failed load. Its log callback
# is process-wide in llama.cpp itself, and so are this buffer and `_initialised` below.
GGML_LOG_LEVEL_ERROR = 4
_recent_errors: deque[str] = deque(maxlen=5)


@llama_cpp.llama_log_callback
def _log_callback(level, text, user_data):
    msg = text.decode("utf-8", "replace").rstrip()
    if level >= GGML_LOG_LEVEL_ERROR and msg:
        _recent_errors.append(msg)


_initialised = False


def _init_once() -> None:
    global _initialised
    if not _initialised:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def tokens_of(path: Path, text: str) -> np.ndarray:
    """The text tokenized by the model file at `path`, its weights never loaded (`vocab_only`): the checks before a
    sweep tokenize without holding a model-sized copy."""
    _init_once()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    _recent_errors.clear()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = _recent_errors[-1] if _recent_errors else "unknown reason"
        raise SweepError(f"llama.cpp cannot load {path}: {why} (unsupported architecture or damaged file?)")
    try:
        return tokenize(llama_cpp.llama_model_get_vocab(model), text)
    finally:
        llama_cpp.llama_model_free(model)


@functools.cache
def _blas():
    return ThreadpoolController().select(user_api="blas")


def one_blas_thread():
    """numpy's BLAS on the calling thread alone, for the length of a decode: the eval callback's matmuls (a weight's
    delta, an importance matrix) run while llama.cpp's own threads hold the cores, spin-waiting between graph splits,
    and BLAS threads beside them made a delta's matmul several times slower and its time erratic (docs/benchmarks.md,
    prefix reuse). Stated rather than left to the machine's core count."""
    return _blas().limit(limits=1)


class Backend(NodeHooks):
    """One model and one context of `n_ctx` tokens, reusable across many perturbations. Its eval callback and the
    observers and replacements registered with it: NodeHooks (observe.py)."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, *, settings: ComputeSettings,
                 writable_weights: bool = False):
        _init_once()
        self._init_hooks()
        self.path, self.n_ctx, self.n_threads, self.settings = Path(path), n_ctx, n_threads, settings
        self.writable = writable_weights
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        mparams.use_extra_bufts = False  # no repacking: AMX crashes, repacked weights are unreadable (see above)
        # with mmap, the weights are read-only pages of the file (writing would crash), mapped in a fraction of the
        # time of a read into memory; stated, not left to LLAMA_LOAD_MODE_AUTO
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE if writable_weights else llama_cpp.LLAMA_LOAD_MODE_MMAP
        # model.rpc: the servers' devices must be listed (registering them alone leaves every layer on the CPU);
        # the array stays referenced as long as the model
        self._devices = offload_devices(settings.rpc)
        if self._devices is not None:
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        self.model_params = mparams
        _recent_errors.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            why = _recent_errors[-1] if _recent_errors else "unknown reason"
            raise SweepError(f"llama.cpp cannot load {self.path}: {why} "
                             f"(unsupported architecture or damaged file?)")

        # The eval callback must stay referenced as long as the context lives.
        self._eval_cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        # An F16 cache (llama.cpp's default) silently absorbs any K/V perturbation at or below fp16 precision,
        # and CPU flash attention converts Q to F16: both are chosen, never left to the build.
        cparams.type_k = cparams.type_v = GGML_TYPES[settings.kv_type]
        cparams.flash_attn_type = FLASH_ATTN[settings.flash_attn]
        cparams.cb_eval = self._eval_cb
        cparams.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise SweepError(f"llama.cpp cannot create a context of {n_ctx} tokens for {self.path}")

        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.n_layers = llama_cpp.llama_model_n_layer(self.model)

        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(n_ctx,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(n_ctx,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(n_ctx,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n_ctx,))[:] = 1
        for k in range(n_ctx):
            b.seq_id[k][0] = 0
        self._b_pos[:] = np.arange(n_ctx, dtype=np.int32)

        # the logit mask of the window being decoded, None outside `decode_window` (generation); routing.py reads it
        self.output_mask: np.ndarray | None = None
        self.decode_seconds = 0.0  # total time inside llama_decode (benchmarks: overhead = wall - decode)
        self.consumers: dict[str, int] = {}  # per weight, the nodes of one decode that multiply by / gather it
        # Filled by the probe decode: every node of the graph and every weight tensor reachable from it.
        self._collect = False
        self.nodes: dict[str, list[NodeOccurrence]] = {}
        self._weights: dict[str, int] = {}
        # Every tensor of each weight's name: llama.cpp loads a tied embedding twice when the output layer is
        # offloaded (token_embd.weight for the input on the CPU, and again for the output on the device)
        self._copies: dict[str, list[int]] = {}
        self._probe()

    # ---- tokens and decoding -------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> np.ndarray:
        return tokenize(self.vocab, text, add_special)

    def detokenize(self, tokens) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    def decode_window(self, tokens: np.ndarray, output_mask: np.ndarray) -> np.ndarray:
        """Decode `tokens` as one fresh sequence; return the logits of positions where `output_mask` is set.

        The KV cache is cleared first, so windows are independent, as in llama-perplexity.
        """
        self._check_open()
        n = len(tokens)
        if n > self.n_ctx:
            raise ValueError(f"window of {n} tokens exceeds the context ({self.n_ctx})")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._b_token[:n] = tokens
        self._b_logits[:n] = output_mask
        self._batch.n_tokens = n
        self.output_mask = output_mask[:n]
        try:
            self._decode()
        finally:
            self.output_mask = None
        n_out = int(np.count_nonzero(output_mask))
        ptr = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def chat_prompt(self, user_text: str) -> str:
        """`user_text` as one user turn in the model's own chat template (plain text if it has none)."""
        template = llama_cpp.llama_model_chat_template(self.model, None)
        if not template:
            return user_text
        msg = (llama_cpp.llama_chat_message * 1)(llama_cpp.llama_chat_message(b"user", user_text.encode()))
        buf = ctypes.create_string_buffer(4 * len(user_text) + 1024)
        n = llama_cpp.llama_chat_apply_template(template, msg, 1, True, buf, len(buf))
        return buf.raw[:n].decode("utf-8", "replace") if 0 < n <= len(buf) else user_text

    def generate_greedy(self, prompt: np.ndarray, max_new: int) -> list[int]:
        """Greedy continuation of `prompt` (a fresh sequence), stopping at end-of-generation or `max_new` tokens.
        Observers, replacements and weight changes apply as in scoring."""
        self._check_open()
        n = len(prompt)
        if n + max_new > self.n_ctx:
            raise SweepError(f"prompt of {n} tokens + {max_new} new exceeds the context of {self.n_ctx}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        out: list[int] = []
        try:
            self._b_token[:n], self._b_logits[:n] = prompt, 0
            self._b_logits[n - 1] = 1
            for step in range(max_new + 1):
                self._batch.n_tokens = n if step == 0 else 1
                self._decode()
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
                token = int(logits.argmax())
                if step == max_new or llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    break
                out.append(token)
                self._b_token[0], self._b_pos[0], self._b_logits[0] = token, n + step, 1
        finally:
            self._b_pos[:] = np.arange(self.n_ctx, dtype=np.int32)  # decode_window relies on positions 0..n-1
        return out

    @property
    def closed(self) -> bool:
        return not getattr(self, "ctx", None)

    def _check_open(self) -> None:
        if self.closed:  # llama.cpp would dereference freed memory
            raise RuntimeError(f"the model {self.path.name} was closed; load it again")

    def _decode(self) -> None:
        """llama_decode of the prepared batch; time spent inside it is added to `decode_seconds`."""
        self._new_decode()
        t0 = time.perf_counter()
        with one_blas_thread():
            rc = llama_cpp.llama_decode(self.ctx, self._batch)
        self.decode_seconds += time.perf_counter() - t0
        self._raise_hook_error()
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    # ---- graph introspection --------------------------------------------------------------------------------

    @property
    def node_names(self) -> set[str]:
        return set(self.nodes)

    def _probe(self) -> None:
        """Decode a few tokens once to learn the graph's nodes (every occurrence, with its op and shape) and to reach
        the weight tensors."""
        n = min(PROBE_TOKENS, self.n_ctx)
        self._collect = True
        try:
            tok = np.full(n, self.bos if self.bos >= 0 else 0, dtype=np.int32)
            self.decode_window(tok, np.ones(n, dtype=np.int8))
        finally:
            self._collect = False
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def _collect_node(self, t_ptr, t: GGMLTensor, name: str, index: int) -> None:
        """The probe's record of one node (every occurrence, its op and shape) and of the weights it reads."""
        op = (libggml.ggml_op_desc(t_ptr) or b"?").decode().lower()
        self.nodes.setdefault(name, []).append(
            NodeOccurrence(name, index, op, shape_of(t),
                           t.view_src.contents.name.decode("utf-8", "replace") if t.view_src else "", t.type))
        if (used := consumed_weight(t)) and _WEIGHT_NAME.match(used):
            self.consumers[used] = self.consumers.get(used, 0) + 1
        for src in t.src:
            if src:
                sname = src.contents.name.decode("utf-8", "replace")
                if _WEIGHT_NAME.match(sname):
                    self._weights[sname] = ctypes.addressof(src.contents)
                    copies = self._copies.setdefault(sname, [])
                    if self._weights[sname] not in copies:
                        copies.append(self._weights[sname])

    # ---- weights --------------------------------------------------------------------------------------------

    def _weight(self, name: str):
        self._check_open()
        if name not in self._weights:
            raise SweepError(f"weight tensor {name!r} is not used by the graph of {self.path.name}")
        addr = self._weights[name]
        return ctypes.c_void_p(addr), GGMLTensor.from_address(addr)

    def read_weight_bytes(self, name: str) -> bytes:
        """A weight tensor's bytes as the backend holds them (any type; a repacked buffer could not give them)."""
        return self.read_weight_raw(name).tobytes()

    def read_weight_raw(self, name: str) -> np.ndarray:
        """The same bytes as a uint8 array, read once (no intermediate copy: a 7B model's matrix is ~100 MB)."""
        ptr, t = self._weight(name)
        out = np.empty(libggml.ggml_nbytes(ptr), dtype=np.uint8)
        libggml.ggml_backend_tensor_get(ptr, out.ctypes.data, 0, out.nbytes)
        return out

    def read_weight(self, name: str) -> np.ndarray:
        ptr, t = self._weight(name)
        return read_f32(ptr, t, name)

    def holds_f32(self, name: str) -> bool:
        """Whether llama.cpp holds the weight in F32, the one type fake-quantized values can be written into."""
        return int(self._weight(name)[1].type) == GGML_TYPE_F32

    def weight_layout(self, name: str) -> tuple[int, tuple[int, ...]]:
        """The ggml type llama.cpp holds the weight in, and its numpy shape."""
        t = self._weight(name)[1]
        return int(t.type), shape_of(t)

    def write_weight(self, name: str, data: np.ndarray) -> None:
        if not self.writable:  # the weights are read-only pages of the file: writing would crash the process
            raise RuntimeError(f"{self.path.name} was loaded read-only (memory-mapped): load it with "
                               f"writable_weights=True to write {name}")
        ptr, t = self._weight(name)
        for addr in self._copies.get(name, [ctypes.addressof(t)]):  # every copy llama.cpp loaded
            write_f32(ctypes.c_void_p(addr), GGMLTensor.from_address(addr), name, data)

    def weight_copies(self, name: str) -> int:
        """How many tensors llama.cpp loaded under this name (2: a tied embedding with its output offloaded)."""
        self._weight(name)
        return len(self._copies[name])

    def placement(self) -> dict:
        """Where the weights are: `devices` (names, memory) and `layer_devices` (blocks per device)."""
        self._check_open()
        return placement([(n, GGMLTensor.from_address(a).buffer) for n, addrs in self._copies.items() for a in addrs])

    # ---- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
