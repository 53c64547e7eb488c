"""``fit_many``'s fused engine: a sweep of small dense stacks trained by plain SGD, one kernel call
per call of the program, every model's epochs in cache (``kernels.numba_cpu.mlp_sgd``).

The generic engine vmaps ``fit``'s train step: each op then runs over all models at once, and
for small models its intermediates (``[models, batch, width]``) leave the caches between ops. For
the sweeps researchers run most (seeds x learning rates of a small MLP), the fused kernel runs
each model's forward, backward and update in a few rows of scratch instead. It applies when
(``refusal`` says which condition failed):

- the platform is the CPU and Numba is available; the sweep is full-batch (``batch_size`` None or
  at least the data's rows), the loss ``jaxnet.losses.mse``, no ``l1``/``l2``, ``accumulate=1``,
  ``on_nonfinite="raise"``, the data just ``x [n, K]`` and ``y [n, F]``, all float32;
- the model describes itself as a stack of dense layers (``dense_layers()``: ``SimpleNet``,
  ``MLP`` without dropout), its parameters are exactly those layers' kernels (and biases), of
  activations the kernel has, and its training forward pass on the data computes that stack
  (checked on every model of the chunk, on the first ``_PROBE_ROWS`` rows, not assumed);
- the optimiser is plain SGD with any learning-rate schedule, checked per model by probing
  ``tx.update`` at its state and at the state a prime number of steps (1,000,003) on: the update
  of a gradient of ones is ``-lr`` everywhere (which gives the rate at that state), of random
  gradients exactly ``-lr * g``, the same at other parameters and a million times the scale, and
  the next state the same whatever the gradient and the parameters. Momentum, Adam, weight decay
  and clipping fail it; a schedule passes, and each epoch runs at the rate its own optimiser state
  gives (computed from the state as ``fit``'s step would reach it, not assumed constant).

``engine="auto"`` also leaves to the vmapped engine any sweep with a layer of more than
``AUTO_MAX_LAYER_WEIGHTS`` weights: the kernel streams each layer's rows once per weight, which
beats XLA's GEMMs for narrow layers only.

Model i then equals its single ``fit`` within ``sweep.tolerance`` as in the generic engine (the
same float32 operations in another summation order, plus FMA contraction); the optimiser state
advances as ``fit``'s does (``tx.update`` applied once per epoch to zero gradients: its next
state does not depend on them). ``fit_many(..., engine=...)`` chooses: ``"auto"`` (this engine where it applies),
``"vmap"`` (never), ``"fused"`` (a ``ValueError`` with the reason where it does not apply).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import losses
from jaxnet.train.step import TrainState, mode_kwargs

ENGINES = ("auto", "vmap", "fused")
_PROBE_ROWS = 1024  # rows of x the forward check runs (it compares the model with its stack)
# "auto" takes the fused engine only for layers of at most this many weights (K * N): measured faster
# than the vmapped engine up to 2048 (1.1-7.6x), slower from 4096 on wider data (docs/benchmarks.md).
AUTO_MAX_LAYER_WEIGHTS = 2048


def _stack(model, params) -> tuple[tuple[str, ...], tuple[str, ...]] | str:
    """``(layer names, activations)`` of a dense-stack model, or why it is not one (``params``:
    one model's or the chunk's stacked; only their names are read)."""
    from kernels.numba_cpu.mlp_sgd import supported_activations

    describe = getattr(model, "dense_layers", None)
    spec = describe() if callable(describe) else None
    if not spec:
        return (f"{type(model).__name__} does not describe itself as a stack of dense layers (dense_layers(); "
                f"MLP does without dropout)")
    names, acts = tuple(n for n, _ in spec), tuple(a for _, a in spec)
    if not isinstance(params, dict) or set(params) != set(names):
        return f"the parameters are not exactly the layers {list(names)}"
    for name, act in spec:
        layer = params[name]
        if not isinstance(layer, dict) or set(layer) - {"bias"} != {"kernel"}:
            return f"layer {name!r} is not a dense kernel (and bias)"
        if act not in supported_activations():
            return f"layer {name!r}'s activation {act!r} is not one of the kernel's {supported_activations()}"
    return names, acts


def _leaf_ids(params, names) -> list[tuple[int, int]]:
    """Each layer's (kernel, bias) index in ``jax.tree.leaves(params)`` (bias -1 if none; the
    order of the tree's paths, the same for one model's and the stacked parameters)."""
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    order = {tuple(k.key for k in path): i for i, path in enumerate(paths)}
    return [(order[(n, "kernel")], order.get((n, "bias"), -1)) for n in names]


def _rate(tx, opt_state, params):
    """The step size ``lr`` of a plain-SGD ``tx`` (``-update`` of a gradient of ones), one model."""
    ones = jax.tree.map(jnp.ones_like, params)
    return -jax.tree.leaves(tx.update(ones, opt_state, params)[0])[0].reshape(-1)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _checks(model, tx, states: TrainState, x, grads, shift):
    """Per model ``[C]``: whether ``tx`` behaves as plain SGD, probed with the gradients ``grads``
    at the parameters moved by ``shift`` (trees like ``states.params``, drawn on the host: values
    made inside the program may be recomputed in each fusion that reads them, to another rounding),
    and the largest gap between the model's training forward pass on ``x`` and its dense stack's,
    relative to the output's scale."""
    from kernels import reference

    names, acts = _stack(model, states.params)

    def same(a, b):
        return jnp.all(jnp.stack([jnp.all(u == v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
                                 or [jnp.bool_(True)]))

    def plain_at(opt_state, params, g, moved):
        """At this state: the update is ``-rate * g`` (the rate from a gradient of ones, the same
        for a gradient 10^6 times larger at other parameters) and the next state does not depend
        on the gradient or the parameters."""
        rate = _rate(tx, opt_state, params)
        ok = jnp.isfinite(rate) & same(tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)[0],
                                       jax.tree.map(lambda p: jnp.full_like(p, -rate), params))
        big = jax.lax.optimization_barrier(jax.tree.map(lambda t: t * 1e6, g))  # one value for both sides
        update, after = tx.update(g, opt_state, params)
        update_big, after_big = tx.update(big, opt_state, moved)
        ok &= same(update, jax.tree.map(lambda t: -rate * t, g))
        ok &= same(update_big, jax.tree.map(lambda t: -rate * t, big))
        return ok & same(after, after_big)

    def one(opt_state, params, rng, g, dp):
        moved = jax.tree.map(jnp.add, params, dp)
        later = jax.tree.map(lambda a: a + 1_000_003 if jnp.issubdtype(a.dtype, jnp.integer) else a, opt_state)
        ok = plain_at(opt_state, params, g, moved) & plain_at(later, params, g, moved)
        # The model's own forward pass (train mode, as fit's step runs it) against its stack.
        pred = model.apply({"params": params}, x, rngs={"dropout": rng}, **mode_kwargs(model, True))
        h = x
        for name, act in zip(names, acts):
            layer = params[name]
            h = reference.fused_dense(h, layer["kernel"], layer.get("bias"), activation=act)
        gap = jnp.max(jnp.abs(pred - h)) / jnp.maximum(jnp.max(jnp.abs(h)), 1e-30)
        return ok, gap if pred.shape == h.shape else jnp.inf

    return jax.vmap(one)(states.opt_state, states.params, states.rng, grads, shift)


def refusal(states: TrainState, data: dict, opts: dict, full_batch: bool, *, auto: bool = False) -> str | None:
    """Why the fused engine cannot train this chunk (``states`` stacked ``[C, ...]``, ``data`` and
    ``opts`` as ``fit_many`` checked them), or None when it can (module docstring). ``auto``: also
    when it would be the slower engine (a layer of more than ``AUTO_MAX_LAYER_WEIGHTS`` weights)."""
    from kernels.numba_cpu import is_available

    if jax.default_backend() != "cpu" or not is_available():
        return f"it runs on the CPU with Numba (the default backend is {jax.default_backend()!r})"
    if not full_batch:
        return "it trains full-batch only (batch_size is smaller than the data)"
    if opts["loss_fn"] is not losses.mse:
        return "its loss is jaxnet.losses.mse"
    for name, plain in (("l1", 0.0), ("l2", 0.0), ("accumulate", 1), ("on_nonfinite", "raise")):
        if opts[name] != plain:
            return f"it takes {name}={plain!r} only, got {opts[name]!r}"
    if states.model_state:
        return "the model has variables besides its parameters"
    if set(data) != {"x", "y"} or data["x"].ndim != 2 or data["y"].ndim != 2:
        return "the data must be x [n, K] and y [n, F] (no mask)"
    stack = _stack(states.model, states.params)
    if isinstance(stack, str):
        return stack
    if auto:
        largest = max(math.prod(states.params[name]["kernel"].shape[1:]) for name in stack[0])
        if largest > AUTO_MAX_LAYER_WEIGHTS:
            return (f"a layer has {largest} weights, more than the {AUTO_MAX_LAYER_WEIGHTS} up to which the fused "
                    f"engine was measured faster")
    leaves = jax.tree.leaves(states.params) + [data["x"], data["y"]]
    if any(a.dtype != jnp.float32 for a in leaves):
        return "its parameters and data are float32 only"
    rng = np.random.default_rng(0)
    grads, shift = (jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), states.params)
                    for _ in range(2))
    ok, gap = jax.device_get(_checks(states.model, states.tx, states, data["x"][:_PROBE_ROWS], grads, shift))
    if not np.all(ok):
        return (f"model {int(np.flatnonzero(~ok)[0])} of the chunk's optimiser is not plain SGD (its update is not "
                f"-lr * gradient, or its next state depends on the gradient)")
    # Same ops on both sides, so equal to rounding; a model whose forward pass is not its stack is far off.
    if not np.all(gap <= 1e-5):
        return "the model's forward pass is not the stack of its dense_layers()"
    return None


