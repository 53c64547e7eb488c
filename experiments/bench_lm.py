"""Training throughput of jaxnet's TransformerLM against the same model in PyTorch, side by side.

    python -m experiments.bench_lm                   # the lm experiment's default model, ~1 minute
    python -m experiments.bench_lm --batch-size 64 --dropout-rate 0
    python -m experiments.bench_lm --dtype bfloat16 --torch-autocast   # mixed precision on both sides

Both sides train the same network on the same (batch, time) windows of the default corpus:
pre-LayerNorm GPT blocks (fused QKV, tanh-GELU MLP, tied embeddings, rotary or learned
positions, dropout on embeddings and residual branches), AdamW with weight decay and gradient clipping at 1.0, one
full update per step. PyTorch uses ``F.scaled_dot_product_attention(is_causal=True)`` (its fused
CPU attention) and as many threads as JAX's CPU client uses cores (``--threads``, default all),
in a spawned child process with glibc's default allocator settings (this process keeps freed
memory for JAX, ``jaxnet.runtime.keep_host_memory``, which slowed PyTorch's autocast step ~1.8x).
Repeats alternate between the two (jaxnet, then PyTorch, ``repeats`` times) so a busy shared
machine slows both alike; each side's figure is the median of its repeats after warm-up (and the
best repeat, the least disturbed, beside it), timed to completion (``block_until_ready`` / synchronous PyTorch). Tokens/s = batch x block / step time;
GFLOP/s from ``flops_per_token`` (6N + 12 L C T). Measured (docs/benchmarks.md "Language", quiet
machine, session 3's final code): jaxnet f32 vs PyTorch f32 1.65-1.89x (e.g. 18,222 vs 11,050
tokens/s); jaxnet bf16 vs PyTorch bf16 autocast 1.61-1.73x; jaxnet bf16 vs PyTorch f32
2.67-2.72x. Under load PyTorch's threads collapse and the ratio reads 2.7-6.5x.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import numpy as np

from experiments.common import enable_compilation_cache, finish, parse_config
from jaxnet import runtime

# Before JAX starts: the train step's ~450 MB temporary buffer is allocated on XLA's worker
# threads, and only the main heap can keep a block that large (kernels/host_memory.py).
runtime.keep_host_memory(single_arena=True)


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int = 32
    block_size: int = 128
    num_layers: int = 4
    embed_dim: int = 192
    num_heads: int = 4
    dropout_rate: float = 0.15
    # "rotary" (the lm experiment's default) or "learned" (nanoGPT's table).
    positions: str = "rotary"
    # Activation dtype of the jaxnet model: "float32" or "bfloat16".
    dtype: str = "float32"
    backend: str = "xla"
    # Timed steps per repeat, repeats per side (alternating), untimed warm-up steps per side.
    steps: int = 4
    repeats: int = 7
    warmup: int = 2
    # PyTorch threads (0: os.cpu_count()).
    threads: int = 0
    # Measure PyTorch too (needs torch installed).
    torch: bool = True
    # Run PyTorch's forward and loss under torch.autocast("cpu", dtype=torch.bfloat16) (its
    # mixed precision: bf16 matmuls, f32 parameters), the like-for-like partner of --dtype bfloat16.
    torch_autocast: bool = False


def jax_side(config: Config, vocab_size: int, windows):
    import jax
    import jax.numpy as jnp

    from jaxnet import losses, optim
    from jaxnet.models.transformer import TransformerConfig, TransformerLM
    from jaxnet.train import TrainState, make_train_step

    cfg = TransformerConfig(vocab_size=vocab_size, block_size=config.block_size, num_layers=config.num_layers,
                            num_heads=config.num_heads, embed_dim=config.embed_dim,
                            dropout_rate=config.dropout_rate, backend=config.backend, positions=config.positions,
                            dtype=jnp.dtype(config.dtype))
    model = TransformerLM(cfg)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.1,
                                                    clip_norm=1.0))
    state = TrainState.create(model=model, tx=tx, sample_x=windows[0][0], seed=0)
    step = jax.jit(make_train_step(losses.cross_entropy), donate_argnums=0)
    batches = [{"x": jnp.asarray(x), "y": jnp.asarray(y)} for x, y in windows]
    rng = jax.random.key(1)
    box = {"state": state, "i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            box["state"], m = step(box["state"], batches[box["i"] % len(batches)], rng)
            box["i"] += 1
        jax.block_until_ready((box["state"].params, m))
        return time.perf_counter() - t

    return run, cfg


def torch_side(config: Config, vocab_size: int, windows):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from jaxnet.models.transformer import rotary_tables

    torch.set_num_threads(config.threads or os.cpu_count())
    torch.manual_seed(0)
    c, h, p = config.embed_dim, config.num_heads, config.dropout_rate

    rope = None
    if config.positions == "rotary":
        d = c // h
        # jaxnet's own tables (float64 angles rounded once), so both sides rotate identically.
        rope = tuple(torch.from_numpy(t.copy()) for t in rotary_tables(config.block_size, d, 10_000.0))  # (T, D/2)

    def rotate(x):  # x: (B, H, T, D)
        cos, sin = (r[: x.shape[2]] for r in rope)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
            if rope is not None:  # the same rotation as jaxnet.models.transformer.rotary
                q, k = rotate(q), rotate(k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn, self.ln2 = nn.LayerNorm(c), Attention(), nn.LayerNorm(c)
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"), nn.Linear(4 * c, c))
            self.drop = nn.Dropout(p)

        def forward(self, x):
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.drop(self.mlp(self.ln2(x)))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, c)
            self.wpe = nn.Embedding(config.block_size, c) if rope is None else None
            self.drop = nn.Dropout(p)
            self.blocks = nn.ModuleList(Block() for _ in range(config.num_layers))
            self.ln_f = nn.LayerNorm(c)

        def forward(self, idx, targets):
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(idx.shape[1]))
            x = self.drop(x)
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T / c ** 0.5  # tied embeddings, scaled as jaxnet's
            return F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))

    model = GPT()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batches = [(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)) for x, y in windows]
    box = {"i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            x, y = batches[box["i"] % len(batches)]
            box["i"] += 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.torch_autocast):
                loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return time.perf_counter() - t

    return run, sum(q.numel() for q in model.parameters())


def _torch_child(conn, config: Config, vocab_size: int, windows) -> None:
    """The PyTorch side in its own process: answers each ``n`` sent with ``run(n)``'s seconds."""
    try:
        run, n_params = torch_side(config, vocab_size, windows)
    except ImportError as e:
        conn.send(("missing", str(e)))
        return
    conn.send(("ready", n_params))
    while (n := conn.recv()) is not None:
        conn.send(run(n))


