"""Knowledge distillation (Hinton et al., 2015): a small student trained on a frozen teacher's
softened outputs as well as on the labels, with the ordinary training loops.

    model = WithTeacher(student, teacher)            # the student, with the teacher run beside it
    state = distill_state(model, teacher_variables, tx=tx, sample_x=x[:1], seed=0)
    run = fit(state, (x, labels), loss_fn=DistillLoss(temperature=4.0, alpha=0.9),
              target_kind="labels", epochs=30, batch_size=64)
    student_vars = student_variables(run.state)      # {"params": ...}: loads into ``student`` as it is

A teacher may be several trained models: ``Ensemble(members)`` averages their logits, and
``ensemble_variables([v0, v1, ...])`` gathers their variables into its tree. On a fixed set of
inputs the teacher need not run at every update: ``teacher_logits`` computes its logits once,
``with_logits`` carries them with the inputs and ``WithTeacherLogits(student, x.shape[1:])`` is
the model ``fit`` trains on them (the same student; ``TrainState.create``, no ``distill_state``).

The objective (``DistillLoss``), per example, with student logits ``s``, teacher logits ``t``,
label ``y`` and temperature ``T``::

    alpha * T² * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

plus, with ``attention_weight`` w > 0 (transformers, ``WithTeacher(..., attention=True)``), ``w``
times the mean over layers and over MiniLM's two relations (Wang et al. 2020: each layer's
attention distributions and its value relations ``softmax(v v^T / sqrt(d))``) of
``jaxnet.losses.attention_transfer``: per query, the heads' mean of KL(teacher's || student's);
and with ``hidden_weight`` h > 0 (``WithTeacher(..., hidden=True)``), ``h`` times the layers' mean
of ``jaxnet.losses.hidden_state_transfer`` (TinyBERT, Jiao et al. 2020): per position,
``|s_l W_l - t_l|^2 / |t_l|^2`` between block l's outputs, the student's mapped to the teacher's
width by a projection ``W_l`` learned with it (``params["hidden_projection"]``, dropped by
``student_variables``).

``alpha`` weighs the soft (teacher) term and ``1 - alpha`` the hard-label term (Hinton et al.'s
"weighted average of two objectives"; some libraries call the hard weight alpha instead). The T²
keeps the soft term's gradient on the scale of the hard one's as T changes, so alpha need not be
retuned with T. The soft term is ``jaxnet.losses.distillation``, the hard one
``jaxnet.losses.cross_entropy``: this module adds no loss arithmetic of its own.

How the teacher stays frozen: ``WithTeacher`` keeps the teacher's variables in a collection of
its own, ``"teacher"``, not in ``"params"``. The training step differentiates ``"params"`` only,
so the optimiser never sees the teacher; its logits also pass through ``stop_gradient``, so no
other caller can push a gradient into it either. The teacher always runs in evaluation mode
(no dropout, BatchNorm on its stored statistics). Because ``fit``'s loss sees only the model's
output and the targets, the model hands the loss both logits: with ``train=True`` it returns
``(student_logits, teacher_logits)``; with ``train=False`` (evaluation, prediction,
``fit``'s validation, ``evaluate_stream``) the student's logits alone, and the teacher does
not run. So nothing in ``jaxnet.train`` changes, and a validation loss is the student's plain
cross-entropy.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import losses
from jaxnet.arguments import check_int, check_number
from jaxnet.data.checks import as_float_array, check_same_length
from jaxnet.explain.attention import output_and_attention
from jaxnet.train.step import TrainState, mode_kwargs
from kernels import xla

TEACHER = "teacher"  # the collection holding the teacher's variables (one entry, "variables")
HIDDEN_PROJECTION = "hidden_projection"  # the params entry of WithTeacher(hidden=True)'s [L, C_s, C_t]


class WithTeacher(nn.Module):
    """The student, with a frozen teacher beside it while training.

    Both see the same input ``x``. The student's variables are the wrapper's own (``nn.share_scope``):
    ``params`` has exactly the student's tree (with ``hidden``, plus the projection, which
    ``student_variables`` leaves out), so trained params load into ``student`` unchanged.
    The teacher's whole variables dict (params, batch statistics) is one entry of the collection
    ``"teacher"``; ``distill_state`` puts the trained teacher there.

    Attributes:
      student: the Flax module being trained (takes ``train`` if it has dropout or BatchNorm).
      teacher: the teacher's Flax module, as it was trained; its logits must have the student's shape.
    """

    student: nn.Module
    teacher: nn.Module
    # Training also hands the loss both models' attention maps and value relations (jaxnet
    # transformers, as many layers and heads; ``DistillLoss.attention_weight``).
    attention: bool = False
    # Training also hands the loss both models' block outputs in the teacher's width (jaxnet
    # transformers, as many layers; ``DistillLoss.hidden_weight``), the student's through a
    # projection per layer trained with it, ``params[HIDDEN_PROJECTION]`` ``[L, C_s, C_t]``.
    hidden: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        """``x``: what both models take, e.g. ``[B, ...]`` images or ``[B, T]`` token ids.

        Returns the student's logits ``[..., C]`` (``train=False``), or the pair
        ``(student_logits, teacher_logits)``, both ``[..., C]`` (``train=True``); with
        ``attention``, ``(student_logits, teacher_logits, student_maps, teacher_maps)``, the maps
        ``[2L, B, H, T, T]``: the L layers' attention, then their value relations
        (``jaxnet.explain.attention.output_and_attention``); with ``hidden``, then also
        ``(student_states, teacher_states)``, both ``[L, B, T, C_t]``: each block's output, the
        student's projected.
        """
        # An unbound copy: the teacher runs on its own variables, not as a child of this scope.
        teacher = self.teacher.clone(parent=None)
        if self.hidden:  # declared in every mode: init creates it, training reads it
            projection = self.param(HIDDEN_PROJECTION, nn.initializers.lecun_normal(batch_axis=(0,)),
                                    self._projection_shape())
        if (self.attention or self.hidden) and train and not self.is_initializing():
            student_logits, *student_views = self._student_with_views(x)  # (maps,) or (maps, states)
        else:
            nn.share_scope(self, self.student)
            student_logits = self.student(x, **mode_kwargs(self.student, train))
        held = self.variable(TEACHER, "variables",
                             lambda: teacher.init(self.make_rng("params"), x, **mode_kwargs(teacher, False)))
        if not train:
            return student_logits
        frozen = jax.lax.stop_gradient(held.value)
        if self.attention or self.hidden:
            teacher_logits, *teacher_views = output_and_attention(
                teacher, frozen, x, value_relations=self.attention, hidden_states=self.hidden,
                **mode_kwargs(teacher, False))
        else:
            teacher_logits = teacher.apply(frozen, x, **mode_kwargs(teacher, False))
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"WithTeacher: teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} must have the same shape")
        out = (student_logits, teacher_logits)
        if self.attention:
            if teacher_views[0].shape != student_views[0].shape:
                raise ValueError(f"WithTeacher: attention maps [2 x layers, B, heads, T, T] of the teacher "
                                 f"{tuple(teacher_views[0].shape)} and the student {tuple(student_views[0].shape)} "
                                 f"must agree")
            out += (student_views[0], teacher_views[0])
        if self.hidden:
            states = student_views[-1]  # [L, B, T, C_s]
            out += (xla.einsum("lbtc,lcd->lbtd", states, projection.astype(states.dtype)), teacher_views[-1])
        return out

    def _student_with_views(self, x):
        """The student in training mode on this scope's params (its projection left out), with its
        maps and states: applied as an unbound copy, since what it sows is kept only where
        "intermediates" is mutable."""
        own = {k: v for k, v in self.variables.items() if k != TEACHER}
        if set(own) != {"params"}:
            raise ValueError(f"WithTeacher(attention=True or hidden=True): the student must hold params only, "
                             f"got {sorted(own)}")
        rngs = {"dropout": self.make_rng("dropout")} if self.has_rng("dropout") else {}
        student = self.student.clone(parent=None)
        return output_and_attention(student, student_variables(own), x, value_relations=self.attention,
                                    hidden_states=self.hidden, rngs=rngs, **mode_kwargs(student, True))

    def _projection_shape(self) -> tuple[int, int, int]:
        """``[L, C_s, C_t]`` from the two transformers' configs (as many layers)."""
        widths = []
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            config = getattr(model, "config", None)
            if not (hasattr(config, "num_layers") and hasattr(config, "embed_dim")):
                raise ValueError(f"WithTeacher(hidden=True): the {role} must be a jaxnet transformer (a config "
                                 f"with num_layers and embed_dim), got {type(model).__name__}")
            widths.append((config.num_layers, config.embed_dim))
        (ls, cs), (lt, ct) = widths
        if ls != lt:
            raise ValueError(f"WithTeacher(hidden=True) compares the blocks' outputs layer by layer: the student "
                             f"has {ls} layers, the teacher {lt}")
        return ls, cs, ct


