"""A sweep: the seed's SimpleNet task for N seeds x M learning rates as one program (fit_many).

    python -m experiments.sweep                          # 100 seeds x 10 rates = 1000 models
    python -m experiments.sweep --seeds 10 --learning-rates 4 --torch-runs 2 --fit-runs 2  # a quick look
    python -m experiments.sweep --backend auto           # the layers on the backend measured fastest batched
    python -m experiments.sweep --engine vmap            # fit's step vmapped over the models (no fused kernel)

The task is the seed's (``jaxnet.seed``): SimpleNet 10 -> 5 -> 1 (ReLU), MSE, full-batch SGD for
1000 epochs on 256 synthetic rows (``--data-seed`` seeds the data, shared by every model); each
model starts from its own seed's weights and trains at one of ``--learning-rates`` rates
log-spaced over [``--lr-min``, ``--lr-max``], the hyperparameter carried in its optimiser state
(``optax.inject_hyperparams``). Reports the best rate (lowest mean final loss over the seeds),
the spread over seeds at it (mean, std, min, max), every rate's mean, and, side by side in this
run, the time per model of

- the sweep, ``jaxnet.train.fit_many(engine=--engine)``: cold (first call, compilation included)
  and warm (the median of ``--warm-runs`` more calls: its programs are compiled), each with every
  model's final loss read; ``engine`` in the result says which engine trained the models (by
  default "fused": the task is plain full-batch SGD of a dense stack, ``jaxnet.train.fused``);
- with ``--vmap-baseline`` (default on) and the fused engine: the same sweep on the vmapped
  engine, cold and warm, and the largest gap between the two engines' final losses;
- the seed's PyTorch loop (``jaxnet.seed_torch.seed_loop``) on ``--torch-runs`` models of the
  sweep spread over its grid (same weights, rate and data), at each of ``--torch-threads`` (the
  fastest is the baseline);
- a Python loop of single ``fit`` calls on ``--fit-runs`` models spread over the grid (the first
  and the last model, so the lowest and the highest rate, and evenly between): the first call
  (compiling), the median of the others (one optimiser object shared, so they reuse it);

with the speed-ups per model, GFLOP/s, and the largest gap between a model's final loss in the
sweep and in its single fit (``fit_many``'s tolerance) and in PyTorch (float32 rounding), and how
many of those models end outside each tolerance (a ReLU near its kink at a high rate can: see
docs/sweeps.md, "How close to a single fit").
Writes ``result.json`` into ``--workdir`` (default ``runs/sweep/``) and prints it as one line.
Measured (docs/benchmarks.md, "Sweeps"): best rate 0.1, final loss there 0.049 ± 0.014 over the
seeds; the figures per model and machine, and the speed-ups, are in docs/benchmarks.md ("The fused
engine"). The guide is docs/sweeps.md.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Literal

from experiments.common import clear_earlier_run, earlier_run_files, finish, parse_config, prepare_process
from kernels.dispatch import BackendName


@dataclasses.dataclass(frozen=True)
class Config:
    # Seeds of the models' initial weights: 0 .. seeds-1; each seed trains at every rate.
    seeds: int = 100
    # Learning rates per seed, log-spaced from lr_min to lr_max (both included).
    learning_rates: int = 10
    # The smallest learning rate (the seed's is 0.01, the grid's geometric middle).
    lr_min: float = 0.001
    # The largest learning rate.
    lr_max: float = 0.1
    # Full-batch SGD epochs (one update each) of every model, as the seed's loop.
    epochs: int = 1000
    # Rows of the seed's synthetic regression set (10 features).
    n_samples: int = 256
    # Standard deviation of the target noise (noise_std**2 is the MSE floor on fresh data).
    noise_std: float = 0.1
    # Seeds the data, shared by every model.
    data_seed: int = 0
    # Models of the sweep (spread over its grid) also trained by the seed's PyTorch loop, timed.
    torch_runs: int = 5
    # PyTorch intra-op thread counts to time (0: PyTorch's default); the fastest is the baseline.
    torch_threads: tuple[int, ...] = (1, 0)
    # Models of the sweep (spread over its grid) also trained by single fit calls in a Python loop, timed.
    fit_runs: int = 4
    # Kernel backend of SimpleNet's dense layers (vmapped engine): the seed's "xla"; "auto" takes, per layer,
    # the backend measured fastest for a batch of models (docs/sweeps.md); "numba" runs a batch one model at a time.
    backend: BackendName = "xla"
    # fit_many's engine: "auto" (the fused kernel where it applies, as here), "vmap" or "fused".
    engine: Literal["auto", "vmap", "fused"] = "auto"
    # With the fused engine, also time the vmapped one on the same sweep (cold and warm) and compare.
    vmap_baseline: bool = True
    # Calls of fit_many after the first (cold) one, per engine: "warm" is their median.
    warm_runs: int = 3
    # Bytes fit_many may use, in MB (0: its default, half of the available memory).
    memory_budget_mb: int = 0
    # Show fit_many's progress bar on stderr.
    progress: bool = True
    # Replace an earlier run's result.json in the workdir instead of refusing to start.
    overwrite: bool = False


def _rates(config: Config) -> list[float]:
    import numpy as np

    return [float(r) for r in np.geomspace(config.lr_min, config.lr_max, config.learning_rates)]


def spread(count: int, models: int) -> list[int]:
    """``count`` model indices spread evenly over ``range(models)``, the first and last included
    (the grid's lowest and highest rates), without repeats; all of them when ``count >= models``."""
    import numpy as np

    if count >= models:
        return list(range(models))
    return sorted({int(i) for i in np.linspace(0, models - 1, count).round()})


def run(config: Config) -> dict:
    """Trains the sweep, times the baselines, and returns the result (what the command prints)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxnet import losses, runtime, seed
    from jaxnet.models import SimpleNet
    from jaxnet.train import TrainState, fit, fit_many, sweep

    for name in ("seeds", "learning_rates", "epochs", "n_samples", "warm_runs"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.lr_min <= config.lr_max:
        raise ValueError(f"need 0 < --lr-min <= --lr-max, got {config.lr_min} and {config.lr_max}")
    seed_config = seed.SeedConfig(n_samples=config.n_samples, noise_std=config.noise_std, epochs=config.epochs,
                                  seed=config.data_seed, backend=config.backend)
    data = seed.make_data(seed_config)
    model = SimpleNet(backend=seed_config.backend)
    # One transformation shared by every state, each carrying its rate: fit_many's second call and
    # the loop's single fits then reuse compiled programs (a new optimiser object compiles anew).
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=seed_config.learning_rate)

    def state_fn(s, learning_rate):
        state = TrainState.create(model=model, tx=tx, sample_x=data.x[:1], seed=s)
        hyper = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
        return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))

    rates = _rates(config)
    hparams = {"learning_rate": rates}
    grid = sweep.model_grid(range(config.seeds), hparams)
    budget = config.memory_budget_mb * 2**20 or None
    kwargs = dict(loss_fn=losses.mse, epochs=config.epochs, title="sweep")
    def timed_sweep(engine):
        walls = []
        for _ in range(1 + config.warm_runs):  # the first call compiles: "cold"
            start = time.perf_counter()
            runs = fit_many(state_fn, (data.x, data.y), seeds=range(config.seeds), hparams=hparams,
                            memory_budget=budget, progress=config.progress, engine=engine, **kwargs)
            final = np.array([r.column("loss")[-1] for r in runs]).reshape(config.seeds, len(rates))
            walls.append(time.perf_counter() - start)  # the results read included: they are built on demand
        return runs, final, {"cold": walls[0], "warm": statistics.median(walls[1:])}

    runs, final, times = timed_sweep(config.engine)
    engine = runs[0].engine
    vmap = {}
    if engine == "fused" and config.vmap_baseline:
        _, vmap_final, vmap_times = timed_sweep("vmap")
        gaps = np.abs(final - vmap_final) / np.abs(vmap_final)
        vmap = {"vmap_cold_s": round(vmap_times["cold"], 3), "vmap_warm_s": round(vmap_times["warm"], 3),
                "speedup_vs_vmap": float(f"{vmap_times['warm'] / times['warm']:.3g}"),
                "max_rel_gap_vs_vmap": float(gaps.max()), "median_rel_gap_vs_vmap": float(np.median(gaps)),
                "models_outside_fit_tolerance_vs_vmap": int((gaps > sweep.tolerance(config.epochs)).sum())}

    # The Python loop of single fits, on models spread over the grid (every rate's gap is checked).
    fit_times, fit_gaps = [], []
    for i in spread(config.fit_runs, len(grid)):
        s, hp = grid[i]
        start = time.perf_counter()
        one = fit(state_fn(s, **hp), (data.x, data.y), progress=False, **kwargs)
        fit_times.append(time.perf_counter() - start)
        want = one.history[-1]["loss"]
        fit_gaps.append(abs(runs[i].history[-1]["loss"] - want) / abs(want))

    # The seed's PyTorch loop from the same weights.
    torch_ms, torch_gaps = {}, {}  # gaps: the largest over the thread counts, per model
    if config.torch_runs:
        import torch

        from jaxnet.interop import export_torch_state_dict
        from jaxnet.seed_torch import TorchSimpleNet, seed_loop

        default_threads = torch.get_num_threads()
        for threads in config.torch_threads:
            torch.set_num_threads(threads or default_threads)
            walls = []
            for i in spread(config.torch_runs, len(grid)):
                s, hp = grid[i]
                net = TorchSimpleNet()
                net.load_state_dict(export_torch_state_dict({"params": state_fn(s, **hp).params}))
                curve, wall = seed_loop(net, data.x, data.y, learning_rate=hp["learning_rate"], epochs=config.epochs)
                walls.append(wall)
                gap = abs(runs[i].history[-1]["loss"] - curve[-1]) / abs(curve[-1])
                torch_gaps[i] = max(torch_gaps.get(i, 0.0), gap)
            torch_ms[threads or default_threads] = round(1e3 * statistics.median(walls), 3)
        torch.set_num_threads(default_threads)

    models = len(grid)
    best = int(np.argmin(final.mean(axis=0)))
    at_best = final[:, best]
    per_model = {kind: 1e3 * t / models for kind, t in times.items()}
    gflop = models * config.epochs * 6 * config.n_samples * (10 * 5 + 5 * 1) / 1e9  # fwd 2, bwd 4 per MAC
    loop_first = 1e3 * fit_times[0] if fit_times else None
    loop_ms = 1e3 * statistics.median(fit_times[1:]) if len(fit_times) > 1 else loop_first
    torch_best = min(torch_ms.values()) if torch_ms else None
    # Three significant digits: a small grid's 0.04x cold speed-up must not read 0.0.
    ratio = lambda a, b: float(f"{a / b:.3g}") if a is not None else None  # noqa: E731
    fit_tolerance, torch_tolerance = sweep.tolerance(config.epochs), seed.float32_curve_tolerance(config.epochs)
    return {
        "experiment": "sweep", "engine": engine, "backend": config.backend, "models": models, "seeds": config.seeds,
        "learning_rates": [round(r, 6) for r in rates],
        "epochs": config.epochs, "best_learning_rate": round(rates[best], 6),
        "final_loss_at_best": {"mean": float(at_best.mean()), "std": float(at_best.std()),
                               "min": float(at_best.min()), "max": float(at_best.max())},
        "mean_final_loss_by_rate": [round(float(v), 6) for v in final.mean(axis=0)],
        "sweep_cold_s": round(times["cold"], 3), "sweep_warm_s": round(times["warm"], 3),
        "sweep_cold_ms_per_model": round(per_model["cold"], 3), "sweep_warm_ms_per_model": round(per_model["warm"], 3),
        "sweep_warm_gflop_per_s": round(gflop / times["warm"], 2), "gflop": float(f"{gflop:.3g}"),
        "torch_ms_per_model_by_threads": torch_ms, "torch_ms_per_model": torch_best,
        "fit_loop_first_ms": round(loop_first, 1) if loop_first else None,
        "fit_loop_ms_per_model": round(loop_ms, 2) if loop_ms else None,
        "speedup_vs_torch": ratio(torch_best, per_model["warm"]),
        "speedup_vs_torch_cold": ratio(torch_best, per_model["cold"]),
        "speedup_vs_fit_loop": ratio(loop_ms, per_model["warm"]),
        "max_rel_gap_vs_fit": float(max(fit_gaps, default=0.0)), "fit_tolerance": fit_tolerance,
        "models_outside_fit_tolerance": int(sum(g > fit_tolerance for g in fit_gaps)),
        "max_rel_gap_vs_torch": float(max(torch_gaps.values(), default=0.0)), "torch_tolerance": torch_tolerance,
        "models_outside_torch_tolerance": int(sum(g > torch_tolerance for g in torch_gaps.values())),
        **vmap,
        "cpu": runtime.cpu_model(), "machine": runtime.machine(), "cpus": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "jax": jax.__version__,
    }


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="sweep", description=__doc__.splitlines()[0], trains=False)
    earlier = earlier_run_files(flags.workdir)
    if earlier and not flags.overwrite:  # (parse_config files the --overwrite flag under flags)
        sys.exit(f"python -m experiments.sweep: --workdir {flags.workdir} holds an earlier run ({earlier[0]}); pass "
                 f"--overwrite to replace it, or another --workdir")
    clear_earlier_run(earlier)
    result = run(config)
    print(f"best rate {result['best_learning_rate']}: final loss {result['final_loss_at_best']}; "
          f"{result['models']} models ({result['engine']} engine) in {result['sweep_warm_s']} s warm "
          f"({result['sweep_cold_s']} s cold): "
          f"{result['speedup_vs_torch']}x PyTorch, {result['speedup_vs_fit_loop']}x a loop of fits per model",
          file=sys.stderr)
    return finish(result, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
