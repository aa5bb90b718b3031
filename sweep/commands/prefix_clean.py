"""`sweep prefix-clean [--cache-dir DIR] [--dry-run]`: remove prefix reuse's stage files and captured
residuals (`<cache>/stages/`, `<cache>/prefix/`; docs/prefix.md). The F32 containers and the store are kept. The next
sweep that reuses a prefix writes what it needs again."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import SweepError, exit_on_user_error
from ..llama.cache import cache_root, prefix_dirs


def clean(cache_dir: Path, dry_run: bool = False) -> int:
    """Remove the two directories; returns the bytes freed (or that would be)."""
    freed = 0
    for d in prefix_dirs(cache_dir):
        if not d.exists():
            continue
        if not d.is_dir():
            raise SweepError(f"{d} is not a directory: not a sweep cache? (give --cache-dir)")
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{'would remove' if dry_run else 'removed'} {d} ({size / 1e9:.2f} GB)")
        if not dry_run:
            shutil.rmtree(d)
        freed += size
    if not freed:
        print(f"nothing to remove in {cache_dir}")
    return freed


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sweep prefix-clean", description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the cache (model.cache_dir; default $SWEEP_CACHE or ~/.cache/sweep)")
    ap.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    exit_on_user_error(clean, cache_root(args.cache_dir), args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
