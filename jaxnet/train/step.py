"""The training state and the pure train/eval steps.

Everything a run needs to continue — parameters, optimiser state, the run's RNG key, the position
in the data order (epoch and batch within it) and the step count — lives in one ``TrainState``
pytree, so a checkpoint of that pytree is a complete, exactly resumable snapshot.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxnet import regularizers

Batch = dict  # {"x": [B, ...], "y": [B, ...], optional "mask": [B] bool}
LossFn = Callable[..., jax.Array]  # loss_fn(pred, target, *, reduction=..., mask=...) -> scalar or [B]


@flax.struct.dataclass
class TrainState:
    """One pytree holding a run.

    Attributes:
      step: int32 scalar, optimiser updates applied so far.
      epoch: int32 scalar, epochs completed.
      batch_in_epoch: int32 scalar, batches of the current epoch already consumed (data order
        position; the order itself is derived from ``rng`` and ``epoch``).
      params: the model's parameters (``variables["params"]``).
      model_state: the model's other variable collections (e.g. ``batch_stats``); ``{}`` if none.
      opt_state: the optimiser's state.
      rng: the run's key; step ``s`` uses ``fold_in(dropout_key, s)``, epoch ``e``'s data order
        uses ``fold_in(data_key, e)`` (see ``split_keys``).
      model, tx: the Flax module and the Optax transformation (static, not data; the module
        rather than its bound ``apply`` so that equal models share compiled programs).
    """

    step: jax.Array
    epoch: jax.Array
    batch_in_epoch: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    model: Any = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, model, tx: optax.GradientTransformation, sample_x, seed: int = 0,
               params=None) -> "TrainState":
        """Initialises a model from ``seed`` (or takes ``params``) and wraps it with ``tx``.

        ``sample_x: [B, ...]`` shows the model its input shape; its values are not used.
        """
        init_params, model_state, opt_state, run_key, (step, epoch, batch) = _init(model, tx, jnp.asarray(sample_x), seed)
        if params is not None:
            init_params, opt_state = params, tx.init(params)
        return cls(
            step=step,
            epoch=epoch,
            batch_in_epoch=batch,
            params=init_params,
            model_state=model_state,
            opt_state=opt_state,
            rng=run_key,
            model=model,
            tx=tx,
        )

    @property
    def apply_fn(self) -> Callable:
        """``model.apply``."""
        return self.model.apply

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, what ``model.apply`` takes."""
        return {"params": self.params, **self.model_state}


def check_live(state: TrainState, name: str) -> None:
    """``ValueError`` if ``state``'s arrays were donated to an earlier ``fit`` / ``fit_stream``
    (their buffers now belong to the state it returned); ``name`` is the caller, for the message."""
    if not isinstance(state, TrainState):
        raise TypeError(f"{name} needs a jaxnet.train.TrainState, got {type(state).__name__}")
    leaves = jax.tree.leaves((state.params, state.opt_state))
    if any(isinstance(a, jax.Array) and a.is_deleted() for a in leaves):
        raise ValueError(f"{name}: this TrainState was donated to an earlier fit or fit_stream, which consumed "
                         f"its arrays; use the state that call returned (result.state)")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, tx, sample_x, seed):
    """Parameters, other variables, optimiser state and run key, as one compiled program (eager
    initialisation would dispatch, and compile, every small op on its own)."""
    init_key, run_key = jax.random.split(jax.random.key(seed))
    variables = dict(model.init(init_key, sample_x, **mode_kwargs(model, False)))
    params = variables.pop("params")
    # Three distinct zero counters (step, epoch, batch_in_epoch): one shared buffer could not be
    # donated three times.
    counters = tuple(jnp.zeros((), jnp.int32) + i * 0 for i in range(3))
    return params, variables, tx.init(params), run_key, counters


def mode_kwargs(model, train: bool) -> dict:
    """``{"train": train}`` when ``model.__call__`` takes a ``train`` argument (jaxnet's models
    do: dropout and batch statistics depend on it), else ``{}``: any Flax module can be trained."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {"train": train}
    takes = "train" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"train": train} if takes else {}


def split_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dropout_key, data_key)``: independent streams derived from the run's key."""
    dropout_key, data_key = jax.random.split(rng)
    return dropout_key, data_key


