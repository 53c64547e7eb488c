"""Decoder-only transformers: a causal language model, a sequence classifier, and cached generation.

    config = TransformerConfig(vocab_size=100, block_size=128, num_layers=4, embed_dim=192)
    model = TransformerLM(config)
    variables = model.init(jax.random.key(0), ids)                    # ids: [B, T] int32
    logits = model.apply(variables, ids, train=True, rngs={"dropout": key})   # [B, T, V]
    out = generate(model, variables["params"], prompt, key, max_new_tokens=200, top_k=10)

The blocks are pre-LayerNorm (GPT-2 / nanoGPT): ``x + attn(ln(x))``, ``x + mlp(ln(x))``, with a
final LayerNorm. Attention projects q, k and v with one fused ``[C, 3C]`` matmul; the MLP's two
matmuls (the first with its activation fused in) go through ``jaxnet.nn.FusedDense``, so any
``kernels`` backend runs them. The output layer reuses the token embedding (tied weights).

Generation keeps a key-value cache: ``TransformerLM.decode`` runs ``S`` new tokens at positions
``offset .. offset + S - 1`` against a cache of every earlier position, so a prompt is one call
(prefill) and each new token one more; ``generate`` jits the whole loop.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.arguments import check_fraction
from jaxnet.nn import FusedDense, named_init
from jaxnet.random_bits import threefry_bits
from kernels import activations, xla
from kernels.dispatch import BackendName

POSITIONS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Everything that defines the network's shape. Variants by ``.replace(...)``."""

    # Token ids are in [0, vocab_size).
    vocab_size: int = 256
    # Longest sequence (context) the model sees; learned position tables have this many rows.
    block_size: int = 128
    # Transformer blocks (attention + MLP), >= 1.
    num_layers: int = 4
    # Attention heads per block, >= 1; must divide embed_dim.
    num_heads: int = 4
    # Width C of the residual stream; C // num_heads per head.
    embed_dim: int = 192
    # MLP hidden width as a multiple of C.
    mlp_ratio: int = 4
    # Activation fused into the MLP's first matmul ("gelu_tanh" is GPT-2's, and cheaper than erf).
    activation: Literal[activations.NAMES] = "gelu_tanh"
    # Dropout on the embeddings and on each residual branch (train=True only).
    dropout_rate: float = 0.1
    # Dropout on the attention probabilities (costs a [B, H, T, T] mask per layer; 0 skips it).
    attention_dropout_rate: float = 0.0
    # "rotary" (RoPE on q and k: relative positions from the first step; on the pydoc corpus it
    # learned much faster than a table, 1.71 vs 2.27 nats after 300 steps of a small model) or
    # "learned" (a [block_size, C] table added to the embeddings, GPT-2).
    positions: Literal[POSITIONS] = "rotary"
    # Rotary positions: the base of their frequencies (pair i turns by position * base^(-2i/head width)).
    rope_base: float = 10_000.0
    # Biases in the dense layers.
    use_bias: bool = True
    # Output logits from the token embedding's transpose (no separate [C, V] matrix), scaled by
    # 1/sqrt(C) (Flax lm1b) so that unit-variance embeddings give unit-scale logits.
    tie_embeddings: bool = True
    # Standard deviation of the token embeddings at init. 1.0 keeps the
    # token's identity on the residual stream as large as the blocks' O(1) outputs (their dense
    # layers start LeCun-normal); GPT-2's 0.02 lets the first attention average drown it.
    embed_init_std: float = 1.0
    # Standard deviation of the learned position table at init (positions="learned" only).
    pos_init_std: float = 1.0
    # Initial scale of the final LayerNorm. 0.0 makes the untrained model's logits exactly 0 (loss
    # log V, no initial guess to unlearn); the scale gets its gradient at the first step.
    final_norm_scale_init: float = 1.0
    # Kernel backend of the dense layers ("auto": the fastest available here).
    backend: BackendName = "xla"
    # Activation dtype: float32, bfloat16 or float16 (parameters stay float32); softmax, LayerNorm
    # and logits run in float32.
    dtype: Any = jnp.float32
    # Recompute each block's activations in the backward pass (jax.checkpoint) instead of keeping
    # them: memory for one block's instead of every block's, for about one more forward pass.
    remat: bool = False

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rotary" and (self.embed_dim // self.num_heads) % 2:
            raise ValueError("rotary positions need an even head width")
        for name in ("dropout_rate", "attention_dropout_rate"):
            check_fraction(getattr(self, name), name, allow_zero=True)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def count_params(config: TransformerConfig) -> int:
    """Number of parameters of ``TransformerLM(config)`` (tied embeddings counted once)."""
    c, h, layers = config.embed_dim, config.mlp_ratio * config.embed_dim, config.num_layers
    b = int(config.use_bias)
    per_layer = 2 * 2 * c + (c * 3 * c + b * 3 * c) + (c * c + b * c) + (c * h + b * h) + (h * c + b * c)
    embed = config.vocab_size * c + (config.block_size * c if config.positions == "learned" else 0)
    head = 0 if config.tie_embeddings else c * config.vocab_size
    return embed + layers * per_layer + 2 * c + head


