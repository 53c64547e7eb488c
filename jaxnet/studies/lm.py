"""A language model on a text corpus, with a Kneser–Ney n-gram on the same split, and the two interpolated.

    result = run(Config(), "runs/lm")           # what ``python -m experiments.lm`` runs

Data: the English text of Python's ``pydoc_data.topics`` at character level, the last
``val_fraction`` held out; or, with ``data_dir``, Mikolov's Penn Treebank files at word level
(valid and test reported as perplexity). Model: ``TransformerLM(config.model)`` (its
``vocab_size`` from the corpus); optimiser: ``config.optimizer`` (AdamW with warm-up and cosine
decay, ``make_optimizer``); trained on random windows (``fit_stream``); by default the decay
follows a time budget (``clock_schedule``), ending at the budget or at ``max_epochs`` passes over
the text, whichever comes first. Held-out loss is measured on every held-out token once, with a
sliding window (stride ``eval_stride``).

The interpolated model: per held-out token, ``(1 - w) * p_transformer + w * p_ngram`` at
``ngram_weight`` w (``jaxnet.baselines.ngram.interpolate``; Mikolov et al.'s RNN + KN5 on Penn
Treebank is the classic instance). Both models are trained on the training text alone and w is
chosen on the tuning split, so the held-out text is read only to score it. The two are wrong on
different characters: on the tuning split the n-gram alone scores 0.18 bits/char worse than the
network and the mixture 0.1 better (docs/benchmarks.md, "Language").
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import ClassVar

import numpy as np

from jaxnet.arguments import check_fraction
from jaxnet.models.transformer import TransformerConfig
from jaxnet.optim import OptimizerConfig
from jaxnet.studies import save_weights


@dataclasses.dataclass(frozen=True)
class Config:
    # Penn Treebank directory (ptb.train.txt, ptb.valid.txt, ptb.test.txt): word level. Empty: the
    # default offline corpus, character level.
    data_dir: str = ""
    # Held-out fraction of the default corpus (its last characters), in (0, 1).
    val_fraction: float = 0.1
    # For choosing hyperparameters: when in (0, 1), the run trains on the training text but its
    # last tune_fraction and reports that part as "held-out", the real held-out text unread
    # (and a corpus' test split dropped). 0: off (the real held-out split).
    tune_fraction: float = 0.0
    # The network: 4 layers, 192 wide, 4 heads, 256 context, rotary positions, tanh-GELU MLPs
    # through FusedDense, tied embeddings (1.80M parameters on the default corpus), dropout 0.2;
    # bf16 matmuls with f32 accumulation (f32 parameters, LayerNorm, softmax and loss), which pay
    # for the longer context. Chosen on the tuning split (docs/benchmarks.md "Language").
    model: TransformerConfig = TransformerConfig(block_size=256, dropout_rate=0.2, dtype="bfloat16")
    # Not flags: set from the corpus and from steps.
    derived: ClassVar[tuple[str, ...]] = ("model.vocab_size", "optimizer.total_steps")
    # Keys of configs saved before the optimiser was nested (flat), and where they live now.
    moved: ClassVar[dict[str, str]] = {k: f"optimizer.{k}" for k in (
        "learning_rate", "warmup_steps", "final_lr_fraction", "weight_decay", "b2", "clip_norm")}

    # --- training: linear warm-up then cosine decay to optimizer.final_lr_fraction ---

    # Updates in all, with the optimiser's schedule over them (its total_steps). 0: train for
    # train_budget_s seconds of training steps instead, the cosine following the fraction of that
    # time used (so it ends at the budget whatever the shared machine's speed; warm-up still counts steps).
    steps: int = 0
    # With steps 0: seconds of training steps (compilation and evaluation excluded) the run trains for.
    train_budget_s: float = 510.0
    # With the time budget: also stop (and end the cosine) after this many passes over the
    # training text; more overfits the 418k-character corpus (docs/benchmarks.md). 0: no cap.
    max_epochs: float = 19.0
    # Windows per update (each model.block_size tokens, drawn at random from the training text), >= 1.
    batch_size: int = 32
    # Gradient accumulation: each update's batch runs as this many micro-batches in sequence
    # (same update up to rounding, 1/accumulate of the activation memory); divides batch_size.
    accumulate: int = 1
    # The optimiser: AdamW peaking at 8e-3 after 100 warm-up updates, cosine to 5% of that, weight
    # decay 0.1, b2 0.99, gradients clipped to global norm 1. With steps 0 its schedule must be
    # warmup_cosine (the clock then drives the cosine); its total_steps is set from steps.
    optimizer: OptimizerConfig = OptimizerConfig(name="adamw", learning_rate=8e-3, schedule="warmup_cosine",
                                                 warmup_steps=100, final_lr_fraction=0.05, weight_decay=0.1,
                                                 b2=0.99, clip_norm=1.0)
    # Stop training after this many seconds even if steps remain (a backstop for the 10 minutes).
    time_limit_s: float = 585.0
    # Updates between held-out evaluations (and one at the end), >= 1.
    eval_every: int = 400
    # Updates between progress records (metrics.jsonl, the loss curve), >= 1.
    log_every: int = 50
    # Held-out evaluation windows start every eval_stride tokens (block_size: no overlap), >= 1.
    eval_stride: int = 32

    # --- baseline and samples ---

    # Order of the interpolated Kneser–Ney n-gram (character level; words use min(order, 3)), >= 1.
    ngram_order: int = 9
    # The interpolated model, (1 - w) * p_transformer + w * p_ngram per token (both trained on the
    # training text only): w, in [0, 1]. Chosen on the tuning split (--tune-fraction, whose result
    # lists the held-out figure at every weight; docs/benchmarks.md "Language"); 0: the transformer.
    ngram_weight: float = 0.3
    # Tokens each sample adds to its prompt (the samples printed after training, and --generate),
    # at most the context left after the prompt (model.block_size minus its length); 0: that many.
    max_new_tokens: int = 0
    # Sampling temperature: the logits are divided by it before sampling; 0: always the likeliest token.
    temperature: float = 0.8
    # Sample among the top_k likeliest tokens only (0: among all).
    top_k: int = 20
    # Seeds the initial weights, the training windows, dropout and the samples.
    seed: int = 0
    # Show a progress bar while training (on stderr).
    progress: bool = True

    def __post_init__(self):
        check_fraction(self.tune_fraction, "tune_fraction", allow_zero=True)
        if not 0 <= self.ngram_weight <= 1:
            raise ValueError(f"ngram_weight must be in [0, 1], got {self.ngram_weight}")
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"need max_new_tokens, temperature and top_k >= 0; got "
                             f"{self.max_new_tokens}, {self.temperature}, {self.top_k}")
        if self.optimizer.total_steps is not None:
            raise ValueError(f"optimizer.total_steps is set from steps; leave it None, got {self.optimizer.total_steps}")
        if not self.steps and self.optimizer.schedule != "warmup_cosine":
            raise ValueError(f"steps 0 (the time budget) needs optimizer.schedule 'warmup_cosine', whose warm-up "
                             f"and cosine the clock drives; got {self.optimizer.schedule!r}")


def load(config: Config):
    """The corpus: ``jaxnet.data.text.Corpus`` (train, val, test or None, vocab, name)."""
    from jaxnet.data import text

    corpus = (text.load_ptb(config.data_dir, level="word") if config.data_dir
              else text.pydoc_corpus(config.val_fraction))
    return tuning_split(corpus, config.tune_fraction) if config.tune_fraction else corpus


def tuning_split(corpus, fraction: float):
    """``corpus`` with its training text cut in two: the first ``1 - fraction`` to train on, the
    rest as the held-out split; the real held-out and test splits are not kept."""
    fraction = check_fraction(fraction, "tune_fraction")
    cut = len(corpus.train) - max(1, round(fraction * len(corpus.train)))
    return dataclasses.replace(corpus, train=corpus.train[:cut], val=corpus.train[cut:], test=None,
                               name=f"{corpus.name} (tuning split: last {fraction:g} of training text held out)")


def ngram_baseline(config: Config, corpus) -> dict:
    """Kneser–Ney (``jaxnet.baselines.ngram``) fitted on the training split: held-out NLL in nats,
    and the log-probability of each held-out target (``val_log_probs``, ``[len(val) - 1]``, aligned
    with ``jaxnet.train.stream.token_log_probs``; ``test_*`` likewise)."""
    from jaxnet.baselines.ngram import KneserNey

    order = config.ngram_order if corpus.vocab.level == "char" else min(config.ngram_order, 3)
    start = time.perf_counter()
    lm = KneserNey.fit(corpus.train, order=order, vocab_size=len(corpus.vocab))
    out = {"order": order}
    for split, tokens, before in (("val", corpus.val, corpus.train), ("test", corpus.test, corpus.val)):
        if tokens is not None:
            # The network scores targets tokens[1:] only (its first window has no earlier context).
            out[f"{split}_log_probs"] = lm.log_probs(tokens, context=before)[1:]
            out[f"{split}_nll"] = lm.cross_entropy(tokens, context=before)
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out


def samples(model, params, vocab, config: Config, prompts) -> list[str]:
    """One continuation of each prompt by ``config.max_new_tokens`` tokens (0, or more than fit:
    up to the end of the model's context; temperature and top-k sampling), decoded with the prompt
    in front.

    Raises:
      ValueError: a prompt with no tokens, or one that fills the model's context already.
    """
    import jax
    import jax.numpy as jnp

    from jaxnet.data.checks import snippet
    from jaxnet.models.transformer import generate

    out = []
    for i, prompt in enumerate(prompts):
        ids = vocab.encode(prompt.split() if vocab.level == "word" else prompt)
        room = config.model.block_size - len(ids)
        if len(ids) == 0 or room < 1:
            raise ValueError(f"prompt {snippet(prompt)} has {len(ids)} tokens; the model continues 1 to "
                             f"{config.model.block_size - 1} (its block_size {config.model.block_size} less one)")
        if config.max_new_tokens > room:
            print(f"max_new_tokens {config.max_new_tokens} cut to {room}: the prompt's {len(ids)} tokens and the "
                  f"new ones fill the model's {config.model.block_size}-token context", file=sys.stderr)
        new = generate(model, params, jnp.asarray(ids)[None], jax.random.key(config.seed + i),
                       max_new_tokens=min(config.max_new_tokens or room, room), temperature=config.temperature,
                       top_k=config.top_k or None, greedy=config.temperature == 0)
        out.append(vocab.decode(np.asarray(new[0])))
    return out


def restore_model(config: Config, checkpoint_dir, *, step: int | None = None):
    """A trained run's network, rebuilt from its ``config`` (the one saved with its weights).

    The vocabulary comes from the corpus again (``load(config)``), so the model is the one the
    run trained; the weights are the checkpoint's (``step``: the newest when None).

    Returns:
      ``(model, params, vocab)``: a ``TransformerLM``, its parameters, the corpus's ``Vocab``.

    Raises:
      jaxnet.train.checkpoint.CheckpointError: no checkpoint, a damaged one, or one whose arrays
        do not fit the model this config builds (listing the differing ones).
    """
    import jax.numpy as jnp

    from jaxnet.models.transformer import TransformerLM
    from jaxnet.train import TrainState, checkpoint

    vocab = load(config).vocab
    model = TransformerLM(config.model.replace(vocab_size=len(vocab)))
    like = TrainState.create(model=model, tx=make_optimizer(config),
                             sample_x=jnp.zeros((1, config.model.block_size), jnp.int32), seed=config.seed)
    return model, checkpoint.restore(checkpoint_dir, like, step=step).params, vocab


def make_optimizer(config: Config):
    """``config.optimizer`` with its schedule over ``config.steps`` updates, or (``steps == 0``) at
    a constant rate scaled by ``clock_schedule`` (its warm-up and cosine, with the optimiser's
    ``warmup_steps`` and ``final_lr_fraction``), which ``fit_stream`` feeds the budget used."""
    import optax

    from jaxnet import optim
    from jaxnet.train.stream import clock_schedule

    opt = config.optimizer
    if not config.steps:
        return optax.chain(optim.make_optimizer(opt.replace(schedule="constant")),
                           clock_schedule(opt.warmup_steps, opt.final_lr_fraction))
    return optim.make_optimizer(opt.replace(total_steps=config.steps,
                                            warmup_steps=min(opt.warmup_steps, config.steps - 1)))


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Trains and evaluates the model and the n-gram baseline; returns the final metrics.

    Prints progress and samples on stderr; writes ``metrics.jsonl``, ``loss_curve.png`` (train
    and held-out loss, nats per token, against epochs) and the final weights (``checkpoints/<step>``,
    whatever ``checkpoint_every`` is; the result's ``"weights"``, read by ``restore_model``) into
    ``workdir``.
    ``tensorboard``, ``profile_steps``: as in ``fit_stream``; ``checkpoint_every``, ``resume``: as
    ``jaxnet.train.checkpoint.run_options`` (checkpoints under ``<workdir>/checkpoints``); ``mesh``,
    ``strategy``: as in ``fit_stream``. On a mesh over several processes each passes ``fit_stream``
    only its part of the training tokens where they divide (``parallel.process_shard``; the
    result's ``"data_split"`` says); every process evaluates the held-out tokens whole.
    """
    import jax.numpy as jnp

    from jaxnet.models.transformer import TransformerLM, count_params, flops_per_token
    from jaxnet import parallel
    from jaxnet.train import TrainState, checkpoint
    from jaxnet.train.stream import fit_stream, token_log_probs

    t_start = time.perf_counter()
    corpus = load(config)
    unit = "char" if corpus.vocab.level == "char" else "word"
    print(f"{corpus.name}: {len(corpus.train):,} training / {len(corpus.val):,} held-out {unit}s, "
          f"vocabulary {len(corpus.vocab)}", file=sys.stderr)
    model_cfg = config.model.replace(vocab_size=len(corpus.vocab))
    model = TransformerLM(model_cfg)
    block = model_cfg.block_size
    state = TrainState.create(model=model, tx=make_optimizer(config), sample_x=jnp.zeros((1, block), jnp.int32),
                              seed=config.seed)
    print(f"TransformerLM: {count_params(model_cfg):,} parameters, {flops_per_token(model_cfg) / 1e6:.1f} MFLOP "
          f"per training token", file=sys.stderr)
    by_time = not config.steps
    step_cap = (math.ceil(config.max_epochs * len(corpus.train) / (config.batch_size * block))
                if config.max_epochs > 0 else 10**7)
    shard = parallel.process_shard(corpus.train, mesh, name="training tokens")
    fit = fit_stream(
        state, shard.data, steps=step_cap if by_time else config.steps, batch_size=config.batch_size,
        block_size=block, val_tokens=corpus.val, eval_every=config.eval_every, eval_stride=config.eval_stride,
        log_every=config.log_every, time_limit_s=config.time_limit_s,
        budget_s=config.train_budget_s if by_time else None, progress=config.progress, workdir=workdir,
        tensorboard=tensorboard, profile_steps=profile_steps, mesh=mesh, strategy=strategy,
        process_local=shard.process_local, accumulate=config.accumulate,
        **checkpoint.run_options(workdir, checkpoint_every=checkpoint_every, resume=resume, config=config),
        title=f"TransformerLM on {corpus.name} (loss: nats/{unit})")
    weights = save_weights(workdir, fit.state, config)  # the final weights, whatever checkpoint_every says
    # Every held-out target's log-probability, for the interpolated model (metrics); fit_stream's
    # evaluation after the last step has scored the validation text already.
    def scored(tokens):
        return token_log_probs(fit.state, tokens, block_size=block, stride=config.eval_stride)

    scores = {"val": fit.val_log_probs if fit.val_log_probs is not None else scored(corpus.val)}
    if corpus.test is not None:
        scores["test"] = scored(corpus.test)
    prompts = ["the company said"] if unit == "word" else ["The ", "def ", "A for statement"]
    texts = samples(model, fit.state.params, corpus.vocab, config, prompts)
    for t in texts:
        print(f"--- sample ---\n{t}\n", file=sys.stderr)
    baseline = ngram_baseline(config, corpus)
    schedule = (f"time (cosine over train_budget_s, or over {step_cap} steps = {config.max_epochs} epochs if "
                "sooner)") if by_time else f"steps ({config.steps})"
    result = metrics(fit, corpus, model_cfg, baseline, scores, schedule=schedule, ngram_weight=config.ngram_weight,
                     weights_table=bool(config.tune_fraction))
    result["samples"] = texts
    result["loss_curve_png"] = fit.files.get("loss_curve")
    result["weights"] = weights
    result.update(parallel.run_info(mesh, strategy, shard))
    result.update(dtype=jnp.dtype(model_cfg.dtype).name, remat=model_cfg.remat, accumulate=config.accumulate)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


# Weights of the n-gram model whose held-out figures a tuning run (tune_fraction) lists.
TUNING_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(13))  # 0, 0.05, ..., 0.6


