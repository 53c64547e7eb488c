"""One process of the multi-process tests: ``python tests/parallel_worker.py OUT CKPT [--die]``.

Started by ``python -m jaxnet.launch`` (which sets the JAXNET_* variables): joins the job, trains
the MLP of tests/test_parallel.py under ``data=4`` / fsdp with checkpoints into CKPT, then again
with each process passing only its rows (``jaxnet.parallel.process_shard``: its half); process 0
writes the final parameters to OUT and OUT's ``_local`` twin (``.npz``). With ``--die`` process 1
dies (status 3) after joining the job; with ``--raise`` it raises an exception there instead (an
uncaught error: ``jaxnet.parallel.initialize`` makes it end the process with status 1). Not
collected by pytest.
"""
from __future__ import annotations

import argparse
import os


def run(checkpoint_dir=None, mesh=None, local=False):
    """The run both sides compare: 3 epochs, batch 16, momentum SGD, on ``mesh`` under fsdp.
    ``local``: pass only this process's rows (``process_shard``), which must split them."""
    from jaxnet import losses, optim, parallel
    from jaxnet.data import make_regression
    from jaxnet.models import MLP
    from jaxnet.train import TrainState, fit

    d = make_regression(96, 16, seed=1)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="momentum", learning_rate=0.05))
    state = TrainState.create(model=MLP((32, 32, 1), dropout_rate=0.1), tx=tx, sample_x=d.x[:1], seed=0)
    extra = {} if checkpoint_dir is None else {"checkpoint_dir": checkpoint_dir, "checkpoint_every": 5}
    data = (d.x, d.y)
    if local:
        split = parallel.process_shard(data, mesh, name="train_data")
        assert split.process_local and len(split.data[0]) == len(d.x) // 2, split.reason
        data, extra["process_local"] = split.data, split.process_local
    return fit(state, data, loss_fn=losses.mse, epochs=3, batch_size=16, progress=False, mesh=mesh,
               strategy="fsdp", **extra)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("checkpoint_dir")
    p.add_argument("--die", action="store_true")
    p.add_argument("--raise", dest="raise_", action="store_true")

    args = p.parse_args(argv)
    from jaxnet import parallel

    index = parallel.initialize()
    import jax
    import numpy as np

    from jaxnet.train.loop import parameter_names

    print(f"process {index} of {jax.process_count()}, {jax.local_device_count()} of {jax.device_count()} devices",
          flush=True)
    if args.die and index == 1:
        os._exit(3)  # dies at once, as a crash would (sys.exit would first wait at JAX's shutdown barrier)
    if args.raise_ and index == 1:
        raise RuntimeError("process 1 fails on purpose")
    # Two runs in one job (one start-up): every process with all the data (and checkpoints),
    # then each with only its share of the rows (process_local) into OUT's "_local" twin.
    for local, out_path, ckpt in ((False, args.out, args.checkpoint_dir),
                                  (True, args.out.replace(".npz", "_local.npz"), None)):
        out = run(ckpt, parallel.make_mesh("data=4"), local)
        # fsdp leaves each process part of every parameter: parallel.fetch gathers them whole.
        params = {n: parallel.fetch(a) for n, a in zip(parameter_names(out.state.params),
                                                       jax.tree.leaves(out.state.params))}
        if index == 0:
            np.savez(out_path, step=int(out.state.step), **params)
    print("done", int(out.state.step), flush=True)


if __name__ == "__main__":
    main()
