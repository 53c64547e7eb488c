"""Recommendation: explicit ratings (RMSE) and implicit feedback (HR@10, NDCG@10) with embedding models.

    python -m experiments.recsys                          # default generator, both tasks
    python -m experiments.recsys --task explicit          # MF on ratings only
    python -m experiments.recsys --validate               # hold validation out of training, report it
    python -m experiments.recsys --data ml-100k/u.data    # MovieLens (u.data, ratings.dat, ratings.csv)

Data: the seeded generator (jaxnet.data.ratings.GeneratorConfig: 2,000 users x 1,000 items, about
400k interactions, rank-8 preferences, Zipf popularity, noise σ = 0.5 on every rating).

- Explicit: a random 10% of ratings is the test set; biased matrix factorisation trained with
  MSE; RMSE beside the generator's σ (the floor no model can beat) and the baselines
  "global mean" and "global mean + user/item biases" (damped least squares).
- Implicit: leave-one-out (each user's latest interaction is the test item); MF, NCF and the
  two-tower model trained with binary cross-entropy on every interaction and 4 sampled unseen
  items per interaction (fresh each epoch); each test item ranked among 99 sampled unseen items:
  HR@10 and NDCG@10 beside the popularity baseline (and, on generated data, the oracle that ranks
  by the generator's own selection logits).

Settings were chosen with ``--validate`` (validation split of the training data), never on the
test split. Writes ``explicit/`` and ``implicit_<model>/`` logs, ``result.json``; ends with one
JSON line. Measured (docs/benchmarks.md, "Recommendation"; 2 shared cores, about 1 minute):
RMSE 1.040σ (biases baseline 1.41σ); HR@10 0.84 for MF, NCF and two-tower, 2.5x popularity (0.34).
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from experiments.common import enable_compilation_cache, finish, parse_config


@dataclasses.dataclass(frozen=True)
class Config:
    # "both", "explicit" or "implicit".
    task: str = "both"
    # A MovieLens ratings file instead of the generator ("" = generator).
    data: str = ""
    # Generator (see jaxnet.data.ratings.GeneratorConfig for the meaning of each).
    num_users: int = 2000
    num_items: int = 1000
    ratings_per_user: int = 200
    rank: int = 8
    noise_std: float = 0.5
    popularity_exponent: float = 1.0
    selection_strength: float = 3.0
    seed: int = 0
    # Hold validation data out of training (explicit: 10% of the training ratings; implicit: each
    # user's latest training interaction) and report the metrics on it.
    validate: bool = False
    # Explicit: biased MF, Adam with cosine decay, minibatches, L2 on the factors.
    test_fraction: float = 0.1
    mf_dim: int = 8
    explicit_epochs: int = 30
    explicit_lr: float = 2e-2
    explicit_l2: float = 0.0
    # Implicit: models, negatives per interaction, epochs, learning rate, batch size.
    implicit_models: tuple[str, ...] = ("mf", "ncf", "two_tower")
    num_negatives: int = 4
    eval_negatives: int = 99
    top_k: int = 10
    implicit_epochs: int = 8
    implicit_lr: float = 1e-2
    implicit_dim: int = 32
    batch_size: int = 8192
    # Kernel backend of the dense layers (NCF, two-tower).
    backend: str = "xla"
    progress: bool = False


def load(config: Config):
    """``(Ratings with dense ids, σ or None, SyntheticRatings or None)``."""
    from jaxnet.data import ratings as R

    if config.data:
        data, _, _ = R.reindex(R.load_movielens(config.data))
        return data, None, None
    gen = R.GeneratorConfig(num_users=config.num_users, num_items=config.num_items,
                            ratings_per_user=config.ratings_per_user, rank=config.rank,
                            noise_std=config.noise_std, popularity_exponent=config.popularity_exponent,
                            selection_strength=config.selection_strength, seed=config.seed)
    world = R.generate_ratings(gen)
    return world.ratings, world.noise_std, world


def bias_baseline(train, damping: float = 5.0, sweeps: int = 10):
    """``predict(user, item)`` of ``mu + b_u + b_i`` fitted by damped alternating least squares
    (Koren's baseline predictor): ``b_i = sum(r - mu - b_u) / (n_i + damping)``, then ``b_u`` alike."""
    mu = float(train.rating.mean())
    bu, bi = np.zeros(train.num_users), np.zeros(train.num_items)
    nu = np.bincount(train.user, minlength=train.num_users)
    ni = np.bincount(train.item, minlength=train.num_items)
    for _ in range(sweeps):
        bi = np.bincount(train.item, train.rating - mu - bu[train.user], train.num_items) / (ni + damping)
        bu = np.bincount(train.user, train.rating - mu - bi[train.item], train.num_users) / (nu + damping)
    return lambda user, item: mu + bu[user] + bi[item]


def rmse(pred, target) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - target) ** 2)))


