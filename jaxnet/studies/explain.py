"""Attributions you can see: digits classifiers and a character LM explained (issue 22, point 5).

    result = run(Config(), "runs/explain")      # what ``python -m experiments.explain`` runs

Digits: scikit-learn's 8x8 digits, the stratified 25% test split of ``experiments.vision``, pixels
in [0, 1] as they are (not standardised), so the zero baseline of integrated gradients is a blank
image. An MLP and a small CNN are fitted quickly; every method of ``jaxnet.explain`` explains the
logit of each test image's true class, and integrated gradients' convergence delta is measured
over the whole test split at several step counts. Text: a small character ``TransformerLM`` on
``pydoc_data.topics``; its attention maps and rollout over ``config.text``.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time

from typing import Literal

import numpy as np

from jaxnet.models.cnn import NORMS
from jaxnet.studies import save_weights


@dataclasses.dataclass(frozen=True)
class Config:
    # MLP: hidden widths (one output per class).
    mlp_hidden: tuple[int, ...] = (64,)
    # CNN: channels per block (one 3x3 conv + normalisation + ReLU, then 2x2 max pooling).
    cnn_features: tuple[int, ...] = (16, 32)
    # CNN: the normalisation after each conv (batch: BatchNorm, jaxnet.models.CNN's default).
    cnn_norm: Literal[NORMS] = "batch"
    # CNN: hidden widths of the dense head.
    cnn_head: tuple[int, ...] = (64,)
    # Passes over the 1,347 training digits for each classifier, >= 1.
    epochs: int = 15
    # Digits per update, >= 1.
    batch_size: int = 64
    # Adam's learning rate for the classifiers, > 0.
    learning_rate: float = 3e-3
    # Integrated gradients' step counts whose convergence delta is reported (the default, 50, first).
    ig_steps: tuple[int, ...] = (50, 10, 25, 100, 200)
    # SmoothGrad: noisy copies of each image, >= 1 (PAIR's nsamples).
    smoothgrad_samples: int = 25
    # SmoothGrad: the noise's sigma as a fraction of each image's range (max - min), >= 0 (PAIR's 15%).
    smoothgrad_noise: float = 0.15
    # Occlusion window side in pixels (stride 1), >= 1.
    occlusion_window: int = 2
    # LM: updates of the small character TransformerLM (2 layers, 4 heads, 64 wide, 64 context), >= 1.
    lm_steps: int = 300
    # LM: windows per update, >= 1.
    lm_batch_size: int = 32
    # The text whose attention is drawn (at most 64 characters).
    text: str = "The for statement is used to iterate over the elements."
    # Seeds the classifiers, the LM and SmoothGrad's noise.
    seed: int = 0
    # Show progress bars while training (on stderr).
    progress: bool = False

    def __post_init__(self):  # for Config(...) in Python; the flags are checked when parsed
        if not 1 <= len(self.text) <= 64:
            raise ValueError(f"text must have 1 to 64 characters (the LM's context), got {len(self.text)}")
        if not self.ig_steps or min(self.ig_steps) < 1:
            raise ValueError(f"ig_steps must be step counts >= 1, got {self.ig_steps}")
        if not 1 <= self.occlusion_window <= 8:
            raise ValueError(f"occlusion_window must be in [1, 8] (the digits are 8x8), got {self.occlusion_window}")


def lm_config(vocab_size: int):
    """The small character LM: 2 layers, 4 heads of width 16, 64 context, no dropout."""
    from jaxnet.models.transformer import TransformerConfig

    return TransformerConfig(vocab_size=vocab_size, block_size=64, num_layers=2, num_heads=4, embed_dim=64,
                             dropout_rate=0.0)


# The methods drawn, in the figures' column order.
METHODS = ("saliency", "SmoothGrad", "input x gradient", "integrated gradients", "occlusion")


def attributions(f, x, y, key, config: Config) -> dict:
    """Every method's attributions of ``f``'s class ``y[b]`` for images ``x: [N, 8, 8, 1]``
    (``METHODS``; a pytree, so jitted the dict comes back with its keys sorted)."""
    from jaxnet import explain

    window = (config.occlusion_window, config.occlusion_window, 1)
    return {
        "saliency": explain.saliency(f, x, target=y),
        "input x gradient": explain.input_x_gradient(f, x, target=y),
        "SmoothGrad": explain.smoothgrad(f, x, key, target=y, samples=config.smoothgrad_samples,
                                         noise_level=config.smoothgrad_noise),
        "integrated gradients": explain.integrated_gradients(f, x, target=y),
        "occlusion": explain.occlusion(f, x, window, target=y),
    }


def completeness(apply, variables, x, y, steps_list) -> dict:
    """Integrated gradients' convergence delta for the logits ``apply(variables, x)`` of classes
    ``y`` at each step count (Gauss-Legendre, zero baseline), relative to ``|f(x) - f(0)|``: its
    median, 99th percentile and largest value, the fraction of inputs within 1%, and the mean
    absolute delta."""
    import jax
    import jax.numpy as jnp

    from jaxnet import explain
    from jaxnet.explain.targets import score_fn

    # The weights enter as arguments: closed over, they would be constants XLA tries to fold.
    scores = jax.jit(lambda v, z, t: score_fn(functools.partial(apply, v), t)(z))
    gap = np.abs(np.asarray(scores(variables, x, y) - scores(variables, jnp.zeros_like(x), y)))
    out = {}
    for steps in steps_list:
        ig = jax.jit(lambda v, z, t, s=steps: explain.integrated_gradients(
            functools.partial(apply, v), z, target=t, steps=s, return_delta=True))
        delta = np.abs(np.asarray(ig(variables, x, y)[1]))
        rel = delta / gap
        out[str(steps)] = {"median": float(np.median(rel)), "p99": float(np.quantile(rel, 0.99)),
                           "max": float(rel.max()), "within_1pct": float(np.mean(rel <= 0.01)),
                           "mean_abs_delta": float(delta.mean())}
    return out


def fit_classifier(name: str, model, x, y, config: Config, workdir: pathlib.Path, fit_options: dict):
    """Fits ``model`` on ``x: [N, ...]`` with labels ``y: [N]`` (Adam); returns the trained ``TrainState``."""
    from jaxnet import losses, optim
    from jaxnet.train import TrainState, checkpoint, fit

    fit_options = dict(fit_options)
    ckpt = checkpoint.run_options(workdir / name, checkpoint_every=fit_options.pop("checkpoint_every"),
                                  resume=fit_options.pop("resume"), config=config)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=config.learning_rate))
    state = TrainState.create(model=model, tx=tx, sample_x=x[:1], seed=config.seed)
    out = fit(state, (x, y), loss_fn=losses.cross_entropy, epochs=config.epochs,
              batch_size=config.batch_size, target_kind="labels", progress=config.progress,
              workdir=workdir / name, title=f"{name} on digits", **fit_options, **ckpt)
    return out.state


def explain_digits(config: Config, workdir: pathlib.Path, fit_options: dict) -> dict:
    """Trains the MLP and the CNN, draws their attributions, measures completeness."""
    import jax
    import jax.numpy as jnp

    from jaxnet.data.digits import digits_split
    from jaxnet.explain import figures
    from jaxnet.models import CNN, MLP

    train, test = digits_split()
    x, y = jnp.asarray(test.x), jnp.asarray(test.y)  # (450, 8, 8, 1), (450,)
    shown = np.array([int(np.flatnonzero(test.y == c)[0]) for c in range(train.num_classes)])  # one per class
    models = {
        # The MLP reads flattened pixels; explained in image space all the same.
        "mlp": (MLP(tuple(config.mlp_hidden) + (train.num_classes,), init_scheme="lecun"),
                lambda a: a.reshape(len(a), -1)),
        "cnn": (CNN(num_classes=train.num_classes, features=config.cnn_features, convs_per_block=1,
                    norm=config.cnn_norm, head=config.cnn_head), lambda a: a),
    }
    out = {}
    for name, (model, view) in models.items():
        start = time.perf_counter()
        state = fit_classifier(name, model, np.asarray(view(train.x)), train.y, config, workdir, fit_options)
        variables = state.variables

        def apply(v, a, model=model, view=view):  # logits [B, 10] of images a: [B, 8, 8, 1]
            return model.apply(v, view(a), train=False)

        accuracy = float(jnp.mean(jnp.argmax(jax.jit(apply)(variables, x), -1) == y))
        attr = jax.jit(lambda v, a, t, key: attributions(functools.partial(apply, v), a, t, key, config))(
            variables, x[shown], y[shown], jax.random.key(config.seed))
        png = figures.attribution_grid(x[shown], {k: attr[k] for k in METHODS}, workdir / f"attributions_{name}.png",
                                       labels=[f"class {c}" for c in test.y[shown]],
                                       title=f"{name}: attributions to the true class's logit")
        out[name] = {"test_accuracy": accuracy,
                     "ig_completeness": completeness(apply, variables, x, y, config.ig_steps),
                     "attributions_png": png, "weights": save_weights(workdir / name, state, config),
                     "wall_s": round(time.perf_counter() - start, 1)}
        first = out[name]["ig_completeness"][str(config.ig_steps[0])]
        print(f"{name}: test accuracy {accuracy:.4f}; integrated gradients at {config.ig_steps[0]} steps: "
              f"|delta| / |f(x) - f(0)| median {first['median']:.3%}, largest {first['max']:.2%}, "
              f"{first['within_1pct']:.1%} of the test digits within 1% ({out[name]['wall_s']} s)",
              file=sys.stderr, flush=True)
    return out


def explain_text(config: Config, workdir: pathlib.Path, fit_options: dict) -> dict:
    """Trains the small character LM and draws its attention maps and rollout over ``config.text``."""
    import jax.numpy as jnp

    from jaxnet import explain, optim
    from jaxnet.data import text
    from jaxnet.explain import figures
    from jaxnet.models.transformer import TransformerLM
    from jaxnet.train import TrainState, checkpoint
    from jaxnet.train.stream import fit_stream

    start = time.perf_counter()
    corpus = text.pydoc_corpus()
    cfg = lm_config(len(corpus.vocab))
    model = TransformerLM(cfg)
    tx = optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=5e-3, weight_decay=0.1, clip_norm=1.0, schedule="warmup_cosine",
        warmup_steps=max(1, config.lm_steps // 10), total_steps=config.lm_steps))
    state = TrainState.create(model=model, tx=tx, sample_x=jnp.zeros((1, cfg.block_size), jnp.int32), seed=config.seed)
    fit_options = dict(fit_options)
    ckpt = checkpoint.run_options(workdir / "lm", checkpoint_every=fit_options.pop("checkpoint_every"),
                                  resume=fit_options.pop("resume"), config=config)
    fit = fit_stream(state, corpus.train, steps=config.lm_steps, batch_size=config.lm_batch_size,
                     block_size=cfg.block_size, val_tokens=corpus.val, eval_every=config.lm_steps,
                     eval_stride=cfg.block_size, log_every=max(1, config.lm_steps // 10), progress=config.progress,
                     workdir=workdir / "lm", title="character LM (loss: nats/char)", **fit_options, **ckpt)
    params = fit.state.params
    ids = jnp.asarray(corpus.vocab.encode(config.text))[None]  # (1, T)
    weights = explain.attention_weights(model, {"params": params}, ids)  # (L, 1, H, T, T)
    flow = explain.rollout(weights)  # (1, T, T)
    tokens = list(config.text)
    png = figures.attention_maps(weights[:, 0], tokens, workdir / "attention.png", rollout=flow[0],
                                 title=f"character LM: attention over {config.text[:40]!r}...")
    w = np.asarray(weights[:, 0], np.float64)  # (L, H, T, T)
    previous = np.diagonal(w, offset=-1, axis1=-2, axis2=-1).mean(-1)  # (L, H): mass on the token before
    return {"val_nll": fit.history[-1].get("val_loss"), "steps": int(fit.state.step),
            "attention_to_previous_token": np.round(previous, 3).tolist(),
            "rollout_rows_sum_to_1": bool(np.allclose(np.asarray(flow).sum(-1), 1.0, atol=1e-5)),
            "attention_png": png, "weights": save_weights(workdir / "lm", fit.state, config),
            "wall_s": round(time.perf_counter() - start, 1)}


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Trains the three models, writes the figures, returns the metrics.

    Writes ``attributions_mlp.png``, ``attributions_cnn.png`` and ``attention.png`` into
    ``workdir``, and each model's ``metrics.jsonl``, loss curve and final weights under
    ``workdir/{mlp,cnn,lm}``. The keywords are as in ``jaxnet.studies.vision.run``.
    """
    from jaxnet import parallel

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    options = {"tensorboard": tensorboard, "profile_steps": profile_steps, "checkpoint_every": checkpoint_every,
               "resume": resume, "mesh": mesh, "strategy": strategy}
    result = {"experiment": "explain", "data": "sklearn digits (8x8), pixels in [0, 1]; pydoc_data.topics (chars)",
              "explained": "logit of the true class; baseline: blank image (zeros)"}
    result.update(explain_digits(config, workdir, options))
    result["lm"] = explain_text(config, workdir, options)
    result.update(parallel.run_info(mesh, strategy))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


__all__ = ["Config", "METHODS", "attributions", "completeness", "explain_digits", "explain_text", "fit_classifier",
           "lm_config", "run"]
