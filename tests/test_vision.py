"""Vision: the CNN's shapes and modes, image loaders, the digits split, classification metrics,
a short training run, and the experiment end to end on a tiny image set."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses, metrics, optim
from jaxnet.data.digits import digits_split, load_digits
from jaxnet.data.images import ImageData, load_images, random_shift, standardize, stratified_split
from jaxnet.models import CNN
from jaxnet.train import TrainState, fit


# --- model ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, norm, pool", [
    ((8, 8, 1), "batch", "max"),
    ((5, 7, 3), "layer", "avg"),   # odd sizes, colour
    ((1, 1, 2), "none", "max"),    # pooling must not make a 1-pixel image vanish
    ((6, 6), "batch", "none"),     # no channel axis: read as one channel
])
def test_cnn_gives_one_logit_per_class_for_any_image_size(shape, norm, pool):
    model = CNN(num_classes=7, features=(4, 6), convs_per_block=1, head=(8,), norm=norm, pool=pool)
    x = jax.random.normal(jax.random.key(0), (3, *shape))
    # Under jit: one compile instead of an eager dispatch (and compile) per small op.
    variables = jax.jit(model.init)(jax.random.key(1), x)
    assert ("batch_stats" in variables) == (norm == "batch")
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_cnn_train_mode_updates_batch_stats_and_uses_its_key():
    model = CNN(num_classes=3, features=(4,), convs_per_block=1, head=(), dropout_rate=0.5, augment_shift=1)
    x = jax.random.normal(jax.random.key(0), (5, 6, 6, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    run = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]))
    (a, new_stats), (b, _) = run(jax.random.key(2)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)  # same key, same dropout and shifts
    assert not np.allclose(a, run(jax.random.key(3))[0])
    assert not np.allclose(new_stats["batch_stats"]["block0_norm0"]["mean"],
                           variables["batch_stats"]["block0_norm0"]["mean"])
    # Evaluation is deterministic and needs no key.
    evaluate = jax.jit(model.apply)
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))


def test_cnn_rejects_bad_settings_and_shapes():
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="norm"):
        CNN(num_classes=2, norm="group").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        CNN(num_classes=2).init(jax.random.key(0), jnp.zeros((2, 16)))


def test_random_shift_is_a_translation_with_edge_fill():
    x = jnp.arange(2 * 5 * 4 * 1, dtype=jnp.float32).reshape(2, 5, 4, 1)
    np.testing.assert_array_equal(random_shift(jax.random.key(0), x, 0), x)
    y = np.asarray(random_shift(jax.random.key(0), x, 1))
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    for b in range(2):  # each image is one of the 9 windows of its edge-padded self
        windows = [padded[b, i:i + 5, j:j + 4] for i in range(3) for j in range(3)]
        assert any(np.array_equal(y[b], w) for w in windows)


# --- data -------------------------------------------------------------------------------------------

def test_digits_split_is_the_stratified_sklearn_split():
    from sklearn.model_selection import train_test_split

    train, test = digits_split()
    assert train.x.shape == (1347, 8, 8, 1) and test.x.shape == (450, 8, 8, 1)
    assert train.x.dtype == np.float32 and 0.0 <= train.x.min() and train.x.max() <= 1.0
    everything = load_digits()
    _, _, _, y_test = train_test_split(everything.x, everything.y, test_size=0.25,
                                       stratify=everything.y, random_state=0)
    np.testing.assert_array_equal(test.y, y_test)
    # Stratified: every class keeps its share (within one example).
    share = np.bincount(everything.y) * 0.25
    assert np.all(np.abs(np.bincount(test.y) - share) <= 1)
    again, _ = digits_split()
    np.testing.assert_array_equal(again.x, train.x)


def test_standardize_uses_training_statistics():
    a, b = np.array([1.0, 3.0], np.float32), np.array([5.0], np.float32)
    sa, sb = standardize(a, b)
    np.testing.assert_allclose(sa, [-1.0, 1.0])
    np.testing.assert_allclose(sb, [3.0])


@pytest.fixture
def npz_images(tmp_path):
    """Six 4x3 uint8 greyscale images, labels as class names."""
    x = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3) * 3
    y = np.array(["cat", "dog", "cat", "dog", "cat", "dog"])
    path = tmp_path / "imgs.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def test_load_npz_scales_uint8_and_names_classes(npz_images):
    path, x, y = npz_images
    data = load_images(path)
    assert data.x.shape == (6, 4, 3, 1) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[..., 0], x / 255.0, rtol=1e-6)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.y, [0, 1, 0, 1, 0, 1])


def test_load_npz_keeps_integer_labels_and_complains_clearly(tmp_path):
    path = tmp_path / "ints.npz"
    np.savez(path, x=np.zeros((3, 2, 2, 3), np.float32), y=np.array([2, 0, 2]))
    data = load_images(path)
    assert data.class_names == ("0", "1", "2") and data.x.shape == (3, 2, 2, 3)
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 2, 2)))
    with pytest.raises(KeyError, match="'x' and 'y'"):
        load_images(tmp_path / "bad.npz")


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/<n>.png: 2 classes x 3 greyscale 5x4 images, pixel value = 10 * class + n."""
    from PIL import Image

    root = tmp_path / "folder"
    for c, name in enumerate(["one", "zero"]):
        (root / name).mkdir(parents=True)
        for n in range(3):
            Image.fromarray(np.full((5, 4), 10 * c + n, np.uint8)).save(root / name / f"{n}.png")
    (root / "one" / "notes.txt").write_text("not an image")
    return root


