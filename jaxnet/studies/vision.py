"""Image classification: a CNN (or an MLP) on images, several seeds, scikit-learn anchors beside it.

    result = run(Config(), "runs/vision")        # what ``python -m experiments.vision`` runs

Data: scikit-learn's 8x8 digits (or your images: an ``.npz`` with ``x``, ``y`` or one folder per
class), a stratified ``test_fraction`` test split, pixels in [0, 1] (what the anchors see),
standardised with the training mean and std for the network. With ``val_fraction`` a stratified
part of the training split is held out for choosing settings; the test split is only evaluated.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
import typing
from typing import Literal

import numpy as np

from jaxnet.studies import save_weights
from kernels.dispatch import BackendName

# The networks make_model builds.
Model = Literal["cnn", "mlp"]


@dataclasses.dataclass(frozen=True)
class Config:
    # The network: cnn (jaxnet.models.CNN) or mlp (jaxnet.models.MLP on flattened pixels).
    model: Model = "cnn"
    # Independent training runs, >= 1 (init, dropout and data order from seeds 0..seeds-1).
    seeds: int = 3
    # Passes over the training images, >= 1; AdamW warms up over the first 5% of updates, then
    # decays by a cosine over the rest.
    epochs: int = 30
    # Images per update, >= 1.
    batch_size: int = 64
    # AdamW's peak learning rate, > 0.
    learning_rate: float = 3e-3
    # AdamW's decoupled weight decay, >= 0.
    weight_decay: float = 1e-4
    # CNN: channels per block (two 3x3 conv + BatchNorm + ReLU, then 2x2 max pooling).
    features: tuple[int, ...] = (32, 64)
    # CNN: hidden widths of the dense head.
    head: tuple[int, ...] = (128,)
    # MLP: hidden widths (the output layer has one unit per class).
    mlp_hidden: tuple[int, ...] = (256,)
    # Dropout rate between the dense layers while training, in [0, 1).
    dropout_rate: float = 0.5
    # Random shifts of up to this many pixels while training (0: off; 1 scored lower on the
    # validation split, the 8x8 digits are already centred).
    augment_shift: int = 0
    # In [0, 1); > 0: train on the rest of the training split and report accuracy on this
    # stratified part of it (for choosing settings); the test split is still evaluated but must
    # not guide choices.
    val_fraction: float = 0.0
    # Fit and score the scikit-learn anchors on the same split in this run.
    baselines: bool = True
    # Your images instead of the digits: an .npz with x, y or a folder of class folders ("": the digits).
    data: str = ""
    # Stratified fraction of the images held out as the test split, in (0, 1).
    test_fraction: float = 0.25
    # Seeds the test split (and, +1, the validation split).
    split_seed: int = 0
    # Kernel backend of the dense layers ("auto": the fastest available here).
    backend: BackendName = "xla"
    # Show a progress bar per seed on stderr.
    progress: bool = False

    def __post_init__(self):  # for Config(...) in Python; the flags are checked when parsed
        if self.model not in typing.get_args(Model):
            raise ValueError(f"model must be one of {typing.get_args(Model)}, got {self.model!r}")


def load(config: Config):
    """``(train, test, val or None)`` as ``ImageData`` with pixels as loaded ([0, 1])."""
    from jaxnet.data.digits import digits_split
    from jaxnet.data.images import load_images, stratified_split

    if config.data:
        train, test = stratified_split(load_images(config.data), test_fraction=config.test_fraction,
                                       seed=config.split_seed)
    else:
        train, test = digits_split(config.test_fraction, config.split_seed)
    val = None
    if config.val_fraction > 0:
        train, val = stratified_split(train, test_fraction=config.val_fraction, seed=config.split_seed + 1)
    return train, test, val


def make_model(config: Config, num_classes: int):
    """The Flax module ``config.model`` names."""
    from jaxnet.models import CNN, MLP

    if config.model == "cnn":
        return CNN(num_classes=num_classes, features=config.features, head=config.head,
                   dropout_rate=config.dropout_rate, augment_shift=config.augment_shift, backend=config.backend)
    if config.model == "mlp":
        return MLP(tuple(config.mlp_hidden) + (num_classes,), dropout_rate=config.dropout_rate,
                   init_scheme="lecun", backend=config.backend)
    raise ValueError(f"unknown model {config.model!r}; choose cnn or mlp")


def inputs(config: Config, x: np.ndarray) -> np.ndarray:
    """The model's view of images ``[n, H, W, C]``: as they are (CNN) or flattened (MLP)."""
    return x.reshape(len(x), -1) if config.model == "mlp" else x


