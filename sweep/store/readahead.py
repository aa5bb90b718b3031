"""Reading files into the page cache ahead of their use, in a background thread.

Prefix reuse loads one stage file after another (sweep/prefix/reuse.py); a stage file not in the page cache
(written long ago, larger than the memory left, or evicted by the machine's reclaim) is read by page faults while
llama.cpp maps and first decodes it, at a fraction of the disk's sequential speed. Reading the next stage's file
while the current stage decodes hides that. The read is a plain sequential read() into one small buffer: the
kernel marks the pages as used (posix_fadvise(WILLNEED) alone measured no gain on a VM whose host pages out
memory not touched for a while), and the buffer keeps the process's memory flat.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..cores import available_memory

log = logging.getLogger(__name__)

CHUNK = 8 << 20
ROOM = 0.5  # read ahead only what fits in this share of the memory available (else it would evict what is in use)


class ReadAhead:
    """One background read at a time; a new one (or `stop`) ends the previous one between chunks."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.done: list[Path] = []  # files read to the end (tests, logs)

    def start(self, paths: list[Path]) -> None:
        self.stop()
        paths = [Path(p) for p in paths if Path(p).is_file()]
        total = sum(p.stat().st_size for p in paths)
        room = available_memory()
        if not paths or (room is not None and total > ROOM * room):
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(paths, self._stop), daemon=True,
                                        name="sweep-readahead")
        self._thread.start()

    def _read(self, paths: list[Path], stop: threading.Event) -> None:
        buf = bytearray(CHUNK)
        try:
            for path in paths:
                with open(path, "rb", buffering=0) as f:
                    while not stop.is_set() and f.readinto(buf):
                        pass
                if stop.is_set():
                    return
                self.done.append(path)
        except OSError as e:  # a file removed or unreadable: its load will say so, not the read-ahead
            log.debug("read-ahead of %s stopped: %s", paths, e)

    def wait(self) -> None:
        """Let the current read finish."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
