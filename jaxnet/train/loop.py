"""``fit``: epochs of jitted train steps, validation, early stopping, logs, and a loss curve.

Two modes, chosen by ``batch_size``:

- **minibatch** (``batch_size < n``): every epoch visits the data in a seeded order
  (``fold_in(data_key, epoch)``) one jitted, state-donating step per batch. The batch is gathered
  on the device from the device-resident data, so nothing crosses to the host inside an epoch.
  A last, partial batch is padded and masked (no example is dropped or counted twice).
- **full batch** (``batch_size=None`` or ``>= n``): many epochs run inside one jitted
  ``lax.scan`` (``epochs_per_call`` of them per call), which is what makes small models fast.

The state carries the data position (``epoch``, ``batch_in_epoch``), so ``fit`` called again on
a state it returned (or a restored one) continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxnet.arguments import check_choice, check_int, check_number
from jaxnet.data.checks import check_same_length, check_supervised
from jaxnet.train.checkpoint import Checkpointer, open_for_run, path_name
from jaxnet.train.pacing import RunAhead
from jaxnet.train.step import TrainState, check_live, make_eval_step, make_train_step, mode_kwargs, split_keys
from jaxnet.train.writers import RunLog, Writer


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
      state: the final state (the best one's parameters when early stopping restored them).
      history: one dict per epoch (a resumed run's earlier epochs first, read back from its
        ``metrics.jsonl``): ``epoch``, ``step``, ``loss``, ``penalty``, ``grad_norm``,
        ``update_norm``, ``time_s`` and, on evaluation epochs, ``val_loss`` and ``val_<metric>``.
      best_epoch: the epoch with the best ``monitor`` value (None without validation data).
      stopped_early: whether early stopping ended the run.
      wall_s: wall time of the whole call, compilation included.
      files: paths written by name: ``metrics`` (JSONL), ``loss_curve`` (PNG), ``tensorboard``
        and ``profile`` (folders).
    """

    state: TrainState
    history: list[dict]
    best_epoch: int | None
    stopped_early: bool
    wall_s: float
    files: dict[str, str]

    def column(self, name: str) -> list:
        """The values of one metric over the epochs that have it."""
        return [r[name] for r in self.history if name in r]


_CLASSIFICATION_LOSSES = ("cross_entropy",)


def _resolve_target_kind(target_kind: str, y, loss_fn, name: str) -> str:
    """``"auto"``: integer targets with a classification loss are class labels, float targets are
    values; integer targets with another loss are an error that says which kind to choose."""
    if target_kind not in ("auto", "float", "labels"):
        raise ValueError(f"target_kind must be 'auto', 'float' or 'labels', got {target_kind!r}")
    if target_kind != "auto":
        return target_kind
    dtype = np.asarray(y).dtype if not hasattr(y, "dtype") else np.dtype(y.dtype)
    if not np.issubdtype(dtype, np.integer):
        return "float"
    loss_name = getattr(loss_fn, "__name__", "")
    if loss_name in _CLASSIFICATION_LOSSES:
        return "labels"
    raise TypeError(f"{name} targets are integers ({dtype}) and the loss is {loss_name or loss_fn!r}: pass "
                    f"target_kind='labels' if they are class labels (with a classification loss such as "
                    f"jaxnet.losses.cross_entropy), or target_kind='float' to regress on them as numbers")


def _xy(data, name: str):
    """``(x, y)`` from a ``(x, y)`` pair or an ``{"x", "y"}`` dict."""
    if isinstance(data, dict):
        if "x" not in data or "y" not in data:
            raise ValueError(f"{name}: a dict of data needs keys 'x' and 'y', got {sorted(data)}")
        return data["x"], data["y"]
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected (x, y) or {{'x': x, 'y': y}}, got {type(data).__name__}") from None
    return x, y


