"""The seed example: SimpleNet (10 -> 5 -> 1, ReLU), MSE, SGD lr 0.01, 1000 full-batch epochs.

    python -m experiments.seed_simple_net                  # ~3 s on 2 cores
    python -m experiments.seed_simple_net --compare-torch  # + the seed's PyTorch loop, same start

Data: 256 seeded synthetic rows, ``y = sin(x·u) + 0.5 x·v + 0.1 noise`` (jaxnet.data.make_regression).
Prints the loss every 100 epochs and ends with one JSON line; writes ``metrics.jsonl``,
``loss_curve.png``, the final weights (``checkpoints/<step>``, the result's ``"weights"``) and
``result.json`` into ``--workdir`` (default ``runs/seed_simple_net/``).
The flags are ``jaxnet.seed.SeedConfig``'s fields and three of this command's own; the run is
``jaxnet.seed.run``.
Expected (measured, see docs/benchmarks.md): final MSE ≈ 0.082 from ≈ 0.45 at the start, with the
PyTorch curve within float32 rounding of jaxnet's.
"""
from __future__ import annotations

import dataclasses
import sys

from experiments.common import finish, parse_config, prepare_process
from jaxnet import seed


@dataclasses.dataclass(frozen=True)
class Config(seed.SeedConfig):
    # Also run the seed's own PyTorch loop from the same initial weights and data and compare.
    compare_torch: bool = False
    # Print the loss every this many epochs (the seed prints every 100; 0: never).
    log_every: int = 100
    # Show a progress bar on stderr.
    progress: bool = False


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="seed_simple_net", description=__doc__.splitlines()[0])
    result = seed.run(config, compare_torch=config.compare_torch, log_every=config.log_every or None,
                      progress=config.progress, workdir=flags.workdir, **flags.fit_options)
    if result["loss_curve_png"]:
        print(f"loss curve: {result['loss_curve_png']}", file=sys.stderr)
    return finish(result, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