def metrics(fit, corpus, model_cfg: TransformerConfig, baseline: dict, scores: dict, *, schedule: str,
            ngram_weight: float, weights_table: bool = False) -> dict:
    """The result of a ``fit_stream`` run beside the n-gram's and their interpolation's: held-out
    bits per character (or perplexity for words), throughput and model FLOPs.

    ``scores``: the network's log-probability of every held-out target, by split ("val", "test");
    ``baseline``: ``ngram_baseline``'s. The interpolated model is
    ``jaxnet.baselines.ngram.interpolate`` at ``ngram_weight``; with ``weights_table`` its held-out
    figure at each of ``TUNING_WEIGHTS`` too (``interpolated_val_bits_per_char_by_weight``, or
    ``..._perplexity_...`` for words: for choosing it).
    """
    from jaxnet.baselines.ngram import interpolate
    from jaxnet.models.transformer import count_params, flops_per_token

    unit = "char" if corpus.vocab.level == "char" else "word"
    nll = {split: float(-np.mean(s)) for split, s in scores.items()}
    mixed = {split: float(-np.mean(interpolate(s, baseline[f"{split}_log_probs"], ngram_weight)))
             for split, s in scores.items()}
    tokens_per_s = fit.tokens / fit.train_s if fit.train_s > 0 else float("nan")
    fpt = flops_per_token(model_cfg)
    kn = f"ngram_kn{baseline['order']}"
    result = {
        "experiment": "lm",
        "data": corpus.name,
        "level": unit,
        "n_train": len(corpus.train), "n_val": len(corpus.val), "vocab_size": len(corpus.vocab),
        "params": count_params(model_cfg),
        "steps": int(fit.state.step),
        "schedule": schedule,
        "stopped_by_time": fit.stopped_by_time,  # the budget (or time_limit_s) ended training
        "epochs": round(fit.history[-1]["epoch"], 2),
        "train_loss_last_interval": round(fit.history[-1]["loss"], 4),
        "val_nll": round(nll["val"], 4),
        "train_wall_s": round(fit.wall_s, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": fpt,
        "model_gflops_per_s": round(tokens_per_s * fpt / 1e9, 1),
        "total_train_pflops": round(fit.tokens * fpt / 1e15, 4),
        f"{kn}_val_nll": round(baseline["val_nll"], 4),
        "ngram_wall_s": baseline["wall_s"],
        "ngram_weight": ngram_weight,
        "interpolated_val_nll": round(mixed["val"], 4),
    }

    def figure(nats: float) -> float:
        return round(nats / math.log(2), 4) if unit == "char" else round(math.exp(nats), 2)

    name = "bits_per_char" if unit == "char" else "perplexity"
    result[f"val_{name}"] = figure(nll["val"])
    result[f"{kn}_val_{name}"] = figure(baseline["val_nll"])
    result[f"interpolated_val_{name}"] = figure(mixed["val"])
    if "test" in scores:
        result[f"test_{name}"] = figure(nll["test"])
        result[f"{kn}_test_{name}"] = figure(baseline["test_nll"])
        result[f"interpolated_test_{name}"] = figure(mixed["test"])
    if weights_table:
        result[f"interpolated_val_{name}_by_weight"] = {
            str(w): figure(float(-np.mean(interpolate(scores["val"], baseline["val_log_probs"], w))))
            for w in TUNING_WEIGHTS}
    return result


__all__ = ["Config", "TUNING_WEIGHTS", "load", "make_optimizer", "metrics", "ngram_baseline", "restore_model", "run",
           "samples"]
