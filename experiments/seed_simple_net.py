"""The seed example: SimpleNet (10 -> 5 -> 1, ReLU), MSE, SGD lr 0.01, 1000 full-batch epochs.

    python -m experiments.seed_simple_net                  # ~3 s on 2 cores
    python -m experiments.seed_simple_net --compare-torch  # + the seed's PyTorch loop, same start

Data: 256 seeded synthetic rows, ``y = sin(x·u) + 0.5 x·v + 0.1 noise`` (jaxnet.data.make_regression).
Prints the loss every 100 epochs and ends with one JSON line; writes ``metrics.jsonl``,
``loss_curve.png`` and ``result.json`` into ``--workdir`` (default ``runs/seed_simple_net/``).
Expected (measured, see docs/benchmarks.md): final MSE ≈ 0.082 from ≈ 0.45 at the start, with the
PyTorch curve within float32 rounding of jaxnet's.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from experiments.common import finish, parse_config
from jaxnet import seed


@dataclasses.dataclass(frozen=True)
class Config(seed.SeedConfig):
    # Also run the seed's own PyTorch loop from the same initial weights and data and compare.
    compare_torch: bool = False
    # Print the loss every this many epochs (the seed prints every 100).
    log_every: int = 100
    # Show a progress bar on stderr.
    progress: bool = False


def main(argv=None) -> dict:
    config, workdir = parse_config(Config, argv, name="seed_simple_net", description=__doc__.splitlines()[0])
    seed_config = seed.SeedConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(seed.SeedConfig)})
    data = seed.make_data(seed_config)
    state = seed.make_state(seed_config, data)
    init_params = state.params
    if config.compare_torch:  # the state is donated to training: keep the start for PyTorch
        import jax
        import jax.numpy as jnp

        init_params = jax.tree.map(jnp.copy, init_params)
    start = time.perf_counter()
    run = seed.train_jaxnet(seed_config, data, state, log_every=config.log_every,
                            progress=config.progress, workdir=workdir)
    wall = time.perf_counter() - start
    curve = run.column("loss")
    result = {
        "experiment": "seed_simple_net",
        "backend": config.backend,
        "epochs": config.epochs,
        "initial_loss": curve[0],
        "final_loss": curve[-1],
        "noise_floor_mse": config.noise_std**2,
        "jaxnet_wall_s": round(wall, 4),
        "loss_curve_png": run.files.get("loss_curve"),
    }
    if config.compare_torch:
        torch_curve, torch_wall = seed.train_torch(seed_config, data, init_params)
        gap = seed.curve_gap(curve, torch_curve)
        tolerance = seed.float32_curve_tolerance(config.epochs)
        result.update(torch_final_loss=float(torch_curve[-1]), torch_wall_s=round(torch_wall, 4), **gap,
                      rel_tolerance=tolerance, curves_agree=gap["max_rel_gap"] <= tolerance)
    if result["loss_curve_png"]:
        print(f"loss curve: {result['loss_curve_png']}", file=sys.stderr)
    return finish(result, workdir)


if __name__ == "__main__":
    main()