def flops_per_token(config: TransformerConfig, context: int | None = None) -> int:
    """Training FLOPs per token, forward + backward: ``6 N + 12 L C T`` (Kaplan et al. 2020, PaLM).

    ``N`` counts the matmul parameters (the output layer included, position tables not), the
    second term the attention scores and weighted sums over a context of ``T`` (default
    ``block_size``; a causal implementation that computes the full ``T x T`` square does this).
    """
    t = config.block_size if context is None else context
    c, layers = config.embed_dim, config.num_layers
    matmul_params = layers * (3 * c * c + c * c + 2 * config.mlp_ratio * c * c) + c * config.vocab_size
    return 6 * matmul_params + 12 * layers * c * t


# --- pieces ---------------------------------------------------------------------------------------

# Dropout's mask: the four bytes of a 32-bit draw, and their keep bits packed into one byte.
_BYTE_SHIFTS = np.array([0, 8, 16, 24], np.uint32)
_NIBBLE_BITS = np.array([1, 2, 4, 8], np.uint8)
_NIBBLE_SHIFTS = np.arange(4, dtype=np.uint8)


class Dropout(nn.Module):
    """Inverted dropout drawing 8 random bits per element instead of Flax's 32.

    On the CPU the random bits, not the multiply, are most of dropout's cost (threefry hashes 32
    bits per call): a byte per element, four from each 32-bit draw, is a quarter of the hashing,
    and ``threefry_bits`` hashes them as one fused loop (``jax.random.bits``'s bits, 7x faster).
    The keep bits of each draw's four bytes are packed into one byte by a reduction, which XLA
    writes out once; the forward and backward passes unpack it (an elementwise mask would be
    re-hashed inside each of them). The rate is rounded to a multiple of 1/256 (0.1 -> 26/256 ≈
    0.1016) and the kept units are scaled by 1 / (1 - rate) with that rounded rate, so the
    expectation is exact. Draws from the "dropout" rng collection.
    """

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        threshold = int(round(self.rate * 256))
        if deterministic or threshold == 0:
            return x
        # Element i is kept when byte i % 4 (little-endian, as a bitcast to uint8 orders them) of
        # draw i // 4 is >= threshold.
        n = x.size
        words = threefry_bits(self.make_rng("dropout"), (-(-n // 4),))  # [ceil(n / 4)]
        keep4 = ((words[:, None] >> _BYTE_SHIFTS) & np.uint32(255)) >= threshold  # [ceil(n / 4), 4]
        packed = jax.lax.reduce(jnp.where(keep4, _NIBBLE_BITS, np.uint8(0)), np.uint8(0), jax.lax.bitwise_or, (1,))
        keep = (packed[:, None] >> _NIBBLE_SHIFTS) & np.uint8(1)  # [ceil(n / 4), 4]
        keep = keep.reshape(-1)[:n].reshape(x.shape) != 0
        return jnp.where(keep, x * (256 / (256 - threshold)), 0).astype(x.dtype)


@jax.custom_jvp
def softmax(x):
    """``jax.nn.softmax(x, axis=-1)``, same values, differentiated as ``y * (dx - sum(y * dx))``.

    The derivative JAX's ``jax_softmax_custom_jvp`` flag selects (off by default in jax 0.10):
    its backward keeps only ``y``, where differentiating through the division keeps the
    denominator broadcast to ``x``'s shape, a ``[B, H, S, L]`` float32 array per layer.
    """
    unnormalized = jnp.exp(x - x.max(-1, keepdims=True))  # not differentiated: the jvp rule below is used
    return unnormalized / unnormalized.sum(-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - (y * dx).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=32)
def rotary_tables(length: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each ``[length, head_dim / 2] float32``: the rotary angles ``pos * base**(-2i/D)``
    of positions ``0 .. length - 1``, computed in float64 and rounded once (read-only arrays).

    Host constants, not traced computations: inside a jitted step XLA would otherwise fuse the
    ``cos``/``sin`` into every consumer and evaluate them per element of ``[B, T, H, D]`` (and
    again in the backward pass), the largest non-matmul cost of the LM's step before this.
    """
    inv_freq = float(base) ** (-np.arange(0, head_dim // 2, dtype=np.float64) * 2 / head_dim)  # (D/2,)
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]  # (length, D/2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    cos.flags.writeable = sin.flags.writeable = False
    return cos, sin


def _rotary_at(positions, head_dim: int, base: float, length: int | None = None):
    """``(cos, sin)`` ``[T, D/2] float32`` at ``positions: [T]``.

    Concrete positions (a training window: ``0 .. T-1``) index the host tables. Traced positions
    (cached decoding at a traced offset) gather from the ``length``-row table when the largest
    position is known to be below ``length``, else compute the angles in float32 on the device.
    """
    try:
        pos = np.asarray(positions)
    except jax.errors.TracerArrayConversionError:
        pos = None
    if pos is not None:
        cos, sin = rotary_tables(int(pos.max(initial=0)) + 1, head_dim, base)
        return cos[pos], sin[pos]
    if length is not None:
        cos, sin = rotary_tables(length, head_dim, base)
        return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)
    inv_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2 / head_dim)  # (D/2,)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    """Rotates the pairs ``(x[..., i], x[..., i + D/2])`` of ``x: [..., D]`` by the angles whose
    ``cos, sin: [..., D/2]`` broadcast against ``x``'s halves. In float32, cast back to x's dtype."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rotary(x: jax.Array, positions, base: float) -> jax.Array:
    """Rotary position embedding (RoFormer) of ``x: [B, T, H, D]`` at ``positions: [T]``.

    Pairs ``(x[..., i], x[..., i + D/2])`` are rotated by ``pos * base**(-2i/D)``: the dot product
    of a rotated query and key depends only on their distance. ``positions`` may be a NumPy array
    (the angles then come from ``rotary_tables``) or a traced array.
    """
    cos, sin = _rotary_at(positions, x.shape[-1], base)
    return _rotate(x, cos[None, :, None, :], sin[None, :, None, :])


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection.

    ``x: [B, S, C]`` at ``positions: [S]``. Without a cache the keys are the S inputs themselves;
    with ``cache = {"k", "v": [B, L, H, D]}`` the new keys and values are written at
    ``positions`` and the queries attend to every cached position ``<=`` their own. Returns
    ``(y: [B, S, C], cache or None)``.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, train: bool = False, cache=None):
        cfg = self.config
        b, s, c = x.shape
        h, d = cfg.num_heads, cfg.head_dim
        qkv = FusedDense(3 * c, use_bias=cfg.use_bias, backend=cfg.backend, init_scheme="lecun",
                         axes=("embed", "heads"), name="qkv")(x)  # (B, S, 3C)
        qkv = qkv.reshape(b, s, 3, h, d)
        # split, not indexing: its gradient is one concatenate, where three slices' gradients
        # are pads summed into the [B, S, 3, H, D] cotangent (docs/benchmarks.md, mixed precision).
        qk, v = jnp.split(qkv, [2], axis=2)  # (B, S, 2, H, D), (B, S, 1, H, D)
        v = v[:, :, 0]
        if cfg.positions == "rotary":
            # q and k rotated together: one pass over the fused projection's output.
            cos, sin = _rotary_at(positions, d, cfg.rope_base, None if cache is None else cache["k"].shape[1])
            qk = _rotate(qk, cos[None, :, None, None, :], sin[None, :, None, None, :])
        q, k = (t[:, :, 0] for t in jnp.split(qk, 2, axis=2))  # (B, S, H, D) each
        if cache is None:
            key_positions = positions
        else:
            start = positions[0]
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
            cache = {"k": k, "v": v}
            key_positions = np.arange(k.shape[1])
        # Scores in float32: a [T, T] softmax in bf16 loses the small probabilities. The two
        # einsums take cfg.dtype operands with f32 accumulation, backward included (kernels.xla).
        # Not a [B, H, S, D] layout for q, k and v: the backward would transpose the gradients
        # back into the fused projection's [B, S, 3C].
        scores = xla.einsum("bshd,bthd->bhst", q, k.astype(q.dtype)) / jnp.sqrt(d)
        allowed = key_positions[None, :] <= positions[:, None]  # (S, L): causal
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = softmax(scores).astype(x.dtype)  # (B, H, S, L)
        # For jaxnet.explain.attention: kept only when "intermediates" is mutable, else a no-op.
        self.sow("intermediates", "attention_weights", probs)
        # MiniLM's value relation (distillation), per head: computed only when its collection is
        # asked for (jaxnet.explain.attention.output_and_attention), so no other forward pays for it
        # (init makes every collection but "intermediates" mutable: not there either).
        if self.is_mutable_collection("relations") and not self.is_initializing():
            self.sow("relations", "value_relation",
                     softmax(xla.einsum("bshd,bthd->bhst", v, v).astype(jnp.float32) / jnp.sqrt(d)))  # (B, H, S, S)
        if cfg.attention_dropout_rate > 0:
            probs = Dropout(cfg.attention_dropout_rate, deterministic=not train)(probs)
        y = xla.einsum("bhst,bthd->bshd", probs, v.astype(x.dtype)).astype(x.dtype).reshape(b, s, c)
        y = FusedDense(c, use_bias=cfg.use_bias, backend=cfg.backend, init_scheme="lecun", axes=("heads", "embed"),
                       name="proj")(y)
        return y, cache


class MLPBlock(nn.Module):
    """``[..., C] -> [..., C]``: ``FusedDense(mlp_ratio*C, activation) -> FusedDense(C)``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = FusedDense(cfg.mlp_ratio * cfg.embed_dim, activation=cfg.activation, use_bias=cfg.use_bias,
                            backend=cfg.backend, init_scheme="lecun", axes=("embed", "mlp"), name="fc")(x)
        return FusedDense(cfg.embed_dim, use_bias=cfg.use_bias, backend=cfg.backend, init_scheme="lecun",
                          axes=("mlp", "embed"), name="out")(hidden)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + drop(attn(ln(x)))``, then ``x + drop(mlp(ln(x)))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, train: bool = False, cache=None):
        cfg = self.config
        drop = Dropout(cfg.dropout_rate, deterministic=not train)
        a, cache = CausalSelfAttention(cfg, name="attn")(
            nn.LayerNorm(dtype=jnp.float32, name="ln1")(x).astype(cfg.dtype), positions, train, cache)
        x = x + drop(a)
        m = MLPBlock(cfg, name="mlp")(nn.LayerNorm(dtype=jnp.float32, name="ln2")(x).astype(cfg.dtype))
        y = x + drop(m)
        # For TinyBERT's hidden-state transfer (distillation): kept only when "intermediates" is mutable.
        self.sow("intermediates", "hidden_state", y)
        return y, cache


class Trunk(nn.Module):
    """Embeddings, blocks and the final LayerNorm, shared by the LM and the classifier.

    ``ids: [B, S]`` at positions ``offset .. offset + S - 1`` -> ``(h: [B, S, C], cache)`` and the
    token embedding module (for tied output logits).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.wte = nn.Embed(cfg.vocab_size, cfg.embed_dim,
                            embedding_init=named_init(nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")),
                            name="wte")
        if cfg.positions == "learned":
            self.wpe = nn.Embed(cfg.block_size, cfg.embed_dim,
                                embedding_init=named_init(nn.initializers.normal(cfg.pos_init_std), (None, "embed")),
                                name="wpe")
        self.drop = Dropout(cfg.dropout_rate)
        # static_argnums counts self: 3 is ``train``.
        block = nn.remat(Block, static_argnums=(3,)) if cfg.remat else Block
        self.blocks = [block(cfg, name=f"block{i}") for i in range(cfg.num_layers)]
        self.ln_f = nn.LayerNorm(dtype=jnp.float32, scale_init=nn.initializers.constant(cfg.final_norm_scale_init),
                                 name="ln_f")

    def __call__(self, ids, train: bool = False, cache=None, offset=0):
        cfg = self.config
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"expected integer token ids [B, T], got {ids.dtype} {tuple(ids.shape)}")
        s = ids.shape[1]
        if cache is None and s > cfg.block_size:
            raise ValueError(f"sequence length {s} exceeds block_size {cfg.block_size}")
        # NumPy for a static offset (training, prefill): the rotary tables and the causal mask are
        # then constants of the compiled program.
        positions = offset + np.arange(s)
        x = self.wte(ids)
        if cfg.positions == "learned":
            x = x + self.wpe(positions)[None]
        x = self.drop(x.astype(cfg.dtype), deterministic=not train)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, train, None if cache is None else cache[i])
            new_cache.append(c)
        return self.ln_f(x), (None if cache is None else tuple(new_cache))


class TransformerLM(nn.Module):
    """Decoder-only language model. ``ids: [B, T] int -> logits [B, T, vocab_size] float32``.

    ``logits[:, t]`` depends on ``ids[:, :t+1]`` only (causal), so one call scores every position
    of a window: train with ``cross_entropy(logits, ids shifted left)``.
    """

    config: TransformerConfig

    def setup(self):
        self.trunk = Trunk(self.config, name="trunk")
        if not self.config.tie_embeddings:
            self.head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=jnp.float32, name="head",
                                 kernel_init=named_init(nn.initializers.lecun_normal(), ("embed", "vocab")))

    def _logits(self, h):
        cfg = self.config
        if cfg.tie_embeddings:
            if xla.is_low_precision(cfg.dtype):
                # The [C, V] matmul in cfg.dtype with f32 accumulation (forward and backward); the
                # logits, softmax and loss stay float32.
                table = self.trunk.wte.embedding.astype(cfg.dtype)  # (V, C)
                return xla.einsum("btc,vc->btv", h.astype(cfg.dtype), table) / jnp.sqrt(cfg.embed_dim)
            return self.trunk.wte.attend(h.astype(jnp.float32)) / jnp.sqrt(cfg.embed_dim)  # (B, T, V)
        return self.head(h.astype(jnp.float32))

    def __call__(self, ids, train: bool = False):
        h, _ = self.trunk(ids, train)
        return self._logits(h)

    def decode(self, ids, cache, offset):
        """Runs ``ids: [B, S]`` at positions ``offset..offset+S-1`` against ``cache`` (inference).

        Returns ``(logits [B, S, V], cache)`` with the new keys and values written in.
        """
        h, cache = self.trunk(ids, False, cache, offset)
        return self._logits(h), cache


class TransformerClassifier(nn.Module):
    """Sequence classification on the same trunk: ``ids: [B, T] -> logits [B, num_classes]``.

    The final hidden states are pooled over the tokens that are not ``pad_id`` ("mean"), or the
    last such token is taken ("last": with causal attention it has seen the whole sequence).
    Pad at the end of a sequence: earlier tokens never attend to later ones, so padding there does
    not change them.
    """

    config: TransformerConfig
    num_classes: int
    pad_id: int | None = None
    pooling: str = "mean"

    @nn.compact
    def __call__(self, ids, train: bool = False):
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        h, _ = Trunk(self.config, name="trunk")(ids, train)  # (B, T, C)
        keep = jnp.ones(ids.shape, bool) if self.pad_id is None else ids != self.pad_id  # (B, T)
        if self.pooling == "mean":
            w = keep.astype(jnp.float32)[..., None]
            pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # (B, C)
        else:
            last = jnp.maximum(jnp.sum(keep, axis=1) - 1, 0)  # pads only at the end
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        pooled = Dropout(self.config.dropout_rate, deterministic=not train)(pooled)
        return FusedDense(self.num_classes, backend=self.config.backend, init_scheme="lecun",
                          name="head")(pooled.astype(jnp.float32))


# --- generation -------------------------------------------------------------------------------------

def init_cache(config: TransformerConfig, batch_size: int, length: int, dtype=None) -> tuple:
    """An empty key-value cache: per layer ``{"k", "v": zeros [B, length, H, D]}``."""
    shape = (batch_size, length, config.num_heads, config.head_dim)
    dtype = dtype or config.dtype
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers))


