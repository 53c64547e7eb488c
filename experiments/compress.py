"""int8 quantisation measured: accuracy or bits/char, bytes and latency of float32, int8 and w8a8 models.

    python -m experiments.compress                           # digits MLP and CNN, a character LM
    python -m experiments.compress --models mlp cnn          # the digits models alone (about a minute)
    python -m experiments.compress --backend xla             # the int8 layers on XLA instead of "auto"
    python -m experiments.compress --lm-steps 2000 --lm.embed-dim 192 --lm.num-layers 4   # a bigger LM

Trains each model (digits: ``experiments.vision``'s MLP 64-256-10 and CNN, 30 epochs, seed 0; the
LM: a 2-layer, 128-wide TransformerLM, 400 updates on the pydoc corpus), quantises its dense
layers per output channel (``jaxnet.compress.quantize``: int8 weight-only, and w8a8 with per-row
int8 activations) and runs the unchanged model on ``kernels.quantized_dense`` (``--backend``).
For every model and mode: test accuracy or held-out bits per character, bytes of the dense layers
and of the whole model, and the latency of one jitted forward pass at batch 1 and 256 (medians,
variants interleaved, ``kernels.timing``); then weight-only int8 at batch 1 against
dequantise-then-dot, and each int8 mode at batch 256 against float32 (issue 22's targets: within
0.3 accuracy points / 0.02 bits per character, dense weights >= 3.9x smaller, >= 1.5x and >= 3x).

The study itself is ``jaxnet.studies.compress``. Writes ``table.md`` and ``table.json`` (every
figure), each model's training run and weights under ``<workdir>/<model>``, and result.json (the
targets, met or not). Measured: docs/benchmarks.md ("Compression").
"""
from __future__ import annotations

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.studies.compress import Config, run

__all__ = ["Config", "main"]


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="compress", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    return finish(run(config, flags.workdir, **flags.fit_options), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