def make_train_step(loss_fn: LossFn, *, l1: float = 0.0, l2: float = 0.0,
                    reg_filter: Callable | None = None, on_nonfinite: str | None = None,
                    micro_batches: int = 1) -> Callable:
    """Builds ``train_step(state, batch, rng) -> (state, metrics)``, a pure function.

    Args:
      loss_fn: ``loss_fn(pred, target, reduction="mean", mask=mask)``, e.g. ``jaxnet.losses.mse``.
      l1, l2: coefficients of ``jaxnet.regularizers`` penalties added to the data loss.
      reg_filter: which parameters the penalties see (default: weights, not biases).
      on_nonfinite: None: nothing more. ``"raise"``: the metrics also hold ``nonfinite_leaf``,
        int32, the index (in ``jax.tree.leaves(params)`` order) of the first parameter whose
        gradient has a NaN/Inf, -1 if none, for the loop to name it. ``"skip"``: also that, and a
        step whose loss or gradients are not all finite leaves parameters, optimiser and model
        state as they were (the step count still advances, so that batch is skipped);
        ``skipped`` (float32, 1 or 0) counts it.
      micro_batches: gradient accumulation: the batch is split into this many equal micro-batches
        (its size must divide), run one after another in a ``lax.scan`` (activations of one
        micro-batch in memory at a time) and their gradients summed, each weighted by its share
        of the batch's (unmasked) examples, so the update equals one over the whole batch up to
        rounding. Dropout draws per micro-batch, and batch statistics update per micro-batch.

    The returned step uses ``fold_in(rng, state.step)`` as this step's dropout key, so the same
    ``rng`` gives a different, reproducible key at every step. Metrics: ``loss`` (data loss),
    ``penalty``, ``grad_norm`` and ``update_norm`` (global L2 norms), all float32 scalars.
    """

    def objective(params, state: TrainState, batch: Batch, key):
        variables = {"params": params, **state.model_state}
        rngs = {"dropout": key}
        if state.model_state:  # e.g. batch statistics, updated by the forward pass
            pred, new_model_state = state.apply_fn(variables, batch["x"], rngs=rngs, mutable=list(state.model_state),
                                                   **mode_kwargs(state.model, True))
        else:
            pred, new_model_state = state.apply_fn(variables, batch["x"], rngs=rngs, **mode_kwargs(state.model, True)), {}
        data_loss = loss_fn(pred, batch["y"], reduction="mean", mask=batch.get("mask"))
        penalty = regularizers.penalty(params, l1=l1, l2=l2, filter=reg_filter or regularizers.is_weight)
        return data_loss + penalty, (data_loss, penalty, dict(new_model_state))

    if on_nonfinite not in (None, "raise", "skip"):
        raise ValueError(f"on_nonfinite must be None, 'raise' or 'skip', got {on_nonfinite!r}")

    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")

    def accumulated(params, state: TrainState, batch: Batch, key):
        """``objective``'s gradient and aux over ``micro_batches`` slices of ``batch``."""
        size = batch["x"].shape[0]
        if size % micro_batches:
            raise ValueError(f"batch of {size} examples does not split into {micro_batches} equal micro-batches")
        micro = jax.tree.map(lambda a: a.reshape(micro_batches, size // micro_batches, *a.shape[1:]), batch)
        counts = (jnp.sum(micro["mask"], axis=1).astype(jnp.float32) if "mask" in micro
                  else jnp.full((micro_batches,), size // micro_batches, jnp.float32))
        shares = counts / jnp.sum(counts)  # (k,): each micro-batch's weight in the batch mean

        def data_term(p, s, mb, k):
            loss, (data_loss, _, model_state) = objective(p, s, mb, k)
            return data_loss, (data_loss, model_state)

        def body(carry, xs):
            grads, loss, model_state = carry
            mb, share, i = xs
            s = state.replace(model_state=model_state)
            g, (data_loss, new_model_state) = jax.grad(data_term, has_aux=True)(params, s, mb, jax.random.fold_in(key, i))
            grads = jax.tree.map(lambda a, b: a + share * b, grads, g)
            return (grads, loss + share * data_loss, new_model_state or model_state), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, data_loss, model_state), _ = jax.lax.scan(
            body, (zeros, jnp.zeros([], jnp.float32), dict(state.model_state)),
            (micro, shares, jnp.arange(micro_batches)))
        penalty_fn = lambda p: regularizers.penalty(p, l1=l1, l2=l2, filter=reg_filter or regularizers.is_weight)  # noqa: E731
        penalty, penalty_grads = jax.value_and_grad(penalty_fn)(params)
        grads = jax.tree.map(jnp.add, grads, penalty_grads)
        return grads, (data_loss, penalty, model_state)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array):
        key = jax.random.fold_in(rng, state.step)
        grad_fn = jax.grad(objective, has_aux=True) if micro_batches == 1 else accumulated
        grads, (data_loss, penalty, model_state) = grad_fn(state.params, state, batch, key)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": data_loss.astype(jnp.float32),
            "penalty": jnp.asarray(penalty, jnp.float32),
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            "update_norm": optax.tree.norm(updates).astype(jnp.float32),
        }
        if on_nonfinite is not None:
            bad = jnp.stack([~jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)] or [jnp.bool_(False)])
            metrics["nonfinite_leaf"] = jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32)
            if on_nonfinite == "skip":
                ok = jnp.isfinite(data_loss) & ~jnp.any(bad)
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
                params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
                model_state = keep(model_state, dict(state.model_state))
                metrics["skipped"] = (~ok).astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, metrics: dict[str, Callable] | None = None) -> Callable:
    """Builds ``eval_step(state, batch) -> sums``, a pure function.

    ``metrics`` maps names to ``fn(pred, target) -> [B]`` per-example values (e.g. accuracy).
    The step returns sums over the unmasked examples and their count ``n``, so batches of any
    size combine exactly: the dataset mean is ``sum / n``.
    """
    metrics = dict(metrics or {})

    def eval_step(state: TrainState, batch: Batch):
        pred = state.apply_fn(state.variables, batch["x"], **mode_kwargs(state.model, False))
        y = batch["y"]
        weight = jnp.ones(pred.shape[:1], jnp.float32)
        if batch.get("mask") is not None:
            weight = weight * batch["mask"].astype(jnp.float32)
        out = {"loss": jnp.sum(loss_fn(pred, y, reduction="none") * weight), "n": jnp.sum(weight)}
        for name, fn in metrics.items():
            out[name] = jnp.sum(fn(pred, y).astype(jnp.float32) * weight)
        return out

    return eval_step
