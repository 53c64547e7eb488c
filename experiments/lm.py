"""Character language model on real text (offline), a Kneser–Ney n-gram on the same split, and the two interpolated.

    python -m experiments.lm                          # default: char LM on pydoc_data.topics, <= 10 min
    python -m experiments.lm --steps 300              # a quick look (~1-2 min)
    python -m experiments.lm --optimizer.learning-rate 3e-3   # the optimiser's fields: --optimizer.*
    python -m experiments.lm --tune-fraction 0.1      # choosing settings: hold out the training text's end
    python -m experiments.lm --data-dir data/ptb      # Penn Treebank, word level (perplexity)
    python -m experiments.lm --model.dtype float32    # f32 matmuls (the default is bf16, f32 accumulation)
    python -m experiments.lm --generate --prompt "The " --max-new-tokens 200   # text from the saved weights

Data: the English text of Python's ``pydoc_data.topics`` (464,970 characters, topics sorted by
name), the last 10% held out (46,497 characters), the 103-character vocabulary (+ ``<unk>``,
``<eos>``) from the training 90%. With ``--data-dir``: Mikolov's ``ptb.{train,valid,test}.txt``,
words with ``<eos>`` after each sentence, reported as perplexity on valid and test.

Model (``--model.*``, a ``TransformerConfig``): ``jaxnet.models.TransformerLM`` (4 layers, 192
wide, 4 heads, 256 context, rotary positions, tanh-GELU MLPs through ``FusedDense``, tied
embeddings, dropout 0.2, bf16 matmuls with f32 accumulation, 1.80M parameters); optimiser
(``--optimizer.*``, a ``jaxnet.optim.OptimizerConfig``): AdamW at 8e-3 with warm-up and cosine
decay (by default over a time budget or 19 epochs, whichever ends first); trained on random
windows (``jaxnet.train.stream.fit_stream``). The interpolated model: per character
``(1 - w) p_transformer + w p_ngram`` with the Kneser–Ney 9-gram, ``--ngram-weight`` w = 0.3.
Every hyperparameter (these, and w) was chosen on the tuning split (``--tune-fraction 0.1``: the
last 10% of the training text held out, the real held-out text unread; its result lists the
interpolated figure at each weight). Held-out bits per character are measured on every held-out
character once, with a sliding window (stride ``eval_stride``: each character predicted from at
least 224 of the 256 characters of context). The study itself is ``jaxnet.studies.lm``.

Prints progress, samples (temperature and top-k) and one JSON line: held-out bits/char of the
transformer, of the n-gram and of the two interpolated, tokens/s, model FLOPs; writes
``metrics.jsonl``, ``loss_curve.png`` (train and held-out loss, nats/char, against epochs), the final weights
(``checkpoints/<step>``, the result's ``"weights"``) and ``result.json``. ``--generate`` trains
nothing: it rebuilds the model of the run in ``--workdir`` from the config saved with its newest
checkpoint (flags given now override it: ``--prompt``, ``--max-new-tokens``, ``--temperature``,
``--top-k``, ``--seed``), loads the weights and prints the prompt and its continuation
(``jaxnet.models.transformer.generate``, with a key-value cache).
Measured (docs/benchmarks.md "Language", 2 cores, Intel Xeon, two runs): held-out 1.444-1.445
bits/char interpolated, 1.579-1.585 the transformer alone, 1.668 the n-gram alone; 778-868 steps
(15-17 epochs) at 12.5-13.9k tokens/s, 9 min 20 s for the whole run. Training ends at
``max_epochs`` or at the time budget, whichever comes first (a slow machine gets fewer steps).
"""
from __future__ import annotations

import dataclasses
import sys

from experiments.common import config_from_dict, enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.studies import lm

__all__ = ["Config", "generate", "main"]


@dataclasses.dataclass(frozen=True)
class Config(lm.Config):
    # Train nothing: print text generated from the weights a finished run saved in --workdir (its
    # model rebuilt from the config saved with them; flags given now override that config).
    generate: bool = False
    # --generate: the text to continue (words, for a word-level model).
    prompt: str = "The "


def main(argv=None) -> dict:
    # Before JAX starts: the train step's ~450 MB temporary buffer is allocated on XLA's worker
    # threads, and only the main heap can keep a block that large (kernels/host_memory.py).
    prepare_process(single_arena=True)
    config, flags = parse_config(Config, argv, name="lm", description=__doc__.splitlines()[0])
    if config.generate:
        return generate(argv, flags.workdir)
    enable_compilation_cache()
    return finish(lm.run(config, flags.workdir, **flags.fit_options), flags.workdir, config, flags.argv)


def generate(argv, workdir) -> dict:
    """``--generate``: the run in ``workdir`` rebuilt from its newest checkpoint's config, ``argv``
    over it; prints the prompt and its continuation. Returns ``{"prompt", "text", "weights"}``."""
    from jaxnet.train import checkpoint

    directory = workdir / "checkpoints"
    step = checkpoint.latest_step(directory)
    if step is None:
        sys.exit(f"--generate: no checkpoint in {directory}; train first (python -m experiments.lm --workdir {workdir})")
    try:
        saved = config_from_dict(Config, checkpoint.load_config(directory, step=step) or {})
    except (ValueError, checkpoint.CheckpointError) as e:
        sys.exit(f"--generate: the config saved in {directory / str(step)}: {e}")
    config, _ = parse_config(Config, argv, name="lm", description=__doc__.splitlines()[0], defaults=saved)
    model, params, vocab = lm.restore_model(config, directory, step=step)
    text = lm.samples(model, params, vocab, config, [config.prompt])[0]
    print(text, flush=True)
    return {"prompt": config.prompt, "text": text, "weights": str(directory / str(step))}


if __name__ == "__main__":
    main()
