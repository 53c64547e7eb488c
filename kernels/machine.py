"""What the CPU is (model, ISA features, cores, caches) and an on-disk cache of what was tuned on it.

    m = describe()                       # Machine(model="AMD EPYC", isa=frozenset({"avx512f", ...}), ...)
    m.as_dict()                          # what benchmark results record
    cache = TuningCache("numba_blocking")
    cache.get() / cache.put({...})       # one JSON file per (kind, machine, versions, sources)

A tuned value is only valid for the machine and the code it was measured with, so the cache key
holds the CPU model, its ISA features, its cache sizes, the versions of jaxnet, jax, jaxlib and
numba, and a digest of this package's sources (``sources_digest``): a new version, or an edited
kernel in a checkout (whose version stays), never reads an old entry. ``reset()`` (or deleting
the directory, ``$JAXNET_TUNING_DIR``, default ``~/.cache/jaxnet/tuning``) forgets everything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import warnings
from importlib import metadata

try:
    import fcntl
except ImportError:  # not POSIX: measurements are not serialised between processes
    fcntl = None

# The ISA features a kernel choice can depend on, as /proc/cpuinfo spells them.
ISA_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
TUNING_DIR_ENV = "JAXNET_TUNING_DIR"
_VERSIONED = ("jaxnet", "jax", "jaxlib", "numba")


@dataclasses.dataclass(frozen=True)
class Machine:
    """A CPU as the kernels see it. Cache sizes in bytes (0: unknown): L1d and L2 of one core, L3 as
    shared by the cores that share it."""
    model: str
    isa: frozenset[str]
    cores: int
    l1d: int
    l2: int
    l3: int
    line: int = 64

    @property
    def vector_bits(self) -> int:
        """The widest float vector the ISA has: 512 (AVX-512), 256 (AVX/AVX2) or 128."""
        return 512 if "avx512f" in self.isa else 256 if "avx" in self.isa else 128

    def as_dict(self) -> dict:
        return {"model": self.model, "isa": sorted(self.isa), "cores": self.cores, "l1d_bytes": self.l1d,
                "l2_bytes": self.l2, "l3_bytes": self.l3, "vector_bits": self.vector_bits}


def _size(text: str) -> int:
    """'32K' / '1024K' / '32768K' / '2M' (sysfs) -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMGB") or 0) * scale


def _caches(cpu: pathlib.Path = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, int]:
    out = {"l1d": 0, "l2": 0, "l3": 0, "line": 64}
    for index in sorted(cpu.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _size((index / "size").read_text())
            line = int((index / "coherency_line_size").read_text())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level > 3:
            continue
        out["l1d" if level == 1 else f"l{level}"] = size
        out["line"] = line
    return out


def _isa() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flag for flag in flags if flag in ISA_FEATURES)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``/proc/cpuinfo`` or the platform otherwise)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


@functools.cache
def describe() -> Machine:
    """This process's CPU (read once)."""
    return Machine(model=cpu_model(), isa=_isa(), cores=len(os.sched_getaffinity(0)), **_caches())


def versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str]:
    """The installed versions of ``names`` ("not installed" for a missing one); by default the
    packages a tuned value depends on."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.cache
def sources_digest(root: pathlib.Path = pathlib.Path(__file__).parent) -> str:
    """A digest of every ``.py`` file under ``root`` (default: the ``kernels`` package), names and
    contents: what a tuned value was measured with, beside the versions."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def tuning_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(TUNING_DIR_ENV) or pathlib.Path.home() / ".cache" / "jaxnet" / "tuning")


def reset() -> None:
    """Forgets every tuned value (removes ``tuning_dir()``)."""
    shutil.rmtree(tuning_dir(), ignore_errors=True)


class TuningCache:
    """One JSON object per (kind, machine, versions, sources), in ``tuning_dir()``.

    ``machine`` defaults to ``describe()``; the file name is the kind and a hash of the key, and
    the file holds the key itself, so an entry whose key differs (a hash collision, a hand edit)
    is ignored rather than trusted.
    """

    def __init__(self, kind: str, machine: Machine | None = None):
        m = machine or describe()
        self.kind = kind
        self.key = {"kind": kind, "machine": m.as_dict(), "versions": versions(), "sources": sources_digest()}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = tuning_dir() / f"{kind}-{digest}.json"

    def get(self) -> dict | None:
        """The stored value, or None (nothing stored, unreadable, or stored under another key)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data.get("value") if isinstance(data, dict) and data.get("key") == self.key else None

    @contextlib.contextmanager
    def locked(self):
        """Holds this entry's lock file (``flock``, exclusive) while the body runs, so that of the
        processes about to measure the same thing on this machine one does and the others wait,
        then read what it stored (two measuring at once would also slow each other's timings).
        Unlocked where the folder cannot be written or there is no ``flock``."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            fd = None
        try:
            if fd is not None and fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def put(self, value: dict) -> None:
        """Stores ``value`` (JSON-serialisable), atomically: a reader sees the old file or the new one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "value": value}, indent=1) + "\n")
        os.replace(tmp, self.path)

    def store(self, value: dict, what: str) -> bool:
        """``put``, or a ``RuntimeWarning`` naming ``what`` and the file where it cannot be written
        (a read-only home: the caller still uses what it measured, later processes measure again)."""
        try:
            self.put(value)
            return True
        except OSError as e:
            warnings.warn(f"cannot store {what} in {self.path}: {e}", RuntimeWarning, stacklevel=3)
            return False


__all__ = ["ISA_FEATURES", "Machine", "TuningCache", "cpu_model", "describe", "reset", "sources_digest", "tuning_dir",
           "versions"]
