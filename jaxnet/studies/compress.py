"""int8 post-training quantisation measured: quality, bytes and latency of float32, int8 weight-only
and w8a8 (``jaxnet.compress``) on the digits MLP and CNN and on the character language model.

    result = run(Config(), "runs/compress")        # what ``python -m experiments.compress`` runs

Each model is trained here first (the digits models with ``experiments.vision``'s recipe, one
seed; a small ``TransformerLM`` on the pydoc corpus, ``jaxnet.studies.lm``'s data), then
quantised per output channel (``quantize``) and run through the unchanged model
(``apply_quantized``, every quantised layer on ``kernels.quantized_dense`` with ``backend``).

Per model and mode: test accuracy (digits) or held-out bits per character (LM); bytes of the dense
layers (what quantisation touches: float32 kernel and bias before; int8 kernel, float32 scale and
bias after) and of every array of the model; latency of one jitted forward pass at each batch size
(median of interleaved samples, ``kernels.timing``). Two ratios per model answer issue 22's speed
targets: weight-only int8 at batch 1 against dequantise-then-dot (the same int8 tree, each layer's
``w_q * scale`` rebuilt inside the jitted forward and multiplied as float32: the reference's
arithmetic), and each int8 mode at the largest batch against float32.

Beside them, each target's *ceiling*: the same ratio with the quantised model replaced by the float
model run with its dense layers free (``dense_free``: each writes zeros of its output's shape,
through a conditional XLA cannot see through, and multiplies nothing). Quantising the dense
layers makes them cheaper but not free, so no int8 mode can beat that model: a ceiling under the
target means the target cannot be met on this model by quantising its dense layers, however fast
their kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Literal

import numpy as np

from jaxnet.models.transformer import TransformerConfig
from jaxnet.studies import save_weights

ModelName = Literal["mlp", "cnn", "lm"]
MODES = ("float32", "int8", "w8a8")
TARGETS = {"digits_accuracy_points": 0.3, "lm_bits_per_char": 0.02, "dense_bytes_ratio": 3.9,
           "int8_vs_dequant_batch1": 1.5, "quantized_vs_float32_large_batch": 3.0}


@dataclasses.dataclass(frozen=True)
class Config:
    # The models: the digits MLP (64-256-10) and CNN (experiments.vision's) and a character LM.
    models: tuple[ModelName, ...] = ("mlp", "cnn", "lm")
    # Passes over the training digits (AdamW with warm-up and cosine decay, batch 64, dropout 0.5).
    digits_epochs: int = 30
    # The LM network (its vocab_size comes from the corpus).
    lm: TransformerConfig = TransformerConfig(num_layers=2, embed_dim=128, num_heads=4, dropout_rate=0.0)
    # Updates of the LM (32 windows each, AdamW 5e-3 with warm-up and cosine decay), >= 1.
    lm_steps: int = 400
    # Held-out evaluation windows of the LM start every lm_eval_stride tokens, in [1, block_size].
    lm_eval_stride: int = 64
    # Batch sizes timed (LM: sequences of block_size tokens); the speed-ups use the first and the last.
    batches: tuple[int, ...] = (1, 256)
    # The kernels.quantized_dense backend of the int8 layers ("auto": per mode, the fastest measured here).
    backend: Literal["auto", "xla", "numba"] = "auto"
    # Timed samples per model, batch and variant (medians reported), after `warmup` untimed rounds.
    repeats: int = 7
    # Untimed rounds first (the first compiles), >= 1.
    warmup: int = 2
    # Each sample repeats the call until it lasts at least this long (batch 1 calls are short).
    min_sample_s: float = 0.02
    # Seeds the models' initialisation and data order.
    seed: int = 0


def dequantized(qvariables) -> dict:
    """The float32 tree a quantised one stands for: each quantised layer ``{"w_q", "scale", "bias"}``
    becomes ``{"kernel": w_q * scale, "bias"}`` (the w8a8 marker dropped). Inside ``jit`` this runs
    on every call: dequantise, then the float32 dot."""
    from jaxnet.compress.quantize import ACT_MARKER

    def convert(node):
        if not isinstance(node, dict):
            return node
        if "w_q" in node:
            out = {"kernel": node["w_q"].astype(np.float32) * node["scale"]}
            if "bias" in node:
                out["bias"] = node["bias"]
            return out
        return {k: convert(v) for k, v in node.items() if k != ACT_MARKER}

    return {**qvariables, "params": convert(dict(qvariables["params"]))}


def dense_bytes(params) -> int:
    """Bytes of the dense layers of a params tree, float (``kernel``, ``bias``) or quantised
    (``w_q``, ``scale``, ``bias``, the w8a8 marker)."""
    from jaxnet.compress.quantize import dense_layers, quantized_layers, tree_bytes

    return sum(tree_bytes(node) for node in {**dense_layers(params), **quantized_layers(params)}.values())


@contextlib.contextmanager
def dense_free():
    """Inside this context every ``jaxnet.nn.FusedDense`` (the layers ``quantize`` touches: every
    other layer stays as it is) returns zeros ``[..., K] -> [..., N]`` in x's dtype instead of
    ``act(x @ w + b)``: it writes y, which any implementation of the layer must do too, and
    multiplies nothing. The zeros come out of a conditional on x's first element (NaN or not)
    whose other branch repeats x's first column: XLA cannot tell which branch runs, so it cannot
    simplify what consumes y (a dot of a broadcast would become a reduction, the attention on
    such q, k and v next to nothing, and the bound would say little). Timing only: the values
    are meaningless."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxnet.nn import FusedDense

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, FusedDense):
            return next_fun(*args, **kwargs)
        x, shape = args[0], (*args[0].shape[:-1], context.module.features)
        return jax.lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda x: jnp.broadcast_to(x[..., :1], shape),
                            lambda x: jnp.zeros(shape, x.dtype), x)

    with nn.intercept_methods(interceptor):
        yield


