"""Training on a long token stream: random (batch, time) windows each step, for language models.

``fit`` visits a fixed set of examples epoch by epoch; a language model instead draws ``batch_size``
windows of ``block_size + 1`` tokens at random starts of one long stream at every step. The draw
happens on the device (``jaxnet.data.text.random_windows``) inside the same jitted, state-donating
program as ``make_train_step``'s update, so nothing crosses to the host between logs.

    state, history = fit_stream(state, train_tokens, steps=3000, batch_size=32, block_size=128,
                                val_tokens=val_tokens, eval_every=500, workdir="runs/lm")

Step ``s`` draws its windows from ``fold_in(data_key, s)`` and its dropout from
``fold_in(dropout_key, s)`` (``split_keys(state.rng)``), so a run is reproducible and a resumed
state continues the same sequence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxnet import losses
from jaxnet.arguments import check_choice, check_int, check_number
from jaxnet.data.text import random_windows, stream_windows
from jaxnet.train.checkpoint import open_for_run
from jaxnet.train.loop import check_finite, parameter_names, summarize_steps
from jaxnet.train.pacing import RunAhead
from jaxnet.train.step import TrainState, check_live, make_train_step, mode_kwargs, split_keys
from jaxnet.train.writers import RunLog, Writer


@dataclasses.dataclass
class StreamResult:
    """What ``fit_stream`` returns: the state, one record per log interval, wall time, files."""

    state: TrainState
    history: list[dict]
    wall_s: float
    train_s: float  # time in training steps only (evaluation and the first compile excluded)
    tokens: int  # training tokens processed in this call
    stopped_by_time: bool
    files: dict[str, str]
    # ``token_log_probs`` of the held-out tokens by the final state (the evaluation after the last
    # step; None when there was none): what ``val_loss`` of the last record is the mean of.
    val_log_probs: np.ndarray | None = None

    def column(self, name: str) -> list:
        return [r[name] for r in self.history if name in r]


@functools.lru_cache(maxsize=16)
def _stream_step(loss_fn: Callable, batch_size: int, block_size: int, on_nonfinite: str, layout=None,
                 micro_batches: int = 1):
    train_step = make_train_step(loss_fn, on_nonfinite=on_nonfinite, micro_batches=micro_batches)
    if layout is not None:
        train_step = layout.wrap_step(train_step)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, tokens, fraction):
        """``fraction``: float32 scalar for ``clock_schedule`` (ignored by optimisers without one)."""
        state = state.replace(opt_state=set_clock_fraction(state.opt_state, fraction))
        dropout_key, data_key = split_keys(state.rng)
        x, y = random_windows(jax.random.fold_in(data_key, state.step), tokens, batch_size, block_size)
        return train_step(state, {"x": x, "y": y}, dropout_key)

    return step


@functools.lru_cache(maxsize=16)
def _log_probs():
    @jax.jit
    def log_probs(state: TrainState, x, y):
        logits = state.apply_fn(state.variables, x, **mode_kwargs(state.model, False))  # (B, T, V)
        return -losses.cross_entropy(logits, y, reduction="none")  # (B, T)

    return log_probs


def token_log_probs(state: TrainState, tokens, *, block_size: int, batch_size: int = 64,
                    stride: int | None = None) -> np.ndarray:
    """``[N - 1]`` float64: the natural-log probability the model gives each target ``tokens[j + 1]``
    of ``tokens: [N]``, in order.

    Windows from ``jaxnet.data.text.stream_windows``: with ``stride < block_size`` each target is
    scored once with at least ``block_size - stride`` tokens of context (a sliding evaluation),
    with the default ``stride = block_size`` in non-overlapping windows. The windows score their
    targets in order, so the scored positions read row by row are targets 0, 1, ..., N - 2.
    """
    from jaxnet.parallel import fetch  # a state on a mesh of several processes gives a global array

    x, y, score = stream_windows(np.asarray(tokens), block_size, stride)
    log_probs = _log_probs()
    pad = (-len(x)) % batch_size  # fixed batch shape: one compilation
    x, y = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x, y))
    out = np.concatenate([fetch(log_probs(state, x[i:i + batch_size], y[i:i + batch_size])).astype(np.float64)
                          for i in range(0, len(x), batch_size)])
    return out[:len(score)][score]


def evaluate_stream(state: TrainState, tokens, *, block_size: int, batch_size: int = 64,
                    stride: int | None = None) -> float:
    """Mean next-token negative log-likelihood (nats) over every target of ``tokens: [N]``: the mean
    of ``-token_log_probs`` (same windows and arguments)."""
    return float(-np.mean(token_log_probs(state, tokens, block_size=block_size, batch_size=batch_size,
                                          stride=stride)))


def _stack(per_step: list[dict]) -> dict:
    """Per-step metric dicts as ``{name: [steps]}``."""
    return {k: np.array([m[k] for m in per_step]) for k in per_step[0]}


class ClockScheduleState(NamedTuple):
    """``clock_schedule``'s state: ``count`` int32 [] updates made, ``fraction`` float32 [] the part
    of the run's budget used, written by the training loop (``set_clock_fraction``)."""

    count: jax.Array
    fraction: jax.Array


