"""Recommendation: explicit ratings (RMSE) and implicit feedback (HR@K, NDCG@K) with embedding models.

    result = run(Config(), "runs/recsys")        # what ``python -m experiments.recsys`` runs

Explicit: biased matrix factorisation on a random split of the ratings, beside the global mean
and user/item biases (``jaxnet.baselines.ratings``) and the generator's noise σ. Implicit:
leave-one-out ranking of each user's latest item among sampled unseen ones by MF, NCF and
two-tower models, beside popularity and (on generated data) the generator's own oracle.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
import typing
from typing import Literal

import numpy as np

from jaxnet.data.ratings import GeneratorConfig
from jaxnet.studies import save_weights
from kernels.dispatch import BackendName

Task = Literal["both", "explicit", "implicit"]
# The implicit-feedback models make_implicit_model builds.
ImplicitModel = Literal["mf", "ncf", "two_tower"]


@dataclasses.dataclass(frozen=True)
class Config:
    # Which task to run: both, explicit (ratings, RMSE) or implicit (ranking, HR@k and NDCG@k).
    task: Task = "both"
    # A MovieLens ratings file (u.data, ratings.dat or ratings.csv) instead of the generator ("": generator).
    data: str = ""
    # The generated world (--generator.num-users ...), when no data file is given.
    generator: GeneratorConfig = GeneratorConfig()
    # Seeds the splits, the sampled negatives and candidates, and the models' initialisation.
    seed: int = 0
    # Hold validation data out of training (explicit: 10% of the training ratings; implicit: each
    # user's latest training interaction) and report the metrics on it.
    validate: bool = False
    # Explicit: the random fraction of ratings held out as the test set, in (0, 1).
    test_fraction: float = 0.1
    # Explicit: width of the biased MF's user and item factors, >= 1.
    mf_dim: int = 8
    # Explicit: passes over the training ratings (Adam, cosine decay over all of them), >= 1.
    explicit_epochs: int = 30
    # Explicit: Adam's initial learning rate, > 0.
    explicit_lr: float = 2e-2
    # Explicit: weight of the L2 penalty on the parameters, >= 0.
    explicit_l2: float = 0.0
    # Explicit: initialisations of the MF (seeds seed, seed+1, ...) trained on the one split as one
    # sweep (jaxnet.train.fit_many), >= 1; the RMSEs are their mean (each in *_per_seed).
    explicit_seeds: int = 1
    # Implicit: the models to train, each on its own (mf, ncf, two_tower).
    implicit_models: tuple[ImplicitModel, ...] = ("mf", "ncf", "two_tower")
    # Implicit: sampled unseen items per training interaction (negatives, fresh each epoch), >= 1.
    num_negatives: int = 4
    # Implicit: sampled unseen items each test item is ranked among, >= 1.
    eval_negatives: int = 99
    # Implicit: the cut-off k of HR@k and NDCG@k, >= 1.
    top_k: int = 10
    # Implicit: passes over the training interactions, >= 1.
    implicit_epochs: int = 8
    # Implicit: Adam's initial learning rate (cosine decay over all updates), > 0.
    implicit_lr: float = 1e-2
    # Implicit: width of every model's embeddings (NCF: both branches; two-tower: towers 2d, d), >= 1.
    implicit_dim: int = 32
    # Examples per update, both tasks, >= 1.
    batch_size: int = 8192
    # Kernel backend of the dense layers of NCF and two-tower ("auto": the fastest available here).
    backend: BackendName = "xla"
    # Show a progress bar on stderr while the explicit model trains.
    progress: bool = False

    def __post_init__(self):  # for Config(...) in Python; the flags are checked when parsed
        if self.task not in typing.get_args(Task):
            raise ValueError(f"task must be one of {typing.get_args(Task)}, got {self.task!r}")
        if self.explicit_seeds < 1:
            raise ValueError(f"explicit_seeds must be >= 1, got {self.explicit_seeds}")
        unknown = [m for m in self.implicit_models if m not in typing.get_args(ImplicitModel)]
        if unknown:
            raise ValueError(f"implicit_models: unknown {unknown}; choose from {typing.get_args(ImplicitModel)}")


def load(config: Config):
    """``(Ratings with dense ids, σ or None, SyntheticRatings or None)``."""
    from jaxnet.data import ratings as R

    if config.data:
        data, _, _ = R.reindex(R.load_movielens(config.data))
        return data, None, None
    world = R.generate_ratings(config.generator)
    return world.ratings, world.noise_std, world


def rmse(pred, target) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - target) ** 2)))


def run_explicit(config: Config, data, sigma, workdir, checkpoints: dict | None = None, **fit_options) -> dict:
    """Biased MF on a random split of the ratings: test RMSE beside the baselines' (and σ's).

    ``checkpoints``: ``jaxnet.train.checkpoint.run_options`` keywords (none when None). On a
    ``mesh`` over several processes each passes ``fit`` only its rows of the training and
    validation ratings where they divide (``parallel.process_shard``; ``"data_split"`` says).
    """
    from jaxnet import losses, optim, parallel
    from jaxnet.baselines.ratings import bias_baseline
    from jaxnet.data.ratings import random_split
    from jaxnet.models import MatrixFactorization
    from jaxnet.train import TrainState, checkpoint, fit, fit_many, sweep

    train, test = random_split(data, test_fraction=config.test_fraction, seed=config.seed)
    val = None
    if config.validate:
        train, val = random_split(train, test_fraction=0.1, seed=config.seed + 1)
    mu = float(train.rating.mean())
    steps = config.explicit_epochs * -(-len(train) // config.batch_size)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=config.explicit_lr,
                                                    schedule="cosine", total_steps=steps))
    model = MatrixFactorization(data.num_users, data.num_items, dim=config.mf_dim, offset=mu)
    start = time.perf_counter()
    shard = parallel.process_shard({"train": (train.pairs, train.rating),
                                    "val": None if val is None else (val.pairs, val.rating)},
                                   fit_options.get("mesh"), name="train and validation ratings")
    seeds = range(config.seed, config.seed + config.explicit_seeds)
    folders = [workdir / "explicit"] if len(seeds) == 1 else [workdir / "explicit" / f"seed{s}" for s in seeds]
    options = dict(loss_fn=losses.mse, x_kind="ids", epochs=config.explicit_epochs, batch_size=config.batch_size,
                   l2=config.explicit_l2, eval_every=5, progress=config.progress, title="biased MF, MSE")
    checkpoints = checkpoints or {"checkpoint_every": None}
    why_not = sweep.not_one_program(steps, mesh=fit_options.get("mesh"), resume=checkpoints.get("resume", False),
                                    tensorboard=fit_options.get("tensorboard", False),
                                    profile_steps=fit_options.get("profile_steps"),
                                    checkpoint_every=checkpoints.get("checkpoint_every"))
    if why_not is None:  # the seeds as one program, each model as its own fit would train it
        runs = fit_many(lambda s: TrainState.create(model=model, tx=tx, sample_x=train.pairs[:1], seed=s),
                        shard.data["train"], seeds=seeds, val_data=shard.data["val"], **options)
        files = [sweep.write_logs(r, folder, title=options["title"]) for r, folder in zip(runs, folders)]
    else:
        runs = [fit(TrainState.create(model=model, tx=tx, sample_x=train.pairs[:1], seed=s), shard.data["train"],
                    val_data=shard.data["val"], process_local=shard.process_local, workdir=folder,
                    **checkpoint.run_options(folder, **checkpoints), **options, **fit_options)
                for s, folder in zip(seeds, folders)]
        files = [r.files for r in runs]
    train_wall = time.perf_counter() - start
    predicts = [_predictor(r.state) for r in runs]
    mean_rmse = lambda pairs, rating: float(np.mean([rmse(p(pairs), rating) for p in predicts]))  # noqa: E731
    out = {"model": "mf", "n_train": len(train), "n_test": len(test),
           "test_rmse": mean_rmse(test.pairs, test.rating), "train_wall_s": round(train_wall, 2),
           "trained_as": "one sweep (fit_many)" if why_not is None else f"one fit per seed: {why_not}"}
    if len(seeds) > 1:
        out["test_rmse_per_seed"] = [rmse(p(test.pairs), test.rating) for p in predicts]
    baseline = bias_baseline(train)
    out["baseline_global_mean_rmse"] = rmse(np.full(len(test), mu), test.rating)
    out["baseline_biases_rmse"] = rmse(baseline(test.user, test.item), test.rating)
    if val is not None:
        out["val_rmse"] = mean_rmse(val.pairs, val.rating)
        out["baseline_biases_val_rmse"] = rmse(baseline(val.user, val.item), val.rating)
    if sigma is not None:
        out["sigma"] = sigma
        out["test_rmse_over_sigma"] = out["test_rmse"] / sigma
        if val is not None:
            out["val_rmse_over_sigma"] = out["val_rmse"] / sigma
    out["loss_curve_png"] = files[0].get("loss_curve")
    weights = [save_weights(folder, r.state, config) for r, folder in zip(runs, folders)]
    out["weights"] = weights[0] if len(seeds) == 1 else weights
    if fit_options.get("mesh") is not None:
        out.update(shard.info())
    return out


def _predictor(state):
    """``pairs int32 [n, 2] -> float [n]`` scores, jitted, in chunks of fixed size (one compile)."""
    import jax

    apply = jax.jit(lambda s, x: s.apply_fn(s.variables, x, train=False))
    chunk = 65536

    def predict(pairs):
        n = len(pairs)
        padded = np.concatenate([pairs, np.zeros((-n % chunk, 2), pairs.dtype)])
        return np.concatenate([np.asarray(apply(state, padded[i:i + chunk]))
                               for i in range(0, len(padded), chunk)])[:n]

    return predict


def make_implicit_model(name: str, config: Config, num_users: int, num_items: int):
    from jaxnet.models import NCF, MatrixFactorization, TwoTower

    d = config.implicit_dim
    if name == "mf":
        return MatrixFactorization(num_users, num_items, dim=d)
    if name == "ncf":
        return NCF(num_users, num_items, gmf_dim=d, mlp_dim=d, backend=config.backend)
    if name == "two_tower":
        return TwoTower(num_users, num_items, dim=d, tower_features=(2 * d, d), backend=config.backend)
    raise ValueError(f"unknown implicit model {name!r}; choose mf, ncf or two_tower")


def ranking_scores(scores: np.ndarray, k: int) -> dict:
    """HR@k and NDCG@k of ``scores: [U, 1 + N]`` (positive in column 0)."""
    from jaxnet import metrics

    return {f"hr@{k}": float(np.mean(metrics.hit_rate_at_k(scores, k))),
            f"ndcg@{k}": float(np.mean(metrics.ndcg_at_k(scores, k)))}


def run_implicit(config: Config, data, world, workdir, checkpoints: dict | None = None, **fit_options) -> dict:
    """Each implicit model, leave-one-out: HR@k and NDCG@k beside popularity (and the oracle).

    On a ``mesh`` over several processes each passes ``fit`` only its rows of every epoch's
    examples where they divide (``parallel.process_shard``; ``"data_split"`` says).
    """
    from jaxnet import losses, optim, parallel
    from jaxnet.baselines.ratings import popularity
    from jaxnet.data import ratings as R
    from jaxnet.train import TrainState, checkpoint, fit

    exclude = R.interaction_keys(data)  # negatives are items the user never touched, in any split
    train, test = R.leave_one_out(data)
    val = None
    if config.validate:
        train, val = R.leave_one_out(train)
    candidates = {"test": R.ranking_candidates(test, exclude, config.eval_negatives, seed=config.seed + 7)}
    if val is not None:
        candidates["val"] = R.ranking_candidates(val, exclude, config.eval_negatives, seed=config.seed + 8)
    rows = {"test": test, "val": val}
    k = config.top_k
    out = {"n_train": len(train), "n_test_users": len(test), "eval_negatives": config.eval_negatives, "models": {}}

    def pair_grid(split):  # (U, 1 + N, 2) user-item pairs of the candidates
        cand = candidates[split]
        return np.stack([np.broadcast_to(rows[split].user[:, None], cand.shape), cand], -1).astype(np.int32)

    popular = popularity(train, data.num_items, config.seed)
    for split in candidates:
        out[f"popularity_{split}"] = ranking_scores(popular[candidates[split]], k)
    if world is not None:  # the generator's own selection logits: a ceiling for any model
        oracle = world.selection_logits(test.user[:, None], candidates["test"])
        out["oracle_test"] = ranking_scores(oracle, k)

    steps = config.implicit_epochs * -(-len(train) * (1 + config.num_negatives) // config.batch_size)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=config.implicit_lr,
                                                    schedule="cosine", total_steps=steps))
    for name in config.implicit_models:
        model = make_implicit_model(name, config, data.num_users, data.num_items)
        start = time.perf_counter()
        state = TrainState.create(model=model, tx=tx, sample_x=train.pairs[:1], seed=config.seed)
        losses_by_epoch = []
        for epoch in range(config.implicit_epochs):
            # Fresh negatives every epoch; the example count is constant, so fit reuses its compilation.
            pairs, labels = R.implicit_examples(train, config.num_negatives, exclude,
                                                seed=config.seed * 100_003 + epoch)
            shard = parallel.process_shard((pairs, labels), fit_options.get("mesh"), name="implicit examples")
            run = fit(state, shard.data, loss_fn=losses.binary_cross_entropy, x_kind="ids",
                      epochs=epoch + 1, batch_size=config.batch_size, progress=False, plot=False,
                      process_local=shard.process_local,
                      workdir=workdir / f"implicit_{name}", title=f"{name}, implicit",
                      **checkpoint.run_options(workdir / f"implicit_{name}",
                                               **(checkpoints or {"checkpoint_every": None})),
                      **fit_options)
            state = run.state
            losses_by_epoch.append(run.history[-1]["loss"])
        predict = _predictor(state)
        res = {"train_loss_first_last": [losses_by_epoch[0], losses_by_epoch[-1]],
               "train_wall_s": round(time.perf_counter() - start, 2),
               "weights": save_weights(workdir / f"implicit_{name}", state, config)}
        for split in candidates:
            grid = pair_grid(split)
            res[split] = ranking_scores(predict(grid.reshape(-1, 2)).reshape(grid.shape[:2]), k)
        popular = out["popularity_test"][f"hr@{k}"]
        # Undefined when popularity hits nothing (small data): reported as None, not divided by zero.
        res[f"hr@{k}_over_popularity"] = res["test"][f"hr@{k}"] / popular if popular > 0 else None
        out["models"][name] = res
        if fit_options.get("mesh") is not None:
            out.update(shard.info())  # the same every epoch and model: the example count is fixed
        print(f"implicit {name}: test {res['test']}  ({res['train_wall_s']} s)", file=sys.stderr, flush=True)
    return out


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Both tasks (or the one ``config.task`` names); returns the final metrics.

    Writes ``explicit/`` and ``implicit_<model>/`` logs and ``checkpoints/`` into ``workdir``; each
    model's final weights are saved there whatever ``checkpoint_every`` is (its ``"weights"``).
    ``tensorboard``, ``profile_steps``, ``mesh``, ``strategy``: as in ``fit``; ``checkpoint_every``,
    ``resume``: as
    ``jaxnet.train.checkpoint.run_options``.
    """
    from jaxnet import parallel

    workdir = pathlib.Path(workdir)
    fit_options = {"tensorboard": tensorboard, "profile_steps": profile_steps, "mesh": mesh,
                   "strategy": strategy,
                   "checkpoints": {"checkpoint_every": checkpoint_every, "resume": resume, "config": config}}
    start = time.perf_counter()
    data, sigma, world = load(config)
    result = {"experiment": "recsys", "data": config.data or "generator", "n_users": data.num_users,
              "n_items": data.num_items, "n_interactions": len(data), "sigma": sigma,
              **parallel.run_info(mesh, strategy)}
    if config.task in ("both", "explicit"):
        result["explicit"] = run_explicit(config, data, sigma, workdir, **fit_options)
        print(f"explicit: {result['explicit']}", file=sys.stderr, flush=True)
    if config.task in ("both", "implicit"):
        result["implicit"] = run_implicit(config, data, world, workdir, **fit_options)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


__all__ = ["Config", "load", "make_implicit_model", "ranking_scores", "rmse", "run", "run_explicit", "run_implicit"]
