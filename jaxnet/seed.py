"""The seed example: a 10 -> 5 -> 1 net trained with MSE and SGD (lr 0.01) for 1000 epochs.

Here as library code so the experiment, the benchmark and the tests run the same thing: the
jaxnet version (``train_jaxnet``) and the seed's own PyTorch loop (``train_torch``) from the same
initial weights and data.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from jaxnet import losses, optim, parallel
from jaxnet.data import RegressionData, make_regression
from jaxnet.interop import export_torch_state_dict
from jaxnet.models import SimpleNet
from jaxnet.studies import save_weights
from jaxnet.train import FitResult, TrainState, checkpoint, fit
from kernels.dispatch import BackendName


@dataclasses.dataclass(frozen=True)
class SeedConfig:
    # Rows of the synthetic regression set (10 features, see jaxnet.data.make_regression).
    n_samples: int = 256
    # Standard deviation of the target noise; noise_std**2 is the MSE floor on fresh data.
    noise_std: float = 0.1
    # Learning rate of the seed's optimiser: plain SGD on the full batch.
    learning_rate: float = 0.01
    # Passes over the data, one update each (full batch), >= 1.
    epochs: int = 1000
    # Seeds the data and the initial weights.
    seed: int = 0
    # Kernel backend of the dense layers ("auto": the fastest available here).
    backend: BackendName = "xla"

    def replace(self, **changes) -> "SeedConfig":
        return dataclasses.replace(self, **changes)


def make_data(config: SeedConfig) -> RegressionData:
    """``x: [n_samples, 10]``, ``y: [n_samples, 1]`` float32 from ``config.seed``."""
    return make_regression(config.n_samples, 10, noise_std=config.noise_std, seed=config.seed)


def make_state(config: SeedConfig, data: RegressionData) -> TrainState:
    """SimpleNet initialised from ``config.seed`` with the seed's SGD."""
    tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=config.learning_rate))
    return TrainState.create(model=SimpleNet(backend=config.backend), tx=tx, sample_x=data.x[:1],
                             seed=config.seed)


def train_jaxnet(config: SeedConfig, data: RegressionData, state: TrainState | None = None, *,
                 log_every: int | None = None, progress: bool = False, workdir=None,
                 epochs_per_call: int | None = None, tensorboard: bool = False,
                 profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
                 resume: bool = False, mesh=None, strategy: str = "dp") -> FitResult:
    """Full-batch SGD on MSE for ``config.epochs`` epochs, inside jitted ``lax.scan`` calls.

    ``tensorboard``, ``profile_steps``, ``mesh``, ``strategy``: as in ``fit``; ``checkpoint_every``,
    ``resume``: as
    ``jaxnet.train.checkpoint.run_options`` (under ``<workdir>/checkpoints``). On a mesh over
    several processes each passes only its rows of ``data`` where they divide
    (``parallel.process_shard``; ``train_data_shard`` says what happened).
    """
    state = make_state(config, data) if state is None else state
    shard = train_data_shard(data, mesh)
    return fit(state, shard.data, loss_fn=losses.mse, epochs=config.epochs, log_every=log_every,
               progress=progress, workdir=workdir, epochs_per_call=epochs_per_call,
               title="seed SimpleNet, MSE, SGD", tensorboard=tensorboard, profile_steps=profile_steps,
               mesh=mesh, strategy=strategy, process_local=shard.process_local,
               **checkpoint.run_options(workdir, checkpoint_every=checkpoint_every, resume=resume, config=config))


def train_data_shard(data: RegressionData, mesh) -> parallel.DataShard:
    """What ``train_jaxnet`` passes to ``fit``: ``(x, y)``, this process's rows of them where
    ``parallel.process_shard`` can split them over ``mesh``'s processes."""
    return parallel.process_shard((data.x, data.y), mesh, name="train_data")


