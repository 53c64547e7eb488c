"""Writing a run's files safely: whole or not at all, and never through a link jaxnet did not make.

``write_atomic`` and ``atomic_path`` write to a temporary file beside the target and rename it
over the target (atomic on POSIX: a reader, or a run killed mid-write, sees the old file or the
whole new one). The rename replaces a symbolic link at the target rather than writing into what
it points to. ``open_log`` opens a log for appending or creating with ``O_NOFOLLOW``.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


def check_not_symlink(path: str | os.PathLike, what: str = "file") -> None:
    """``ValueError`` if ``path`` is a symbolic link (jaxnet writes no file through one)."""
    if os.path.islink(path):
        raise ValueError(f"{what} {os.fspath(path)} is a symbolic link (to {os.readlink(path)}); jaxnet does not "
                         f"write through links it did not create: remove it or choose another folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; on success renames it over ``path`` (and syncs),
    on an exception removes it."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def open_log(path: str | os.PathLike, *, append: bool):
    """A text file for appending (``append``) or a new one (it must not exist), opened with
    ``O_NOFOLLOW``: a symbolic link at ``path`` is refused, not followed."""
    check_not_symlink(path, "log")
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_APPEND if append else os.O_EXCL)
    return os.fdopen(os.open(path, flags, 0o644), "a" if append else "w")
