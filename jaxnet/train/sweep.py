"""``fit_many``: many models (seeds x hyperparameters) trained by one compiled program.

    def state_fn(seed, learning_rate):
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
        return TrainState.create(model=SimpleNet(), tx=tx, sample_x=x[:1], seed=seed)

    runs = fit_many(state_fn, (x, y), seeds=range(10), hparams={"learning_rate": [1e-3, 1e-2]},
                    loss_fn=losses.mse, epochs=100, batch_size=32)      # 20 FitResults

**How.** ``state_fn(seed, **hp)`` is traced once under ``jax.vmap`` over the models' seeds and
hyperparameter values: one ``TrainState`` whose every leaf has a leading model axis ``[C, ...]``.
The hyperparameters must live in the optimiser *state* (``optax.inject_hyperparams``), so the
models differ only in array values and ``fit``'s own train step (``make_train_step``), vmapped,
serves them all: ``jit(vmap(scan(epochs)))``, compiled once per chunk size. The data are shared;
in minibatch mode each model visits them in the order ``fit`` would for its seed
(``fold_in(data_key, epoch)`` of its own key). Validation is vmapped too; early stopping is per
model: a model that stopped keeps its state (the program's update is masked by a per-model
``active`` flag, an argument, so nothing recompiles) and, with ``restore_best``, its best
parameters.

**Engines.** That is the ``"vmap"`` engine. Chunks of small dense stacks trained by plain
full-batch SGD under MSE take the ``"fused"`` engine instead (``engine="auto"``, the default):
one kernel call trains every model's epochs in cache, with the same ``run`` contract
(``jaxnet.train.fused`` says when, and checks it per model).

**Order.** Result ``i`` is ``model_grid(seeds, hparams, combine=...)[i]``: seeds outermost, then
the hyperparameter combinations, ``itertools.product`` over the names in the dict's order (the
last name varies fastest), or with ``combine="zip"`` the j-th value of every name.

**How close model i is to a single ``fit``** (same seed and hyperparameters). Same data order,
same keys, same arithmetic; what may differ is the order of float32 sums: a vmapped dot product
is a batched dot (or its batch axis folded into a larger matrix), which XLA may accumulate in
another order, as it may fuse the scanned epochs differently. A sum of ``K`` terms in two orders
differs by at most ``~K u`` of the sum of magnitudes (``u = 2**-24``), but a training step
*rounds its result into the parameters*: an update much smaller than the weight it changes
moves it by at most an ulp or two of the weight, whatever the order inside it. So each step adds
a few ulps (``c u |w|``, ``c ~ 8``, as in ``jaxnet.seed.float32_curve_tolerance``) of
independent difference; gradient descent at a stable rate neither amplifies nor cancels them
(the same argument that bounds the seed's PyTorch/jaxnet gap), so after ``T`` updates they are
within ``T c u`` relative in the worst case and ``sqrt(T) c u`` typically. ``tests/test_sweep.py``
holds the worst case, ``tolerance(steps)``, to every parameter, loss and validation figure.
That bound assumes both runs take the same branches. A ReLU whose input for some example is
within rounding of 0 can switch on in one run and stay off in the other; from then on they
differ by that example's share of a gradient, not by ulps, and follow nearby trajectories that
may drift past ``tolerance``. Rare, and at high rates: in the seed task's 1000-model sweep 13
models (at rates 0.06 and 0.1; up to 2.5e-3 relative in the final loss, 4e-2 in a parameter)
ended outside ``tolerance(1000)``, the median gap being 1.3e-7 (docs/sweeps.md).

**Memory.** Models train in chunks of ``C``: the budget (``memory_budget`` bytes; default half
of the device's free memory, or of the host's available memory on the CPU) less the shared data,
divided by the bytes one model needs: four copies of its state (in, out, the masked copy, the
best parameters) plus every intermediate of one train step and one evaluation batch (the sum
over the traced step's values, an upper bound on what XLA keeps live). Chunks are balanced and
the last one is padded with copies of its last model, so one program serves them all.

What a sweep cannot honour is refused with a ``ValueError`` naming the argument (``REFUSED``):
run files and logs (``workdir``, ``writers``, ...), checkpoints and meshes.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import sys
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxnet.arguments import check_choice, check_int, check_number
from jaxnet.data.checks import snippet
from jaxnet.train import fused
from jaxnet.train.loop import FitResult, check_data, check_finite, fit, parameter_names
from jaxnet.train.step import TrainState, make_eval_step, make_train_step, split_keys
from kernels.dispatch import models_batched

# fit's arguments a sweep does not take, and why (a value other than fit's default is refused).
_NO_FILES = "fit_many writes no run files; keep what you need from the results' histories"
_ONE_PROGRAM = "the models of a sweep are one program; fit a chosen model again with it"
REFUSED = {
    "workdir": _NO_FILES, "plot": _NO_FILES, "tensorboard": _NO_FILES, "profile_steps": _NO_FILES,
    "writers": _NO_FILES, "log_every": "fit_many prints no per-epoch lines (see the results' histories)",
    "checkpoint_dir": _ONE_PROGRAM, "checkpoint_every": _ONE_PROGRAM, "keep": _ONE_PROGRAM,
    "resume": _ONE_PROGRAM, "config": _ONE_PROGRAM,
    "mesh": "fit_many runs on one device, its models being the parallel axis",
    "strategy": "fit_many runs on one device, its models being the parallel axis",
    "process_local": "fit_many runs on one device, its models being the parallel axis",
}
_FIT_DEFAULTS = {name: p.default for name, p in inspect.signature(fit).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
# The fit arguments fit_many honours, with fit's defaults (loss_fn and epochs have none).
HONOURED = tuple(name for name in _FIT_DEFAULTS if name not in REFUSED)
_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def tolerance(steps: int) -> float:
    """Relative gap allowed between model i of a sweep and a single ``fit`` after ``steps``
    updates: ``steps * 8 * 2**-24``, the worst case of the module docstring's derivation."""
    return max(int(steps), 1) * 8 * 2.0**-24