def clock_factor(count, fraction, warmup_steps: int, final_fraction: float = 0.0):
    """The factor ``clock_schedule`` applies: warm-up by update count times a cosine in ``fraction``.

    ``warm = min(1, (count + 1) / warmup_steps)`` (1 without warm-up) and
    ``factor = warm * (final + (1 - final) * (1 + cos(pi * fraction)) / 2)``; ``count`` int [],
    ``fraction`` float [] (jax or NumPy scalars; float32 on the device).
    """
    warm = jnp.minimum(1.0, (count + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * (final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * fraction)))


def clock_schedule(warmup_steps: int, final_fraction: float = 0.0) -> optax.GradientTransformation:
    """Scales updates by a schedule of the time used: warm-up over ``warmup_steps`` updates, then a
    cosine decay to ``final_fraction`` as the run's budget is spent (``clock_factor``).

    Chain it after a constant-rate optimiser (``optax.chain(make_optimizer(config), clock_schedule(
    100, 0.1))``). ``fit_stream`` writes the budget used into its state before every update, as
    data (no recompiling), from the clock with ``budget_s``, else from the steps; elsewhere, set it
    with ``set_clock_fraction``. Warm-up counts this transformation's own updates, on the device.
    """
    def init(params):
        del params
        return ClockScheduleState(count=jnp.zeros([], jnp.int32), fraction=jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del params
        factor = clock_factor(state.count, state.fraction, warmup_steps, final_fraction)
        updates = jax.tree.map(lambda u: u * factor, updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def set_clock_fraction(opt_state, fraction):
    """``opt_state`` with every ``ClockScheduleState``'s fraction set to ``fraction`` (a float
    scalar, stored as float32); unchanged when it has none. Works inside and outside ``jit``."""
    fraction = jnp.asarray(fraction, jnp.float32)
    is_clock = lambda s: isinstance(s, ClockScheduleState)
    return jax.tree.map(lambda s: s._replace(fraction=fraction) if is_clock(s) else s, opt_state, is_leaf=is_clock)


def agree(values) -> np.ndarray:
    """``values`` (float [k], e.g. clock readings) as process 0 has them, the same in every process.

    With several processes, one broadcast from process 0 (a small collective that waits for every
    process, so call it where all of them do, at the same step); the values travel as float32
    (x64 is off), which every process then uses alike. With one process, ``values`` as float64,
    no collective and no wait.
    """
    values = np.asarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values.astype(np.float32)), np.float64)