class WithTeacherLogits(nn.Module):
    """The student, with its teacher's logits read from the input: ``WithTeacher`` for a fixed
    transfer set, whose teacher ran once (``teacher_logits``) rather than beside every update.

    The teacher runs in evaluation mode, so on a fixed set of inputs its logits are the same at
    every epoch: computing them once and carrying them with the inputs (``with_logits``) trains
    the same student as ``WithTeacher`` (the same params tree, initialisation and loss,
    ``DistillLoss``), for the cost of one teacher pass instead of one per update. Not for inputs
    drawn afresh at each step (``fit_stream``'s windows), nor for attention or hidden-state
    transfer, which need the teacher's insides.

    Input ``[B, D + C]``: each row is one example's input flattened (``D = prod(input_shape)``, as
    floats) and then its teacher's C logits. Returns the student's logits ``[B, C]``
    (``train=False``; the stored logits unread) or ``(student_logits, teacher_logits)``
    (``train=True``, the stored ones under ``stop_gradient``).

    Attributes:
      student: the Flax module being trained, on inputs ``[B, *input_shape]``; its params tree is
        this module's (``nn.share_scope``), so trained params load into ``student`` unchanged.
      input_shape: one example's shape as the student takes it, e.g. ``(8, 8, 1)``.
    """

    student: nn.Module
    input_shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, n in enumerate(self.input_shape):
            check_int(n, f"WithTeacherLogits: input_shape[{i}] of {tuple(self.input_shape)}", minimum=1)
        d = math.prod(self.input_shape)
        if x.ndim != 2 or x.shape[1] <= d:
            raise ValueError(f"WithTeacherLogits: input must be [B, {d} + C] (each example's {d} input values "
                             f"{tuple(self.input_shape)}, then its teacher's C logits: with_logits), got "
                             f"{tuple(x.shape)}")
        nn.share_scope(self, self.student)
        student_logits = self.student(x[:, :d].reshape(x.shape[0], *self.input_shape),
                                      **mode_kwargs(self.student, train))
        if not train:
            return student_logits
        teacher_logits = jax.lax.stop_gradient(x[:, d:])
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"WithTeacherLogits: the stored teacher logits {tuple(teacher_logits.shape)} and the "
                             f"student's logits {tuple(student_logits.shape)} must have the same shape")
        return student_logits, teacher_logits