def model_grid(seeds, hparams: Mapping[str, Sequence] | None = None, *,
               combine: str = "product") -> list[tuple[int, dict]]:
    """The models of a sweep in ``fit_many``'s order: ``[(seed, {name: value}), ...]``.

    Seeds outermost; for each, the combinations of ``hparams`` (name -> list of numbers):
    ``"product"``: ``itertools.product`` over the names in the dict's order (the last name varies
    fastest); ``"zip"``: the j-th value of every name (the lists must be of one length).

    Raises:
      TypeError: seeds not integers, hparams not a dict of lists of numbers.
      ValueError: no seeds, an empty list, lists of different lengths for ``"zip"``.
    """
    check_choice(combine, "combine", ("product", "zip"))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (Sequence, range, np.ndarray)):
        raise TypeError(f"seeds must be a list of integers, got {snippet(seeds)} ({type(seeds).__name__})")
    seeds = [check_int(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
    if not seeds:
        raise ValueError("seeds is empty: a sweep needs at least one seed")
    hparams = {} if hparams is None else hparams
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict of name -> list of values, got {type(hparams).__name__}")
    values = {}
    for name, vals in hparams.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"hparams: names must be identifiers (state_fn keywords), got {snippet(name)}")
        if isinstance(vals, (str, bytes)) or not isinstance(vals, (Sequence, np.ndarray)):
            raise TypeError(f"hparams[{name!r}] must be a list of numbers, got {snippet(vals)}")
        if len(vals) == 0:
            raise ValueError(f"hparams[{name!r}] is empty")
        values[name] = [_number(v, f"hparams[{name!r}][{j}]") for j, v in enumerate(vals)]
    if combine == "zip":
        lengths = {name: len(v) for name, v in values.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"hparams: combine='zip' needs lists of one length, got lengths {lengths}")
        combos = [dict(zip(values, row)) for row in zip(*values.values())] if values else [{}]
    else:
        combos = [dict(zip(values, row)) for row in itertools.product(*values.values())]
    return [(s, dict(c)) for s in seeds for c in combos]


def _number(value, name: str):
    """An int stays an int (an integer hyperparameter), anything else a finite float."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    return check_number(value, name)


def plan_chunks(models: int, bytes_per_model: int, shared_bytes: int, budget: int) -> list[range]:
    """Balanced chunks of ``range(models)``, as many models per chunk as ``budget`` bytes hold
    after ``shared_bytes`` (at least one per chunk, whatever the budget)."""
    fit_in = max(1, (budget - shared_bytes) // max(bytes_per_model, 1))
    count = -(-models // min(fit_in, models))
    size = -(-models // count)
    return [range(start, min(start + size, models)) for start in range(0, models, size)]


def available_memory() -> int:
    """Bytes free for a sweep: the default device's free memory where it reports it (GPUs), else
    the host's available memory (``MemAvailable`` of ``/proc/meminfo``, or free pages)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def not_one_program(steps: int, *, mesh=None, resume: bool = False, tensorboard: bool = False,
                    profile_steps=None, checkpoint_every: int | None = None) -> str | None:
    """Why a study's run options need one ``fit`` per model rather than a sweep (None: they do
    not). ``steps``: the updates of each model; checkpoints only at the end (``checkpoint_every``
    0, None or >= steps) are the final weights, which a study saves itself."""
    wants = {"mesh": mesh is not None, "resume": resume, "tensorboard": tensorboard,
             "profile_steps": profile_steps is not None,
             "checkpoint_every": bool(checkpoint_every) and checkpoint_every < steps}
    asked = [name for name, on in wants.items() if on]
    return f"{', '.join(asked)} asked for (fit_many does not take them)" if asked else None


