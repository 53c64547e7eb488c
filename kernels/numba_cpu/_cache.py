"""Keeps Numba's on-disk cache of this package consistent with its sources.

Numba keys a cached function on its own source file only, so a handler cached before an edit of
a module it calls (or of ``kernels/activations.py``, whose codes are compiled in as constants)
would be reused stale. ``drop_if_stale`` deletes this package's cached functions whenever any of
those sources changed since the cache was written (a digest of them is kept beside the cache).

It runs at the backend's first use, just before the first handler or task is compiled or loaded
(``_handlers.handler``), never on import.
"""
from __future__ import annotations

import hashlib
import pathlib
import threading

_HERE = pathlib.Path(__file__).parent
_STAMP = "numba_sources.sha256"
_lock = threading.Lock()
_checked: list[pathlib.Path] = []


# Modules of this package that no compiled function reads (pure Python around the kernels):
# editing them keeps the cache, whose cold rebuild takes minutes.
NOT_COMPILED = frozenset({"__init__.py", "_batching.py", "_cache.py", "backend.py", "blocking.py", "mlp_sgd.py",
                          "peak.py", "tune.py"})


def sources() -> list[pathlib.Path]:
    """The files whose contents the compiled kernels depend on: every module of this package
    but ``NOT_COMPILED`` (a new module counts until listed there), and the activation codes."""
    return sorted(p for p in _HERE.glob("*.py") if p.name not in NOT_COMPILED) + [_HERE.parent / "activations.py"]


def digest() -> str:
    """Of the sources and the register tile in force (``_kernels.MR``, ``NR``: compiled in, and
    chosen by the machine or ``$JAXNET_NUMBA_TILE``, not by the source)."""
    from kernels.numba_cpu._kernels import MR, NR

    tile = f"tile {MR}x{NR}".encode()
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources()) + tile).hexdigest()


def cache_dir() -> pathlib.Path:
    """Where Numba caches this package's functions (in-tree ``__pycache__``, ``NUMBA_CACHE_DIR``
    or a user-wide directory, by Numba's own rules; created if missing)."""
    from numba.core.caching import FunctionCache

    from kernels.numba_cpu import _handlers

    return pathlib.Path(FunctionCache(_handlers.handler).cache_path)  # any function of this package


def drop_if_stale(directory: pathlib.Path | None = None) -> bool:
    """Deletes the cached ``.nbi``/``.nbc`` files in ``directory`` (default ``cache_dir()``) unless
    its stamp matches ``digest()``, then writes the stamp; once per directory and process.
    Returns whether files were dropped. A read-only cache is left alone."""
    with _lock:
        directory = pathlib.Path(directory) if directory is not None else cache_dir()
        if directory in _checked:
            return False
        _checked.append(directory)
        want, stamp = digest(), directory / _STAMP
        try:
            if stamp.read_text() == want:
                return False
        except OSError:
            pass
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for f in list(directory.glob("*.nbi")) + list(directory.glob("*.nbc")):
                f.unlink(missing_ok=True)
            stamp.write_text(want)
        except OSError:  # read-only: Numba then caches elsewhere or not at all
            return False
        return True