def torch_in_child(config: Config, vocab_size: int, windows):
    """``(run, n_params, close)`` for the PyTorch side running in a spawned child process.

    The child is started with ``JAXNET_KEEP_HOST_MEMORY=0``: jaxnet's allocator settings
    (``jaxnet.runtime.keep_host_memory``, which this process applies for JAX) slowed PyTorch's
    autocast step ~1.8x, so PyTorch is timed with glibc's defaults, as it would run on its own.
    Raises ImportError when torch is not installed.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = os.environ.get("JAXNET_KEEP_HOST_MEMORY")
    os.environ["JAXNET_KEEP_HOST_MEMORY"] = "0"
    try:
        proc = ctx.Process(target=_torch_child, args=(child, config, vocab_size, windows), daemon=True)
        proc.start()
    finally:
        if saved is None:
            del os.environ["JAXNET_KEEP_HOST_MEMORY"]
        else:
            os.environ["JAXNET_KEEP_HOST_MEMORY"] = saved
    status, payload = parent.recv()
    if status != "ready":
        proc.join()
        raise ImportError(payload)

    def run(n: int) -> float:
        parent.send(n)
        return parent.recv()

    def close() -> None:
        parent.send(None)
        proc.join(timeout=30)

    return run, payload, close


def main(argv=None) -> dict:
    config, workdir = parse_config(Config, argv, name="bench_lm", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    import jax

    from jaxnet.data.text import pydoc_corpus, random_windows
    from jaxnet.models.transformer import TransformerConfig, count_params, flops_per_token

    corpus = pydoc_corpus()
    windows = [tuple(np.asarray(a) for a in random_windows(jax.random.key(i), corpus.train, config.batch_size,
                                                             config.block_size)) for i in range(8)]
    sides = {"jaxnet": jax_side(config, len(corpus.vocab), windows)[0]}
    close_torch = None
    if config.torch:
        try:
            run_torch, torch_params, close_torch = torch_in_child(config, len(corpus.vocab), windows)
            sides["pytorch"] = run_torch
        except ImportError:
            print("bench_lm: torch is not installed (pip install 'jaxnet[torch]'); jaxnet only", file=sys.stderr)
    load_before = os.getloadavg()[0]
    for name, run in sides.items():  # warm-up: compilation, allocator, thread pools
        run(config.warmup)
    times = {name: [] for name in sides}
    for r in range(config.repeats):
        for name, run in sides.items():
            times[name].append(run(config.steps) / config.steps)
        print(f"repeat {r + 1}/{config.repeats}: " + ", ".join(
            f"{n} {config.batch_size * config.block_size / t[-1]:.0f} tok/s" for n, t in times.items()),
            file=sys.stderr, flush=True)
    if close_torch is not None:
        close_torch()
    model_cfg = TransformerConfig(vocab_size=len(corpus.vocab), block_size=config.block_size,
                                  num_layers=config.num_layers, num_heads=config.num_heads,
                                  embed_dim=config.embed_dim, positions=config.positions)
    fpt = flops_per_token(model_cfg)
    tokens = config.batch_size * config.block_size
    result = {"experiment": "bench_lm", "params": count_params(model_cfg),
              "batch_size": config.batch_size, "block_size": config.block_size, "dtype": config.dtype,
              "torch_autocast": config.torch_autocast,
              "dropout_rate": config.dropout_rate, "positions": config.positions, "cpu_count": os.cpu_count(),
              "flops_per_token": fpt, "repeats": config.repeats, "steps_per_repeat": config.steps,
              # The machine's 1-minute load average around the measurement (a shared machine).
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_step_ms"] = round(med * 1e3, 2)
        result[f"{name}_tokens_per_s"] = round(tokens / med, 1)
        result[f"{name}_gflops"] = round(tokens * fpt / med / 1e9, 2)
        # The fastest repeat: the least disturbed by other jobs.
        result[f"{name}_best_tokens_per_s"] = round(tokens / min(ts), 1)
        result[f"{name}_tokens_per_s_per_repeat"] = [round(tokens / t) for t in ts]
    if "pytorch" in sides:
        result["pytorch_params"] = torch_params
        result["speedup_vs_pytorch"] = round(result["jaxnet_tokens_per_s"] / result["pytorch_tokens_per_s"], 3)
        result["speedup_vs_pytorch_best"] = round(
            result["jaxnet_best_tokens_per_s"] / result["pytorch_best_tokens_per_s"], 3)
    return finish(result, workdir)


if __name__ == "__main__":
    main()
