"""A sweep that ends with points missing (a cluster task cancelled, killed, or timed out too often): say which, and how
to finish them.

The launcher writes `incomplete.json` into the sweep dir, one entry per task that returned no result; the
end-of-sweep callback still writes the table of what finished, then prints one line naming the missing points and
the command that computes them (the same command: the store already holds every finished point, so only the
missing ones are computed), and the sweep exits non-zero.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..files import atomic_write_bytes

INCOMPLETE_FILE = "incomplete.json"
EXIT_INCOMPLETE = 1


def command_line() -> str:
    """The user's sweep command as given: the sweeper expands the grid inside Hydra, so sys.argv is untouched."""
    return shlex.join(["python", "-m", "sweep", *sys.argv[1:]])


def write_missing(sweep_dir: Path, missing: list[dict]) -> None:
    """`missing`: {"job": scheduler id, "overrides": [...], "reason": one line} per task without a result. An empty
    list removes a previous run's file (a resubmission into the same sweep dir that finished everything)."""
    path = sweep_dir / INCOMPLETE_FILE
    if missing:
        atomic_write_bytes(path, json.dumps({"missing": missing}, indent=1).encode())
    else:
        path.unlink(missing_ok=True)


def read_missing(sweep_dir: Path) -> list[dict]:
    path = sweep_dir / INCOMPLETE_FILE
    return json.loads(path.read_text())["missing"] if path.exists() else []


def missing_line(missing: list[dict], n_finished: int) -> str:
    """The one line: which points are missing, why, and the command that finishes them."""
    points = "; ".join(f"{' '.join(m['overrides'])} (task {m['job']}: {m['reason']})" for m in missing)
    return (f"incomplete: {len(missing)} point{'s' if len(missing) != 1 else ''} did not finish: {points}. The table "
            f"holds the {n_finished} that did. To finish, run the same command again (the store computes only the "
            f"missing): {command_line()}")
