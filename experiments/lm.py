"""Character language model on real text (offline), with a Kneser–Ney n-gram baseline on the same split.

    python -m experiments.lm                          # default: char LM on pydoc_data.topics, <= 10 min
    python -m experiments.lm --steps 300              # a quick look (~1-2 min)
    python -m experiments.lm --optimizer.learning-rate 3e-3   # the optimiser's fields: --optimizer.*
    python -m experiments.lm --data-dir data/ptb      # Penn Treebank, word level (perplexity)
    python -m experiments.lm --model.dtype bfloat16   # bf16 matmuls with f32 accumulation
    python -m experiments.lm --generate --prompt "The " --max-new-tokens 200   # text from the saved weights

Data: the English text of Python's ``pydoc_data.topics`` (464,970 characters, topics sorted by
name), the last 10% held out (46,497 characters), the 103-character vocabulary (+ ``<unk>``,
``<eos>``) from the training 90%. With ``--data-dir``: Mikolov's ``ptb.{train,valid,test}.txt``,
words with ``<eos>`` after each sentence, reported as perplexity on valid and test.

Model (``--model.*``, a ``TransformerConfig``): ``jaxnet.models.TransformerLM`` (4 layers, 192
wide, 4 heads, 128 context, rotary positions, tanh-GELU MLPs through ``FusedDense``, tied
embeddings, 1.80M parameters); optimiser (``--optimizer.*``, a ``jaxnet.optim.OptimizerConfig``):
AdamW with warm-up and cosine decay (by default over a time budget or 19 epochs, whichever ends
first); trained on random windows (``jaxnet.train.stream.fit_stream``).
Held-out bits per character are measured on every held-out character once, with a sliding window
(stride ``eval_stride``: each character predicted from at least 96 of the 128 characters of
context). The study itself is ``jaxnet.studies.lm``.

Prints progress, samples (temperature and top-k) and one JSON line: held-out bits/char, the
n-gram baseline's on the same split, tokens/s, model FLOPs; writes ``metrics.jsonl``,
``loss_curve.png`` (train and held-out loss, nats/char, against epochs), the final weights
(``checkpoints/<step>``, the result's ``"weights"``) and ``result.json``. ``--generate`` trains
nothing: it rebuilds the model of the run in ``--workdir`` from the config saved with its newest
checkpoint (flags given now override it: ``--prompt``, ``--max-new-tokens``, ``--temperature``,
``--top-k``, ``--seed``), loads the weights and prints the prompt and its continuation
(``jaxnet.models.transformer.generate``, with a key-value cache).
Measured (docs/benchmarks.md "Language", 2 cores): 1.591 held-out bits/char, 1,942 steps (19
epochs, the cap) at 20,478 tokens/s, 6 min 49 s for the whole run; Kneser–Ney order 9: 1.668.
Training ends at ``max_epochs`` or at the time budget, whichever comes first (a slow machine
gets fewer steps).
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
