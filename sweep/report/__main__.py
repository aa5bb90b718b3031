"""`python -m sweep.report DIR [DIR ...]`: rebuild the results table and the ranking from sweep directories.

Works on any set of sweep directories (a local sweep, a cluster's run dir copied back, several sweeps at once):
it reads every job's record.json, keeps one row per point, writes results.parquet/results.csv and prints the
ranking.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SweepError, exit_on_user_error
from ..estimate.rows import gather_table
from ..store.records import write_table
from .ranking import default_metric, format_ranking


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep directories (or record.json files)")
    parser.add_argument("--out", type=Path, help="where to write results.parquet/csv (default: the first DIR)")
    parser.add_argument("--metric", help="column to rank by (default: kld_mean, or delta_ppl where the points have "
                                         "no KL)")
    parser.add_argument("--top", type=int, default=20, help="rows of the ranking to print (default: 20)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write the figures as PNGs into DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    exit_on_user_error(report, parse_args(argv))
    return 0


def report(args: argparse.Namespace) -> None:
    missing = [str(d) for d in args.dirs if not d.exists()]
    if missing:
        raise SweepError(f"not found: {', '.join(missing)} (give sweep directories under runs/)")
    df = gather_table(args.dirs)
    if df.empty:
        raise SweepError(f"no record.json under {', '.join(map(str, args.dirs))}")
    args.metric = args.metric or default_metric(df)
    if args.metric not in df:
        raise SweepError(f"unknown metric {args.metric!r}; numeric columns: "
                         f"{', '.join(df.select_dtypes('number').columns)}")
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    parquet, csv = write_table(df, out)
    print(format_ranking(df, args.metric, args.top))
    print(f"{len(df)} points -> {parquet} and {csv.name}")
    if args.plots:
        from .plots import write_all  # deferred: matplotlib, only with --plots

        for path in write_all(df, args.plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
