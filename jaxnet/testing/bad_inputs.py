"""``check_bad_inputs``: a kernel must refuse malformed calls with a Python exception.

Each malformed call runs in a worker subprocess (``jaxnet.testing.worker``), so that a kernel which crashes the process
(a segfault in native code, an abort) or hangs is caught and reported, not fatal to the caller.
Outcomes per call:

  raised     a Python exception (any ``Exception``) -- pass;
  returned   a result came back for a call that has no right answer -- fail ("silent result");
  crashed    the worker died (signal or exit) during the call -- fail;
  hung       no answer within ``timeout`` seconds -- fail.

One worker runs the calls in order; after a crash or a hang it is replaced and the rest go on,
so a kernel pays the interpreter start-up (importing jax) once, not once per call.

The candidate must be importable in the worker: pass ``"module:function"``, or a picklable
callable (a top-level function, or ``functools.partial`` of one). ``sys.path`` is passed on,
without the current directory (a module there is imported only when a spec names it).
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import time
from typing import Any, Sequence

import numpy as np

from jaxnet.testing import candidates
from jaxnet.testing.worker import Worker, child_channel


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
    out: list[BadResult] = []
    current = None  # the call in progress
    with Worker("jaxnet.testing.bad_inputs:_worker", payload, (str(first),)) as proc:
        for msg in proc.events(startup_timeout, timeout):
            kind = msg["event"]
            if kind in ("hung", "exited") and current is None:
                how = (f"did not start within {startup_timeout}s" if kind == "hung"
                       else f"failed to start (it {proc.exit_description}):\n{proc.stderr_tail()}")
                raise RuntimeError(f"check_bad_inputs: worker {how}")
            if kind == "hung":
                c = calls[current]
                out.append(BadResult(c.name, "hung", f"no answer within {timeout:g}s", c.why))
            elif kind == "exited":
                c = calls[current]
                out.append(BadResult(c.name, "crashed", f"the process died (it {proc.exit_description})", c.why))
            elif kind == "begin":
                current = msg["index"]
            elif kind == "end":
                c = calls[msg["index"]]
                out.append(BadResult(c.name, msg["outcome"], msg["detail"], c.why))
                current = None
            elif kind == "done":
                break
    return out


def _worker() -> None:
    """Subprocess side: unpickle (candidate, calls), run calls from argv[1] on, report as JSON lines."""
    first = int(sys.argv[1])
    payload, emit = child_channel()
    candidate, calls = pickle.loads(payload)
    fn = candidates.resolve(candidate)
    import jax
    import jax.numpy as jnp

    for i in range(first, len(calls)):
        c = calls[i]
        emit(event="begin", index=i)
        try:
            args = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in c.args)
            out = jax.block_until_ready(fn(*args, **c.kwargs))
        except Exception as e:  # noqa: BLE001 - any Python exception is the right answer here
            # (SystemExit is not one: a kernel must not end the caller's program on a bad call.)
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            emit(event="end", index=i, outcome="raised", detail=f"{type(e).__name__}: {first_line}")
        else:
            shape = getattr(out, "shape", None)
            emit(event="end", index=i, outcome="returned",
                 detail=f"returned a result (shape {tuple(shape) if shape is not None else type(out).__name__}) "
                        "instead of raising")
    emit(event="done")
