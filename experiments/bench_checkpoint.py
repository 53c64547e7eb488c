"""Benchmark: what checkpoints cost (jaxnet.train.checkpoint), beside the training step they interrupt.

    python -m experiments.bench_checkpoint          # ~2 minutes on 2 cores

Two figures:

- **per save**: for the seed's SimpleNet, an MLP and the language experiment's default
  TransformerLM (each with Adam), the median seconds of ``checkpoint.save`` (Orbax write, file
  and array hashes, the manifest) and of ``checkpoint.restore`` (verification included), the
  bytes on disk, and the median seconds of one jitted training step; the overhead at the
  experiments' default ``--checkpoint-every`` is ``save / (every x step)``.
- **end to end**: ``fit`` of the MLP, minibatch, ``steps`` updates with ``checkpoint_every`` at
  its default against the same run without checkpoints, interleaved; the ratio is the slowdown.

Results in docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import statistics
import tempfile
import time

from experiments.common import CHECKPOINT_EVERY, finish, parse_config, prepare_process


@dataclasses.dataclass(frozen=True)
class Config:
    # Timed repeats of each save, restore and step (medians are reported).
    repeats: int = 5
    # Updates of the end-to-end fit, run with and without checkpoints, >= 1.
    steps: int = 3000
    # Timed repeats of that fit, each way (medians are reported), >= 1.
    fit_repeats: int = 3
    # Steps between checkpoints (the experiments' default).
    every: int = CHECKPOINT_EVERY


def _states():
    """(name, state, batch) for each model measured."""
    import jax.numpy as jnp
    import numpy as np

    from jaxnet import optim
    from jaxnet.models import MLP, SimpleNet, TransformerLM
    from jaxnet.studies.lm import Config as LMConfig
    from jaxnet.train import TrainState

    adam = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-3))
    rng = np.random.default_rng(0)
    x10 = rng.standard_normal((256, 10)).astype(np.float32)
    x64 = rng.standard_normal((128, 64)).astype(np.float32)
    lm_cfg = LMConfig().model.replace(vocab_size=96)
    ids = rng.integers(0, 96, (LMConfig().batch_size, lm_cfg.block_size + 1)).astype(np.int32)
    return [
        ("seed SimpleNet", TrainState.create(model=SimpleNet(), tx=adam, sample_x=x10[:1]),
         {"x": jnp.asarray(x10), "y": jnp.asarray(x10[:, :1])}, "mse"),
        ("MLP 64-512-512-10", TrainState.create(model=MLP((512, 512, 10)), tx=adam, sample_x=x64[:1]),
         {"x": jnp.asarray(x64), "y": jnp.asarray(rng.integers(0, 10, 128))}, "cross_entropy"),
        (f"TransformerLM (experiments.lm default, batch {ids.shape[0]}x{lm_cfg.block_size})",
         TrainState.create(model=TransformerLM(lm_cfg), tx=adam, sample_x=ids[:1, :-1]),
         {"x": jnp.asarray(ids[:, :-1]), "y": jnp.asarray(ids[:, 1:])}, "cross_entropy"),
    ]


def _per_save(config: Config, root: pathlib.Path) -> list[dict]:
    import jax

    from jaxnet import losses
    from jaxnet.train import checkpoint, make_train_step
    from kernels.timing import median_of

    rows = []
    for name, state, batch, loss in _states():
        step = jax.jit(make_train_step(getattr(losses, loss)))
        directory = root / name.split()[0]
        saves = []
        for i in range(config.repeats + 1):  # the first save imports Orbax: dropped
            s = state.replace(step=state.step + i + 1)
            t0 = time.perf_counter()
            checkpoint.save(directory, s, keep=2)
            saves.append(time.perf_counter() - t0)
        newest = directory / str(checkpoint.latest_step(directory))
        size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
        restore_s = median_of(lambda: _timed(lambda: checkpoint.restore(directory, like=state)), config.repeats, 1)
        holder = {"s": state}

        def one_step():
            t0 = time.perf_counter()
            holder["s"], m = step(holder["s"], batch, holder["s"].rng)
            jax.block_until_ready(m)
            return time.perf_counter() - t0

        step_s = median_of(one_step, max(config.repeats, 20), warmup=3)
        save_s = statistics.median(saves[1:])
        params = sum(x.size for x in jax.tree.leaves(state.params))
        rows.append({"model": name, "params": int(params), "checkpoint_mb": round(size / 2**20, 3),
                     "save_s": round(save_s, 4), "restore_s": round(restore_s, 4), "step_s": round(step_s, 5),
                     f"overhead_at_every_{config.every}": round(save_s / (config.every * step_s), 5)})
        print(f"{name}: {params:,} params, {size / 2**20:.2f} MB; save {save_s * 1e3:.0f} ms, restore "
              f"{restore_s * 1e3:.0f} ms, step {step_s * 1e3:.2f} ms -> +{100 * save_s / (config.every * step_s):.2f}% "
              f"at one save per {config.every} steps", flush=True)
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _end_to_end(config: Config, root: pathlib.Path) -> dict:
    import numpy as np

    from jaxnet import losses, optim
    from jaxnet.models import MLP
    from jaxnet.train import TrainState, fit

    rng = np.random.default_rng(1)
    batch = 32
    n = 4096
    x = rng.standard_normal((n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n)
    epochs = -(-config.steps * batch // n)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-3))

    def run(checkpointed: bool, i: int) -> float:
        state = TrainState.create(model=MLP((512, 512, 10)), tx=tx, sample_x=x[:1], seed=0)
        extra = {"checkpoint_dir": root / f"fit{i}", "checkpoint_every": config.every} if checkpointed else {}
        out = fit(state, (x, y), loss_fn=losses.cross_entropy, target_kind="labels", epochs=epochs,
                  batch_size=batch, progress=False, **extra)
        shutil.rmtree(root / f"fit{i}", ignore_errors=True)
        return out.wall_s

    run(True, -1)  # compiles both (the same programs) and imports Orbax
    times = {"without": [], "with": []}
    for i in range(config.fit_repeats):
        times["without"].append(run(False, i))
        times["with"].append(run(True, i))
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = epochs * (n // batch)
    print(f"fit, {steps} steps: {med['without']:.2f} s without checkpoints, {med['with']:.2f} s with one every "
          f"{config.every} steps and at the end -> slowdown {med['with'] / med['without']:.3f}x", flush=True)
    return {"steps": steps, "without_s": round(med["without"], 3), "with_s": round(med["with"], 3),
            "slowdown": round(med["with"] / med["without"], 4),
            "saves": steps // config.every + (steps % config.every != 0)}


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="bench_checkpoint", description=__doc__.splitlines()[0],
                                 trains=False)
    import jax

    from jaxnet.runtime import cpu_model, machine

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        result = {"benchmark": "checkpoint", "cpu": cpu_model(), "machine": machine(), "jax": jax.__version__,
                  "per_save": _per_save(config, root), "fit": _end_to_end(config, root)}
    return finish(result, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
