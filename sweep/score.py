"""`python -m sweep.score [overrides]`: perplexity of the reference model as configured, no perturbation."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from . import config  # noqa: F401  (registers the schemas)
from .cli import exit_on_user_error
from .perplexity import score
from .reference import open_reference


def run_score(cfg: DictConfig) -> str:
    ref = open_reference(cfg.model, cfg.data, cfg.run)
    result = score(ref.backend, ref.windows, progress=cfg.run.progress)
    print(f"model {ref.source.name} [{ref.container} container], text {ref.text.source}")
    print(f"{result.tokens_per_second:.1f} tokens/s ({result.seconds:.1f} s)")
    line = result.summary()
    print(line)
    return line


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run_score, cfg)


if __name__ == "__main__":
    main()