@functools.lru_cache(maxsize=16)
def make_run(model, tx):
    """``run(states, data, active, length)`` with the contract of ``fit_many``'s vmapped program:
    ``length`` epochs of every active model, metrics ``[C, length]`` as ``fit``'s step names them."""
    from kernels.numba_cpu import mlp_sgd

    @functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
    def run(states, data, active, length):
        params = states.params
        names, acts = _stack(model, params)
        ids = _leaf_ids(params, names)
        # Each epoch's rate from the optimiser state it starts from (a schedule moves it), and the
        # state after: it does not depend on the gradients (checked by refusal), so zeros advance it.
        zeros = jax.tree.map(jnp.zeros_like, params)
        rate_at = jax.vmap(functools.partial(_rate, tx))
        advance = jax.vmap(lambda g, s, p: tx.update(g, s, p)[1])
        opt_state, rates = jax.lax.scan(lambda s, _: (advance(zeros, s, params), rate_at(s, params)),
                                        states.opt_state, None, length=length)  # rates [length, C]
        weights, biases, m = mlp_sgd.train(data["x"], data["y"], [params[n]["kernel"] for n in names],
                                           [params[n].get("bias") for n in names], acts, rates.T, active, length,
                                           ids)
        leaves = [None] * len(jax.tree.leaves(params))
        for (w_id, b_id), w, b in zip(ids, weights, biases):
            leaves[w_id] = w
            if b_id >= 0:
                leaves[b_id] = b
        new_params = jax.tree.unflatten(jax.tree.structure(params), leaves)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(active.reshape(-1, *[1] * (a.ndim - 1)), a, b), new, old)
        live = active.astype(jnp.int32) * length
        new = states.replace(params=new_params, opt_state=keep(opt_state, states.opt_state),
                             step=states.step + live, epoch=states.epoch + live)
        metrics = dict(m, penalty=jnp.zeros_like(m["loss"]))
        return new, metrics

    return run
