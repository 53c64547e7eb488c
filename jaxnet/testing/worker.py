"""A child Python process that runs untrusted kernel code and reports JSON events on its own pipe.

``check_bad_inputs`` and ``jaxnet verify`` run candidates in one of these, so that whatever the
candidate does -- segfault, ``sys.exit(0)``, ``os._exit``, hang, print -- the parent sees it
as an event (or the lack of one) and reports it, instead of dying, passing or hanging with it.

- The child starts with ``python -P``: the current directory is not on its import path, so a
  ``hypothesis.py`` lying there is never imported; a candidate named ``module:function`` is
  searched in the current directory last (``candidates.resolve``). The parent's ``sys.path``
  is passed on without it.
- Events travel on a private copy of the child's stdout; its fd 1 is pointed at stderr, so the
  candidate's prints cannot forge an event. stderr goes to a temporary file, whose tail is
  shown when the child dies.
- The child runs in its own session and is killed with its whole process group.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading


def child_path() -> list[str]:
    """The parent's import path without the current directory (``""`` or its absolute path)."""
    here = os.getcwd()
    return [p for p in sys.path if p and os.path.abspath(p) != here]


class Worker:
    """``python -P -c "from MODULE import FUNCTION; FUNCTION()"`` fed ``payload`` on stdin.

    ``next_event(timeout)`` returns the next event (a dict), ``None`` once the child has exited,
    or raises ``TimeoutError`` after ``timeout`` seconds without one; ``events(...)`` iterates
    over them with the timeouts applied.
    """

    def __init__(self, entry: str, payload: bytes, argv: tuple[str, ...] = ()):
        module, _, function = entry.partition(":")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(child_path()))
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", f"from {module} import {function}; {function}()", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env, start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.close()
        except BrokenPipeError:  # it died before reading: next_event reports the exit
            pass

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.decode(errors="replace"))
        self._lines.put(None)

    def next_event(self, timeout: float) -> dict | None:
        while True:
            try:
                line = self._lines.get(timeout=max(timeout, 0.01))
            except queue.Empty:
                raise TimeoutError(f"no event within {timeout:g}s") from None
            if line is None:
                self.proc.wait()
                return None
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (cannot happen unless the candidate writes to the private fd)

    def events(self, startup_timeout: float, timeout: float):
        """Yields the child's events: the first within ``startup_timeout`` seconds, each next
        within ``timeout``. Ends with ``{"event": "hung"}`` when one does not come in time, or
        ``{"event": "exited"}`` when the child has ended (the caller says how: ``exit_description``)."""
        wait = startup_timeout
        while True:
            try:
                event = self.next_event(wait)
            except TimeoutError:
                yield {"event": "hung"}
                return
            if event is None:
                yield {"event": "exited"}
                return
            yield event
            wait = timeout

    @property
    def exit_description(self) -> str:
        rc = self.proc.wait()
        if rc < 0:
            try:
                return f"was killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                return f"was killed by signal {-rc}"
        return f"exited with status {rc}"

    def stderr_tail(self, chars: int = 1500) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()[-chars:]

    def close(self) -> None:
        """Kills the child (and anything it started) if it still runs; releases the pipes."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._reader.join(timeout=10)  # EOF follows the exit; then the pipe can be closed
        self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def child_channel():
    """Child side: returns ``(payload bytes, emit)``; ``emit(**event)`` sends one event.

    Moves the event channel off fd 1 first, so that prints of the code under test go to stderr.
    """
    payload = sys.stdin.buffer.read()
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(**event) -> None:
        channel.write(json.dumps(event) + "\n")
        channel.flush()
    return payload, emit