def fit_stream(
    state: TrainState,
    train_tokens,
    *,
    steps: int,
    batch_size: int,
    block_size: int,
    loss_fn: Callable = losses.cross_entropy,
    val_tokens=None,
    eval_every: int | None = None,
    eval_stride: int | None = None,
    log_every: int = 50,
    time_limit_s: float | None = None,
    budget_s: float | None = None,
    before_step: Callable[[TrainState, float], TrainState] | None = None,
    progress: bool = True,
    workdir: str | pathlib.Path | None = None,
    plot: bool | None = None,
    tensorboard: bool = False,
    profile_steps: tuple[int, int] | None = None,
    writers: Sequence[Writer] = (),
    title: str = "language model",
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int | None = 1000,
    keep: int | None = 3,
    resume: bool = False,
    config=None,
    on_nonfinite: str = "raise",
    mesh=None,
    strategy: str = "dp",
    accumulate: int = 1,
    process_local: bool = False,
) -> StreamResult:
    """Trains ``state`` until it has made ``steps`` updates (a resumed state continues).

    Args:
      state: from ``TrainState.create`` with a model mapping ``ids [B, T] -> logits [B, T, V]``;
        donated: use the returned one.
      train_tokens, val_tokens: ``[N] int`` streams.
      steps: total updates; batch_size, block_size: windows per step and their length.
      eval_every: evaluate ``val_tokens`` every this many steps (and at the end).
      eval_stride: stride of the evaluation windows (``evaluate_stream``).
      log_every: one history record (means of the interval's metrics) every this many steps.
      time_limit_s: stop after this much wall time (checked at log points).
      budget_s: stop once the training steps (evaluation and the first, compiling step excluded)
        have taken this long, checked every step; ``steps`` is then an upper bound. For a fixed
        time on a shared machine. Each step is then waited for before the next is dispatched, so
        the time used is the time really spent.

        Several processes: process 0's clock decides, for all of them. The training time it
        reads after each step (with ``budget_s``) and the wall and training times at each log
        point (with ``time_limit_s`` or ``budget_s``) reach every process by one broadcast
        (``agree``), so all stop after the same step and hand every update the same
        ``fraction``; each clock alone would stop them at different steps, and the ones still
        training would wait in their next collective for good. One process: no broadcast, and
        nothing else changes either.

        Every update is handed ``fraction``, the larger of the parts of ``budget_s`` and of
        ``steps`` used so far: a ``clock_schedule`` in the optimiser takes it as data, so the
        learning rate follows time rather than steps and ends at whichever budget runs out first.
      before_step: ``before_step(state, fraction) -> state`` before every update (that fraction);
        it too waits for each step.
      workdir: where ``metrics.jsonl`` and ``loss_curve.png`` go. The curve's x axis is epochs:
        tokens seen / training tokens.
      plot, tensorboard, writers: as in ``fit``.
      profile_steps: ``(start, stop)``: a ``jax.profiler`` trace under ``<workdir>/profile/`` of
        updates ``start + 1 .. stop`` (``state.step`` going from ``start`` to ``stop``).
      checkpoint_dir, checkpoint_every, keep, resume, config, on_nonfinite, mesh, strategy, accumulate: as in
        ``fit`` (with a mesh, each step's windows are split over ``data``).
      process_local: with a mesh over several processes, each process passes only its own
        contiguous part of ``train_tokens`` (equal lengths, process 0's first): together they are
        the stream, split over ``data``, and windows are drawn from all of it. A
        resumed run ends bit-identical to an uninterrupted one unless ``budget_s`` or
        ``before_step`` make the updates depend on the clock.

    Raises:
      ValueError: ``tensorboard`` or ``profile_steps`` without ``workdir``; a bad window.
      ImportError: ``tensorboard=True`` without tensorboardX.
      FloatingPointError: the loss or gradient turned NaN/Inf.
      jaxnet.train.checkpoint.CheckpointError: ``resume`` into a run of another config.
    """
    check_live(state, "fit_stream")
    steps = check_int(steps, "steps", minimum=0)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    block_size = check_int(block_size, "block_size", minimum=1)
    log_every = check_int(log_every, "log_every", minimum=1)
    eval_every = check_int(eval_every, "eval_every", minimum=1, allow_none=True)
    eval_stride = check_int(eval_stride, "eval_stride", minimum=1, allow_none=True)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1, allow_none=True)
    keep = check_int(keep, "keep", minimum=1, allow_none=True)
    accumulate = check_int(accumulate, "accumulate", minimum=1)
    time_limit_s = check_number(time_limit_s, "time_limit_s", minimum=0.0, allow_none=True)
    budget_s = check_number(budget_s, "budget_s", minimum=0.0, allow_none=True)
    check_choice(on_nonfinite, "on_nonfinite", ("raise", "skip"))
    t_start = time.perf_counter()
    tokens = jnp.asarray(train_tokens, jnp.int32)
    n_train = int(tokens.shape[0])
    layout = None
    if mesh is not None:
        from jaxnet.parallel import Layout

        layout = Layout.for_state(state, mesh, strategy, sample_x=np.zeros((1, block_size), np.int32))
        state = layout.place(state)
        tokens = (layout.from_process_local(tokens, "train_tokens") if process_local
                  else layout.replicate(tokens))
    elif process_local:
        raise ValueError("process_local=True needs a mesh: the processes' tokens make one array over its data axis")
    n_train = int(tokens.shape[0])  # the whole stream's length (all processes' parts)
    step_fn = _stream_step(loss_fn, batch_size, block_size, on_nonfinite, layout, accumulate)
    ckpt, state = open_for_run(state, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                               keep=keep, resume=resume, config=config)
    param_names = parameter_names(state.params)
    epoch_of = lambda s: s * batch_size * block_size // n_train + 1  # noqa: E731
    log = RunLog(workdir, start_step=int(state.step), title=title, plot=plot, tensorboard=tensorboard,
                 profile_steps=profile_steps, writers=writers, resume=resume)

    history: list[dict] = list(log.previous)  # a resumed run's earlier records first
    first_interval = True  # its first step compiles
    first = int(state.step)
    done = first
    train_s, stopped = 0.0, False
    val_log_probs, val_step = None, None
    bar = tqdm(total=steps if budget_s is None else None, initial=min(done, steps), unit="step", desc=title,
               disable=not progress or jax.process_index() != 0,  # several processes: process 0's bar
               file=sys.stderr, dynamic_ncols=True)
    with ckpt if ckpt is not None else contextlib.nullcontext():
        try:
            while done < steps and not stopped:
                n = min(log_every - done % log_every, steps - done)  # records on multiples of log_every
                t0 = t_begin = time.perf_counter()
                per_step = []
                ahead = RunAhead()  # unbounded run-ahead deadlocks XLA CPU meshes (jaxnet.train.pacing)
                used = train_s  # training seconds so far by process 0's clock (agree)
                for _ in range(n):
                    step = done + len(per_step)
                    fraction = max(min(used / budget_s, 1.0) if budget_s else 0.0, step / steps)
                    if before_step is not None:
                        state = before_step(state, fraction)
                    log.before(step, step + 1)
                    state, m = step_fn(state, tokens, np.float32(fraction))
                    log.after(step + 1, state)
                    per_step.append(ahead.add(m))
                    if first_interval and len(per_step) == 1:
                        # A call's first step includes compilation: the clock (budget, schedule,
                        # throughput) restarts after it, and it counts as an average step below.
                        jax.block_until_ready(m)
                        t0 = time.perf_counter()
                    elif before_step is not None or budget_s is not None:
                        jax.block_until_ready(m)
                        if budget_s is not None:
                            used = float(agree([train_s + time.perf_counter() - t0])[0])
                            if used >= budget_s:
                                break
                    if ckpt is not None and ckpt.due(step + 1) and len(per_step) < n:  # the last: below
                        check_finite(_stack(jax.device_get(per_step)), done, epoch_of, param_names)
                        ckpt.save(state)
                        ckpt.exit_if_interrupted()
                n = len(per_step)
                m = jax.device_get(per_step)  # waits for the interval's steps
                dt = time.perf_counter() - t0
                timed = n - 1 if first_interval else n  # steps inside dt
                first_interval = False
                train_s += dt * n / timed if timed else 0.0
                # An interval that is only the compiling step reports that step's throughput, not NaN
                # (metrics.jsonl must stay valid JSON).
                steps_per_s = timed / dt if timed else n / (time.perf_counter() - t_begin)
                tokens_per_s = steps_per_s * batch_size * block_size
                stacked = _stack(m)
                check_finite(stacked, done, epoch_of, param_names)
                done += n
                rec = {"step": done, "epoch": done * batch_size * block_size / n_train,
                       **summarize_steps(stacked), "tokens_per_s": tokens_per_s}
                if time_limit_s is not None or budget_s is not None:  # process 0's clock decides
                    wall, train_s = (float(v) for v in agree([time.perf_counter() - t_start, train_s]))
                    stopped = ((time_limit_s is not None and wall >= time_limit_s)
                               or (budget_s is not None and train_s >= budget_s))
                if val_tokens is not None and eval_every and (done // eval_every > (done - n) // eval_every
                                                               or done >= steps or stopped):
                    val_log_probs = token_log_probs(state, val_tokens, block_size=block_size, stride=eval_stride)
                    val_step = done
                    rec["val_loss"] = float(-np.mean(val_log_probs))
                    bar.write(f"step {done:>6}  loss {rec['loss']:.4f}  val_loss {rec['val_loss']:.4f} "
                              f"({rec['val_loss'] / math.log(2):.3f} bits/token)")
                rec["time_s"] = round(time.perf_counter() - t_start, 3)
                history.append(rec)
                log.write(rec)
                bar.update(n)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if ckpt is not None and (ckpt.due(done) or done >= steps or stopped):
                    ckpt.save(state)
                    ckpt.exit_if_interrupted()
        finally:
            bar.close()
            files = log.close()
        if ckpt is not None:
            files["checkpoints"] = str(ckpt.directory)
    return StreamResult(state, history, time.perf_counter() - t_start, train_s,
                        (done - first) * batch_size * block_size, stopped, files,
                        val_log_probs if val_step == done else None)


__all__ = ["ClockScheduleState", "StreamResult", "agree", "clock_factor", "clock_schedule", "evaluate_stream",
           "fit_stream", "set_clock_fraction", "token_log_probs"]
