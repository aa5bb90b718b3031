"""Hydra callbacks: at the end of a multirun, gather the records into one table and print the ranking."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..cluster.incomplete import EXIT_INCOMPLETE, missing_line, read_missing
from ..cluster.launcher import checks_generation_in_a_task
from ..errors import SweepError
from ..estimate.rows import spent_line, with_predictions
from ..pipeline.gencheck import check_worst
from ..scoring.generation import generation_mode
from ..store.records import gather, write_table
from .ranking import format_ranking

log = logging.getLogger(__name__)


class GatherResults(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.sweeper.get("plan"):  # the plan launched nothing and writes nothing
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        df = gather([sweep_dir])
        missing = read_missing(sweep_dir)  # tasks a cluster launcher got no result from
        if df.empty:
            print(f"no records under {sweep_dir}")
            self.end_incomplete(missing, 0)
            return
        n_check = generation_mode(config.metrics.generate)
        # metrics.generate=top:N: the generation check of the N worst points, now that they are known (a cluster
        # launcher has run it as a task of its own: its results are in the records gathered above)
        if n_check and not checks_generation_in_a_task(config.hydra.launcher):
            df = check_worst(df, sweep_dir, str(config.metrics.rank_by), n_check)
        map_failed = None
        try:  # run.estimate=map: the predicted points beside the measured ones
            df = with_predictions(df, [sweep_dir])
        except SweepError as e:  # the map's check: the measured points are kept, the predictions are not written
            map_failed = str(e)
            df["estimated"] = False
        parquet, csv = write_table(df, sweep_dir)
        print(format_ranking(df, str(config.metrics.rank_by)))
        counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
        print(f"{len(df)} points ({counts}) -> {parquet} and {csv.name}")
        print(spent_line(df, sweep_dir))
        if map_failed:
            print(f"error: {map_failed}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        self.end_incomplete(missing, len(df))

    @staticmethod
    def end_incomplete(missing: list[dict], n_finished: int) -> None:
        if missing:  # the one line, then a non-zero exit (SystemExit passes through Hydra's callback guard)
            print(missing_line(missing, n_finished), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INCOMPLETE)