def write_logs(result: FitResult, folder, *, title: str, plot: bool | None = None) -> dict[str, str]:
    """Writes one model's history as ``fit(..., workdir=folder, plot=plot)`` would have:
    ``metrics.jsonl`` and ``loss_curve.png``; returns the files by name."""
    from jaxnet.train.writers import RunLog

    log = RunLog(folder, start_step=0, title=title, plot=plot)
    for record in result.history:
        log.write(record)
    return log.close()


def _bytes(tree) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _traced_bytes(fn, *args) -> int:
    """Sum of the sizes of every value ``fn(*args)`` computes (sub-programs included): an upper
    bound on its live intermediates."""
    def total(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += total(inner)
        return n
    return total(jax.make_jaxpr(fn)(*args).jaxpr)


def _injected(opt_state) -> dict[str, list]:
    """``{name: [value, ...]}`` of the hyperparameters ``optax.inject_hyperparams`` keeps in
    ``opt_state`` (every occurrence, nested transformations included)."""
    found: dict[str, list] = {}
    todo = [opt_state]
    while todo:
        for node in jax.tree.leaves(todo.pop(), is_leaf=lambda x: isinstance(x, _INJECTED)):
            if isinstance(node, _INJECTED):
                for name, value in node.hyperparams.items():
                    found.setdefault(name, []).append(value)
                todo.append(node.inner_state)
    return found


@functools.lru_cache(maxsize=16)
def _init_program(state_fn, names: tuple[str, ...]):
    """``jit(vmap(state_fn))``: stacked states from ``seeds: [C] int32`` and ``values: [C]`` per name."""
    return jax.jit(jax.vmap(lambda seed, values: state_fn(seed, **dict(zip(names, values)))))


@functools.lru_cache(maxsize=16)
def _programs(loss_fn, l1, l2, reg_filter, metrics_items, n, batch_size, shuffle, on_nonfinite, accumulate):
    """The jitted, vmapped programs of one configuration (cached across calls, like ``fit``'s).

    ``run(states, data, active, length)``: ``length`` epochs of every model (``active[c]`` False:
    model ``c`` comes back unchanged); metrics ``[C, length]`` (full batch) or
    ``[C, length, batches]``. ``evaluate(states, batch)``: sums ``[C]`` as ``make_eval_step``'s.
    """
    train_step = make_train_step(loss_fn, l1=l1, l2=l2, reg_filter=reg_filter, on_nonfinite=on_nonfinite,
                                 micro_batches=accumulate)
    num_batches = -(-n // batch_size)
    padded = num_batches * batch_size

    def full_batch_epoch(state, data):
        dropout_key, _ = split_keys(state.rng)
        state, m = train_step(state, data, dropout_key)
        return state.replace(epoch=state.epoch + 1), m

    def minibatch_epoch(state, data):
        # fit's order: a permutation from fold_in(data_key, epoch), padded with -1 and masked.
        dropout_key, data_key = split_keys(state.rng)
        perm = jax.random.permutation(jax.random.fold_in(data_key, state.epoch), n) if shuffle else jnp.arange(n)
        order = jnp.pad(perm, (0, padded - n), constant_values=-1).reshape(num_batches, batch_size)

        def body(s, idx):
            mask = idx >= 0
            batch = {k: jnp.take(v, jnp.where(mask, idx, 0), axis=0) for k, v in data.items()}
            if padded != n:
                batch["mask"] = mask
            return train_step(s, batch, dropout_key)

        state, m = jax.lax.scan(body, state, order)
        return state.replace(epoch=state.epoch + 1), m

    epoch = full_batch_epoch if batch_size >= n else minibatch_epoch

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
    def run(states, data, active, length):
        def one(state, live):
            new, m = jax.lax.scan(lambda s, _: epoch(s, data), state, None, length=length)
            return jax.tree.map(lambda a, b: jnp.where(live, a, b), new, state), m

        return jax.vmap(one)(states, active)

    evaluate = jax.jit(jax.vmap(make_eval_step(loss_fn, dict(metrics_items)), in_axes=(0, None)))
    return run, evaluate, train_step, num_batches


@jax.jit
def _select(mask, new, old):
    """Per model (``mask: [C]``), ``new``'s leaves where True, else ``old``'s."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(-1, *[1] * (a.ndim - 1)), a, b), new, old)


def _summaries(m: dict, weights: np.ndarray) -> dict:
    """``summarize_steps`` over the last axis of ``m[name]: [C, L, steps]`` at once: ``[C, L]``
    means weighted by ``weights: [steps]`` over the steps not skipped (all when every one was)."""
    w = np.broadcast_to(np.asarray(weights, np.float64), next(iter(m.values())).shape)
    skipped = np.asarray(m["skipped"]) > 0 if "skipped" in m else np.zeros(w.shape, bool)
    kept = np.where(skipped.all(-1, keepdims=True), True, ~skipped)
    out = {}
    for k, v in m.items():
        if k == "skipped":
            out[k] = skipped.sum(-1)
        elif k != "nonfinite_leaf":
            out[k] = np.sum(np.asarray(v, np.float64) * w * kept, -1) / np.sum(w * kept, -1)
    return out


def _options(fit_kwargs: dict) -> dict:
    """fit's keyword arguments for a sweep: the honoured ones with fit's defaults filled in."""
    for name, value in fit_kwargs.items():
        if name in REFUSED:
            default = _FIT_DEFAULTS[name]
            if value is not default and not (isinstance(value, (int, str, tuple)) and value == default):
                raise ValueError(f"fit_many does not take {name}={snippet(value)}: {REFUSED[name]}")
        elif name not in _FIT_DEFAULTS:
            raise TypeError(f"fit_many got an unexpected keyword argument {name!r} (fit's arguments: "
                            f"{', '.join(HONOURED)})")
    missing = [name for name in ("loss_fn", "epochs") if name not in fit_kwargs]
    if missing:
        raise TypeError(f"fit_many needs {' and '.join(missing)} (as fit does)")
    return {name: fit_kwargs.get(name, _FIT_DEFAULTS[name]) for name in HONOURED}


def fit_many(state_fn: Callable[..., TrainState], train_data, *, seeds, hparams: Mapping[str, Sequence] | None = None,
             combine: str = "product", memory_budget: int | None = None, engine: str = "auto",
             **fit_kwargs) -> list[FitResult]:
    """Trains one model per (seed, hyperparameter combination) in one compiled program.

    Args:
      state_fn: ``state_fn(seed, **hp) -> TrainState``; traced under ``jax.vmap`` (``seed`` an
        int32 scalar, each hyperparameter a float32 (int32 for integer values) scalar), so it
        must not turn them into Python numbers, and each hyperparameter must reach the optimiser
        through ``optax.inject_hyperparams`` (checked: every model's optimiser state must hold
        the values asked for). The model and the rest of the optimiser must not depend on them.
      train_data: as in ``fit``; shared by all models.
      seeds: the seeds, e.g. ``range(10)``.
      hparams: ``{name: [values]}``; None: one model per seed.
      combine: ``"product"`` (every combination) or ``"zip"`` (see ``model_grid``).
      memory_budget: bytes the sweep may use (default: half of ``available_memory()``); the
        models train in chunks that fit (module docstring).
      engine: ``"auto"``: a chunk of small dense stacks trained by plain full-batch SGD runs on
        the fused kernel (``jaxnet.train.fused``, where ``fused.refusal`` finds nothing against
        it), any other chunk vmaps ``fit``'s step; ``"vmap"``: always the latter; ``"fused"``:
        always the former, a ``ValueError`` with the reason where it does not apply.
      **fit_kwargs: ``fit``'s arguments (``loss_fn`` and ``epochs`` required; ``batch_size``,
        ``val_data``, ``patience``, ``restore_best``, ``monitor``, ``metrics``, ``l1``, ``l2``,
        ``on_nonfinite``, ``accumulate``, ``epochs_per_call``, ``progress``, ...). Those in
        ``REFUSED`` raise ``ValueError`` unless left at fit's default.

    Returns:
      One ``FitResult`` per model, in ``model_grid(seeds, hparams, combine=combine)`` order, as
      ``fit`` would return it, except: ``wall_s`` is the wall time of the model's chunk
      (compilation included; shared by its models), ``files`` is empty, and ``state.tx`` is the
      first model's transformation (each state's hyperparameters are in its ``opt_state``, which
      is what the transformation reads). ``state`` and ``history`` are built when first read;
      ``engine`` says which engine trained the model ("fused" or "vmap").

    Raises:
      TypeError, ValueError: bad seeds, hyperparameters, data or arguments, naming them;
        ``FloatingPointError`` as ``fit`` (on_nonfinite="raise"), naming the model.
    """
    opts = _options(fit_kwargs)
    grid = model_grid(seeds, hparams, combine=combine)
    names = tuple(grid[0][1])
    epochs = check_int(opts["epochs"], "epochs", minimum=0)
    batch_size = check_int(opts["batch_size"], "batch_size", minimum=1, allow_none=True)
    eval_every = check_int(opts["eval_every"], "eval_every", minimum=1)
    patience = check_int(opts["patience"], "patience", minimum=1, allow_none=True)
    per_call = check_int(opts["epochs_per_call"], "epochs_per_call", minimum=1, allow_none=True)
    accumulate = check_int(opts["accumulate"], "accumulate", minimum=1)
    l1, l2 = check_number(opts["l1"], "l1", minimum=0.0), check_number(opts["l2"], "l2", minimum=0.0)
    check_choice(opts["on_nonfinite"], "on_nonfinite", ("raise", "skip"))
    check_choice(opts["mode"], "mode", ("min", "max"))
    check_choice(engine, "engine", fused.ENGINES)
    memory_budget = check_int(memory_budget, "memory_budget", minimum=1, allow_none=True)
    val_data, metrics = opts["val_data"], dict(opts["metrics"] or {})
    if patience is not None and val_data is None:
        raise ValueError(f"patience={patience} needs val_data: early stopping watches the validation loss")
    watchable = ["val_loss"] + [f"val_{name}" for name in metrics]
    if opts["monitor"] not in watchable:
        raise ValueError(f"monitor={opts['monitor']!r} is not a validation figure of this run; "
                         f"choose one of {watchable}")
    try:
        params = inspect.signature(state_fn).parameters
    except (TypeError, ValueError):
        params = None
    takes_any = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in names:
        if not takes_any and name not in params:
            raise ValueError(f"hparams: state_fn{inspect.signature(state_fn)} takes no hyperparameter {name!r}")

    t_start = time.perf_counter()
    # The first model's state, traced but not computed (shapes, static parts, the data checks).
    ref = jax.eval_shape(lambda: state_fn(grid[0][0], **grid[0][1]))
    if not isinstance(ref, TrainState):
        raise TypeError(f"state_fn must return a jaxnet.train.TrainState, got {type(ref).__name__}")
    data, val = check_data(ref, train_data, val_data, loss_fn=opts["loss_fn"], target_kind=opts["target_kind"],
                           x_kind=opts["x_kind"])
    injected = _injected(ref.opt_state)
    for name in names:
        if name not in injected:
            raise ValueError(f"hparams: {name!r} is not in the optimiser state state_fn builds (injected: "
                             f"{sorted(injected) or 'none'}); build the optimiser with optax.inject_hyperparams "
                             f"so that each model carries its own value")
    n = int(data["x"].shape[0])
    full_batch = batch_size is None or batch_size >= n
    bs = n if full_batch else batch_size
    run, evaluate, train_step, num_batches = _programs(
        opts["loss_fn"], float(l1), float(l2), opts["reg_filter"], tuple(sorted(metrics.items())), n, bs,
        bool(opts["shuffle"]), opts["on_nonfinite"], accumulate)

    # Memory: the shared data, and per model its state and one step's and one evaluation's values.
    batch = {k: jax.ShapeDtypeStruct((bs, *v.shape[1:]), v.dtype) for k, v in data.items()}
    per_model = 4 * _bytes(ref) + _bytes(batch) + _traced_bytes(train_step, ref, batch, ref.rng)
    if val is not None:
        val_rows = n if full_batch else min(bs, int(val["x"].shape[0]))
        val_batch = {k: jax.ShapeDtypeStruct((val_rows, *v.shape[1:]), v.dtype) for k, v in val.items()}
        per_model += _traced_bytes(make_eval_step(opts["loss_fn"], metrics), ref, val_batch)
    budget = available_memory() // 2 if memory_budget is None else memory_budget
    chunks = plan_chunks(len(grid), per_model, _bytes(data) + _bytes(val), budget)

    calls = per_call or (eval_every if val is not None else max(epochs, 1))
    bar = tqdm(total=epochs * len(chunks), unit="epoch", disable=not opts["progress"] or jax.process_index() != 0,
               desc=opts["title"], file=sys.stderr, dynamic_ncols=True)
    results: list[FitResult] = []
    try:
        with models_batched(len(chunks[0])):  # backend="auto" layers pick what runs fastest batched
            for chunk in chunks:
                bar.set_description(f"{opts['title']}: models {chunk.start + 1}-{chunk.stop} of {len(grid)}")
                results += _train_chunk(
                    [grid[i] for i in chunk], len(chunks[0]), state_fn, names, ref, data, val, run, evaluate, opts,
                    epochs=epochs, bs=bs, n=n, full_batch=full_batch, calls=calls, eval_every=eval_every,
                    patience=patience, num_batches=num_batches, first_index=chunk.start, t_start=t_start, bar=bar,
                    engine=engine)
    finally:
        bar.close()
    return results


def _init_chunk(models, size, state_fn, names, ref):
    """The chunk's states stacked ``[size, ...]`` (padded with copies of its last model), checked."""
    padded = models + [models[-1]] * (size - len(models))
    seeds = jnp.asarray([s for s, _ in padded], jnp.int32)
    values = tuple(jnp.asarray([hp[name] for _, hp in padded]) for name in names)
    try:
        states = _init_program(state_fn, names)(seeds, values)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError(f"state_fn(seed, **hp) is traced under jax.vmap and used its seed or a hyperparameter as "
                         f"a Python value: {snippet(str(e).splitlines()[0])}") from None
    if not isinstance(states, TrainState) or jax.tree.structure(states.replace(model=ref.model, tx=ref.tx)) != \
            jax.tree.structure(ref):
        raise ValueError("state_fn must build states of one structure for every seed and hyperparameter value "
                         "(the same model and optimiser; only injected hyperparameters may differ)")
    states = states.replace(model=ref.model, tx=ref.tx)
    got = jax.device_get(_injected(states.opt_state))
    for name in names:
        if name not in got:
            raise ValueError(f"hparams: {name!r} is not in the optimiser state state_fn builds under jax.vmap")
        for held in got[name]:
            want = np.asarray([hp[name] for _, hp in padded], held.dtype)
            bad = np.flatnonzero(want != held)
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"hparams: model with seed {padded[i][0]} asked {name}={padded[i][1][name]} but its "
                                 f"optimiser state holds {held[i].item():.7g}: state_fn must pass {name} to "
                                 f"optax.inject_hyperparams")
    epoch, batch_in_epoch = np.asarray(states.epoch), np.asarray(states.batch_in_epoch)
    if (epoch != epoch[0]).any() or (batch_in_epoch != 0).any():
        raise ValueError(f"state_fn's states must start at one epoch boundary, got epochs {snippet(epoch.tolist())} "
                         f"and batch_in_epoch {snippet(batch_in_epoch.tolist())}")
    return states


