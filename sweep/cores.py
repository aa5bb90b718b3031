"""The machine's core count, computed in one place: the cores this process may run on (its CPU affinity, which a
cluster's allocation or `taskset` narrows), not the machine's total."""

from __future__ import annotations

import os


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