def _train_digits(name: str, config: Config, workdir: pathlib.Path, options: dict):
    """``(model, variables, x_test [n, ...], y_test [n])``: ``experiments.vision``'s model ``name``."""
    from jaxnet import losses, optim
    from jaxnet.data.images import standardize
    from jaxnet.studies import vision
    from jaxnet.train import TrainState, checkpoint, fit

    vcfg = vision.Config(model=name, seeds=1, epochs=config.digits_epochs, baselines=False)
    train, test, _ = vision.load(vcfg)
    xtr, xte = (vision.inputs(vcfg, x) for x in standardize(train.x, test.x))
    model = vision.make_model(vcfg, train.num_classes)
    steps = vcfg.epochs * -(-len(xtr) // vcfg.batch_size)
    tx = optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=vcfg.learning_rate, weight_decay=vcfg.weight_decay, schedule="warmup_cosine",
        warmup_steps=max(1, steps // 20), total_steps=steps))
    folder = workdir / name
    checkpointing = {k: options[k] for k in ("checkpoint_every", "resume")}
    out = fit(TrainState.create(model=model, tx=tx, sample_x=xtr[:1], seed=config.seed), (xtr, train.y),
              loss_fn=losses.cross_entropy, epochs=vcfg.epochs, batch_size=vcfg.batch_size, progress=False,
              workdir=folder, title=f"{name} on digits",
              **{k: v for k, v in options.items() if k not in checkpointing},
              **checkpoint.run_options(folder, **checkpointing, config=config))
    save_weights(folder, out.state, config)
    return model, out.state.variables, xte, test.y


def _train_lm(config: Config, workdir: pathlib.Path, options: dict):
    """``(model, variables, corpus)``: a ``TransformerLM(config.lm)`` trained on the pydoc corpus."""
    import jax.numpy as jnp

    from jaxnet import optim
    from jaxnet.data import text
    from jaxnet.models.transformer import TransformerLM
    from jaxnet.train import TrainState, checkpoint
    from jaxnet.train.stream import fit_stream

    corpus = text.pydoc_corpus(0.1)
    model = TransformerLM(config.lm.replace(vocab_size=len(corpus.vocab)))
    tx = optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=5e-3, weight_decay=0.1, b2=0.99, clip_norm=1.0, schedule="warmup_cosine",
        warmup_steps=max(1, min(100, config.lm_steps // 10)), total_steps=config.lm_steps, final_lr_fraction=0.05))
    state = TrainState.create(model=model, tx=tx, sample_x=jnp.zeros((1, config.lm.block_size), jnp.int32),
                              seed=config.seed)
    folder = workdir / "lm"
    checkpointing = {k: options[k] for k in ("checkpoint_every", "resume")}
    out = fit_stream(state, corpus.train, steps=config.lm_steps, batch_size=32, block_size=config.lm.block_size,
                     progress=False, workdir=folder, title="TransformerLM on pydoc (loss: nats/char)",
                     **{k: v for k, v in options.items() if k not in checkpointing},
                     **checkpoint.run_options(folder, **checkpointing, config=config))
    save_weights(folder, out.state, config)
    return model, out.state, corpus


def _latency(forward: dict, inputs: dict, config: Config) -> dict:
    """Median seconds per call: ``{batch: {variant: s}}``; ``forward[variant] = (fn, variables)``,
    the variants interleaved sample by sample (``kernels.timing``)."""
    from kernels.timing import interleaved_medians, timed_call

    out = {}
    for batch, x in inputs.items():
        samplers = {name: timed_call(fn, (variables, x), min_sample_s=config.min_sample_s)
                    for name, (fn, variables) in forward.items()
                    if name != "dequant" or batch == min(inputs)}  # dequantise-then-dot: the batch 1 target
        out[batch] = interleaved_medians(samplers, config.repeats, config.warmup)
    return out


def measure(model, variables, quality, inputs: dict, config: Config) -> dict:
    """Quality, bytes and latency of one trained model in every mode.

    Args:
      model: the Flax module; variables: its trained float32 variables.
      quality: ``quality(apply, tree) -> float``, the model's accuracy or bits per character with
        ``apply(tree, x) -> logits`` (jitted); called inside ``quantized()`` for every mode's tree.
      inputs: ``{batch: x}``, the inputs timed.
    """
    import jax

    from jaxnet.compress import QuantRule, quantize, quantized
    from jaxnet.compress.quantize import tree_bytes

    trees = {"float32": variables, "int8": quantize(variables),
             "w8a8": quantize(variables, [QuantRule(weight_qtype="int8", act_qtype="int8")])}
    # One jitted forward per mode, traced (at each batch size) inside quantized(), so that the int8
    # layers run quantized_dense; the float32 model is the one trained (XLA's float32 dot).
    forward = {mode: (jax.jit(lambda v, x: model.apply(v, x, train=False)), tree) for mode, tree in trees.items()}
    forward["dequant"] = (jax.jit(lambda v, x: model.apply(dequantized(v), x, train=False)), trees["int8"])

    def free(v, x):  # the bound on both speed targets (the module docstring)
        with dense_free():
            return model.apply(v, x, train=False)

    forward["dense_free"] = (jax.jit(free), variables)
    with quantized(backend=config.backend):
        rows = {mode: {"quality": quality(forward[mode][0], tree)} for mode, tree in trees.items()}
        times = _latency(forward, inputs, config)
    for mode, tree in trees.items():
        rows[mode].update(dense_bytes=dense_bytes(tree["params"]), all_bytes=tree_bytes(tree),
                          latency_s={b: times[b][mode] for b in inputs})
    small, large = min(inputs), max(inputs)
    return {
        "modes": rows,
        "dequant_latency_s": times[small]["dequant"],
        "int8_vs_dequant_batch1": times[small]["dequant"] / times[small]["int8"],
        "speedup_vs_float32": {mode: {b: times[b]["float32"] / times[b][mode] for b in inputs}
                               for mode in ("int8", "w8a8")},
        "dense_bytes_ratio": rows["float32"]["dense_bytes"] / rows["int8"]["dense_bytes"],
        "batches": [small, large],
        "dense_free_latency_s": {b: times[b]["dense_free"] for b in inputs},
        "ceiling_vs_float32": {b: times[b]["float32"] / times[b]["dense_free"] for b in inputs},
        "ceiling_vs_dequant_batch1": times[small]["dequant"] / times[small]["dense_free"],
    }


def run(config: Config, workdir: str | pathlib.Path, *, tensorboard: bool = False,
        profile_steps: tuple[int, int] | None = None, checkpoint_every: int | None = None,
        resume: bool = False, mesh=None, strategy: str = "dp") -> dict:
    """Trains, quantises and measures ``config.models``; writes ``table.md`` and ``table.json``
    into ``workdir`` and returns the summary with each target of issue 22 met or not."""
    import jax
    import jax.numpy as jnp

    from jaxnet.train.stream import evaluate_stream

    workdir = pathlib.Path(workdir)
    options = dict(tensorboard=tensorboard, profile_steps=profile_steps, checkpoint_every=checkpoint_every,
                   resume=resume, mesh=mesh, strategy=strategy)
    start = time.perf_counter()
    measured = {}
    for name in config.models:
        if name in ("mlp", "cnn"):
            model, variables, x_test, y_test = _train_digits(name, config, workdir, options)

            def quality(apply, tree, x_test=x_test, y_test=y_test):
                return float(np.mean(np.asarray(apply(tree, x_test)).argmax(-1) == y_test))

            inputs = {b: jnp.asarray(np.resize(x_test, (b, *x_test.shape[1:]))) for b in config.batches}
        else:
            model, state, corpus = _train_lm(config, workdir, options)
            variables = state.variables

            def quality(apply, tree, state=state, corpus=corpus):
                # evaluate_stream reads the state's model and variables only: the tree goes in as params.
                rest = {k: v for k, v in tree.items() if k != "params"}
                nats = evaluate_stream(state.replace(params=tree["params"], model_state=rest), corpus.val,
                                       block_size=config.lm.block_size, stride=config.lm_eval_stride)
                return nats / math.log(2)

            windows = np.resize(np.asarray(corpus.val), (max(config.batches), config.lm.block_size))
            inputs = {b: jnp.asarray(windows[:b]) for b in config.batches}
        measured[name] = measure(model, variables, quality, inputs, config)
        print(f"{name}: measured ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "table.md").write_text(table_markdown(measured, config))
    (workdir / "table.json").write_text(json.dumps(measured, indent=1) + "\n")
    result = {"experiment": "compress", "backend": config.backend, **summary(measured),
              "table_md": str(workdir / "table.md"), "wall_s": round(time.perf_counter() - start, 1)}
    return result


def summary(measured: dict) -> dict:
    """Each target of issue 22 (``TARGETS``) per model: the figure and whether it is met."""
    out = {}
    for name, m in measured.items():
        f32 = m["modes"]["float32"]["quality"]
        small, large = m["batches"]
        row = {}
        for mode in ("int8", "w8a8"):
            q = m["modes"][mode]["quality"]
            if name == "lm":
                row[f"{mode}_bits_per_char_change"] = round(q - f32, 4)
                row[f"{mode}_quality_met"] = abs(q - f32) <= TARGETS["lm_bits_per_char"]
            else:
                row[f"{mode}_accuracy_change_points"] = round(100 * (q - f32), 2)
                row[f"{mode}_quality_met"] = abs(100 * (q - f32)) <= TARGETS["digits_accuracy_points"] + 1e-9
            speedup = m["speedup_vs_float32"][mode][large]
            row[f"{mode}_vs_float32_batch{large}"] = round(speedup, 2)
            row[f"{mode}_speed_met"] = speedup >= TARGETS["quantized_vs_float32_large_batch"]
        ceiling = m["ceiling_vs_float32"][large]
        row[f"ceiling_vs_float32_batch{large}"] = round(ceiling, 2)
        row["speed_target_reachable"] = ceiling >= TARGETS["quantized_vs_float32_large_batch"]
        row["quality_float32"] = round(f32, 4)
        row["dense_bytes_ratio"] = round(m["dense_bytes_ratio"], 3)
        row["dense_bytes_met"] = m["dense_bytes_ratio"] >= TARGETS["dense_bytes_ratio"]
        row["int8_vs_dequant_batch1"] = round(m["int8_vs_dequant_batch1"], 2)
        row["int8_vs_dequant_met"] = m["int8_vs_dequant_batch1"] >= TARGETS["int8_vs_dequant_batch1"]
        row["ceiling_vs_dequant_batch1"] = round(m["ceiling_vs_dequant_batch1"], 2)
        row["int8_vs_dequant_reachable"] = m["ceiling_vs_dequant_batch1"] >= TARGETS["int8_vs_dequant_batch1"]
        out[name] = row
    return out


def table_markdown(measured: dict, config: Config) -> str:
    """The table: one row per model and mode."""
    batches = sorted(config.batches)
    head = (["model", "mode", "quality", "dense bytes", "all bytes"] + [f"latency b={b} (ms)" for b in batches]
            + [f"speed-up vs float32 b={b}" for b in batches])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in measured.items():
        for mode in MODES:
            r = m["modes"][mode]
            quality = f"{r['quality']:.4f} bits/char" if name == "lm" else f"{100 * r['quality']:.2f}%"
            speed = [f"{m['speedup_vs_float32'][mode][b]:.2f}x" if mode != "float32" else "" for b in batches]
            lines.append("| " + " | ".join([name, mode, quality, f"{r['dense_bytes']:,}", f"{r['all_bytes']:,}"]
                                           + [f"{1e3 * r['latency_s'][b]:.3f}" for b in batches] + speed) + " |")
        lines.append(f"| {name} | dequantise-then-dot | | | | {1e3 * m['dequant_latency_s']:.3f} |"
                     + " |" * (2 * len(batches) - 1))
        free = m["dense_free_latency_s"]  # the ceilings: against float32, and at batch 1 against dequantising
        ceilings = [f"{m['ceiling_vs_float32'][b]:.2f}x" for b in batches]
        ceilings[0] += f" ({m['ceiling_vs_dequant_batch1']:.2f}x dequantise-then-dot)"
        lines.append("| " + " | ".join([name, "dense layers free (ceiling)", "", "", ""]
                                       + [f"{1e3 * free[b]:.3f}" for b in batches] + ceilings) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["Config", "MODES", "TARGETS", "dense_bytes", "dense_free", "dequantized", "measure", "run", "summary",
           "table_markdown"]
