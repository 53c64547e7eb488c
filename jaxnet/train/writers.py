"""Training logs through writer objects: JSONL, a loss-curve PNG, TensorBoard, a profiler trace.

The loops (``fit``, ``fit_stream``) hand every history record to ``writer.write_scalars(step,
record)`` (Flax lm1b's pattern) and know nothing of files; what a record becomes on disk is the
writer's business. A writer of your own needs only ``write_scalars`` (``Writer``)::

    class Printer:
        def write_scalars(self, step, scalars):
            print(step, scalars["loss"])

    fit(state, data, loss_fn=losses.mse, epochs=5, writers=[Printer()])

``RunLog`` is what a loop opens from its ``workdir``, ``plot``, ``tensorboard`` and
``profile_steps`` arguments::

    <workdir>/metrics.jsonl     JsonlWriter: one JSON object per record
    <workdir>/loss_curve.png    LossCurveWriter: train (and validation) loss against epochs
    <workdir>/tensorboard/      TensorBoardWriter: event files (``tensorboard --logdir``)
    <workdir>/profile/          ProfileTrace: a ``jax.profiler`` trace (Perfetto, TensorBoard)
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Mapping, Protocol, Sequence

import jax

from jaxnet.files import atomic_path, check_not_symlink, open_log, write_atomic


class Writer(Protocol):
    """Anything with ``write_scalars``; the loops call nothing else on a caller's writer."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Takes one record of scalars (e.g. ``loss``, ``epoch``, ``val_loss``) at update ``step``."""


