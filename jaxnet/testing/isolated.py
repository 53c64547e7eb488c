"""``verify_isolated``: ``verify`` with the candidate in a child process, for ``jaxnet verify``.

The whole property search runs in a ``jaxnet.testing.worker`` child that announces each check
before it runs the candidate. If the child dies (a segfault, ``sys.exit``, ``os._exit``) or sends
nothing for ``timeout`` seconds (a hang), that check fails with the call it was on and how the
process ended, and a fresh child searches on for the checks not yet decided. So a run ends with
a verdict per check, whatever the candidate does, and never hangs.
"""
from __future__ import annotations

import base64
import dataclasses
import pickle
import time
from typing import Any

from jaxnet.testing import candidates
from jaxnet.testing.harness import CheckResult, Failure, Report
from jaxnet.testing.worker import Worker, child_channel

DEFAULT_TIMEOUT = 120.0  # seconds a check may go without an answer (compiles included)
STARTUP_TIMEOUT = 300.0  # seconds for the child to import jax and the candidate


class CandidateError(RuntimeError):
    """The candidate could not be loaded: its import raised, or its process ended or hung first."""


@dataclasses.dataclass(frozen=True)
class CallText:
    """A call as the child described it (the arrays stay in the child): for ``Failure.format``."""
    text: str
    spec: str

    def describe(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.spec


def verify_isolated(candidate: Any, *, name: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                    startup_timeout: float = STARTUP_TIMEOUT, **verify_kwargs) -> Report:
    """``harness.verify(candidate, **verify_kwargs)`` run in a child process.

    Args:
      candidate: ``"module:function"`` or a picklable callable (top-level, or a partial of one).
      name: the candidate's name in the report.
      timeout: seconds one check may take before the candidate counts as hung.
      startup_timeout: seconds for the child to import jax and the candidate.
      verify_kwargs: passed to ``verify`` (``dtypes``, ``max_examples``, ``profile``, ``shrink``,
        ...); float64 among ``dtypes`` turns on x64 mode in the child.

    Returns:
      The ``Report``; a check during which the child died or hung holds that as its failure.

    Raises:
      CandidateError: the candidate could not be imported, or its process ended or hung before
        the first check.
    """
    label = name or candidates.label(candidate)
    start = time.perf_counter()
    skip = set(verify_kwargs.pop("skip", ()))
    ended: dict[str, Failure] = {}  # checks during which a child died or hung
    while True:
        kwargs = dict(verify_kwargs, skip=tuple(skip | set(ended)), name=label)
        with Worker("jaxnet.testing.isolated:_child", pickle.dumps((candidate, kwargs))) as child:
            report, failure = _follow(child, label, timeout, startup_timeout)
        if report is not None:
            for check, f in ended.items():
                report.results[check] = CheckResult(check, worst_ratio=float("inf"), failure=f)
            report.seconds = time.perf_counter() - start  # every child's time, restarts included
            return report
        ended[failure.check] = failure


def _follow(child: Worker, label: str, timeout: float, startup_timeout: float):
    """Reads one child's events: ``(report, None)`` when it finished, else ``(None, failure)``."""
    last = None  # the check in progress
    for event in child.events(startup_timeout, timeout):
        kind = event["event"]
        if kind == "hung":
            if last is None:
                raise CandidateError(f"candidate {label}: no answer within {startup_timeout:g}s of starting "
                                     f"(importing it hangs?)")
            return None, _ended(last, f"no answer within {timeout:g}s: the candidate hung (or is slower "
                                      f"than --timeout)")
        if kind == "exited":
            if last is None:
                raise CandidateError(f"candidate {label}: its process {child.exit_description} before the "
                                     f"first check\n{child.stderr_tail()}")
            tail = child.stderr_tail(600)
            return None, _ended(last, f"the candidate's process {child.exit_description} during this check"
                                      + (f"; its stderr ended with:\n{tail}" if tail else ""))
        if kind == "check":
            last = event
        elif kind == "error":
            raise CandidateError(f"candidate {label}: {event['message']}")
        elif kind == "report":
            return pickle.loads(base64.b64decode(event["report"])), None
    raise AssertionError("unreachable: events() ends with 'hung' or 'exited'")


def _ended(event: dict, message: str) -> Failure:
    return Failure(event["check"], CallText(event["call"], event["spec"]), message)


def _child() -> None:
    """Child side: unpickle ``(candidate, verify kwargs)``, run ``verify``, announce every check."""
    payload, emit = child_channel()
    candidate, kwargs = pickle.loads(payload)
    try:
        fn = candidates.resolve(candidate)
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
        emit(event="error", message=f"cannot import it: {type(e).__name__}: {str(e)[:300]}")
        return
    import jax

    from jaxnet.testing.harness import verify

    def progress(check, call) -> None:
        emit(event="check", check=check, call=call.describe(), spec=repr(call))

    # float64 needs JAX's x64 mode (without it, float64 inputs would run as float32).
    try:
        with jax.enable_x64("float64" in kwargs.get("dtypes", ()) or jax.config.jax_enable_x64):
            report = verify(fn, progress=progress, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. bad verify arguments: said, not a crash of a check
        emit(event="error", message=f"verify raised {type(e).__name__}: {str(e)[:300]}")
        return
    emit(event="report", report=base64.b64encode(pickle.dumps(report)).decode())