def _as_xy(data, name: str, target_kind: str, x_kind: str = "float"):
    x, y = _xy(data, name)
    if target_kind not in ("float", "labels"):
        raise ValueError(f"target_kind must be 'float' or 'labels', got {target_kind!r}")
    if x_kind not in ("float", "ids"):
        raise ValueError(f"x_kind must be 'float' or 'ids', got {x_kind!r}")
    if x_kind == "ids":  # integer ids for embedding lookups (e.g. (user, item) pairs)
        ids = np.asarray(x)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} inputs: x_kind='ids' needs integer ids, got dtype {ids.dtype} "
                            f"with shape {ids.shape}")
        if ids.size and ids.min() < 0:
            raise ValueError(f"{name} inputs: ids must be >= 0, got {ids.min()} in shape {ids.shape}")
        check_same_length(**{f"{name} inputs": ids, f"{name} targets": y})
        # The targets get the usual checks; a float stand-in takes the ids' place.
        _, y = check_supervised(np.zeros(ids.shape[:1], np.float32), y, y_name=f"{name} targets",
                                y_float=target_kind == "float")
        return {"x": jnp.asarray(ids), "y": jnp.asarray(y)}
    x, y = check_supervised(x, y, x_name=f"{name} inputs", y_name=f"{name} targets",
                            y_float=target_kind == "float")
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def check_data(state: TrainState, train_data, val_data=None, *, loss_fn: Callable, target_kind: str = "auto",
               x_kind: str = "float") -> tuple[dict, dict | None]:
    """``fit``'s checks of its data, before any step: ``(train, val)`` as ``{"x", "y"}`` device
    arrays (``val`` None without ``val_data``); ``target_kind``, ``x_kind`` as in ``fit``.

    Raises ``TypeError`` / ``ValueError`` naming the array: dtypes, NaN/Inf, lengths, no
    examples, labels or ids out of the model's range.
    """
    target_kind = _resolve_target_kind(target_kind, _xy(train_data, "train_data")[1], loss_fn, "train")
    data = _as_xy(train_data, "train", target_kind, x_kind)
    val = None if val_data is None else _as_xy(val_data, "validation", target_kind, x_kind)
    if int(data["x"].shape[0]) == 0:
        raise ValueError("train_data has no examples")
    if val is not None and int(val["x"].shape[0]) == 0:
        raise ValueError("val_data has no examples (pass None for no validation)")
    # A label the model has no output for, or an id past its table, is a data error, before training.
    for split, d in (("train", data), ("validation", val)):
        if d is not None:
            check_ids_and_labels(state, d, split, target_kind)
    return data, val


@functools.lru_cache(maxsize=64)
def _runners(loss_fn, l1, l2, reg_filter, metrics_items, n, batch_size, shuffle, on_nonfinite="raise",
             layout=None, micro_batches=1):
    """Jitted pieces for one configuration, cached so repeated ``fit`` calls reuse compilations.

    With a ``jaxnet.parallel.Layout``, batches are split over the mesh's ``data`` axis and the
    state kept in the layout's shardings.
    """
    train_step = make_train_step(loss_fn, l1=l1, l2=l2, reg_filter=reg_filter, on_nonfinite=on_nonfinite,
                                 micro_batches=micro_batches)
    if layout is not None:
        train_step = layout.wrap_step(train_step)

    eval_step = jax.jit(make_eval_step(loss_fn, dict(metrics_items)))
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size

    @functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
    def run_epochs(state, data, length):
        """``length`` full-batch epochs in one ``lax.scan``; metrics stacked ``[length]``."""
        dropout_key, _ = split_keys(state.rng)

        def body(s, _):
            s, m = train_step(s, data, dropout_key)
            return s.replace(epoch=s.epoch + 1), m

        return jax.lax.scan(body, state, None, length=length)

    @jax.jit
    def epoch_order(rng, epoch):
        """``[num_batches * batch_size]`` example indices of one epoch, padded with -1."""
        _, data_key = split_keys(rng)
        perm = (jax.random.permutation(jax.random.fold_in(data_key, epoch), n) if shuffle
                else jnp.arange(n))
        return jnp.pad(perm, (0, padded - n), constant_values=-1)

    @functools.partial(jax.jit, donate_argnums=0)
    def minibatch_step(state, data, order):
        idx = jax.lax.dynamic_slice_in_dim(order, state.batch_in_epoch * batch_size, batch_size)
        mask = idx >= 0
        batch = {k: jnp.take(v, jnp.where(mask, idx, 0), axis=0) for k, v in data.items()}
        if padded != n:
            batch["mask"] = mask
        dropout_key, _ = split_keys(state.rng)
        state, m = train_step(state, batch, dropout_key)
        last = state.batch_in_epoch + 1 >= num_batches
        state = state.replace(batch_in_epoch=jnp.where(last, 0, state.batch_in_epoch + 1),
                              epoch=state.epoch + last.astype(jnp.int32))
        return state, m

    return run_epochs, epoch_order, minibatch_step, eval_step, num_batches