def teacher_logits(teacher: nn.Module, variables, x, *, batch_size: int = 256) -> np.ndarray:
    """The teacher's logits on every input, in evaluation mode: ``x: [n, ...]`` -> ``float32 [n, C]``.

    Batches of ``batch_size`` (the last padded to it, so one program is compiled); in evaluation
    mode an example's logits do not depend on the others in its batch.
    """
    x = np.asarray(x)
    check_int(batch_size, "teacher_logits: batch_size", minimum=1)
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"teacher_logits: x must be [n, ...] with n >= 1, got shape {x.shape}")
    apply = jax.jit(lambda v, xb: teacher.apply(v, xb, **mode_kwargs(teacher, False)))
    size = min(batch_size, len(x))
    out = []
    for start in range(0, len(x), size):
        xb = x[start:start + size]
        pad = size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
        out.append(np.asarray(apply(variables, xb), np.float32)[:size - pad])
        if out[-1].ndim != 2:
            raise ValueError(f"teacher_logits: the teacher must return logits [B, C], got shape "
                             f"{tuple(out[-1].shape)} for a batch of {len(out[-1])}")
    return np.concatenate(out)


def with_logits(x, logits) -> np.ndarray:
    """``WithTeacherLogits``'s input: each example's input flattened, then its teacher's logits,
    ``x: [n, ...]`` float and ``logits: [n, C]`` -> ``float32 [n, prod(x.shape[1:]) + C]``.

    Raises:
      ValueError: x and logits of different lengths, logits not ``[n, C]``, or a non-finite value
      (naming which).
    """
    x, logits = as_float_array(x, "with_logits: x"), as_float_array(logits, "with_logits: logits")
    if logits.ndim != 2:
        raise ValueError(f"with_logits: logits must be [n, C], got shape {logits.shape}")
    check_same_length(**{"with_logits: x": x, "with_logits: logits": logits})
    return np.concatenate([x.reshape(len(x), -1), logits], axis=1).astype(np.float32)