def _train_chunk(models, size, state_fn, names, ref, data, val, run, evaluate, opts, *, epochs, bs, n, full_batch,
                 calls, eval_every, patience, num_batches, first_index, t_start, bar, engine):
    """Trains one chunk of models together; one ``FitResult`` per (unpadded) model."""
    t_chunk = time.perf_counter()
    states = _init_chunk(models, size, state_fn, names, ref)
    why_not = fused.refusal(states, data, opts, full_batch, auto=engine == "auto") if engine != "vmap" else "vmap"
    if why_not is None:
        run = fused.make_run(ref.model, ref.tx)
    elif engine == "fused":
        raise ValueError(f"fit_many(engine='fused') cannot train these models: {why_not}")
    count, param_names = len(models), parameter_names(ref.params)
    sign = 1.0 if opts["mode"] == "min" else -1.0
    keep_best = patience is not None and opts["restore_best"]
    active = np.arange(size) < count  # the padding trains (one program) but never counts
    best_value, best_epoch = np.full(size, np.inf), np.zeros(size, np.int64)
    since, has_best, stopped = np.zeros(size, np.int64), np.zeros(size, bool), np.zeros(size, bool)
    best_params = None
    calls_made: list[_Call] = []
    epoch = int(states.epoch[0])
    bar.update(min(epoch, epochs))  # the states' earlier epochs
    sizes = np.array([min(bs, n - b * bs) for b in range(num_batches)], np.float64)
    while epoch < epochs and active.any():
        if full_batch:
            length = min(calls, epochs - epoch)
        else:  # up to the next evaluation, as fit evaluates every eval_every epochs and at the end
            length = min(eval_every - epoch % eval_every if val is not None else calls, epochs - epoch)
        first_steps = np.array(states.step)  # a copy: kept in the history after run donates states
        states, m = run(states, data, jnp.asarray(active), length)
        m = jax.device_get(m)
        live = np.flatnonzero(active[:count])
        _check_finite(m, live, first_steps, epoch, full_batch, param_names, models, first_index)
        if full_batch:
            summary = _summaries({k: v[..., None] for k, v in m.items()}, np.ones(1))
        else:
            summary = _summaries(m, sizes)
        steps_per_epoch = 1 if full_batch else num_batches
        now = round(time.perf_counter() - t_start, 4)
        evaluate_now = val is not None and (full_batch or (epoch + length) % eval_every == 0
                                            or epoch + length == epochs)
        val_means = _evaluate(evaluate, states, val, None if full_batch else bs) if evaluate_now else {}
        calls_made.append(_Call(epoch, steps_per_epoch, first_steps, active[:count].copy(), summary,
                                {f"val_{k}": v for k, v in val_means.items()}, now))
        epoch += length
        bar.update(length)
        if val_means:
            value = sign * val_means[opts["monitor"][len("val_"):]]
            improved = active & (value < best_value)
            best_value = np.where(improved, value, best_value)
            best_epoch = np.where(improved, epoch, best_epoch)
            since = np.where(improved, 0, since + active)
            has_best |= improved
            if keep_best:
                best_params = _select(jnp.asarray(improved), states.params,
                                      states.params if best_params is None else best_params)
            if patience is not None:
                stopped |= active & (since >= patience)
                active &= ~stopped
    bar.update(max(epochs - epoch, 0))  # the epochs the chunk's models, all stopped early, did not run
    if keep_best and best_params is not None:
        states = states.replace(params=_select(jnp.asarray(has_best), best_params, states.params))
    wall = time.perf_counter() - t_chunk
    stacked = _StackedStates(states)
    used = "vmap" if why_not else "fused"
    return [_SweepResult(int(best_epoch[c]) if has_best[c] else None, bool(stopped[c]), wall,
                         lazy=(stacked, c, calls_made), engine=used) for c in range(count)]