def evaluate(state: TrainState, data, eval_step: Callable | None = None, batch_size: int | None = None, *,
             loss_fn: Callable | None = None, metrics: dict[str, Callable] | None = None) -> dict:
    """Dataset means over ``data`` (``(x, y)`` or ``{"x", "y"}``, as ``fit`` takes):
    ``{"loss": ..., <metric>: ...}``.

    Either ``eval_step`` (from ``make_eval_step``) or ``loss_fn`` (and ``metrics``, name ->
    ``fn(pred, y) -> [B]``) says what to compute; ``batch_size`` bounds the examples per call.
    """
    check_live(state, "evaluate")
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    if not isinstance(data, dict):
        x, y = _xy(data, "data")
        data = {"x": x, "y": y}
    n = int(np.shape(data["x"])[0])
    if n == 0:
        raise ValueError("evaluate: data has no examples")
    if eval_step is None:  # (fit passes its eval_step, with the data checked already)
        if loss_fn is None:
            raise ValueError("evaluate needs eval_step or loss_fn (and metrics)")
        labels = (getattr(loss_fn, "__name__", "") in _CLASSIFICATION_LOSSES
                  and np.issubdtype(np.asarray(data["y"]).dtype, np.integer))
        check_ids_and_labels(state, data, "data", "labels" if labels else "float")
        eval_step = _eval_step(loss_fn, tuple(sorted((metrics or {}).items())))
    size = n if batch_size is None else min(batch_size, n)
    totals = None
    for start in range(0, n, size):
        batch = {k: v[start:start + size] for k, v in data.items()}
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("n"))
    return {k: float(v) / count for k, v in totals.items()}


@functools.lru_cache(maxsize=32)
def _eval_step(loss_fn, metrics_items):
    return jax.jit(make_eval_step(loss_fn, dict(metrics_items)))


@functools.lru_cache(maxsize=32)
def _predictor(model):
    return jax.jit(lambda variables, x: model.apply(variables, x, **mode_kwargs(model, False)))


def predict(state: TrainState, x, batch_size: int | None = None) -> np.ndarray:
    """The model's outputs for ``x: [n, ...]`` (``train=False``), in batches of ``batch_size``
    (all at once when None): ``[n, ...outputs]`` as a NumPy array."""
    check_live(state, "predict")
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    n = int(np.shape(x)[0])
    size = n if batch_size is None else min(batch_size, n)
    apply = _predictor(state.model)
    outs = [np.asarray(apply(state.variables, x[start:start + size])) for start in range(0, n, size)]
    return np.concatenate(outs) if outs else np.zeros((0,))


def check_labels(y, num_classes: int, name: str) -> None:
    """Raises ``ValueError`` at the first class label outside ``[0, num_classes)``, naming its
    index and value (an out-of-range label would otherwise train into NaN or be ignored)."""
    y = np.asarray(y)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), y.shape)
        shown = int(index[0]) if len(index) == 1 else tuple(int(i) for i in index)
        raise ValueError(f"{name} targets: label {y[index]} at index {shown} is outside [0, {num_classes}): the "
                         f"model has {num_classes} outputs ({int(bad.sum())} labels out of range in all)")


