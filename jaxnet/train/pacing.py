"""A bound on how far a training loop may run ahead of the devices.

JAX dispatches jitted calls asynchronously, so a loop that reads no result for many steps queues
them all. On XLA's CPU client with several devices in one process this deadlocks: each device
admits at most 32 unfinished programs, a program over the limit blocks one of the client's few
launch threads (as many as the cores or the devices, whichever is more) until an earlier one
finishes, and a program that reaches an all-reduce holds another thread until every device's copy
arrives; with all threads held, the other devices' copies never start and XLA aborts after its
40 s rendezvous timeout ("Termination timeout for all reduce"). With one device per process no
two devices share those threads, which is why the same run worked under ``jaxnet.launch``.

Waiting for the call ``MAX_IN_FLIGHT`` places back keeps every device far below the limit and
costs nothing measurable: by then that call has usually finished, and the device still has the
later ones queued.

    ahead = RunAhead()
    for batch in batches:
        state, metrics = step(state, batch)
        ahead.add(metrics)          # waits for the step 8 places back
"""
from __future__ import annotations

import collections

import jax

# Calls a loop may have dispatched and not yet finished: a training step is one program, so 8 stay
# well under XLA CPU's 32 per device and still keep any device busy while the host dispatches.
MAX_IN_FLIGHT = 8


class RunAhead:
    """Waits, after each dispatched call, for the outputs of the call ``limit`` places back."""

    def __init__(self, limit: int = MAX_IN_FLIGHT):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._pending: collections.deque = collections.deque()

    def add(self, outputs):
        """Records a call's ``outputs`` (any pytree of arrays) and returns them unchanged."""
        self._pending.append(outputs)
        if len(self._pending) > self.limit:
            jax.block_until_ready(self._pending.popleft())
        return outputs


__all__ = ["MAX_IN_FLIGHT", "RunAhead"]
