"""Recommendation: MovieLens loaders on shipped samples, re-indexing, splits, negative sampling, the
generator, ranking metrics by hand, the models' invariants, fit on id inputs, the experiment."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses, metrics, optim
from jaxnet.data import ratings as R
from jaxnet.models import NCF, MatrixFactorization, TwoTower
from jaxnet.train import TrainState, fit

DATA = pathlib.Path(__file__).parent / "data"


# --- loaders, re-indexing, splits -------------------------------------------------------------------

def test_load_u_data_sample():
    data = R.load_movielens(DATA / "u.data")
    assert len(data) == 12
    assert (data.user[0], data.item[0], data.rating[0], data.timestamp[0]) == (196, 242, 3.0, 881250949)
    assert data.rating.dtype == np.float32 and data.num_users == 306


def test_load_ratings_csv_sample():
    data = R.load_movielens(DATA / "ratings.csv")
    assert len(data) == 10
    np.testing.assert_array_equal(data.user, [1, 1, 1, 1, 1, 2, 2, 2, 3, 3])
    np.testing.assert_allclose(data.rating[[7, 8]], [4.5, 0.5])
    assert data.item[7] == 1704 and data.timestamp[-1] == 1306464275


def test_load_refuses_a_wrong_header(tmp_path):
    (tmp_path / "r.csv").write_text("user,item,score\n1,2,3\n")
    with pytest.raises(ValueError, match="header"):
        R.load_movielens(tmp_path / "r.csv")


def test_reindex_gives_dense_ids_that_map_back():
    raw = R.load_movielens(DATA / "u.data")
    dense, user_ids, item_ids = R.reindex(raw)
    assert dense.num_users == len(set(raw.user)) == 10 and dense.num_items == len(set(raw.item)) == 10
    assert set(dense.user) == set(range(10)) and set(dense.item) == set(range(10))
    np.testing.assert_array_equal(user_ids[dense.user], raw.user)
    np.testing.assert_array_equal(item_ids[dense.item], raw.item)
    assert dense.pairs.shape == (12, 2) and dense.pairs.dtype == np.int32


def test_random_split_partitions_the_ratings():
    data, _, _ = R.reindex(R.load_movielens(DATA / "u.data"))
    train, test = R.random_split(data, test_fraction=0.25, seed=0)
    assert len(train) == 9 and len(test) == 3
    both = sorted(zip(*train.pairs.T, train.rating)) + sorted(zip(*test.pairs.T, test.rating))
    assert sorted(both) == sorted(zip(*data.pairs.T, data.rating))


def test_leave_one_out_holds_out_each_users_latest():
    data = R.load_movielens(DATA / "ratings.csv")
    train, test = R.leave_one_out(data)
    # users 1, 2, 3: latest timestamps are items 47, 1704, 527
    np.testing.assert_array_equal(test.user, [1, 2, 3])
    np.testing.assert_array_equal(test.item, [47, 1704, 527])
    assert len(train) == 7 and not set(zip(train.user, train.item)) & set(zip(test.user, test.item))


def test_negatives_are_never_seen_items_even_for_heavy_users():
    # user 0 has seen every item but 5; user 1 has seen two items.
    seen_user = np.r_[np.zeros(9, int), 1, 1]
    seen_item = np.r_[[i for i in range(10) if i != 5], 0, 1]
    data = R.Ratings(seen_user, seen_item, np.ones(11, np.float32), np.arange(11), 2, 10)
    exclude = R.interaction_keys(data)
    neg = R.sample_negatives(np.array([0, 1, 1]), 10, 50, exclude, seed=3)
    assert neg.shape == (3, 50) and neg.dtype == np.int32
    assert np.all(neg[0] == 5)
    assert not np.isin(neg[1:], [0, 1]).any() and neg.min() >= 0 and neg.max() < 10
    pairs, labels = R.implicit_examples(data.subset(np.array([9, 10])), 2, exclude, seed=0)
    assert pairs.shape == (6, 2) and labels.tolist() == [1, 1, 0, 0, 0, 0]
    cands = R.ranking_candidates(data.subset(np.array([9])), exclude, 4)
    assert cands.shape == (1, 5) and cands[0, 0] == 0 and not np.isin(cands[0, 1:], [0, 1]).any()


def test_generator_has_the_promised_structure():
    config = R.GeneratorConfig(num_users=300, num_items=200, ratings_per_user=40, noise_std=0.4, seed=1)
    world = R.generate_ratings(config)
    data = world.ratings
    assert data.num_users == 300 and data.num_items == 200
    assert len(set(zip(data.user, data.item))) == len(data)  # no repeated (user, item)
    counts = np.bincount(data.user, minlength=300)
    assert counts.min() >= 20 and counts.max() <= 100
    noise = data.rating - world.expected_rating(data.user, data.item)
    assert abs(noise.std() / 0.4 - 1) < 0.03 and abs(noise.mean()) < 0.01
    popular = np.sort(np.bincount(data.item, minlength=200))[::-1]
    assert popular[:20].sum() > 0.2 * len(data)  # 10% of items, twice their share of interactions
    again = R.generate_ratings(config)
    np.testing.assert_array_equal(again.ratings.rating, data.rating)


# --- ranking metrics by hand -------------------------------------------------------------------------

def test_hit_rate_and_ndcg_on_a_tiny_ranking():
    scores = jnp.array([
        [0.9, 0.1, 0.5, 0.2],   # positive first: rank 0
        [0.3, 0.4, 0.9, 0.1],   # two above: rank 2
        [0.0, 0.4, 0.9, 0.1],   # last: rank 3
        [0.5, 0.5, 0.1, 0.1],   # a tie counts against the positive: rank 1
    ])
    np.testing.assert_array_equal(metrics.rank_of_first(scores), [0, 2, 3, 1])
    np.testing.assert_array_equal(metrics.hit_rate_at_k(scores, 2), [1, 0, 0, 1])
    np.testing.assert_array_equal(metrics.hit_rate_at_k(scores, 3), [1, 1, 0, 1])
    np.testing.assert_allclose(metrics.ndcg_at_k(scores, 3), [1.0, 0.5, 0.0, 1 / np.log2(3)], rtol=1e-6)


# --- models ----------------------------------------------------------------------------------------

MODELS = {
    "mf": lambda: MatrixFactorization(7, 5, dim=4, offset=3.0),
    "ncf": lambda: NCF(7, 5, gmf_dim=4, mlp_dim=3, mlp_features=(6, 4)),
    "two_tower": lambda: TwoTower(7, 5, dim=4, tower_features=(6, 3)),
}


def _permute_tables(params, user_perm, item_perm):
    """Rows of every user (item) table moved so that new id ``user_perm[old]`` holds old row ``old``."""
    def move(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "user" in name and leaf.shape[0] == len(user_perm):
            return jnp.zeros_like(leaf).at[user_perm].set(leaf)
        if "item" in name and leaf.shape[0] == len(item_perm):
            return jnp.zeros_like(leaf).at[item_perm].set(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_scores_are_consistent_under_id_reindexing(name):
    model = MODELS[name]()
    pairs = np.stack(np.meshgrid(np.arange(7), np.arange(5), indexing="ij"), -1).reshape(-1, 2).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), pairs)
    apply = jax.jit(model.apply)
    scores = apply(variables, pairs)
    assert scores.shape == (35,) and scores.dtype == jnp.float32
    rng = np.random.default_rng(0)
    user_perm, item_perm = rng.permutation(7), rng.permutation(5)
    moved = {"params": _permute_tables(variables["params"], user_perm, item_perm)}
    renamed = np.stack([user_perm[pairs[:, 0]], item_perm[pairs[:, 1]]], -1).astype(np.int32)
    np.testing.assert_allclose(apply(moved, renamed), scores, rtol=1e-6, atol=1e-6)


def test_mf_score_is_the_biased_dot_product():
    model = MODELS["mf"]()
    pairs = np.array([[0, 1], [6, 4]], np.int32)
    params = jax.jit(model.init)(jax.random.key(0), pairs)["params"]
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero biases too
    p, q = params["user_factors"]["embedding"], params["item_factors"]["embedding"]
    bu, bi = params["user_bias"]["embedding"][:, 0], params["item_bias"]["embedding"][:, 0]
    expected = [3.0 + bu[u] + bi[i] + p[u] @ q[i] for u, i in pairs]
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, pairs), expected, rtol=1e-6)


def test_two_tower_vectors_give_the_scores():
    model = MODELS["two_tower"]()
    pairs = np.array([[0, 1], [3, 2], [6, 4]], np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), pairs)
    both = jax.jit(lambda v, x: (model.apply(v, x[:, 0], method=TwoTower.user_vectors),
                                 model.apply(v, x[:, 1], method=TwoTower.item_vectors), model.apply(v, x)))
    u, v, scores = both(variables, pairs)
    np.testing.assert_allclose(scores, np.sum(u * v, -1), rtol=1e-5, atol=1e-6)


def test_models_refuse_float_or_misshapen_ids():
    model = MODELS["mf"]()
    with pytest.raises(TypeError, match="integers"):
        model.init(jax.random.key(0), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model.init(jax.random.key(0), np.zeros((2, 3), np.int32))


# --- training on id inputs ---------------------------------------------------------------------------

def test_fit_on_id_pairs_lowers_the_loss_and_checks_ids():
    world = R.generate_ratings(R.GeneratorConfig(num_users=100, num_items=60, ratings_per_user=25, seed=2))
    data = world.ratings
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=3e-2))
    model = MatrixFactorization(100, 60, dim=4, offset=float(data.rating.mean()))
    state = TrainState.create(model=model, tx=tx, sample_x=data.pairs[:1], seed=0)
    run = fit(state, (data.pairs, data.rating), loss_fn=losses.mse, x_kind="ids", epochs=6, batch_size=512,
              val_data=(data.pairs[:200], data.rating[:200]), eval_every=6, progress=False)
    loss = run.column("loss")
    assert loss[-1] < 0.7 * loss[0]
    with pytest.raises(TypeError, match="integer ids"):
        fit(run.state, (data.pairs.astype(np.float32), data.rating), loss_fn=losses.mse, x_kind="ids",
            epochs=7, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        fit(run.state, (data.pairs - 1, data.rating), loss_fn=losses.mse, x_kind="ids", epochs=7, progress=False)
    with pytest.raises(TypeError, match="floating-point"):  # the default still wants float inputs
        fit(run.state, (data.pairs, data.rating), loss_fn=losses.mse, epochs=7, progress=False)


def test_recsys_experiment_end_to_end_on_a_small_generator(tmp_path):
    from experiments import recsys

    result = recsys.main(["--generator.num-users", "60", "--generator.num-items", "50", "--generator.ratings-per-user", "20",
                          "--explicit-epochs", "2", "--implicit-epochs", "2", "--implicit-models", "mf", "ncf",
                          "--batch-size", "256", "--validate", "--workdir", str(tmp_path)])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["sigma"] == 0.5 and saved["explicit"]["test_rmse_over_sigma"] > 0
    assert {"baseline_biases_rmse", "baseline_global_mean_rmse", "val_rmse"} <= set(saved["explicit"])
    implicit = saved["implicit"]
    assert set(implicit["models"]) == {"mf", "ncf"} and implicit["n_test_users"] == 60
    for res in implicit["models"].values():
        assert 0 <= res["test"]["hr@10"] <= 1 and 0 <= res["val"]["ndcg@10"] <= 1
    assert 0 < implicit["popularity_test"]["hr@10"] < 1 and "oracle_test" in implicit


def test_the_experiment_runs_on_the_shipped_sample_and_reports_undefined_ratios(tmp_path, monkeypatch):
    """On ratings.csv the popularity baseline hits nothing: the ratio to it is undefined (None),
    not a ZeroDivisionError, and the run writes its result."""
    from experiments import recsys

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    result = recsys.main(["--data", str(DATA / "ratings.csv"), "--task", "implicit", "--implicit-models", "mf",
                          "--implicit-epochs", "2", "--no-progress", "--checkpoint-every", "0",
                          "--workdir", str(tmp_path)])
    models = result["implicit"]["models"]
    assert result["implicit"]["popularity_test"]["hr@10"] == 0
    assert all(m["hr@10_over_popularity"] is None for m in models.values())
    assert (tmp_path / "result.json").exists()
    # the final weights, saved with --checkpoint-every 0 too, named in the result
    from jaxnet.train import checkpoint

    weights = pathlib.Path(models["mf"]["weights"])
    assert weights.parent == tmp_path / "implicit_mf" / "checkpoints"
    assert checkpoint.steps(weights.parent) == [int(weights.name)]


def test_the_implicit_task_on_a_mesh_of_this_process_devices_finishes(tmp_path):
    """Issue 18: ``--mesh data=2 --task implicit`` in one process with 2 CPU devices aborted in XLA
    ("Termination timeout ... all reduce"): an epoch queued more steps than XLA's CPU client admits
    unfinished per device (32) and its launch threads deadlocked (jaxnet.train.pacing). Here 90
    steps an epoch on data=4; on a regression XLA aborts this process after its 40 s timeout."""
    from experiments import recsys

    result = recsys.main(["--generator.num-users", "60", "--generator.num-items", "50",
                          "--generator.ratings-per-user", "20", "--task", "implicit", "--implicit-models", "mf",
                          "--implicit-epochs", "1", "--batch-size", "64", "--mesh", "data=4",
                          "--workdir", str(tmp_path)])
    implicit = result["implicit"]
    steps = -(-implicit["n_train"] * 5 // 64)  # (1 + 4 negatives) examples per interaction
    assert steps > 32 and result["devices"] == 4
    assert pathlib.Path(implicit["models"]["mf"]["weights"]).name == str(steps)
    assert 0 <= implicit["models"]["mf"]["test"]["hr@10"] <= 1