def save_confusion_png(cm: np.ndarray, class_names, path, title: str) -> str | None:
    """``cm: [C, C]`` counts (rows: true class) as an annotated PNG; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > cm.max() / 2 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Trains ``config.seeds`` models, evaluates them (and the anchors); returns the final metrics.

    The seeds train as one sweep (``jaxnet.train.fit_many``: one compiled program, each model as
    its own ``fit`` would train it) unless an option needs ``fit`` itself (a mesh, ``resume``,
    ``tensorboard``, ``profile_steps``, checkpoints during training) or the model is the CNN on
    the CPU (vmapped convolutions are slower there than a loop): then one ``fit`` per seed. The
    result's ``"trained_as"`` says which.

    Writes each seed's ``seed<k>/metrics.jsonl``, ``loss_curve.png`` and final weights
    (``seed<k>/checkpoints/<step>``, whatever ``checkpoint_every`` is; listed in the result's
    ``"weights"``) and the summed ``confusion_matrix.png`` into ``workdir``.
    ``checkpoint_every``, ``resume``: as ``jaxnet.train.checkpoint.run_options``. ``tensorboard``,
    ``profile_steps``, ``mesh``, ``strategy``: as in ``fit`` (each seed's under its own folder); on a
    mesh over several processes each passes ``fit`` only its rows of the training and validation
    images where they divide (``parallel.process_shard``; the result's ``"data_split"`` says).
    """
    import jax

    from jaxnet import losses, metrics, optim
    from jaxnet.data.images import standardize
    from jaxnet import parallel
    from jaxnet.train import TrainState, checkpoint, fit, fit_many, sweep

    workdir = pathlib.Path(workdir)
    train, test, val = load(config)
    # The network sees pixels standardised with the training statistics; the anchors see [0, 1].
    xtr, xte, *xval = (inputs(config, x) for x in standardize(
        train.x, test.x, *([] if val is None else [val.x])))
    xval = xval[0] if xval else None
    model = make_model(config, train.num_classes)
    steps = config.epochs * -(-len(xtr) // config.batch_size)
    # One optimiser object for every seed: equal static arguments, so the seeds share compilations.
    tx = optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        schedule="warmup_cosine", warmup_steps=max(1, steps // 20), total_steps=steps))
    predict = jax.jit(lambda state, x: state.apply_fn(state.variables, x, train=False).argmax(-1))
    # Split after standardising: the statistics are the whole training split's in every process.
    shard = parallel.process_shard({"train": (xtr, train.y), "val": None if val is None else (xval, val.y)},
                                   mesh, name="train and validation images")

    options = dict(loss_fn=losses.cross_entropy, epochs=config.epochs, batch_size=config.batch_size,
                   target_kind="labels", eval_every=5, metrics={"accuracy": metrics.accuracy}, progress=config.progress)
    why_not = sweep.not_one_program(steps, mesh=mesh, resume=resume, tensorboard=tensorboard,
                                    profile_steps=profile_steps, checkpoint_every=checkpoint_every)
    if config.model == "cnn" and jax.default_backend() == "cpu":
        # Per-model kernels vmap into grouped convolutions, which XLA's CPU backend runs ~4.5x
        # slower per model than one model's convolutions (docs/benchmarks.md, "Sweeps").
        why_not = "the CNN on the CPU (vmapped convolutions are slower than one model's)"
    start = time.perf_counter()
    if why_not is None:  # the seeds as one program (jaxnet.train.fit_many); the same runs as below
        outs = fit_many(lambda seed: TrainState.create(model=model, tx=tx, sample_x=xtr[:1], seed=seed),
                        shard.data["train"], seeds=range(config.seeds), val_data=shard.data["val"],
                        title=f"{config.model} on digits, {config.seeds} seeds", **options)
        for seed, out in enumerate(outs):
            sweep.write_logs(out, workdir / f"seed{seed}", title=f"{config.model} on digits, seed {seed}")
    else:
        outs = (fit(TrainState.create(model=model, tx=tx, sample_x=xtr[:1], seed=seed), shard.data["train"],
                    val_data=shard.data["val"], workdir=workdir / f"seed{seed}",
                    title=f"{config.model} on digits, seed {seed}", tensorboard=tensorboard,
                    profile_steps=profile_steps, mesh=mesh, strategy=strategy, process_local=shard.process_local,
                    **checkpoint.run_options(workdir / f"seed{seed}", checkpoint_every=checkpoint_every,
                                             resume=resume, config=config), **options)
                for seed in range(config.seeds))
    test_acc, val_acc, finals, cm = [], [], [], np.zeros((train.num_classes,) * 2, np.int64)
    for seed, out in enumerate(outs):
        finals.append(out.state)
        pred = np.asarray(predict(out.state, xte))
        test_acc.append(float(np.mean(pred == test.y)))
        cm += metrics.confusion_matrix(test.y, pred, train.num_classes)
        line = f"seed {seed}: test accuracy {test_acc[-1]:.4f}"
        if val is not None:
            val_acc.append(out.history[-1]["val_accuracy"])
            line += f", validation accuracy {val_acc[-1]:.4f}"
        print(line, f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    train_wall = time.perf_counter() - start
    weights = [save_weights(workdir / f"seed{seed}", state, config) for seed, state in enumerate(finals)]

    result = {
        "experiment": "vision",
        "data": config.data or "sklearn digits (8x8)",
        "model": config.model,
        "backend": config.backend,
        "n_train": len(xtr), "n_test": len(xte),
        "seeds": config.seeds,
        "test_accuracy_mean": float(np.mean(test_acc)),
        "test_accuracy_std": float(np.std(test_acc)),
        "test_accuracy_per_seed": test_acc,
        "per_class_accuracy": [round(float(a), 4) for a in metrics.per_class_accuracy(cm)],
        "train_wall_s": round(train_wall, 2),
        "trained_as": "one sweep (fit_many)" if why_not is None else f"one fit per seed: {why_not}",
        "weights": weights,
        **parallel.run_info(mesh, strategy, shard),
    }
    if val is not None:
        result.update(val_accuracy_mean=float(np.mean(val_acc)), val_accuracy_per_seed=val_acc, n_val=len(val.y))
    if config.baselines:
        from jaxnet.baselines.classifiers import sklearn_anchors

        start = time.perf_counter()
        result["anchors"] = sklearn_anchors(train, test)
        result["anchors_wall_s"] = round(time.perf_counter() - start, 2)
        result["beats_every_anchor"] = result["test_accuracy_mean"] > max(
            a["test_accuracy"] for a in result["anchors"].values())
    result["confusion_matrix_png"] = None
    if parallel.is_main_process():  # several processes: process 0 writes
        workdir.mkdir(parents=True, exist_ok=True)
        result["confusion_matrix_png"] = save_confusion_png(
            cm, train.class_names, workdir / "confusion_matrix.png",
            f"{config.model}: test confusion, {config.seeds} seeds summed")
    return result


__all__ = ["Config", "inputs", "load", "make_model", "run", "save_confusion_png"]
