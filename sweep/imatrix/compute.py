"""`python -m sweep.imatrix [overrides] out=PATH`: an importance matrix computed on the text, as llama-imatrix does.

For every matrix multiplication of the model (llama/input_stats.py: a matmul observer of the backend,
`Backend.observe_matmuls`: the context's eval callback sees each MUL_MAT / MUL_MAT_ID node once computed), the sum
over tokens of the squared input activations per column, and the number of tokens, per weight tensor. The rules are
tools/imatrix/imatrix.cpp's of the vendored llama.cpp:
  * MUL_MAT nodes count only when their input has >= 16 rows, is F32, and the weight is a block tensor (`blk.*`;
    `output.weight` too with process_output=true); MUL_MAT_ID nodes always, per routed expert;
  * sums accumulate in float32, row after row (the same rounding as llama-imatrix's loop);
  * the text is cut into windows of n_ctx tokens (BOS first when the vocab asks for it), every position's logits
    are requested (so the last block computes every row), and data.n_windows windows are used.
The file is written in the GGUF form llama-imatrix writes (sweep/quant/imatrix_file.py); `fmt.imatrix=PATH` reads it.
bench/crosscheck/imatrix_crosscheck.py compares it with llama-imatrix's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from ..llama.input_stats import Collector, collect
from ..pipeline import config
from ..pipeline.config import hydra_command
from ..pipeline.reference import open_reference
from ..pipeline.settings import score_settings
from ..quant.imatrix_file import Imatrix, write_gguf


@dataclass
class ImatrixConfig(config.ScoreConfig):
    out: str = MISSING  # where to write the imatrix (GGUF form)
    process_output: bool = False  # llama-imatrix --process-output: also collect output.weight


ConfigStore.instance().store(name="imatrix_schema", node=ImatrixConfig)


def run_imatrix(cfg: DictConfig) -> Path:
    s = score_settings(cfg)
    with open_reference(s) as ref:
        col = collect(ref.backend, ref.windows.tokens, bool(cfg.process_output), s.run.progress)
    im = Imatrix(col.sums, col.counts, chunk_count=ref.windows.n_windows, chunk_size=ref.windows.n_ctx,
                 datasets=[str(ref.text.source)])
    out = write_gguf(Path(cfg.out), im)
    print(f"imatrix of {len(im.sums)} tensors over {ref.windows.n_windows} windows of {ref.windows.n_ctx} tokens "
          f"({ref.source.name}, {ref.container} container) written to {out}")
    return out


main = hydra_command("imatrix", run_imatrix)

__all__ = ["Collector", "collect", "main", "run_imatrix"]
