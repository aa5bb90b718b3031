"""Files that appear whole or not at all: written under a temporary name beside their destination, then renamed
(atomic on POSIX). A reader never sees half a record, half a table or half a GGUF; a failure leaves nothing.
And what is read from a file, once per process while it is unchanged (`file_memo`)."""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar, cast

T = TypeVar("T")


class FileMemo(Protocol[T]):
    """A function of a file memoised by `file_memo`; its `file_memo` is the lru_cache (cache_info, cache_clear)."""

    file_memo: functools._lru_cache_wrapper[T]

    def __call__(self, path: str | os.PathLike, /) -> T: ...


def temporary_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty file next to `path`, created with the usual permissions (0666 less the umask: results are
    meant to be shared, unlike mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Write the file at the yielded temporary path; on leaving the block it becomes `path`, or on an error it is
    removed."""
    tmp = temporary_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def file_memo(maxsize: int) -> Callable[[Callable[[Path], T]], FileMemo[T]]:
    """`f(path)` computed once per process while the file is unchanged: a pure function of a file's contents,
    memoised (least recently used, `maxsize` entries) by the path as given, the file it resolves to, its size and
    its modification time, so that a file rewritten in place is read again. A path that cannot be stat'ed is not
    memoised: `f` says what is wrong with it. `f` gets the path as a Path."""

    def decorate(f: Callable[[Path], T]) -> FileMemo[T]:
        @functools.lru_cache(maxsize=maxsize)
        def memo(path: Path, resolved: str, size: int, mtime_ns: int) -> T:
            return f(path)

        @functools.wraps(f)
        def read(path: str | os.PathLike) -> T:
            path = Path(path)
            try:
                st = path.stat()
            except OSError:
                return f(path)
            return memo(path, str(path.resolve()), st.st_size, st.st_mtime_ns)

        memoised = cast("FileMemo[T]", read)  # a function with an attribute: what the Protocol says
        memoised.file_memo = memo  # its cache_info() and cache_clear()
        return memoised

    return decorate
