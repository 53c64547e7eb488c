"""Optax optimisers and learning-rate schedules by name, from one frozen config.

    config = OptimizerConfig(name="adamw", learning_rate=3e-4, schedule="warmup_cosine",
                             warmup_steps=100, total_steps=10_000, weight_decay=1e-4, clip_norm=1.0)
    tx = make_optimizer(config)                      # an optax.GradientTransformation
    sgd = config.replace(name="momentum", learning_rate=0.1, weight_decay=0.0)

Every optimiser is the same ``optax.chain``, built from Optax's own pieces::

    clip_by_global_norm(clip_norm)            # if clip_norm is set: on the raw gradients
    -> scale_by_<name>                        # identity / trace / adam / rms
    -> add_decayed_weights(wd, mask)          # if weight_decay > 0: decoupled decay
    -> scale_by_learning_rate(schedule)       # multiply by -lr(step)

so one update is ``-lr(t) * (direction(clip(g)) + wd * w_masked)``, which for "adamw" is exactly
``optax.adamw`` and for "sgd"/"momentum" is SGDW (Loshchilov & Hutter): the decay is not fed
through the momentum or Adam's normalisation. The decay mask selects weights, not biases
(``jaxnet.regularizers.is_weight``). Schedules are evaluated at Optax's update count ``t``:
0 for the first update.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import optax

from jaxnet import regularizers
from jaxnet.arguments import check_fraction

# Literal types, so that an experiment's flags list and check the names (experiments/common.py).
Optimizer = Literal["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"]
Schedule = Literal["constant", "step", "cosine", "warmup_cosine"]
OPTIMIZERS = get_args(Optimizer)
SCHEDULES = get_args(Schedule)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that defines an optimiser and its schedule. Variants by ``.replace(...)``."""

    # One of OPTIMIZERS. "sgd": -lr·g; "momentum"/"nesterov": heavy-ball / Nesterov trace;
    # "adam"/"adamw": Adam (adamw adds decoupled weight decay); "rmsprop": g / sqrt(ν + eps).
    name: Optimizer = "sgd"
    # Peak learning rate: the constant value, the start of "step" and "cosine", the top of warm-up.
    learning_rate: float = 1e-2

    # --- schedule ---

    # One of SCHEDULES: how the rate changes over the updates (make_schedule).
    schedule: Schedule = "constant"
    # "cosine", "warmup_cosine": length of the whole schedule in updates (warm-up included);
    # the rate stays at its final value afterwards.
    total_steps: int | None = None
    # "warmup_cosine": linear warm-up from 0 to learning_rate over this many updates.
    warmup_steps: int = 0
    # "cosine", "warmup_cosine": the final rate as a fraction of learning_rate.
    final_lr_fraction: float = 0.0
    # "step": the factor the rate is multiplied by at each decay.
    decay_rate: float = 0.1
    # "step": decay every this many updates (staircase). Set this or boundaries, not both.
    decay_every: int | None = None
    # "step": decay when the update count reaches each of these (piecewise constant). Set this or
    # decay_every, not both.
    boundaries: tuple[int, ...] = ()

    # --- optimiser ---

    # "momentum", "nesterov": trace decay β in v ← g + β v (Optax's `trace`, PyTorch's convention).
    momentum: float = 0.9
    # "adam", "adamw": decay of the running mean of g (first moment).
    b1: float = 0.9
    # "adam", "adamw": decay of the running mean of g² (second moment).
    b2: float = 0.999
    # "adam", "adamw": added to sqrt(ν̂); "rmsprop": added to ν inside the sqrt (Optax's default).
    eps: float = 1e-8
    # "rmsprop": decay of the running mean of g² (no bias correction, no centring).
    rms_decay: float = 0.9
    # Decoupled weight decay wd (update -= lr·wd·w) on the leaves decay_filter selects. Refused for
    # "adam", where it is ambiguous (PyTorch's Adam couples it): use "adamw".
    weight_decay: float = 0.0
    # The leaves weight decay applies to, filter(path, leaf) -> bool: weights, not biases.
    decay_filter: regularizers.Filter = regularizers.is_weight
    # Clip the gradients to this global L2 norm before anything else; None for no clipping.
    clip_norm: float | None = None

    def __post_init__(self):
        _check_choice("optimizer", self.name, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_fraction(self.momentum, "momentum", allow_zero=True)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.name == "adam" and self.weight_decay > 0:
            raise ValueError("weight_decay with 'adam' is ambiguous (coupled in PyTorch); use name='adamw' "
                             "for decoupled decay")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")

    def replace(self, **changes) -> "OptimizerConfig":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning-rate schedule of ``config``: ``step -> lr`` (Optax's update count, from 0).

    - "constant": ``lr``.
    - "step": ``lr * decay_rate ** (t // decay_every)``, or ``lr * decay_rate ** k`` after the
      k-th boundary in ``boundaries`` has been reached (``t >= boundary``).
    - "cosine": ``lr * (f + (1 - f) * (1 + cos(π t / total_steps)) / 2)`` with
      ``f = final_lr_fraction``, held at ``f * lr`` after ``total_steps``.
    - "warmup_cosine": ``lr * t / warmup_steps`` for ``t < warmup_steps``, then the cosine above
      over the remaining ``total_steps - warmup_steps`` updates.

    Raises:
      ValueError: when a schedule's required field is missing or inconsistent.
    """
    lr, name = config.learning_rate, config.schedule
    _check_choice("schedule", name, SCHEDULES)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "step":
        if (config.decay_every is None) == (not config.boundaries):
            raise ValueError("schedule 'step' needs exactly one of decay_every or boundaries, got "
                             f"decay_every={config.decay_every}, boundaries={config.boundaries}")
        if config.boundaries:
            if list(config.boundaries) != sorted(set(config.boundaries)) or config.boundaries[0] <= 0:
                raise ValueError(f"boundaries must be positive and strictly increasing, got {config.boundaries}")
            return optax.piecewise_constant_schedule(lr, {b: config.decay_rate for b in config.boundaries})
        if config.decay_every <= 0:
            raise ValueError(f"decay_every must be > 0, got {config.decay_every}")
        return optax.exponential_decay(lr, config.decay_every, config.decay_rate, staircase=True)
    if config.total_steps is None or config.total_steps <= 0:
        raise ValueError(f"schedule {name!r} needs total_steps > 0, got {config.total_steps}")
    end = lr * config.final_lr_fraction
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, config.total_steps, alpha=config.final_lr_fraction)
    if not 0 <= config.warmup_steps < config.total_steps:
        raise ValueError(f"warmup_cosine needs 0 <= warmup_steps < total_steps, got warmup_steps="
                         f"{config.warmup_steps}, total_steps={config.total_steps}")
    return optax.warmup_cosine_decay_schedule(0.0, lr, config.warmup_steps, config.total_steps, end_value=end)


def _direction(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optimiser's own rescaling of the gradient, before decay and learning rate."""
    name = config.name
    if name == "sgd":
        return optax.identity()
    if name in ("momentum", "nesterov"):
        return optax.trace(decay=config.momentum, nesterov=name == "nesterov")
    if name in ("adam", "adamw"):
        return optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
    if name == "rmsprop":
        return optax.scale_by_rms(decay=config.rms_decay, eps=config.eps)
    _check_choice("optimizer", name, OPTIMIZERS)
    raise AssertionError(f"optimizer {name!r} is listed in OPTIMIZERS but not built here")


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The ``optax.GradientTransformation`` that ``config`` describes (see the module docstring).

    Args:
      config: an ``OptimizerConfig``.

    Returns:
      ``optax.chain(...)``: ``init(params) -> state`` and
      ``update(grads, state, params) -> (updates, state)``; apply with ``optax.apply_updates``.
      ``params`` must be passed to ``update`` when ``weight_decay > 0``.
    """
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(_direction(config))
    if config.weight_decay > 0:
        decay_filter = config.decay_filter
        parts.append(optax.add_decayed_weights(
            config.weight_decay, mask=lambda params: regularizers.weight_mask(params, decay_filter)))
    parts.append(optax.scale_by_learning_rate(make_schedule(config)))
    return optax.chain(*parts)


__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimizerConfig", "make_optimizer", "make_schedule"]
