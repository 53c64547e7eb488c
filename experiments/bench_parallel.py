"""Benchmark: the per-step cost of each parallel strategy over one device, on fake CPU devices.

    python -m experiments.bench_parallel              # ~2 minutes on 2 cores

A CPU with 2 cores shows correctness and overhead, not speed-up: ``--devices`` fake devices
(``jax_num_cpu_devices``, set here before JAX starts) share the same cores. For an MLP and a small
TransformerLM, the jitted AdamW step (``parallel.Layout.wrap_step``: what ``fit`` runs) is timed
on one device and under each strategy and mesh on the same global batch, interleaved, and the
ratio sharded / one device is printed: the partitioned program's extra work (collectives,
gathers, smaller matmuls) on this machine. Results in docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import time

from experiments.common import finish, parse_config, prepare_process

CASES = (("data=4", "dp"), ("data=4", "fsdp"), ("data=2,model=2", "tp"), ("model=4", "tp"),
         ("data=2,model=2", "fsdp+tp"))


@dataclasses.dataclass(frozen=True)
class Config:
    # Fake CPU devices (the meshes below use 4).
    devices: int = 4
    # Timed rounds (medians are reported), each steps_per_sample steps of every case in turn.
    repeats: int = 7
    # Steps per case in a round (one timed sample: their mean), >= 1.
    steps_per_sample: int = 5


def _models():
    """(name, model, batch): an MLP on 64 features, and a small TransformerLM on 128 tokens."""
    import jax.numpy as jnp
    import numpy as np

    from jaxnet.models import MLP, TransformerConfig, TransformerLM

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    mlp_batch = {"x": x, "y": jnp.asarray(rng.integers(0, 10, 256))}
    cfg = TransformerConfig(vocab_size=96, block_size=128, num_layers=2, num_heads=4, embed_dim=128)
    ids = jnp.asarray(rng.integers(0, 96, (16, 129)), jnp.int32)
    return [("MLP 64-1024-1024-10, batch 256", MLP((1024, 1024, 10)), mlp_batch),
            ("TransformerLM 2x128, batch 16x128", TransformerLM(cfg), {"x": ids[:, :-1], "y": ids[:, 1:]})]


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="bench_parallel", description=__doc__.splitlines()[0],
                                 trains=False)
    import jax

    jax.config.update("jax_num_cpu_devices", config.devices)
    import optax

    from jaxnet import losses, parallel
    from jaxnet.runtime import cpu_model, machine
    from jaxnet.train import TrainState, make_train_step
    from kernels.timing import interleaved_medians

    rows = []
    for name, model, batch in _models():
        tx = optax.adamw(1e-3)
        base = TrainState.create(model=model, tx=tx, sample_x=batch["x"][:1])
        step = make_train_step(losses.cross_entropy)
        samplers = {}
        for case in (("one device", None), *CASES):
            spec, strategy = case
            key = jax.random.key(1)  # the dropout key, apart from the donated state
            if strategy is None:
                fn, state, b = jax.jit(step, donate_argnums=0), jax.tree.map(lambda a: a.copy(), base), batch
            else:
                layout = parallel.Layout.for_state(base, parallel.make_mesh(spec), strategy, sample_x=batch["x"][:1])
                fn = jax.jit(layout.wrap_step(step), donate_argnums=0)
                fresh = jax.tree.map(lambda a: a.copy(), base)  # place may alias base's buffers; the step donates
                state, b, key = layout.place(fresh), layout.replicate(batch), parallel.put(key, layout.replicated)
            holder = {"state": state}

            def sample(fn=fn, holder=holder, b=b, key=key):
                t0 = time.perf_counter()
                for _ in range(config.steps_per_sample):
                    holder["state"], m = fn(holder["state"], b, key)
                jax.block_until_ready(m)
                return (time.perf_counter() - t0) / config.steps_per_sample

            samplers[f"{spec} {strategy}" if strategy else spec] = sample
        med = interleaved_medians(samplers, config.repeats, warmup=1)
        one = med.pop("one device")
        print(f"{name}: one device {one * 1e3:.2f} ms/step", flush=True)
        for case, t in med.items():
            print(f"  {case:24s} {t * 1e3:8.2f} ms/step  {t / one:5.2f}x one device", flush=True)
        rows.append({"model": name, "one_device_ms": round(one * 1e3, 3),
                     "sharded_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                     "ratio": {k: round(v / one, 3) for k, v in med.items()}})
    return finish({"benchmark": "parallel", "cpu": cpu_model(), "machine": machine(), "jax": jax.__version__,
                   "fake_devices": config.devices, "models": rows}, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
