"""A small training run for the fault-injection tests: ``python tests/resume_worker.py MODE CKPT OUT``.

MODE is ``minibatch``, ``fullbatch`` or ``stream``. It trains (resuming from the checkpoint folder
CKPT when one is there), sleeps ``--delay`` seconds per logged record so that a kill lands
mid-run, and writes the final parameters to OUT (``.npz``). Not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np


class _Slow:
    """A writer that sleeps per record: stretches the run without touching its numbers."""

    def __init__(self, delay: float):
        self.delay = delay

    def write_scalars(self, step, scalars):
        del scalars
        print("record", step, flush=True)  # the tests wait for the first one
        time.sleep(self.delay)


def run(mode: str, checkpoint_dir: str | None, *, every: int | None, delay: float = 0.0, resume: bool = True):
    """Trains one of three small runs; returns the final ``TrainState``."""
    from jaxnet import losses, optim
    from jaxnet.data import make_regression
    from jaxnet.models import MLP, TransformerConfig, TransformerLM
    from jaxnet.train import TrainState, fit, fit_stream

    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=3e-3))
    ckpt = dict(checkpoint_dir=checkpoint_dir, checkpoint_every=every, keep=2, resume=resume and checkpoint_dir is not None,
                config={"mode": mode}) if checkpoint_dir else {}
    writers = [_Slow(delay)] if delay else []
    if mode == "stream":
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 17, 4000).astype(np.int32)
        cfg = TransformerConfig(vocab_size=17, block_size=16, num_layers=1, num_heads=2, embed_dim=16, mlp_ratio=2)
        state = TrainState.create(model=TransformerLM(cfg), tx=tx, sample_x=tokens[None, :16], seed=3)
        return fit_stream(state, tokens, steps=60, batch_size=4, block_size=16, log_every=1, progress=False,
                          writers=writers, **ckpt).state
    d = make_regression(90, 10, seed=1)
    state = TrainState.create(model=MLP((16, 1), dropout_rate=0.1), tx=tx, sample_x=d.x[:1], seed=2)
    batch = 16 if mode == "minibatch" else None
    epochs = 12 if mode == "minibatch" else 80
    return fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=epochs, batch_size=batch, progress=False,
               epochs_per_call=5, writers=writers, **ckpt).state


class StepDict(dict):
    """A dict of arrays with a ``step`` attribute: what ``checkpoint.save`` needs of a state."""

    @property
    def step(self):
        return self["step"]


def _register():
    import jax

    jax.tree_util.register_pytree_with_keys(
        StepDict, lambda s: ([(jax.tree_util.DictKey(k), s[k]) for k in sorted(s)], tuple(sorted(s))),
        lambda keys, leaves: StepDict(zip(keys, leaves)))


def big_state(step: int) -> StepDict:
    """Two ~9 MB arrays, so that a checkpoint write takes long enough to be killed inside."""
    big = np.random.default_rng(0).standard_normal((1536, 1536)).astype(np.float32)
    return StepDict(step=np.int32(step), w=big + step, v=big - step)


def write_forever(directory: str) -> None:
    """Checkpoints of ``big_state(1), big_state(2), ...`` (keep 2) until killed."""
    from jaxnet.train import checkpoint

    for step in range(1, 10**6):
        checkpoint.save(directory, big_state(step), keep=2)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["minibatch", "fullbatch", "stream", "writer"])
    p.add_argument("checkpoint_dir")
    p.add_argument("out")
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args(argv)
    # As a process started from a terminal: pytest-xdist's workers ignore SIGINT, which their
    # children inherit (and an ignored signal stays ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("RESUME_WORKER_CACHE"):  # the tests share compiled programs between the runs
        from experiments.common import enable_compilation_cache

        enable_compilation_cache(os.environ["RESUME_WORKER_CACHE"])
    if args.mode == "writer":
        return write_forever(args.checkpoint_dir)
    state = run(args.mode, args.checkpoint_dir, every=args.every, delay=args.delay)
    import jax

    from jaxnet.train.loop import parameter_names

    leaves = jax.tree.leaves(jax.device_get(state.params))
    np.savez(args.out, step=int(state.step), **dict(zip(parameter_names(state.params), leaves)))
    print("done", int(state.step), flush=True)


_register()

if __name__ == "__main__":
    sys.exit(main())