class JsonlWriter:
    """One JSON object per record (the record as given, ``step`` added if missing).

    Each line is flushed as it is written, so a run can be followed while it goes.
    """

    def __init__(self, path: str | pathlib.Path, *, append: bool = False, after_step: int | None = None):
        """``append``: continue the file; with ``after_step``, first drop its records of later steps
        (a run resumed from a checkpoint logs those steps again). Without ``append`` the file must
        not exist yet: an earlier run's log is never overwritten. A symbolic link is never followed.

        Raises:
          FileExistsError: not appending, and ``path`` exists.
          ValueError: ``path`` is a symbolic link.
        """
        self.path = pathlib.Path(path)
        self.files = {"metrics": str(self.path)}
        self.previous: list[dict] = []  # the records kept from before, when appending
        check_not_symlink(self.path, "metrics log")
        if append and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if after_step is None or _record_step(line) <= after_step]
            if after_step is not None:
                write_atomic(self.path, "".join(kept))
            self.previous = [json.loads(line) for line in kept if line.strip()]
        elif not append and self.path.exists():
            raise FileExistsError(f"{self.path} exists: it holds an earlier run's metrics, which a new run does not "
                                  f"overwrite; choose another workdir, remove it, or resume that run")
        self._file = open_log(self.path, append=append)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = dict(scalars)
        record.setdefault("step", step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _record_step(line: str) -> float:
    """A JSONL line's ``step`` (a broken line, e.g. cut by a kill, counts as after every step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class LossCurveWriter:
    """Keeps each record's ``epoch``, ``loss`` and ``val_loss``; draws them as a PNG on ``close``.

    ``files`` names the PNG once it is written (not when nothing was recorded or matplotlib is
    missing; with ``quiet=False`` the latter is said on stderr).
    """

    def __init__(self, path: str | pathlib.Path, title: str, *, quiet: bool = False):
        self.path, self.title, self.quiet = pathlib.Path(path), title, quiet
        self.files: dict[str, str] = {}
        self._records: list[dict] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._records.append({k: scalars[k] for k in ("epoch", "loss", "val_loss") if k in scalars})

    def close(self) -> None:
        if self._records and save_loss_curve(self._records, self.path, self.title, quiet=self.quiet):
            self.files = {"loss_curve": str(self.path)}


class TensorBoardWriter:
    """TensorBoard event files in ``logdir``: every scalar of a record (but ``step``) at its step.

    Written by ``tensorboardX``, which needs no TensorFlow (``pip install 'jaxnet[logs]'``).

    Raises:
      ImportError: tensorboardX is not installed.
    """

    def __init__(self, logdir: str | pathlib.Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logs need tensorboardX: pip install 'jaxnet[logs]'") from e
        self.logdir = pathlib.Path(logdir)
        self.files = {"tensorboard": str(self.logdir)}
        # Event file names hold the time in whole seconds: the suffix keeps a resumed run started
        # within the same second from overwriting the earlier file.
        self._writer = SummaryWriter(str(self.logdir), flush_secs=10, filename_suffix=f".{time.time_ns()}")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            if name != "step":
                self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


def check_profile_steps(profile_steps) -> tuple[int, int]:
    """``(start, stop)`` as two ints with ``0 <= start < stop``; otherwise a ValueError naming them."""
    try:
        start, stop = (int(s) for s in profile_steps)
    except (TypeError, ValueError):
        raise ValueError(f"profile_steps must be (start, stop), two step counts; got {profile_steps!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"profile_steps=({start}, {stop}) needs 0 <= start < stop")
    return start, stop


class ProfileTrace:
    """A ``jax.profiler`` trace of the updates that take the step count from ``start`` to ``stop``.

    The loop calls ``before(step_from, step_to)`` ahead of dispatching the updates that take
    ``state.step`` from ``step_from`` to ``step_to`` and ``after(step_to, state)`` once they are
    dispatched. A trace starts before the first batch of updates that reaches into the window and
    stops after the one that reaches its end (after waiting for it): with one update per call the
    trace holds exactly updates ``start + 1 .. stop``; with several per call (``fit``'s full-batch
    scan) it holds every whole call that overlaps them. ``close`` stops a trace still running (a
    run that ended or raised inside the window). One trace per object; ``files`` names its folder
    once one was taken (``<logdir>/plugins/profile/<time>/*.xplane.pb``).
    """

    def __init__(self, logdir: str | pathlib.Path, profile_steps: tuple[int, int]):
        self.logdir = pathlib.Path(logdir)
        self.start, self.stop = check_profile_steps(profile_steps)
        self.files: dict[str, str] = {}
        self._pending, self._running = True, False

    def before(self, step_from: int, step_to: int) -> None:
        if self._pending and step_from < self.stop and step_to > self.start:
            jax.profiler.start_trace(str(self.logdir))
            self._pending, self._running = False, True

    def after(self, step_to: int, state) -> None:
        if self._running and step_to >= self.stop:
            jax.block_until_ready(state)  # the window's device work belongs in the trace
            self.close()

    def close(self) -> None:
        if self._running:
            self._running = False
            jax.profiler.stop_trace()
            self.files = {"profile": str(self.logdir)}


class RunLog:
    """The logs of one training call: the writers its arguments ask for, then the caller's own.

    Args:
      workdir: folder for ``metrics.jsonl``, ``loss_curve.png``, ``tensorboard/``, ``profile/``;
        None writes no files.
      start_step: the step the run starts from; above 0 (a resumed run), ``metrics.jsonl`` is
        continued, without its records of later steps, instead of started anew.
      resume: the run was asked to resume: a ``metrics.jsonl`` already there (of the run that
        is being resumed) is continued, or started anew when no checkpoint was found
        (``start_step`` 0). Otherwise an existing ``metrics.jsonl`` is an error: a new run does
        not overwrite an earlier one.
      title: the loss curve's title.
      plot: the PNG: never when False; when matplotlib is installed when None; when True, or say
        on stderr why not.
      tensorboard: TensorBoard event files under ``<workdir>/tensorboard/``.
      profile_steps: ``(start, stop)``: a ``ProfileTrace`` under ``<workdir>/profile/``.
      writers: the caller's writers; they get every record and are not closed here.

    In a multi-process job only process 0 writes files (the others' ``workdir`` is ignored).

    Raises:
      ValueError: ``tensorboard`` or ``profile_steps`` without a ``workdir``, or a bad window.
      ImportError: ``tensorboard=True`` without tensorboardX.
    """

    def __init__(self, workdir: str | pathlib.Path | None, *, start_step: int, title: str,
                 plot: bool | None = None, tensorboard: bool = False,
                 profile_steps: tuple[int, int] | None = None, writers: Sequence[Writer] = (),
                 resume: bool = False):
        if workdir is not None and jax.process_index() != 0:  # several processes: process 0 writes
            workdir, tensorboard, profile_steps = None, False, None
        if workdir is None and (tensorboard or profile_steps is not None):
            raise ValueError(f"tensorboard={tensorboard}, profile_steps={profile_steps} need a workdir "
                             f"to write into (<workdir>/tensorboard/, <workdir>/profile/)")
        self.profile = None if profile_steps is None else ProfileTrace(pathlib.Path(workdir) / "profile", profile_steps)
        self._own: list = []
        if workdir is not None:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            if tensorboard:  # first: a missing tensorboardX raises before any file is open
                self._own.append(TensorBoardWriter(workdir / "tensorboard"))
            metrics = workdir / "metrics.jsonl"
            if resume and start_step == 0 and metrics.exists() and not metrics.is_symlink():
                metrics.unlink()  # the resumed run found no checkpoint: it starts again from step 0
            self._own.append(JsonlWriter(metrics, append=start_step > 0, after_step=start_step))
            if plot is not False:
                self._own.append(LossCurveWriter(workdir / "loss_curve.png", title, quiet=plot is None))
        self._writers = [*self._own, *writers]
        self.files: dict[str, str] = {}
        # A resumed run's earlier records (from metrics.jsonl): its history and loss curve start with them.
        self.previous = next((w.previous for w in self._own if isinstance(w, JsonlWriter)), [])
        for w in self._own:
            if isinstance(w, LossCurveWriter):
                for record in self.previous:
                    w.write_scalars(record["step"], record)

    def write(self, record: Mapping[str, float]) -> None:
        """Hands ``record`` (which holds its ``step``) to every writer."""
        for writer in self._writers:
            writer.write_scalars(record["step"], record)

    def before(self, step_from: int, step_to: int) -> None:
        """``ProfileTrace.before`` when profiling, else nothing."""
        if self.profile is not None:
            self.profile.before(step_from, step_to)

    def after(self, step_to: int, state) -> None:
        """``ProfileTrace.after`` when profiling, else nothing."""
        if self.profile is not None:
            self.profile.after(step_to, state)

    def close(self) -> dict[str, str]:
        """Stops the trace, closes this log's own writers; returns the files written by name."""
        own = [w for w in (self.profile, *self._own) if w is not None]
        for w in own:
            w.close()
        self.files = {name: path for w in own for name, path in w.files.items()}
        return self.files


def save_loss_curve(history: Sequence[Mapping[str, float]], path: str | pathlib.Path, title: str,
                    quiet: bool = False) -> bool:
    """Train (and validation) loss against epochs as a PNG; False when matplotlib is missing.

    ``history``: records with ``epoch`` and ``loss`` (and ``val_loss`` where evaluated).
    """
    try:
        import matplotlib
    except ImportError:
        if not quiet:
            print("jaxnet: matplotlib is not installed (pip install 'jaxnet[plots]'); no loss-curve PNG",
                  file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], label="train loss")
    val = [(r["epoch"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in history):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a kill mid-write leaves the previous curve, never half a PNG
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


__all__ = ["JsonlWriter", "LossCurveWriter", "ProfileTrace", "RunLog", "TensorBoardWriter", "Writer",
           "check_profile_steps", "save_loss_curve"]
