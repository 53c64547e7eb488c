"""Character language model on real text (offline), with a Kneser–Ney n-gram baseline on the same split.

    python -m experiments.lm                          # default: char LM on pydoc_data.topics, <= 10 min
    python -m experiments.lm --steps 300              # a quick look (~1-2 min)
    python -m experiments.lm --data-dir data/ptb      # Penn Treebank, word level (perplexity)

Data: the English text of Python's ``pydoc_data.topics`` (464,970 characters, topics sorted by
name), the last 10% held out (46,497 characters), the 103-character vocabulary (+ ``<unk>``,
``<eos>``) from the training 90%. With ``--data-dir``: Mikolov's ``ptb.{train,valid,test}.txt``,
words with ``<eos>`` after each sentence, reported as perplexity on valid and test.

Model: ``jaxnet.models.TransformerLM`` (4 layers, 192 wide, 4 heads, 128 context, rotary
positions, tanh-GELU MLPs through ``FusedDense``, tied embeddings, 1.80M parameters), AdamW with
warm-up and cosine decay (by default over a time budget or 19 epochs, whichever ends first),
trained on random windows (``jaxnet.train.stream.fit_stream``).
Held-out bits per character are measured on every held-out character once, with a sliding window
(stride ``eval_stride``: each character predicted from at least 96 of the 128 characters of
context).

Prints progress, samples (temperature and top-k) and one JSON line: held-out bits/char, the
n-gram baseline's on the same split, tokens/s, model FLOPs; writes ``metrics.jsonl``,
``loss_curve.png`` (train and held-out loss, nats/char, against epochs) and ``result.json``.
Measured (docs/benchmarks.md "Language", 2 cores): 1.591 held-out bits/char, 1,942 steps (19
epochs, the cap) at 20,478 tokens/s, 6 min 49 s for the whole run; Kneser–Ney order 9: 1.668.
Training ends at ``max_epochs`` or at the time budget, whichever comes first (a slow machine
gets fewer steps).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np

from experiments.common import enable_compilation_cache, finish, parse_config
from jaxnet import runtime

# Before JAX starts: the train step's ~450 MB temporary buffer is allocated on XLA's worker
# threads, and only the main heap can keep a block that large (kernels/host_memory.py).
runtime.keep_host_memory(single_arena=True)


@dataclasses.dataclass(frozen=True)
class Config:
    # Penn Treebank directory (ptb.train.txt, ptb.valid.txt, ptb.test.txt): word level. Empty: the
    # default offline corpus, character level.
    data_dir: str = ""
    # Held-out fraction of the default corpus (its last characters).
    val_fraction: float = 0.1
    # --- model (jaxnet.models.TransformerConfig) ---
    num_layers: int = 4
    embed_dim: int = 192
    num_heads: int = 4
    block_size: int = 128
    positions: str = "rotary"
    dropout_rate: float = 0.15
    activation: str = "gelu_tanh"
    # "float32" or "bfloat16" activations (parameters stay float32).
    dtype: str = "float32"
    backend: str = "xla"
    # --- training: AdamW, linear warm-up then cosine decay to final_lr_fraction over all steps ---
    # Updates in all, with a warm-up + cosine schedule over them. 0: train for train_budget_s
    # seconds of training steps instead, the cosine following the fraction of that time used (so
    # it ends at the budget whatever the shared machine's speed; warm-up still counts steps).
    steps: int = 0
    train_budget_s: float = 510.0
    # With the time budget: also stop (and end the cosine) after this many passes over the
    # training text. Beyond ~19 the model overfits the 418k-character corpus: default runs
    # measured 1.577 bits/char at 18.8 epochs, 1.600 at 24.1 and 1.669 at 34.0 (bf16), their
    # count set by the machine's speed alone (docs/benchmarks.md). 0: no cap.
    max_epochs: float = 19.0
    batch_size: int = 32
    learning_rate: float = 5e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.1
    b2: float = 0.99
    clip_norm: float = 1.0
    # Stop training after this many seconds even if steps remain (a backstop for the 10 minutes).
    time_limit_s: float = 585.0
    eval_every: int = 400
    log_every: int = 50
    # Held-out evaluation windows start every eval_stride tokens (block_size: no overlap).
    eval_stride: int = 32
    # --- baseline and samples ---
    # Order of the interpolated Kneser–Ney n-gram (character level; words use min(order, 3)).
    ngram_order: int = 9
    sample_length: int = 300
    temperature: float = 0.8
    top_k: int = 20
    seed: int = 0
    progress: bool = True


def load(config: Config):
    from jaxnet.data import text

    if config.data_dir:
        return text.load_ptb(config.data_dir, level="word")
    return text.pydoc_corpus(config.val_fraction)


def ngram_baseline(config: Config, corpus) -> dict:
    from jaxnet.baselines.ngram import KneserNey

    order = config.ngram_order if corpus.vocab.level == "char" else min(config.ngram_order, 3)
    start = time.perf_counter()
    lm = KneserNey.fit(corpus.train, order=order, vocab_size=len(corpus.vocab))
    out = {"order": order, "val_nll": lm.cross_entropy(corpus.val, context=corpus.train)}
    if corpus.test is not None:
        out["test_nll"] = lm.cross_entropy(corpus.test, context=corpus.val)
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out


def samples(model, params, vocab, config: Config, prompts) -> list[str]:
    import jax
    import jax.numpy as jnp

    from jaxnet.models.transformer import generate

    out = []
    for i, prompt in enumerate(prompts):
        ids = vocab.encode(prompt.split() if vocab.level == "word" else prompt)
        room = config.block_size - len(ids)
        new = generate(model, params, jnp.asarray(ids)[None], jax.random.key(config.seed + i),
                       max_new_tokens=min(config.sample_length, room), temperature=config.temperature,
                       top_k=config.top_k)
        out.append(vocab.decode(np.asarray(new[0])))
    return out


def main(argv=None) -> dict:
    config, workdir = parse_config(Config, argv, name="lm", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    import jax.numpy as jnp
    import optax

    from jaxnet import optim
    from jaxnet.models.transformer import TransformerConfig, TransformerLM, count_params, flops_per_token
    from jaxnet.train import TrainState
    from jaxnet.train.stream import evaluate_stream, fit_stream, time_schedule

    t_start = time.perf_counter()
    corpus = load(config)
    unit = "char" if corpus.vocab.level == "char" else "word"
    print(f"{corpus.name}: {len(corpus.train):,} training / {len(corpus.val):,} held-out {unit}s, "
          f"vocabulary {len(corpus.vocab)}", file=sys.stderr)
    model_cfg = TransformerConfig(
        vocab_size=len(corpus.vocab), block_size=config.block_size, num_layers=config.num_layers,
        num_heads=config.num_heads, embed_dim=config.embed_dim, positions=config.positions,
        dropout_rate=config.dropout_rate, activation=config.activation, backend=config.backend,
        dtype=jnp.dtype(config.dtype))
    model = TransformerLM(model_cfg)

    def optimizer(total_steps: int | None):
        """AdamW; a warm-up + cosine schedule over total_steps, or (None) a constant rate times a
        factor that ``time_schedule`` sets before every step."""
        base = optim.OptimizerConfig(
            name="adamw", learning_rate=config.learning_rate, weight_decay=config.weight_decay, b2=config.b2,
            clip_norm=config.clip_norm)
        if total_steps is None:
            return optax.chain(optim.make_optimizer(base), optax.inject_hyperparams(optax.scale)(step_size=1.0))
        return optim.make_optimizer(base.replace(
            schedule="warmup_cosine", warmup_steps=min(config.warmup_steps, total_steps - 1),
            total_steps=total_steps, final_lr_fraction=config.final_lr_fraction))

    by_time = not config.steps
    state = TrainState.create(model=model, tx=optimizer(None if by_time else config.steps),
                              sample_x=jnp.zeros((1, config.block_size), jnp.int32), seed=config.seed)
    params = count_params(model_cfg)
    print(f"TransformerLM: {params:,} parameters, {flops_per_token(model_cfg) / 1e6:.1f} MFLOP per "
          f"training token", file=sys.stderr)
    tokens_per_step = config.batch_size * config.block_size
    step_cap = (math.ceil(config.max_epochs * len(corpus.train) / tokens_per_step)
                if config.max_epochs > 0 else 10**7)
    run = fit_stream(
        state, corpus.train, steps=step_cap if by_time else config.steps, batch_size=config.batch_size,
        block_size=config.block_size, val_tokens=corpus.val, eval_every=config.eval_every,
        eval_stride=config.eval_stride, log_every=config.log_every, time_limit_s=config.time_limit_s,
        budget_s=config.train_budget_s if by_time else None,
        before_step=time_schedule(config.warmup_steps, config.final_lr_fraction) if by_time else None,
        progress=config.progress, workdir=workdir, title=f"TransformerLM on {corpus.name} (loss: nats/{unit})")
    state = run.state
    val_nll = run.history[-1]["val_loss"]
    test_nll = None
    if corpus.test is not None:
        test_nll = evaluate_stream(state, corpus.test, block_size=config.block_size, stride=config.eval_stride)

    prompts = ["the company said"] if unit == "word" else ["The ", "def ", "A for statement"]
    texts = samples(model, state.params, corpus.vocab, config, prompts)
    for t in texts:
        print(f"--- sample ---\n{t}\n", file=sys.stderr)

    baseline = ngram_baseline(config, corpus)
    tokens_per_s = run.tokens / run.train_s if run.train_s > 0 else float("nan")
    fpt = flops_per_token(model_cfg)
    result = {
        "experiment": "lm",
        "data": corpus.name,
        "level": unit,
        "n_train": len(corpus.train), "n_val": len(corpus.val), "vocab_size": len(corpus.vocab),
        "params": params,
        "steps": int(state.step),
        "schedule": (f"time (cosine over train_budget_s, or over {step_cap} steps = {config.max_epochs} epochs "
                     "if sooner)") if by_time else f"steps ({config.steps})",
        "stopped_by_time": run.stopped_by_time,  # the budget (or time_limit_s) ended training
        "epochs": round(run.history[-1]["epoch"], 2),
        "train_loss_last_interval": round(run.history[-1]["loss"], 4),
        "val_nll": round(val_nll, 4),
        "train_wall_s": round(run.wall_s, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": fpt,
        "model_gflops_per_s": round(tokens_per_s * fpt / 1e9, 1),
        "total_train_pflops": round(run.tokens * fpt / 1e15, 4),
        f"ngram_kn{baseline['order']}_val_nll": round(baseline["val_nll"], 4),
        "ngram_wall_s": baseline["wall_s"],
    }
    if unit == "char":
        result["val_bits_per_char"] = round(val_nll / math.log(2), 4)
        result[f"ngram_kn{baseline['order']}_val_bits_per_char"] = round(baseline["val_nll"] / math.log(2), 4)
    else:
        result["val_perplexity"] = round(math.exp(val_nll), 2)
        result[f"ngram_kn{baseline['order']}_val_perplexity"] = round(math.exp(baseline["val_nll"]), 2)
        if test_nll is not None:
            result["test_perplexity"] = round(math.exp(test_nll), 2)
            result[f"ngram_kn{baseline['order']}_test_perplexity"] = round(math.exp(baseline["test_nll"]), 2)
    result["samples"] = texts
    result["loss_curve_png"] = run.files.get("loss_curve")
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return finish(result, workdir)


if __name__ == "__main__":
    main()
