"""Hydra callbacks: at the end of a multirun, gather the records into one table and print the ranking."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..gencheck import check_worst, generation_mode
from ..store.records import gather, write_table
from .ranking import format_ranking

log = logging.getLogger(__name__)


class GatherResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.sweeper.get("plan"):  # the plan launched nothing and writes nothing
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        df = gather([sweep_dir])
        if df.empty:
            print(f"no records under {sweep_dir}")
            return
        n_check = generation_mode(config.metrics.generate)
        if n_check:  # metrics.generate=top:N: the generation check of the N worst points, now that they are known
            df = check_worst(df, sweep_dir, str(config.metrics.rank_by), n_check)
        parquet, csv = write_table(df, sweep_dir)
        print(format_ranking(df, str(config.metrics.rank_by)))
        counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
        print(f"{len(df)} points ({counts}) -> {parquet} and {csv.name}")
