"""``check_bad_inputs``: a kernel must refuse malformed calls with a Python exception.

Each malformed call runs in a worker subprocess, so that a kernel which crashes the process
(a segfault in native code, an abort) or hangs is caught and reported, not fatal to the caller.
Outcomes per call:

  raised     a Python exception (any ``Exception``) -- pass;
  returned   a result came back for a call that has no right answer -- fail ("silent result");
  crashed    the worker died (signal or exit) during the call -- fail;
  hung       no answer within ``timeout`` seconds -- fail.

One worker runs the calls in order; after a crash or a hang it is replaced and the rest go on,
so a kernel pays the interpreter start-up (importing jax) once, not once per call.

The candidate must be importable in the worker: pass ``"module:function"``, or a picklable
callable (a top-level function, or ``functools.partial`` of one). ``sys.path`` is passed on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np

from jaxnet.testing import candidates


@dataclasses.dataclass(frozen=True)
class BadCall:
    """One malformed call: ``candidate(*args, **kwargs)``; NumPy arrays become ``jnp`` arrays."""
    name: str
    args: tuple
    kwargs: dict
    why: str = ""


def default_bad_calls() -> list[BadCall]:
    """Calls the fused-dense contract rejects (``kernels.checks``): the reference raises on each."""
    f32 = np.float32
    x = np.ones((3, 4), f32)
    w = np.ones((4, 2), f32)
    b = np.ones((2,), f32)
    relu = {"activation": "relu"}
    return [
        BadCall("wrong_K", (np.ones((3, 5), f32), w, b), relu, "x has K=5, w has K=4"),
        BadCall("x_scalar", (np.ones((), f32), np.ones((1, 2), f32), b), relu, "x has rank 0"),
        BadCall("w_rank1", (x, np.ones((4,), f32), None), relu, "w is [K], not [K, N]"),
        BadCall("w_rank3", (x, np.ones((4, 2, 2), f32), b), relu, "w is [K, N, N]"),
        BadCall("b_wrong_length", (x, w, np.ones((3,), f32)), relu, "b has 3 entries, N=2"),
        BadCall("b_rank2", (x, w, np.ones((1, 2), f32)), relu, "b is [1, N], not [N]"),
        BadCall("int_x", (np.ones((3, 4), np.int32), w, b), relu, "x is int32"),
        BadCall("int_w", (x, np.ones((4, 2), np.int32), b), relu, "w is int32"),
        BadCall("bool_b", (x, w, np.ones((2,), bool)), relu, "b is bool"),
        BadCall("complex_x", (np.ones((3, 4), np.complex64), w, b), relu, "x is complex64"),
        BadCall("unknown_activation", (x, w, b), {"activation": "swish2"}, "no such activation"),
        BadCall("activation_none", (x, w, b), {"activation": None}, "activation is not a string"),
        BadCall("x_list", ([[1.0] * 4] * 3, w, b), relu, "x is a Python list, not an array"),
    ]


@dataclasses.dataclass
class BadResult:
    name: str
    outcome: str  # raised | returned | crashed | hung | error
    detail: str
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "raised"


@dataclasses.dataclass
class BadInputsReport:
    candidate: str
    results: list
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.results)

    def format(self) -> str:
        lines = [f"bad inputs for {self.candidate}: {self.passed}/{len(self.results)} refused with an exception"]
        for r in self.results:
            mark = "ok  " if r.ok else "FAIL"
            lines.append(f"  {mark} {r.name:<20} {r.outcome:<8} {r.detail}" + (f"  [{r.why}]" if r.why and not r.ok else ""))
        return "\n".join(lines)


def check_bad_inputs(candidate: Any, calls: Sequence[BadCall] | None = None, *, timeout: float = 60.0,
                     startup_timeout: float = 120.0, raise_on_failure: bool = True) -> BadInputsReport:
    """Runs each malformed call in a worker subprocess; each must raise a Python exception.

    Args:
      candidate: ``"module:function"`` or a picklable callable, called ``candidate(*args, **kwargs)``.
      calls: the malformed calls (default ``default_bad_calls()``, the fused-dense contract).
      timeout: seconds one call may take before it counts as hung (compiles included).
      startup_timeout: seconds for a worker to import the candidate (jax included).
      raise_on_failure: raise ``AssertionError`` with the report if any call did not raise.

    Returns:
      ``BadInputsReport`` with one ``BadResult`` per call.
    """
    calls = list(default_bad_calls() if calls is None else calls)
    payload = pickle.dumps((candidate, calls))
    start = time.perf_counter()
    results: list[BadResult] = []
    while len(results) < len(calls):
        results += _run_worker(payload, len(results), calls, timeout, startup_timeout)
    report = BadInputsReport(candidates.label(candidate), results, time.perf_counter() - start)
    if raise_on_failure and not report.ok:
        raise AssertionError(report.format())
    return report


def _run_worker(payload: bytes, first: int, calls, timeout, startup_timeout) -> list[BadResult]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from jaxnet.testing.bad_inputs import _worker; _worker()", str(first)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line.decode(errors="replace"))
            lines.put(None)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        proc.stdin.write(payload)
        proc.stdin.close()

        out: list[BadResult] = []
        current, deadline = None, time.monotonic() + startup_timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    _kill(proc)
                    if current is None:
                        raise RuntimeError(f"check_bad_inputs: worker did not start within {startup_timeout}s")
                    c = calls[current]
                    out.append(BadResult(c.name, "hung", f"no answer within {timeout:g}s", c.why))
                    return out
                if line is None:  # the worker died
                    rc = proc.wait()
                    if current is None:
                        err.seek(0)
                        tail = err.read().decode(errors="replace").strip()[-2000:]
                        raise RuntimeError(f"check_bad_inputs: worker failed to start (exit {rc}):\n{tail}")
                    c = calls[current]
                    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
                    out.append(BadResult(c.name, "crashed", f"the process died ({how})", c.why))
                    return out
                msg = json.loads(line)
                if msg["event"] == "begin":
                    current, deadline = msg["index"], time.monotonic() + timeout
                elif msg["event"] == "end":
                    c = calls[msg["index"]]
                    out.append(BadResult(c.name, msg["outcome"], msg["detail"], c.why))
                    current, deadline = None, time.monotonic() + timeout
                elif msg["event"] == "done":
                    proc.wait()
                    return out
        finally:
            if proc.poll() is None:
                _kill(proc)
            reader.join(timeout=10)  # EOF follows the exit; then the pipe can be closed
            proc.stdout.close()


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and nothing else
    except ProcessLookupError:
        pass
    proc.wait()


def _worker() -> None:
    """Subprocess side: unpickle (candidate, calls), run calls from argv[1] on, report as JSON lines."""
    first = int(sys.argv[1])
    candidate, calls = pickle.loads(sys.stdin.buffer.read())
    fn = candidates.resolve(candidate)
    import jax
    import jax.numpy as jnp

    def emit(**msg):
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    for i in range(first, len(calls)):
        c = calls[i]
        emit(event="begin", index=i)
        try:
            args = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in c.args)
            out = jax.block_until_ready(fn(*args, **c.kwargs))
        except Exception as e:  # noqa: BLE001 - any Python exception is the right answer here
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            emit(event="end", index=i, outcome="raised", detail=f"{type(e).__name__}: {first_line}")
        else:
            shape = getattr(out, "shape", None)
            emit(event="end", index=i, outcome="returned",
                 detail=f"returned a result (shape {tuple(shape) if shape is not None else type(out).__name__}) "
                        "instead of raising")
    emit(event="done")
