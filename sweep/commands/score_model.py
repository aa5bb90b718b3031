"""`sweep score [overrides]`: perplexity of the reference model as configured, no perturbation."""

from __future__ import annotations

from omegaconf import DictConfig

from ..pipeline.config import hydra_command
from ..pipeline.reference import open_reference
from ..pipeline.settings import score_settings
from ..scoring.perplexity import score


def run_score(cfg: DictConfig) -> str:
    s = score_settings(cfg)
    with open_reference(s) as ref:
        result = score(ref.backend, ref.windows, progress=s.run.progress, math=ref.session.math)
    print(f"model {ref.source.name} [{ref.container} container], text {ref.text.source}")
    print(f"{result.tokens_per_second:.1f} tokens/s ({result.seconds:.1f} s)")
    line = result.summary()
    print(line)
    return line


main = hydra_command("score", run_score)


if __name__ == "__main__":
    main()
