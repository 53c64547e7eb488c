"""Knowledge distillation: a teacher, a small student from scratch and the same student distilled
(``jaxnet.compress.distill``), on the digits and on the character language model.

    result = run(Config(), "runs/distill")         # what ``python -m experiments.distill`` runs

Per task, three models and one figure: the teacher, the student trained on the labels alone
("scratch"), the same student trained with ``DistillLoss`` beside the frozen teacher
("distilled"; same seed, data, updates and optimiser as scratch: the teacher is the only
difference), and the fraction of the gap between scratch and the teacher that distillation closes:
``(distilled - scratch) / (teacher - scratch)`` in accuracy or in bits per character (``gap_closed``).

Digits: a CNN teacher (``experiments.vision``'s recipe; ``teachers`` of them from as many seeds,
teaching as an ``Ensemble``: their mean logits) and an MLP student on the flattened pixels. The
students train on a transfer set, every training image seen at each whole-pixel shift up to
``transfer_shift`` (Hinton et al.'s transfer set; Beyer et al. 2022, "a good teacher is patient
and consistent": the teacher labels every view the student sees), its logits on the set computed
once (``teacher_logits``, carried with the images: ``WithTeacherLogits``). On the unshifted
images alone the soft targets add little: the teacher fits them almost one-hot. The MLP from
scratch on the shifted views is worse than on the plain images, so a third student, scratch on
the plain images for as many updates, is trained too and the gap is also reported against the
better of the two scratch students (``gap_closed``: the conservative figure). The same fraction
in test cross-entropy (``gap_closed_nll``) is reported beside it: accuracy on 450 digits moves in
steps of one digit, and the whole gap is a few of them.

Language model: ``TransformerLM`` teacher and student on the pydoc corpus (``jaxnet.studies.lm``'s
data), trained for a fixed number of updates on random windows (``fit_stream``); held-out bits per
character on every held-out character once (a sliding window).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import ClassVar, Literal

import numpy as np

from jaxnet.arguments import check_fraction, check_int, check_number
from jaxnet.models.transformer import TransformerConfig
from jaxnet.studies import save_weights

Task = Literal["digits", "lm"]


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    # The teacher: jaxnet.models.CNN, channels per block (two 3x3 conv + BatchNorm + ReLU, then pooling).
    teacher_features: tuple[int, ...] = (32, 64)
    # The teacher's dense head, hidden widths.
    teacher_head: tuple[int, ...] = (128,)
    # Dropout in the teacher's head while training, in [0, 1).
    teacher_dropout: float = 0.5
    # Passes of the teacher over the training images (AdamW, warm-up and cosine decay), >= 1.
    teacher_epochs: int = 30
    # Teachers, from seeds 0..teachers-1, >= 1; more than one teach as an Ensemble (their mean
    # logits). 5: on both tuning splits the students closed more of the gap to the ensemble than
    # to one teacher or to three (docs/benchmarks.md, session 33).
    teachers: int = 5
    # The student: an MLP on the flattened pixels (CNN(features=()): its dense head alone), hidden widths.
    student_hidden: tuple[int, ...] = (32,)
    # Dropout in the student while training, in [0, 1).
    student_dropout: float = 0.0
    # Passes of each student over the transfer set, >= 1 (scratch on the plain images: as many
    # updates). Beyer et al.'s patient teacher: on two tuning splits (5 seeds) 60 closed more of
    # the gap than 40 or 80 (docs/benchmarks.md, session 24).
    student_epochs: int = 60
    # The transfer set: each training image at every shift of up to this many pixels in each
    # direction, (2s+1)^2 views, edges repeated; 0: the training images alone.
    transfer_shift: int = 1
    # Images per update, >= 1.
    batch_size: int = 64
    # AdamW's peak learning rate (teacher and students), > 0.
    learning_rate: float = 3e-3
    # AdamW's decoupled weight decay, >= 0.
    weight_decay: float = 1e-4
    # Distillation temperature T, > 0 (the tuning split's choice among 2, 4 and 8; docs/benchmarks.md).
    temperature: float = 4.0
    # Weight of the soft (teacher) term, in [0, 1]; 1 - alpha weighs the labels' cross-entropy.
    alpha: float = 0.9
    # Students of each kind, from seeds 0..seeds-1, accuracies averaged (one test digit is 0.22 points).
    # 5: the tuning runs' count; with 3, one weak student moves the mean by a digit (docs/benchmarks.md).
    seeds: int = 5
    # > 0: a tuning run. This fraction of the training digits (stratified) is held out and scored
    # in place of the test digits, which are not read; choices are made on such runs.
    tune_fraction: float = 0.0

    def __post_init__(self):
        check_fraction(self.tune_fraction, "digits.tune_fraction", allow_zero=True)
        check_int(self.teachers, "digits.teachers", minimum=1)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    # The teacher network (its vocab_size comes from the corpus).
    teacher: TransformerConfig = TransformerConfig(num_layers=2, embed_dim=128, num_heads=4, dropout_rate=0.0)
    # The student network; its block_size must be the teacher's (and its layers and heads too, with
    # attention_weight > 0: the maps are compared head by head).
    student: TransformerConfig = TransformerConfig(num_layers=2, embed_dim=64, num_heads=4, dropout_rate=0.0)
    # Updates of the teacher, >= 1 (AdamW, warm-up then cosine decay).
    teacher_steps: int = 400
    # Updates of each student, >= 1.
    student_steps: int = 300
    # Windows of block_size tokens per update, >= 1.
    batch_size: int = 32
    # AdamW's peak learning rate (teacher and students), > 0.
    learning_rate: float = 5e-3
    # Distillation temperature T, > 0. 2: with the attention and hidden-state terms, better than 1
    # on the tuning split, two seeds each (docs/benchmarks.md).
    temperature: float = 2.0
    # Weight of the soft (teacher) term, in [0, 1] (1: the teacher's distributions alone). 0.5: with
    # the attention term, better than 1 on the tuning split (docs/benchmarks.md); with the logits
    # alone 0.5 had done slightly worse.
    alpha: float = 0.5
    # Weight of the attention-transfer term (the teacher's attention maps, MiniLM), >= 0; 0: logits alone.
    attention_weight: float = 1.0
    # Weight of the hidden-state term (each block's output, the student's through a learned
    # projection: TinyBERT), >= 0; 0: none.
    hidden_weight: float = 1.0
    # Held-out evaluation windows start every eval_stride tokens, in [1, block_size].
    eval_stride: int = 64
    # Held-out fraction of the corpus (its last characters), in (0, 1).
    val_fraction: float = 0.1
    # Seeds the teacher (the students use seed + 1).
    seed: int = 0
    # > 0: a tuning run. The last fraction of the training text is held out and scored in place of
    # the held-out text, which is not read (jaxnet.studies.lm.tuning_split); choices come from such runs.
    tune_fraction: float = 0.0

    def __post_init__(self):
        check_fraction(self.tune_fraction, "lm.tune_fraction", allow_zero=True)
        if self.teacher.block_size != self.student.block_size:
            raise ValueError(f"teacher.block_size {self.teacher.block_size} and student.block_size "
                             f"{self.student.block_size} must be equal: both read the same windows")
        for name in ("attention_weight", "hidden_weight"):
            if check_number(getattr(self, name), f"lm.{name}") < 0:
                raise ValueError(f"lm.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_weight and self.teacher.num_layers != self.student.num_layers:
            raise ValueError(f"lm.hidden_weight > 0 compares the blocks' outputs layer by layer: the teacher has "
                             f"{self.teacher.num_layers} layers, the student {self.student.num_layers}")
        if self.attention_weight and (self.teacher.num_layers, self.teacher.num_heads) != (
                self.student.num_layers, self.student.num_heads):
            raise ValueError(f"lm.attention_weight > 0 compares the maps layer by layer and head by head: the "
                             f"teacher has {self.teacher.num_layers} layers x {self.teacher.num_heads} heads, the "
                             f"student {self.student.num_layers} x {self.student.num_heads}")


@dataclasses.dataclass(frozen=True)
class Config:
    # Which tasks to run.
    tasks: tuple[Task, ...] = ("digits", "lm")
    # The digits task.
    digits: DigitsConfig = DigitsConfig()
    # The character language-model task.
    lm: LMConfig = LMConfig()
    # Set from the corpus, not by flags.
    derived: ClassVar[tuple[str, ...]] = ("lm.teacher.vocab_size", "lm.student.vocab_size")


def gap_closed(scratch: float, distilled: float, teacher: float) -> float | None:
    """``(distilled - scratch) / (teacher - scratch)`` for a figure where higher is better (pass
    bits per character negated): 1 when the student matches the teacher, 0 when distillation
    changed nothing, negative when it hurt; None unless the teacher beats scratch (no gap to close)."""
    gap = teacher - scratch
    return float((distilled - scratch) / gap) if gap > 0 else None


def shifted_views(x: np.ndarray, max_shift: int) -> np.ndarray:
    """Every whole-pixel shift of every image: ``x: [n, H, W, C]`` -> ``[(2s+1)^2 * n, H, W, C]``,
    view by view (the unshifted images are view ``(2s+1)^2 // 2``); vacated pixels take the
    smallest value of ``x`` (the digits' blank background)."""
    s = max_shift
    if s == 0:
        return x
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=x.min())
    return np.concatenate([padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * s + 1) for dx in range(2 * s + 1)])