class Ensemble(nn.Module):
    """Several trained models as one teacher: the mean of their logits.

    Averaging logits is taking the normalised geometric mean of the members' distributions, at
    every temperature (``mean(z) / T``); Hinton et al. (2015) distilled an ensemble's arithmetic or
    geometric mean. The members' variables sit under ``members_0``, ``members_1``, ... of each
    collection: ``ensemble_variables`` builds that tree from the members' own.

    Attributes:
      members: the Flax modules, one instance each (``model.clone()``), each returning logits of
        one shape (take ``train`` if they have dropout or BatchNorm).
    """

    members: tuple[nn.Module, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        """``x``: what every member takes; returns the members' mean logits ``[..., C]``."""
        if not self.members:
            raise ValueError("Ensemble: members must name at least one model")
        if len({id(member) for member in self.members}) != len(self.members):
            # Flax would bind one instance once: every "member" would run on members_0's variables.
            raise ValueError("Ensemble: a module appears more than once in members; pass one instance per member "
                             "(e.g. tuple(model.clone() for _ in range(n)))")
        logits = [member(x, **mode_kwargs(member, train)) for member in self.members]
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"Ensemble: the members' logits must have one shape, got {[z.shape for z in logits]}")
        return sum(logits) / len(logits)


def ensemble_variables(members_variables) -> dict:
    """``Ensemble``'s variables from its members' trained ones, in order: ``{collection:
    {"members_i": variables_i[collection]}}`` (e.g. ``[state.variables for state in runs]``).

    Raises:
      ValueError: no members, or members whose collections differ (naming them).
    """
    members_variables = list(members_variables)
    if not members_variables:
        raise ValueError("ensemble_variables: no members' variables given")
    collections = [sorted(v) for v in members_variables]
    for i, names in enumerate(collections):
        if names != collections[0]:
            raise ValueError(f"ensemble_variables: member {i} has collections {names}, member 0 {collections[0]}")
    return {name: {f"members_{i}": v[name] for i, v in enumerate(members_variables)} for name in collections[0]}


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, a ``fit`` loss.

    A frozen dataclass, so equal settings are equal losses and share ``fit``'s compiled steps.

    Attributes:
      temperature: T, finite and > 0; larger T softens both distributions (Hinton et al. used 1 to 20).
      alpha: the soft term's weight, in [0, 1]; 0 is plain cross-entropy on the labels, 1 ignores them.
      attention_weight: w >= 0, the attention-transfer term's weight; > 0 needs the maps
        (``WithTeacher(..., attention=True)``).
      hidden_weight: h >= 0, the hidden-state term's weight; > 0 needs the states
        (``WithTeacher(..., hidden=True)``).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    attention_weight: float = 0.0
    hidden_weight: float = 0.0

    def __post_init__(self):
        if check_number(self.temperature, "DistillLoss: temperature") <= 0:
            raise ValueError(f"DistillLoss: temperature must be > 0, got {self.temperature}")
        if not 0.0 <= check_number(self.alpha, "DistillLoss: alpha") <= 1.0:
            raise ValueError(f"DistillLoss: alpha must be in [0, 1], got {self.alpha}")
        for name in ("attention_weight", "hidden_weight"):
            if not 0.0 <= check_number(getattr(self, name), f"DistillLoss: {name}") < float("inf"):
                raise ValueError(f"DistillLoss: {name} must be finite and >= 0, got {getattr(self, name)}")

    def __call__(self, pred, labels, *, reduction: str = "mean", weights=None, mask=None):
        """The loss of ``pred`` against integer ``labels``.

        Args:
          pred: ``(student_logits, teacher_logits)``, both ``[..., C]`` (``WithTeacher`` in training;
            with ``attention_weight``, then both models' maps ``[2L, B, H, T, T]``; with
            ``hidden_weight``, then both models' states ``[L, B, T, C_t]``), or the student's logits
            ``[..., C]`` alone (evaluation), which gives ``CE(s, y)``.
          labels: integer ``[...]`` class labels (``logits.shape[:-1]``).
          reduction, weights, mask: as in ``jaxnet.losses`` (per-example shape ``[...]``).
        """
        if not isinstance(pred, tuple):
            return losses.cross_entropy(pred, labels, reduction=reduction, weights=weights, mask=mask)
        want = ["student_logits", "teacher_logits"]
        want += ["student_maps", "teacher_maps"] if self.attention_weight else []
        want += ["student_states", "teacher_states"] if self.hidden_weight else []
        if len(pred) != len(want):
            flags = [flag for flag, on in (("attention=True", self.attention_weight),
                                           ("hidden=True", self.hidden_weight)) if on]
            raise ValueError(f"DistillLoss: pred must be ({', '.join(want)})"
                             f"{': WithTeacher(' + ', '.join(flags) + ')' if flags else ''}, got {len(pred)} arrays")
        student_logits, teacher_logits = pred[:2]
        hard = losses.cross_entropy(student_logits, labels, reduction=reduction, weights=weights, mask=mask)
        soft = losses.distillation(student_logits, teacher_logits, temperature=self.temperature,
                                   reduction=reduction, weights=weights, mask=mask)
        loss = self.alpha * soft + (1.0 - self.alpha) * hard
        if self.attention_weight:  # the maps' mean (each [B, H, T, T]: layers' attention, value relations)
            maps = [losses.attention_transfer(s, t, reduction=reduction, weights=weights, mask=mask)
                    for s, t in zip(*pred[2:4])]
            loss = loss + self.attention_weight * sum(maps) / len(maps)
        if self.hidden_weight:  # the layers' mean (each [B, T, C_t])
            states = [losses.hidden_state_transfer(s, t, reduction=reduction, weights=weights, mask=mask)
                      for s, t in zip(*pred[-2:])]
            loss = loss + self.hidden_weight * sum(states) / len(states)
        return loss


