"""One process of the multi-process time-budget test: ``python tests/budget_worker.py [BUDGET_S]``.

Started by ``python -m jaxnet.launch`` (which sets the JAXNET_* variables): joins the job and
trains a bigram model with ``fit_stream(budget_s=BUDGET_S)`` (default 2) under ``data=4``, process
1's clock running 3x as fast as process 0's (the ``time`` of ``jaxnet.train.stream``). Prints
``process I: S steps, fractions F`` (F: a digest of the fractions handed to ``before_step``) and
the mean cost of one ``jaxnet.train.stream.agree`` (the broadcast of process 0's clock) over 50
calls. Not collected by pytest.
"""
from __future__ import annotations

import hashlib
import sys
import time


class FastClock:
    """A ``time`` whose perf_counter runs ``rate`` times as fast as the real one."""

    def __init__(self, rate: float):
        self.rate, self.start = rate, time.perf_counter()

    def perf_counter(self) -> float:
        return self.start + self.rate * (time.perf_counter() - self.start)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    budget = float(argv[0]) if argv else 2.0
    from jaxnet import parallel

    index = parallel.initialize()
    import flax.linen as nn
    import numpy as np

    from jaxnet import optim
    from jaxnet.train import TrainState, stream

    class Bigram(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Embed(8, 8)(x)  # (B, T, 8)

    if index == 1:
        stream.time = FastClock(3.0)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1))
    state = TrainState.create(model=Bigram(), tx=tx, sample_x=np.zeros((1, 4), np.int32), seed=0)
    fractions = []
    out = stream.fit_stream(state, np.arange(400) % 8, steps=10**6, batch_size=4, block_size=4, log_every=10,
                            budget_s=budget, before_step=lambda s, f: fractions.append(f) or s,
                            mesh=parallel.make_mesh("data=4"), progress=False)
    digest = hashlib.sha256(np.array(fractions, np.float64).tobytes()).hexdigest()[:16]
    print(f"process {index}: {int(out.state.step)} steps, fractions {digest}", flush=True)
    t = time.perf_counter()
    for _ in range(50):
        stream.agree([t])
    print(f"process {index}: agree {(time.perf_counter() - t) / 50 * 1e3:.2f} ms, "
          f"step {out.train_s / int(out.state.step) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
