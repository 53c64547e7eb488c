"""Character language model on real text (offline), with a Kneser–Ney n-gram baseline on the same split.

    python -m experiments.lm                          # default: char LM on pydoc_data.topics, <= 10 min
    python -m experiments.lm --steps 300              # a quick look (~1-2 min)
    python -m experiments.lm --data-dir data/ptb      # Penn Treebank, word level (perplexity)
    python -m experiments.lm --model.dtype bfloat16   # bf16 matmuls with f32 accumulation

Data: the English text of Python's ``pydoc_data.topics`` (464,970 characters, topics sorted by
name), the last 10% held out (46,497 characters), the 103-character vocabulary (+ ``<unk>``,
``<eos>``) from the training 90%. With ``--data-dir``: Mikolov's ``ptb.{train,valid,test}.txt``,
words with ``<eos>`` after each sentence, reported as perplexity on valid and test.

Model (``--model.*``, a ``TransformerConfig``): ``jaxnet.models.TransformerLM`` (4 layers, 192
wide, 4 heads, 128 context, rotary positions, tanh-GELU MLPs through ``FusedDense``, tied
embeddings, 1.80M parameters), AdamW with warm-up and cosine decay (by default over a time budget
or 19 epochs, whichever ends first), trained on random windows (``jaxnet.train.stream.fit_stream``).
Held-out bits per character are measured on every held-out character once, with a sliding window
(stride ``eval_stride``: each character predicted from at least 96 of the 128 characters of
context). The study itself is ``jaxnet.studies.lm``.

Prints progress, samples (temperature and top-k) and one JSON line: held-out bits/char, the
n-gram baseline's on the same split, tokens/s, model FLOPs; writes ``metrics.jsonl``,
``loss_curve.png`` (train and held-out loss, nats/char, against epochs) and ``result.json``.
Measured (docs/benchmarks.md "Language", 2 cores): 1.591 held-out bits/char, 1,942 steps (19
epochs, the cap) at 20,478 tokens/s, 6 min 49 s for the whole run; Kneser–Ney order 9: 1.668.
Training ends at ``max_epochs`` or at the time budget, whichever comes first (a slow machine
gets fewer steps).
"""
from __future__ import annotations

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.studies.lm import Config, run

__all__ = ["Config", "main"]


def main(argv=None) -> dict:
    # Before JAX starts: the train step's ~450 MB temporary buffer is allocated on XLA's worker
    # threads, and only the main heap can keep a block that large (kernels/host_memory.py).
    prepare_process(single_arena=True)
    config, flags = parse_config(Config, argv, name="lm", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    return finish(run(config, flags.workdir, **flags.fit_options), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