def run_explicit(config: Config, data, sigma, workdir) -> dict:
    from jaxnet import losses, optim
    from jaxnet.data.ratings import random_split
    from jaxnet.models import MatrixFactorization
    from jaxnet.train import TrainState, fit

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
    state = TrainState.create(model=model, tx=tx, sample_x=train.pairs[:1], seed=config.seed)
    run = fit(state, (train.pairs, train.rating), loss_fn=losses.mse, x_kind="ids",
              epochs=config.explicit_epochs, batch_size=config.batch_size, l2=config.explicit_l2,
              val_data=None if val is None else (val.pairs, val.rating), eval_every=5,
              progress=config.progress, workdir=workdir / "explicit", title="biased MF, MSE")
    predict = _predictor(run.state)
    out = {"model": "mf", "n_train": len(train), "n_test": len(test),
           "test_rmse": rmse(predict(test.pairs), test.rating), "train_wall_s": round(time.perf_counter() - start, 2)}
    baseline = bias_baseline(train)
    out["baseline_global_mean_rmse"] = rmse(np.full(len(test), mu), test.rating)
    out["baseline_biases_rmse"] = rmse(baseline(test.user, test.item), test.rating)
    if val is not None:
        out["val_rmse"] = rmse(predict(val.pairs), val.rating)
        out["baseline_biases_val_rmse"] = rmse(baseline(val.user, val.item), val.rating)
    if sigma is not None:
        out["sigma"] = sigma
        out["test_rmse_over_sigma"] = out["test_rmse"] / sigma
        if val is not None:
            out["val_rmse_over_sigma"] = out["val_rmse"] / sigma
    out["loss_curve_png"] = run.files.get("loss_curve")
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


def run_implicit(config: Config, data, world, workdir) -> dict:
    from jaxnet import losses, optim
    from jaxnet.data import ratings as R
    from jaxnet.train import TrainState, fit

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

    # Popularity: training counts, ties broken at random (an integer count plus noise below 1).
    jitter = np.random.default_rng(config.seed).uniform(0, 0.5, data.num_items)
    popularity = np.bincount(train.item, minlength=data.num_items) + jitter
    for split in candidates:
        out[f"popularity_{split}"] = ranking_scores(popularity[candidates[split]], k)
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
            run = fit(state, (pairs, labels), loss_fn=losses.binary_cross_entropy, x_kind="ids",
                      epochs=epoch + 1, batch_size=config.batch_size, progress=False, plot=False,
                      workdir=workdir / f"implicit_{name}", title=f"{name}, implicit")
            state = run.state
            losses_by_epoch.append(run.history[-1]["loss"])
        predict = _predictor(state)
        res = {"train_loss_first_last": [losses_by_epoch[0], losses_by_epoch[-1]],
               "train_wall_s": round(time.perf_counter() - start, 2)}
        for split in candidates:
            grid = pair_grid(split)
            res[split] = ranking_scores(predict(grid.reshape(-1, 2)).reshape(grid.shape[:2]), k)
        res[f"hr@{k}_over_popularity"] = res["test"][f"hr@{k}"] / out["popularity_test"][f"hr@{k}"]
        out["models"][name] = res
        print(f"implicit {name}: test {res['test']}  ({res['train_wall_s']} s)", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    config, workdir = parse_config(Config, argv, name="recsys", description=__doc__.splitlines()[0])
    if config.task not in ("both", "explicit", "implicit"):
        raise SystemExit(f"--task must be both, explicit or implicit, got {config.task!r}")
    enable_compilation_cache()
    start = time.perf_counter()
    data, sigma, world = load(config)
    result = {"experiment": "recsys", "data": config.data or "generator", "n_users": data.num_users,
              "n_items": data.num_items, "n_interactions": len(data), "sigma": sigma}
    if config.task in ("both", "explicit"):
        result["explicit"] = run_explicit(config, data, sigma, workdir)
        print(f"explicit: {result['explicit']}", file=sys.stderr, flush=True)
    if config.task in ("both", "implicit"):
        result["implicit"] = run_implicit(config, data, world, workdir)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return finish(result, workdir)


if __name__ == "__main__":
    main()
