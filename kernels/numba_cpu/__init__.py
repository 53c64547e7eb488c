"""The "numba" backend of ``kernels.fused_dense``: Numba CPU kernels behind XLA's typed FFI.

Importing this package registers the backend with ``kernels.dispatch``; the Numba handlers are
compiled (or loaded from Numba's on-disk cache) and registered with XLA on first use.

Numba's cache is keyed on each function's own source file only, so a handler cached before an
edit of a module it calls would be reused stale; ``_invalidate_stale_cache`` drops this
package's cache whenever any of its sources changed.
"""
import hashlib
import pathlib

from kernels.dispatch import register_backend


def _invalidate_stale_cache() -> None:
    here = pathlib.Path(__file__).parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    cache = here / "__pycache__"
    stamp = cache / "numba_sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: Numba then caches elsewhere or not at all
        pass


_invalidate_stale_cache()

from kernels.numba_cpu.backend import fused_dense, is_available  # noqa: E402

register_backend("numba", fused_dense, is_available=is_available)

__all__ = ["fused_dense", "is_available"]