def run(config: SeedConfig, *, compare_torch: bool = False, log_every: int | None = None,
        progress: bool = False, workdir=None, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Trains the seed example and returns its final metrics (what ``experiments.seed_simple_net`` prints).

    Args:
      config: the run; compare_torch: also run the seed's PyTorch loop from the same initial
        weights and data and compare the two loss curves (``curve_gap`` against
        ``float32_curve_tolerance``).
      log_every, progress, workdir, tensorboard, profile_steps: as in ``fit``.
      checkpoint_every, resume: as ``jaxnet.train.checkpoint.run_options`` (needs ``workdir``).
        With a ``workdir`` the final state is saved under ``<workdir>/checkpoints`` whatever
        ``checkpoint_every`` is; the result's ``"weights"`` names its folder.
      mesh, strategy: as in ``fit``.
    """
    data = make_data(config)
    state = make_state(config, data)
    init_params = state.params
    if compare_torch:  # the state is donated to training: keep the start for PyTorch
        import jax
        import jax.numpy as jnp

        init_params = jax.tree.map(jnp.copy, init_params)
    start = time.perf_counter()
    out = train_jaxnet(config, data, state, log_every=log_every, progress=progress, workdir=workdir,
                       tensorboard=tensorboard, profile_steps=profile_steps,
                       checkpoint_every=checkpoint_every, resume=resume, mesh=mesh, strategy=strategy)
    wall = time.perf_counter() - start
    curve = out.column("loss")
    result = {
        "experiment": "seed_simple_net",
        "backend": config.backend,
        "epochs": config.epochs,
        "initial_loss": curve[0],
        "final_loss": curve[-1],
        "noise_floor_mse": config.noise_std**2,
        "jaxnet_wall_s": round(wall, 4),
        "loss_curve_png": out.files.get("loss_curve"),
        **parallel.run_info(mesh, strategy, train_data_shard(data, mesh)),
    }
    if workdir is not None:
        result["weights"] = save_weights(workdir, out.state, config)
    if compare_torch:
        torch_curve, torch_wall = train_torch(config, data, init_params)
        gap = curve_gap(curve, torch_curve)
        tolerance = float32_curve_tolerance(config.epochs)
        result.update(torch_final_loss=float(torch_curve[-1]), torch_wall_s=round(torch_wall, 4), **gap,
                      rel_tolerance=tolerance, curves_agree=gap["max_rel_gap"] <= tolerance)
    return result


def torch_simple_net():
    """The seed's PyTorch model: fc1 Linear(10, 5), ReLU, fc2 Linear(5, 1) (needs torch)."""
    from jaxnet.seed_torch import TorchSimpleNet

    return TorchSimpleNet()


def train_torch(config: SeedConfig, data: RegressionData, params, *, log_every: int | None = None):
    """The seed's own PyTorch loop (``jaxnet.seed_torch.seed_loop``) from jaxnet's initial ``params``.

    Returns ``(losses, wall_s)``: the loss of every epoch and the loop's wall time.
    """
    from jaxnet.seed_torch import seed_loop

    model = torch_simple_net()
    model.load_state_dict(export_torch_state_dict({"params": params}))
    return seed_loop(model, data.x, data.y, learning_rate=config.learning_rate, epochs=config.epochs,
                     log_every=log_every)


def curve_gap(a, b) -> dict:
    """Largest absolute and relative gaps between two loss curves of equal length."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"loss curves differ in length: {a.shape} vs {b.shape}")
    gap = np.abs(a - b)
    return {"max_abs_gap": float(gap.max()), "max_rel_gap": float((gap / np.abs(b)).max())}


def float32_curve_tolerance(epochs: int) -> float:
    """Relative gap two float32 implementations of the same loop may show after ``epochs`` steps.

    Both sides round every product and sum to float32 (unit roundoff u = 2**-24 ≈ 6e-8) but in
    different orders (Eigen vs oneDNN/MKL), so each step adds a few u of independent rounding
    difference to the parameters; SGD at a small rate neither amplifies nor cancels them, so they
    add up like a random walk, ~sqrt(epochs) steps of ~8u (1.5e-5 relative after 1000 epochs).
    Any algorithmic difference (another lr, a missed bias, a loss scaled by 2) is percent-level.
    """
    return math.sqrt(epochs) * 8 * 2.0**-24