def check_ids(ids, limits: Sequence[int], name: str) -> None:
    """Raises ``ValueError`` at the first id outside ``[0, limits[j])`` in column ``j`` of
    ``ids: [n, len(limits)]``, naming its row, column and value."""
    ids = np.asarray(ids)
    for j, limit in enumerate(limits):
        col = ids[:, j]
        bad = (col < 0) | (col >= limit)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{name} inputs: id {col[row]} at row {row}, column {j} is outside [0, {limit}): the "
                             f"model's table has {limit} rows ({int(bad.sum())} ids of column {j} out of range)")


def check_ids_and_labels(state: TrainState, data: dict, name: str, target_kind: str) -> None:
    """Host-side range checks before any step: integer ``x`` against the model's ``id_limits``
    (recommenders) and, with ``target_kind="labels"``, class labels against its output width."""
    x, y = data["x"], data["y"]
    limits = getattr(state.model, "id_limits", None)
    if limits is not None and np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) == 2:
        check_ids(x, limits, name)
    if target_kind == "labels":
        out = jax.eval_shape(lambda v, x: state.apply_fn(v, x, **mode_kwargs(state.model, False)),
                             state.variables, x[:1])
        check_labels(y, int(out.shape[-1]), name)


def check_finite(metrics: dict, first_step: int, epoch_of_step: Callable[[int], int],
                 param_names: Sequence[str] | None = None) -> None:
    """Raises ``FloatingPointError`` at the first non-finite loss or gradient norm.

    ``metrics[name]: [steps]`` from updates ``first_step + 1, ...``; ``epoch_of_step`` maps an
    update number to the (1-based) epoch it belongs to. With ``metrics["nonfinite_leaf"]`` (from
    ``make_train_step(..., on_nonfinite=...)``) and ``param_names`` (``parameter_names(params)``),
    the message names the first parameter whose gradient went non-finite. Steps that
    ``on_nonfinite="skip"`` skipped (``metrics["skipped"]``) are not errors.
    """
    skipped = np.asarray(metrics["skipped"]) > 0 if "skipped" in metrics else None
    for name in ("loss", "grad_norm"):
        values = np.asarray(metrics[name])
        bad = ~np.isfinite(values)
        if skipped is not None:
            bad &= ~skipped
        if bad.any():
            i = int(np.argmax(bad))
            step = first_step + i + 1  # 1-based number of the update that produced it
            last = values[:i][np.isfinite(values[:i])]
            last_txt = f"; the last finite loss before it was {float(last[-1]):.6g}" if name == "loss" and last.size else ""
            leaf = int(np.asarray(metrics["nonfinite_leaf"])[i]) if "nonfinite_leaf" in metrics else -1
            where = (f"; the first parameter whose gradient is not finite: {param_names[leaf]}"
                     if param_names is not None and 0 <= leaf < len(param_names) else "")
            raise FloatingPointError(
                f"training diverged: {name} became {values[i]} at step {step} (epoch {epoch_of_step(step)})"
                f"{where}{last_txt}. Lower the learning rate, clip gradients, check the data, or pass "
                f"on_nonfinite='skip' to skip such updates."
            )