def _pick(logits, key, temperature, top_k, greedy):
    """Next token ids ``[B]`` from ``logits: [B, V]``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy"))
def generate(model: TransformerLM, params, prompt, key, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, greedy: bool = False):
    """Continues ``prompt: [B, P] int`` by ``max_new_tokens`` tokens with a key-value cache.

    Args:
      model: a ``TransformerLM``; params: its ``variables["params"]``.
      key: PRNG key for sampling (unused when ``greedy``).
      temperature: divides the logits before sampling; top_k: sample among the k likeliest only.
      greedy: take the argmax at every step (deterministic).

    Returns:
      ``[B, P + max_new_tokens] int32``: the prompt followed by the new tokens. With learned
      positions ``P + max_new_tokens`` must not exceed ``block_size``.
    """
    cfg = model.config
    b, p = prompt.shape
    total = p + max_new_tokens
    if p < 1 or max_new_tokens < 1:
        raise ValueError(f"generate needs a prompt of >= 1 token and max_new_tokens >= 1, got {p}, {max_new_tokens}")
    if cfg.positions == "learned" and total > cfg.block_size:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds block_size {cfg.block_size}")
    variables = {"params": params}
    cache = init_cache(cfg, b, total)
    logits, cache = model.apply(variables, prompt.astype(jnp.int32), cache, 0, method=TransformerLM.decode)
    keys = jax.random.split(key, max_new_tokens)
    first = _pick(logits[:, -1], keys[0], temperature, top_k, greedy)

    def step(carry, i):
        token, cache = carry
        logits, cache = model.apply(variables, token[:, None], cache, p + i, method=TransformerLM.decode)
        nxt = _pick(logits[:, -1], keys[i + 1], temperature, top_k, greedy)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens - 1))
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)  # (B, max_new_tokens)
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


__all__ = ["Block", "CausalSelfAttention", "MLPBlock", "TransformerClassifier", "TransformerConfig",
           "TransformerLM", "Trunk", "count_params", "flops_per_token", "generate", "init_cache", "rotary",
           "rotary_tables"]