class _Call(NamedTuple):
    """One call of a chunk's program: its first epoch, per model its first step, whether it
    trained (``live: [C]``) and its epochs' means (``summary[name]: [C, L]``), the evaluation
    after it (``val_means["val_<name>"]: [C]``, or empty) and the time it ended."""
    epoch: int
    steps_per_epoch: int
    first_steps: np.ndarray
    live: np.ndarray
    summary: dict
    val_means: dict
    time_s: float


class _StackedStates:
    """A chunk's final states, copied to the host once and split into one model's arrays when asked."""

    def __init__(self, states: TrainState):
        leaves, self.treedef = jax.tree.flatten(states)
        self.impls = [jax.random.key_impl(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else None
                      for a in leaves]  # keys travel as their raw data
        self.host = [np.asarray(jax.random.key_data(a) if impl else a) for a, impl in zip(leaves, self.impls)]

    def model(self, c: int) -> TrainState:
        rows = jax.device_put([h[c] for h in self.host])
        return self.treedef.unflatten([jax.random.wrap_key_data(r, impl=impl) if impl else r
                                       for r, impl in zip(rows, self.impls)])


class _SweepResult(FitResult):
    """A ``FitResult`` whose ``state`` and ``history`` are built on first access: a sweep of 1000
    models over 1000 epochs would otherwise build a million dicts and 10^4 arrays up front."""

    def __init__(self, *fields, lazy: tuple[_StackedStates, int, list[_Call]] | None = None, engine: str = "vmap",
                 **named):
        self.engine = engine  # which engine trained the model ("fused" or "vmap")
        if lazy is None:  # FitResult's fields, as dataclasses.replace passes them
            super().__init__(*fields, **named)
        else:  # (best_epoch, stopped_early, wall_s) and where state and history come from
            self._stacked, self._c, self._calls = lazy
            self.best_epoch, self.stopped_early, self.wall_s = fields
            self.files = {}

    @functools.cached_property
    def state(self) -> TrainState:
        return self._stacked.model(self._c)

    @functools.cached_property
    def history(self) -> list[dict]:
        c, out = self._c, []
        for call in self._calls:
            if not call.live[c]:
                continue
            length = next(iter(call.summary.values())).shape[1]
            per, step0 = call.steps_per_epoch, int(call.first_steps[c])
            keys = ("epoch", "step", *call.summary, "time_s")
            epochs = range(call.epoch + 1, call.epoch + length + 1)
            steps = range(step0 + per, step0 + (length + 1) * per, per)
            values = (v[c].tolist() for v in call.summary.values())
            records = [dict(zip(keys, row)) for row in zip(epochs, steps, *values, itertools.repeat(call.time_s))]
            if call.val_means:  # the call's last epoch was evaluated; time_s stays last, as in fit
                records[-1].update((k, float(v[c])) for k, v in call.val_means.items())
                records[-1]["time_s"] = records[-1].pop("time_s")
            out += records
        return out

    def column(self, name: str) -> list:
        """As ``FitResult.column``, read from the chunk's columns without building the history."""
        if name in ("epoch", "step", "time_s") or "history" in self.__dict__:
            return super().column(name)
        out = []
        for call in (call for call in self._calls if call.live[self._c]):
            if name in call.summary:
                out += call.summary[name][self._c].tolist()
            elif name in call.val_means:
                out.append(float(call.val_means[name][self._c]))
        return out


def _evaluate(evaluate, states, val, batch_size) -> dict[str, np.ndarray]:
    """Every model's dataset means over ``val`` (as ``jaxnet.train.evaluate``): ``{name: [C]}``."""
    rows = int(val["x"].shape[0])
    size = rows if batch_size is None else min(batch_size, rows)
    totals = None
    for start in range(0, rows, size):
        sums = evaluate(states, {k: v[start:start + size] for k, v in val.items()})
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = np.asarray(totals.pop("n"), np.float64)
    return {k: np.asarray(v, np.float64) / count for k, v in totals.items()}


def _check_finite(m, live, first_steps, epoch, full_batch, param_names, models, first_index) -> None:
    """``check_finite`` for the models that trained (``live``), naming the first that diverged."""
    bad = ~(np.isfinite(m["loss"]) & np.isfinite(m["grad_norm"]))
    if "skipped" in m:
        bad &= np.asarray(m["skipped"]) == 0
    flagged = [c for c in live if bad[c].any()]
    if not flagged:
        return
    c = flagged[0]
    mc = {k: np.asarray(v[c]).reshape(-1) for k, v in m.items()}
    per_epoch = 1 if full_batch else np.asarray(m["loss"]).shape[-1]
    s0 = int(first_steps[c])
    try:
        check_finite(mc, s0, lambda s: epoch + (s - s0 - 1) // per_epoch + 1, param_names)
    except FloatingPointError as e:
        seed, hp = models[c]
        raise FloatingPointError(f"model {first_index + c} (seed {seed}, {hp or 'no hyperparameters'}): {e}") from None