def parameter_names(params) -> list[str]:
    """Dotted paths of ``jax.tree.leaves(params)``, in that order (``fc1.kernel``)."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def summarize_steps(m: dict, weights=None) -> dict:
    """One record's values from per-step metrics ``{name: [steps]}``: means (weighted by
    ``weights``) over the steps not skipped (all of them when every one was), the count of
    ``skipped`` steps; the per-step ``nonfinite_leaf`` is left out."""
    w = np.ones(len(next(iter(m.values()))), np.float64) if weights is None else np.asarray(weights, np.float64)
    skipped = np.asarray(m.get("skipped", np.zeros_like(w))) > 0
    kept = ~skipped if not skipped.all() else np.ones_like(skipped)
    out = {}
    for k, v in m.items():
        if k == "skipped":
            out[k] = int(skipped.sum())
        elif k != "nonfinite_leaf":
            out[k] = float(np.sum(np.asarray(v, np.float64)[kept] * w[kept]) / w[kept].sum())
    return out


class _Best:
    """Early stopping's memory: the best monitored value, its epoch and (with patience) parameters.

    ``loss`` holds the value with its sign set so that lower is better (``mode="max"`` negates).
    """

    def __init__(self, patience: int | None, monitor: str = "val_loss", mode: str = "min"):
        self.patience, self.loss, self.epoch, self.params, self.since = patience, math.inf, None, None, 0
        self.monitor, self.sign = monitor, (1.0 if mode == "min" else -1.0)

    def update(self, value: float, epoch: int, params) -> None:
        if self.sign * value < self.loss:
            self.loss, self.epoch, self.since = self.sign * value, epoch, 0
            if self.patience is not None:  # a copy: the state's buffers are donated to the next step
                self.params = jax.tree.map(jnp.copy, params)
        else:
            self.since += 1

    def replay(self, records: Sequence[dict]) -> None:
        """A resumed run's earlier evaluations (their parameters are not kept: see ``fit``)."""
        for rec in records:
            if self.monitor in rec:
                if self.sign * rec[self.monitor] < self.loss:
                    self.loss, self.epoch, self.since, self.params = self.sign * rec[self.monitor], rec["epoch"], 0, None
                else:
                    self.since += 1

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience


def _stacked(per_step: list[dict]) -> dict:
    """Per-step metric dicts on the device as ``{name: [steps]}`` on the host (one transfer)."""
    return jax.device_get(jax.tree.map(lambda *a: jnp.stack(a), *per_step))


def _checkpoint(ckpt: Checkpointer | None, step: int, state) -> None:
    """Saves when a checkpoint is due at ``step`` (or a signal arrived), then honours the signal."""
    if ckpt is not None and ckpt.due(step):
        ckpt.save(state)
        ckpt.exit_if_interrupted()


def _full_batch_epochs(state, data, run_epochs, log: RunLog, *, epochs: int, per_call: int,
                       ckpt: Checkpointer | None, param_names):
    """Yields ``(state, record, evaluate_now)`` per epoch; ``per_call`` epochs per jitted scan
    (shortened to end on checkpoint steps), evaluated at the end of each call."""
    epoch = int(state.epoch)
    while epoch < epochs:
        first_step = int(state.step)
        length = min(per_call, epochs - epoch, (ckpt and ckpt.steps_to_next(first_step)) or epochs)
        log.before(first_step, first_step + length)
        state, m = run_epochs(state, data, length)
        log.after(first_step + length, state)
        m = jax.device_get(m)
        check_finite(m, first_step, lambda s, e0=epoch, s0=first_step: e0 + (s - s0), param_names)
        for i in range(length):
            rec = {"epoch": epoch + i + 1, "step": first_step + i + 1,
                   **summarize_steps({k: v[i:i + 1] for k, v in m.items()})}
            yield state, rec, i == length - 1
        epoch += length
        _checkpoint(ckpt, first_step + length, state)


def _minibatch_epochs(state, data, epoch_order, minibatch_step, log: RunLog, *, epochs: int,
                      eval_every: int, n: int, batch_size: int, num_batches: int,
                      ckpt: Checkpointer | None, param_names):
    """Yields ``(state, record, evaluate_now)`` per epoch of one jitted step per batch."""
    epoch = int(state.epoch)
    while epoch < epochs:
        order = epoch_order(state.rng, state.epoch)
        start_batch = int(state.batch_in_epoch)
        first_step = step = int(state.step)
        per_step = []
        ahead = RunAhead()  # unbounded run-ahead deadlocks XLA CPU meshes (jaxnet.train.pacing)
        for b in range(start_batch, num_batches):
            log.before(step, step + 1)
            state, m = minibatch_step(state, data, order)
            step += 1
            log.after(step, state)
            per_step.append(ahead.add(m))
            if b + 1 < num_batches and ckpt is not None and ckpt.due(step):  # mid-epoch; the last: below
                # never checkpoint a diverged state
                check_finite(_stacked(per_step), first_step, lambda s, e=epoch: e + 1, param_names)
                _checkpoint(ckpt, step, state)
        m = _stacked(per_step)
        check_finite(m, first_step, lambda s, e=epoch: e + 1, param_names)
        # Each batch's mean loss weighs by its number of real examples.
        sizes = np.array([min(batch_size, n - b * batch_size) for b in range(start_batch, num_batches)], np.float64)
        rec = {"epoch": epoch + 1, "step": step, **summarize_steps(m, sizes)}
        epoch += 1
        yield state, rec, epoch % eval_every == 0 or epoch == epochs
        _checkpoint(ckpt, step, state)