def _optimizer(learning_rate: float, weight_decay: float, steps: int, warmup: int, **extra):
    from jaxnet import optim

    return optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=learning_rate, weight_decay=weight_decay, schedule="warmup_cosine",
        warmup_steps=max(1, min(warmup, steps - 1)), total_steps=steps, **extra))


def digits_data(config: DigitsConfig):
    """``(train, test)`` of the digits task (``jaxnet.data.images.ImageData``): the vision split, or
    with ``tune_fraction`` a stratified slice of its training digits as ``test`` (the test digits
    unread)."""
    from jaxnet.data.digits import digits_split
    from jaxnet.data.images import stratified_split

    train, test = digits_split()
    if config.tune_fraction:
        return stratified_split(train, test_fraction=config.tune_fraction, seed=1)
    return train, test


def run_digits(config: DigitsConfig, workdir: pathlib.Path, *, checkpoint_every=None, resume=False,
               **fit_options) -> dict:
    """The digits task: test accuracies of the teacher and the mean of each kind of student."""
    import jax

    from jaxnet import losses, metrics
    from jaxnet.compress.distill import (DistillLoss, Ensemble, WithTeacherLogits, ensemble_variables,
                                         student_variables, teacher_logits, with_logits)
    from jaxnet.data.images import standardize
    from jaxnet.models import CNN
    from jaxnet.train import TrainState, checkpoint, fit

    train, test = digits_data(config)
    xtr, xte = standardize(train.x, test.x)  # [n, 8, 8, 1] float32
    views = (2 * config.transfer_shift + 1) ** 2
    x_transfer, y_transfer = shifted_views(xtr, config.transfer_shift), np.tile(train.y, views)
    logits_of = jax.jit(lambda model, variables: model.apply(variables, xte, train=False), static_argnums=0)

    def score(model, variables) -> tuple[float, float]:
        """Test accuracy, and test cross-entropy in nats (the mean over the digits)."""
        logits = logits_of(model, variables)
        return float(np.mean(metrics.accuracy(logits, test.y))), float(losses.cross_entropy(logits, test.y))

    def train_one(name, state, data, epochs, **kwargs):
        folder = workdir / name
        out = fit(state, data, epochs=epochs, batch_size=config.batch_size, target_kind="labels", progress=False,
                  workdir=folder, title=f"digits: {name}", **fit_options,
                  **checkpoint.run_options(folder, checkpoint_every=checkpoint_every, resume=resume, config=config),
                  **kwargs)
        return out.state, save_weights(folder, out.state, config)

    def tx(n, epochs):
        steps = epochs * -(-n // config.batch_size)
        return _optimizer(config.learning_rate, config.weight_decay, steps, steps // 20)

    start = time.perf_counter()
    member = CNN(num_classes=train.num_classes, features=config.teacher_features, head=config.teacher_head,
                 dropout_rate=config.teacher_dropout)
    result = {"weights": {}, "teacher_member_accuracies": []}
    members = []
    for seed in range(config.teachers):
        name = "teacher" if config.teachers == 1 else f"teacher/member{seed}"
        state = TrainState.create(model=member, tx=tx(len(xtr), config.teacher_epochs), sample_x=xtr[:1], seed=seed)
        state, result["weights"][name] = train_one(name, state, (xtr, train.y), config.teacher_epochs,
                                                   loss_fn=losses.cross_entropy)
        members.append(state.variables)
        result["teacher_member_accuracies"].append(score(member, state.variables)[0])
    if config.teachers == 1:
        teacher, teacher_variables = member, members[0]
    else:
        teacher, teacher_variables = Ensemble(tuple(member.clone() for _ in members)), ensemble_variables(members)
    result["teacher_accuracy"], result["teacher_nll"] = score(teacher, teacher_variables)
    each = ", ".join(f"{a:.4f}" for a in result["teacher_member_accuracies"])
    print(f"digits: teacher {result['teacher_accuracy']:.4f}" + (f" (members {each})" if config.teachers > 1 else "")
          + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    student = CNN(num_classes=train.num_classes, features=(), head=config.student_hidden,
                  dropout_rate=config.student_dropout)
    tx_student = tx(len(x_transfer), config.student_epochs)
    # The transfer set is fixed and the teacher runs in evaluation mode: its logits, computed once,
    # travel with the images instead of the teacher running beside every update.
    x_taught = with_logits(x_transfer, teacher_logits(teacher, teacher_variables, x_transfer))
    taught = WithTeacherLogits(student, xtr.shape[1:])
    kinds = {"scratch": [], "scratch_plain": [], "distilled": []}
    nlls = {kind: [] for kind in kinds}
    for seed in range(config.seeds):
        runs = {
            "scratch": (TrainState.create(model=student, tx=tx_student, sample_x=xtr[:1], seed=seed),
                        (x_transfer, y_transfer), config.student_epochs, losses.cross_entropy),
            # The same updates on the plain images: the views are what cost the MLP.
            "scratch_plain": (TrainState.create(model=student, tx=tx_student, sample_x=xtr[:1], seed=seed),
                              (xtr, train.y), config.student_epochs * views, losses.cross_entropy),
            "distilled": (TrainState.create(model=taught, tx=tx_student, sample_x=x_taught[:1], seed=seed),
                          (x_taught, y_transfer), config.student_epochs,
                          DistillLoss(temperature=config.temperature, alpha=config.alpha)),
        }
        if config.transfer_shift == 0:
            del runs["scratch_plain"]  # the same run as scratch
        for kind, (state, data, epochs, loss_fn) in runs.items():
            final, weights = train_one(f"{kind}/seed{seed}", state, data, epochs, loss_fn=loss_fn)
            accuracy, nll = score(student, student_variables(final))
            kinds[kind].append(accuracy)
            nlls[kind].append(nll)
            result["weights"][f"{kind}_seed{seed}"] = weights
        print(f"digits: seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in kinds.items() if v)
              + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if not kinds["scratch_plain"]:
        kinds["scratch_plain"], nlls["scratch_plain"] = kinds["scratch"], nlls["scratch"]
    mean = {k: float(np.mean(v)) for k, v in kinds.items()}
    mean_nll = {k: float(np.mean(v)) for k, v in nlls.items()}
    best_scratch = max(mean["scratch"], mean["scratch_plain"])
    best_scratch_nll = min(mean_nll["scratch"], mean_nll["scratch_plain"])
    result.update({
        "scratch_accuracy": mean["scratch"],
        "scratch_plain_accuracy": mean["scratch_plain"],
        "distilled_accuracy": mean["distilled"],
        "per_seed": kinds,
        "gap_closed_same_data": gap_closed(mean["scratch"], mean["distilled"], result["teacher_accuracy"]),
        "gap_closed": gap_closed(best_scratch, mean["distilled"], result["teacher_accuracy"]),
        # The same in test cross-entropy (nats; lower is better, so negated): a continuous figure
        # beside the accuracy, whose steps are one digit each (0.22 points of 450).
        "scratch_nll": mean_nll["scratch"],
        "scratch_plain_nll": mean_nll["scratch_plain"],
        "distilled_nll": mean_nll["distilled"],
        "gap_closed_nll": gap_closed(-best_scratch_nll, -mean_nll["distilled"], -result["teacher_nll"]),
        "teacher_params": _count(teacher_variables["params"]),
        "student_params": _count(final.params),
        "transfer_images": len(x_transfer),
        "scored_on": f"{len(test.y)} training digits held out (tuning run)" if config.tune_fraction else "test digits",
        "wall_s": round(time.perf_counter() - start, 1),
    })
    return result


def lm_corpus(config: LMConfig):
    """The LM task's corpus (``jaxnet.data.text.Corpus``): pydoc with ``val_fraction`` held out, or
    with ``tune_fraction`` its tuning split, whose held-out part is the end of the training text
    (``jaxnet.studies.lm.tuning_split``; the real held-out text is dropped unread)."""
    from jaxnet.data import text
    from jaxnet.studies.lm import tuning_split

    corpus = text.pydoc_corpus(config.val_fraction)
    return tuning_split(corpus, config.tune_fraction) if config.tune_fraction else corpus


def run_lm(config: LMConfig, workdir: pathlib.Path, *, checkpoint_every=None, resume=False, **fit_options) -> dict:
    """The language-model task: held-out bits per character of the teacher and both students."""
    import jax.numpy as jnp

    from jaxnet.compress.distill import DistillLoss, WithTeacher, distill_state, student_variables
    from jaxnet.models.transformer import TransformerLM
    from jaxnet.train import TrainState, checkpoint
    from jaxnet.train.stream import evaluate_stream, fit_stream

    start = time.perf_counter()
    corpus = lm_corpus(config)
    block = config.teacher.block_size
    teacher = TransformerLM(config.teacher.replace(vocab_size=len(corpus.vocab)))
    student = TransformerLM(config.student.replace(vocab_size=len(corpus.vocab)))
    sample_x = jnp.zeros((1, block), jnp.int32)

    def tx(steps):
        return _optimizer(config.learning_rate, 0.1, steps, min(100, steps // 10), b2=0.99, clip_norm=1.0,
                          final_lr_fraction=0.05)

    def train_one(name, state, steps, **kwargs):
        folder = workdir / name
        out = fit_stream(state, corpus.train, steps=steps, batch_size=config.batch_size, block_size=block,
                         progress=False, workdir=folder, title=f"lm: {name} (loss: nats/char)", **fit_options,
                         **checkpoint.run_options(folder, checkpoint_every=checkpoint_every, resume=resume,
                                                  config=config), **kwargs)
        bits = evaluate_stream(out.state, corpus.val, block_size=block, stride=config.eval_stride) / math.log(2)
        print(f"lm: {name} {bits:.4f} bits/char, {out.tokens / max(out.train_s, 1e-9):,.0f} tokens/s "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        return out.state, bits, save_weights(folder, out.state, config)

    teacher_state, teacher_bits, w_teacher = train_one(
        "teacher", TrainState.create(model=teacher, tx=tx(config.teacher_steps), sample_x=sample_x, seed=config.seed),
        config.teacher_steps)
    tx_student = tx(config.student_steps)
    _, scratch_bits, w_scratch = train_one(
        "scratch", TrainState.create(model=student, tx=tx_student, sample_x=sample_x, seed=config.seed + 1),
        config.student_steps)
    distilled, distilled_bits, w_distilled = train_one(
        "distilled", distill_state(WithTeacher(student, teacher, attention=config.attention_weight > 0,
                                               hidden=config.hidden_weight > 0),
                                   teacher_state.variables, tx=tx_student, sample_x=sample_x, seed=config.seed + 1),
        config.student_steps, loss_fn=DistillLoss(temperature=config.temperature, alpha=config.alpha,
                                                  attention_weight=config.attention_weight,
                                                  hidden_weight=config.hidden_weight))
    return {
        "teacher_bits_per_char": round(teacher_bits, 4),
        "scratch_bits_per_char": round(scratch_bits, 4),
        "distilled_bits_per_char": round(distilled_bits, 4),
        "gap_closed": gap_closed(-scratch_bits, -distilled_bits, -teacher_bits),
        "teacher_params": _count(teacher_state.params),
        "student_params": _count(student_variables(distilled)["params"]),
        "scored_on": corpus.name,
        "weights": {"teacher": w_teacher, "scratch": w_scratch, "distilled": w_distilled},
        "wall_s": round(time.perf_counter() - start, 1),
    }


def _count(params) -> int:
    import jax

    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Runs ``config.tasks``; returns ``{"experiment": "distill", "digits": {...}, "lm": {...}, ...}``
    with each task's figures and ``"gap_closed_target_met"`` (>= half the gap closed, per task).

    Every model's run (metrics.jsonl, loss_curve.png, final weights under ``checkpoints/``) goes
    into ``<workdir>/<task>/<model>[/seed<k>]``; the keywords are ``fit``'s / ``fit_stream``'s, as
    in the other studies.
    """
    workdir = pathlib.Path(workdir)
    options = dict(tensorboard=tensorboard, profile_steps=profile_steps, checkpoint_every=checkpoint_every,
                   resume=resume, mesh=mesh, strategy=strategy)
    result: dict = {"experiment": "distill"}
    if "digits" in config.tasks:
        result["digits"] = run_digits(config.digits, workdir / "digits", **options)
    if "lm" in config.tasks:
        result["lm"] = run_lm(config.lm, workdir / "lm", **options)
    result["gap_closed_target_met"] = {task: (result[task]["gap_closed"] or 0.0) >= 0.5 for task in config.tasks}
    return result


__all__ = ["Config", "DigitsConfig", "LMConfig", "digits_data", "gap_closed", "lm_corpus", "run", "run_digits",
           "run_lm", "shifted_views"]