def distill_state(model: WithTeacher, teacher_variables, *, tx, sample_x, seed: int = 0) -> TrainState:
    """A ``TrainState`` for ``fit`` / ``fit_stream`` that trains ``model.student`` from ``seed`` beside
    the trained teacher.

    Args:
      model: ``WithTeacher(student, teacher)``.
      teacher_variables: the trained teacher's variables (``{"params": ..., "batch_stats": ...}``,
        e.g. ``TrainState.variables`` of its run); held as they are, never updated.
      tx: the student's Optax optimiser.
      sample_x: ``[B, ...]``, shows both models the input shape.
      seed: the student's initialisation, dropout and data order (as ``TrainState.create``).

    Raises:
      TypeError: ``model`` is not a ``WithTeacher``. ValueError: ``teacher_variables`` do not have
      the tree, shapes and dtypes of ``model.teacher``'s (naming the first that differs).
    """
    if not isinstance(model, WithTeacher):
        raise TypeError(f"distill_state: model must be a WithTeacher(student, teacher), got {type(model).__name__}")
    teacher = model.teacher
    like = _by_path(jax.eval_shape(lambda x: teacher.init(jax.random.key(0), x, **mode_kwargs(teacher, False)),
                                   jnp.asarray(sample_x)))
    given = {path: jnp.asarray(leaf) for path, leaf in _by_path(teacher_variables).items()}
    if set(given) != set(like):
        first = min(set(like) ^ set(given))
        raise ValueError(f"distill_state: teacher_variables do not fit {type(model.teacher).__name__}: "
                         f"{len(given)} arrays for its {len(like)}, first differing {first}")
    for path, a in like.items():
        b = given[path]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"distill_state: teacher_variables{path} is {b.dtype}{list(b.shape)}; "
                             f"{type(model.teacher).__name__} has {a.dtype}{list(a.shape)}")
    state = TrainState.create(model=model, tx=tx, sample_x=sample_x, seed=seed)
    # A copy: fit donates the state's arrays, which would delete the caller's teacher.
    teacher = jax.tree.map(lambda a: jnp.array(a, copy=True), teacher_variables)
    return state.replace(model_state={**state.model_state, TEACHER: {"variables": teacher}})


def _by_path(tree) -> dict:
    """``{"['params']['fc1']['kernel']": array, ...}`` of a variables tree (dicts or FrozenDicts)."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def student_variables(state) -> dict:
    """The student's own variables (``{"params": ..., "batch_stats": ...}``) from a ``WithTeacher``
    run's ``TrainState`` or variables dict: what ``model.student.apply`` takes (the teacher and the
    hidden-state projection left out)."""
    variables = state.variables if isinstance(state, TrainState) else state
    own = {k: v for k, v in variables.items() if k != TEACHER}
    if HIDDEN_PROJECTION in own.get("params", {}):
        own["params"] = {k: v for k, v in own["params"].items() if k != HIDDEN_PROJECTION}
    return own


__all__ = ["DistillLoss", "Ensemble", "HIDDEN_PROJECTION", "TEACHER", "WithTeacher", "WithTeacherLogits",
           "distill_state", "ensemble_variables", "student_variables", "teacher_logits", "with_logits"]