def fit(
    state: TrainState,
    train_data,
    *,
    loss_fn: Callable,
    epochs: int,
    batch_size: int | None = None,
    val_data=None,
    target_kind: str = "auto",
    x_kind: str = "float",
    l1: float = 0.0,
    l2: float = 0.0,
    reg_filter: Callable | None = None,
    metrics: dict[str, Callable] | None = None,
    shuffle: bool = True,
    eval_every: int = 1,
    patience: int | None = None,
    restore_best: bool = True,
    epochs_per_call: int | None = None,
    log_every: int | None = None,
    progress: bool = True,
    workdir: str | pathlib.Path | None = None,
    plot: bool | None = None,
    tensorboard: bool = False,
    profile_steps: tuple[int, int] | None = None,
    writers: Sequence[Writer] = (),
    title: str = "training",
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
    monitor: str = "val_loss",
    mode: str = "min",
) -> FitResult:
    """Trains ``state`` until it has completed ``epochs`` epochs.

    Args:
      state: from ``TrainState.create`` (or a previous ``fit``); it is donated: use the returned one.
      train_data: ``(x, y)`` or ``{"x": x, "y": y}``; ``x: [n, ...]`` float, ``y: [n, ...]`` float
        (``target_kind="float"``) or integer class labels ``[n]`` (``target_kind="labels"``; each
        in ``[0, outputs)``, checked before training). ``target_kind="auto"`` (the default):
        integer targets with ``losses.cross_entropy`` are labels, float targets are values.
        With ``x_kind="ids"``, ``x`` holds non-negative integer ids instead (e.g. ``[n, 2]``
        (user, item) pairs for ``jaxnet.models.recsys``).
      loss_fn: ``loss_fn(pred, y, reduction=..., mask=...)`` from ``jaxnet.losses``.
      epochs: total epochs; a resumed state continues from its own ``epoch``.
      batch_size: examples per step; None (or >= n) trains full-batch with epochs in ``lax.scan``.
      val_data: like ``train_data``; evaluated every ``eval_every`` epochs (in full-batch mode at the
        end of each call of ``epochs_per_call`` epochs).
      l1, l2, reg_filter: penalties from ``jaxnet.regularizers`` added to the loss.
      metrics: extra validation metrics, ``name -> fn(pred, y) -> [B]``.
      patience: stop after this many evaluations without a better ``monitor`` value.
      restore_best: with ``patience``, return the parameters of the best evaluation.
      monitor, mode: what early stopping (and ``best_epoch``) watches: ``"val_loss"`` or
        ``"val_<metric>"`` for a name in ``metrics``, lower (``"min"``) or higher (``"max"``)
        being better.
      epochs_per_call: full-batch mode only: epochs per jitted scan (default: ``eval_every`` with
        validation data, else ``log_every``, else all of them).
      log_every: print a line of metrics every this many epochs.
      progress: show a tqdm progress bar (stderr).
      workdir: where ``metrics.jsonl`` and ``loss_curve.png`` go (nothing is written when None).
      plot: write the PNG (None: when matplotlib is installed and ``workdir`` is set).
      tensorboard: also write TensorBoard event files under ``<workdir>/tensorboard/`` (needs
        ``workdir`` and tensorboardX: ``pip install 'jaxnet[logs]'``).
      profile_steps: ``(start, stop)``: a ``jax.profiler`` trace under ``<workdir>/profile/`` of the
        updates that take ``state.step`` from ``start`` to ``stop``. In full-batch mode a call's
        epochs run as one program, so the trace holds every whole call that overlaps the window.
      writers: more ``jaxnet.train.writers.Writer`` objects; each gets every history record as
        ``write_scalars(record["step"], record)`` (they are not closed here).
      checkpoint_dir: where checkpoints go (``jaxnet.train.checkpoint``); None: none. A checkpoint
        is written every ``checkpoint_every`` updates, at the end, and when SIGTERM or SIGINT
        arrives (at the step reached; then the signal takes its course).
      checkpoint_every: updates between checkpoints (None: only at the end and on a signal). In
        full-batch mode the scans end on these steps.
      keep: how many newest checkpoints to keep (None: all).
      resume: continue from the newest checkpoint in ``checkpoint_dir`` that verifies (one that
        does not is skipped with a warning saying why); ``state`` then only gives the structure.
        Without a checkpoint, training starts from ``state``. The run then ends bit-identical to
        one never interrupted (same seed, data and arguments). With ``patience``, the earlier
        validation losses are read back from ``metrics.jsonl`` (so stopping happens at the same
        epoch), but parameters of a best epoch before the resume are not kept: ``restore_best``
        then returns the final ones.
      config: the run's config (dataclass or dict), saved with every checkpoint as JSON; on
        resume, a checkpoint written with another config raises ``CheckpointError``.
      on_nonfinite: ``"raise"``: stop at the first non-finite loss or gradient, naming the step
        and the first parameter whose gradient is not finite; ``"skip"``: leave such updates out
        (the batch is skipped) and count them in the history's ``skipped``.
      mesh, strategy: train on a ``jax.sharding.Mesh`` (``jaxnet.parallel.make_mesh("data=4")``)
        with ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp+tp"`` (see ``jaxnet.parallel``): the state
        is placed by its layers' logical axis names, every batch split over ``data``. The
        returned state stays sharded.
      process_local: with a mesh over several processes, each process passes only its own rows
        of ``train_data`` / ``val_data`` (equal counts; process 0's rows first in the global
        order), which become one array split over ``data`` (``jax.make_array_from_process_local_data``).
        False: every process passes all the data.
      accumulate: gradient accumulation: each update's batch runs as this many micro-batches in
        sequence (``make_train_step(micro_batches=...)``); ``batch_size`` (or, full batch, the
        number of examples) must divide by it.

    Raises:
      TypeError, ValueError: bad data (dtype, NaN/Inf, lengths), naming the array and shapes;
        ``tensorboard`` or ``profile_steps`` without ``workdir``; a bad ``profile_steps`` window.
      ImportError: ``tensorboard=True`` without tensorboardX.
      FloatingPointError: the loss or gradient turned NaN/Inf, naming the step and epoch.
      jaxnet.train.checkpoint.CheckpointError: ``resume`` into a run of another config.
    """
    check_live(state, "fit")
    epochs = check_int(epochs, "epochs", minimum=0)
    batch_size = check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    eval_every = check_int(eval_every, "eval_every", minimum=1)
    patience = check_int(patience, "patience", minimum=1, allow_none=True)
    epochs_per_call = check_int(epochs_per_call, "epochs_per_call", minimum=1, allow_none=True)
    log_every = check_int(log_every, "log_every", minimum=1, allow_none=True)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1, allow_none=True)
    keep = check_int(keep, "keep", minimum=1, allow_none=True)
    accumulate = check_int(accumulate, "accumulate", minimum=1)
    l1, l2 = check_number(l1, "l1", minimum=0.0), check_number(l2, "l2", minimum=0.0)
    check_choice(on_nonfinite, "on_nonfinite", ("raise", "skip"))
    if patience is not None and val_data is None:
        raise ValueError(f"patience={patience} needs val_data: early stopping watches the validation loss")
    t_start = time.perf_counter()
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    watchable = ["val_loss"] + [f"val_{name}" for name in (metrics or {})]
    if monitor not in watchable:
        raise ValueError(f"monitor={monitor!r} is not a validation figure of this run; choose one of {watchable}")
    data, val = check_data(state, train_data, val_data, loss_fn=loss_fn, target_kind=target_kind, x_kind=x_kind)
    if process_local and mesh is None:
        raise ValueError("process_local=True needs a mesh: the processes' rows make one array over its data axis")
    layout = None
    if mesh is not None:
        from jaxnet.parallel import Layout

        layout = Layout.for_state(state, mesh, strategy, sample_x=data["x"][:1])
        state = layout.place(state)
        spread = layout.from_process_local if process_local else layout.replicate
        data = spread(data, "train_data")
        val = None if val is None else spread(val, "val_data")
    n = int(data["x"].shape[0])
    full_batch = batch_size is None or batch_size >= n
    bs = n if full_batch else batch_size
    run_epochs, epoch_order, minibatch_step, eval_step, num_batches = _runners(
        loss_fn, float(l1), float(l2), reg_filter, tuple(sorted((metrics or {}).items())), n, bs, shuffle,
        on_nonfinite, layout, accumulate)
    ckpt, state = open_for_run(state, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                               keep=keep, resume=resume, config=config)
    param_names = parameter_names(state.params)

    log = RunLog(workdir, start_step=int(state.step), title=title, plot=plot, tensorboard=tensorboard,
                 profile_steps=profile_steps, writers=writers, resume=resume)
    if full_batch:
        per_call = epochs_per_call or (eval_every if val is not None else (log_every or max(epochs, 1)))
        epochs_run = _full_batch_epochs(state, data, run_epochs, log, epochs=epochs, per_call=per_call,
                                        ckpt=ckpt, param_names=param_names)
    else:
        epochs_run = _minibatch_epochs(state, data, epoch_order, minibatch_step, log, epochs=epochs,
                                       eval_every=eval_every, n=n, batch_size=bs, num_batches=num_batches,
                                       ckpt=ckpt, param_names=param_names)
    history: list[dict] = list(log.previous)
    best = _Best(patience, monitor, mode)
    best.replay(history)
    bar = tqdm(total=epochs, initial=min(int(state.epoch), epochs), unit="epoch",
               disable=not progress or jax.process_index() != 0,  # several processes: process 0's bar
               desc=title, file=sys.stderr, dynamic_ncols=True)
    with ckpt if ckpt is not None else contextlib.nullcontext():
        try:
            for state, rec, evaluate_now in epochs_run:
                if evaluate_now and val is not None:
                    for k, v in evaluate(state, val, eval_step, None if full_batch else bs).items():
                        rec[f"val_{k}"] = v
                    best.update(rec[monitor], rec["epoch"], state.params)
                rec["time_s"] = round(time.perf_counter() - t_start, 4)
                history.append(rec)
                log.write(rec)
                if log_every and rec["epoch"] % log_every == 0:
                    shown = ["loss"] + [k for k in rec if k.startswith("val_")] + ["grad_norm"]
                    bar.write(f"epoch {rec['epoch']:>5}  " + "  ".join(f"{k} {rec[k]:.6g}" for k in shown))
                bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)  # shown at the bar's next refresh
                bar.update(1)
                if best.stop:
                    break
        finally:
            epochs_run.close()
            bar.close()
            files = log.close()
        if ckpt is not None:
            if not ckpt.saved or ckpt.saved[-1] != int(state.step):
                ckpt.save(state)
            files["checkpoints"] = str(ckpt.directory)
            ckpt.exit_if_interrupted()

    if patience is not None and restore_best and best.params is not None:
        state = state.replace(params=best.params)
    return FitResult(state, history, best.epoch, best.stop, time.perf_counter() - t_start, files)