def test_load_folder_reads_class_subfolders(image_folder):
    data = load_images(image_folder)
    assert data.class_names == ("one", "zero")
    assert data.x.shape == (6, 5, 4, 1)
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(data.x[:, 0, 0, 0] * 255, [0, 1, 2, 10, 11, 12], atol=1e-4)
    rgb = load_images(image_folder, grayscale=False)
    assert rgb.x.shape == (6, 5, 4, 3)


def test_load_folder_refuses_mixed_sizes(image_folder):
    from PIL import Image

    Image.fromarray(np.zeros((7, 7), np.uint8)).save(image_folder / "zero" / "big.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_images(image_folder)


def test_image_data_checks_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        ImageData(np.zeros((2, 1, 1, 1), np.float32), np.array([0, 2]), ("a", "b"))


# --- metrics ----------------------------------------------------------------------------------------

def test_classification_metrics_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    labels = jnp.array([0, 2, 2, 1])
    np.testing.assert_array_equal(metrics.accuracy(logits, labels), [1, 0, 1, 0])
    cm = metrics.confusion_matrix(labels, jnp.argmax(logits, -1), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), [1.0, 0.0, 0.5])


# --- training ---------------------------------------------------------------------------------------

def test_short_cnn_training_lowers_the_loss_on_digits():
    train, test = digits_split()
    xtr, xte = standardize(train.x[:256], test.x[:128])
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-2))
    model = CNN(num_classes=10, features=(8,), convs_per_block=1, head=(32,))
    state = TrainState.create(model=model, tx=tx, sample_x=xtr[:1], seed=0)
    run = fit(state, (xtr, train.y[:256]), loss_fn=losses.cross_entropy, target_kind="labels", epochs=4,
              batch_size=64, val_data=(xte, test.y[:128]), metrics={"accuracy": metrics.accuracy},
              eval_every=4, progress=False)
    loss = run.column("loss")
    assert loss[-1] < 0.6 * loss[0]
    assert run.history[-1]["val_accuracy"] > 0.5  # chance is 0.1


def test_vision_experiment_end_to_end_on_a_tiny_npz(tmp_path):
    from experiments import vision

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = (rng.uniform(0, 0.2, (24, 6, 6)) + y[:, None, None] * 0.4).astype(np.float32)  # separable
    np.savez(tmp_path / "tiny.npz", x=x, y=y)
    result = vision.main(["--data", str(tmp_path / "tiny.npz"), "--seeds", "2", "--epochs", "2",
                          "--features", "4", "--head", "8", "--batch-size", "8", "--no-baselines",
                          "--checkpoint-every", "0", "--workdir", str(tmp_path / "run")])
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n_test"] == 6 and len(saved["test_accuracy_per_seed"]) == 2
    assert len(saved["per_class_accuracy"]) == 3
    assert (tmp_path / "run" / "confusion_matrix.png").stat().st_size > 0
    assert (tmp_path / "run" / "seed0" / "loss_curve.png").exists()
    # each seed's final weights (3 updates an epoch), saved with --checkpoint-every 0 too
    from jaxnet.train import checkpoint

    assert saved["weights"] == [str(tmp_path / "run" / f"seed{k}" / "checkpoints" / "6") for k in range(2)]
    assert all(checkpoint.steps(tmp_path / "run" / f"seed{k}" / "checkpoints") == [6] for k in range(2))
