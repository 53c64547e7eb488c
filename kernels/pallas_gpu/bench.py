"""Side-by-side timing of the Pallas kernels against XLA's own ``act(x @ w + b)``.

Both sides run in the same process on the same arrays, sampled in turn (``kernels.timing``):
medians of several samples after warm-up, each sample a run of back-to-back calls lasting at
least ``min_sample_s`` and ended by ``block_until_ready``, so that the host's per-call dispatch
(tens of microseconds) overlaps the GPU's work instead of adding to a 0.2 ms kernel. TFLOP/s counts
the matmul flops only: 2 M N K for the forward, 6 M N K for forward + backward (dx and dw are one
matmul each).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import kernels
from kernels.pallas_gpu.blocks import BlockConfig
from kernels.pallas_gpu.ops import fused_dense
from kernels.timing import interleaved_medians, timed_call


@dataclasses.dataclass(frozen=True)
class Problem:
    """``x: [m, k] @ w: [k, n] + b``, then ``activation``; ``name`` says where the shape comes from."""

    m: int
    k: int
    n: int
    activation: str
    name: str = ""

    @property
    def flops_fwd(self) -> int:
        return 2 * self.m * self.n * self.k


HEADLINE = Problem(4096, 4096, 4096, "relu", "square 4096^3")
# Transformer MLP shapes: 8 sequences of 1024 tokens (M = 8192) through d -> 4d (GELU/SiLU) and
# back 4d -> d (no activation), for d = 1024, 2048, 4096.
TRANSFORMER_GRID = (
    Problem(8192, 1024, 4096, "gelu_tanh", "mlp up, d=1024"),
    Problem(8192, 4096, 1024, "identity", "mlp down, d=1024"),
    Problem(8192, 2048, 8192, "gelu", "mlp up, d=2048"),
    Problem(8192, 8192, 2048, "identity", "mlp down, d=2048"),
    Problem(8192, 4096, 16384, "silu", "mlp up, d=4096"),
)
# Tiny stand-ins for a CPU dry run of the script (interpret mode): they check the plumbing only.
QUICK_HEADLINE = Problem(64, 64, 64, "relu", "quick square")
QUICK_GRID = (Problem(48, 32, 80, "gelu_tanh", "quick mlp up"), Problem(33, 40, 17, "identity", "quick mlp down"))


def _inputs(p: Problem, dtype):
    kx, kw, kb, kd = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (p.m, p.k), dtype)
    w = (jax.random.normal(kw, (p.k, p.n), jnp.float32) / jnp.sqrt(p.k)).astype(dtype)
    b = jax.random.normal(kb, (p.n,), dtype)
    dy = jax.random.normal(kd, (p.m, p.n), dtype)
    return x, w, b, dy


def _fns(fwd):
    """jitted forward and forward + backward (all three gradients) of ``fwd(x, w, b)``."""
    def fwd_bwd(x, w, b, dy):
        _, vjp = jax.vjp(fwd, x, w, b)
        return vjp(dy)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def measure(p: Problem, *, dtype=jnp.bfloat16, lowering: str = "auto", config: BlockConfig | None = None,
            repeats: int = 10, warmup: int = 2, min_sample_s: float = 0.02) -> dict:
    """Times Pallas and XLA, forward and forward + backward, on one problem; returns a row.
    ``min_sample_s``: 0 times single calls (each waited for)."""
    x, w, b, dy = _inputs(p, dtype)
    pallas = _fns(lambda x, w, b: fused_dense(x, w, b, activation=p.activation, config=config, lowering=lowering))
    xla = _fns(lambda x, w, b: kernels.fused_dense(x, w, b, activation=p.activation, backend="xla"))
    row = {"name": p.name, "m": p.m, "k": p.k, "n": p.n, "activation": p.activation,
           "dtype": jnp.dtype(dtype).name, "config": None if config is None else dataclasses.asdict(config)}
    samplers = {}
    for label, (f, fb) in (("pallas", pallas), ("xla", xla)):
        samplers[label, "fwd"] = timed_call(f, (x, w, b), min_sample_s=min_sample_s)
        samplers[label, "fwdbwd"] = timed_call(fb, (x, w, b, dy), min_sample_s=min_sample_s)
    t = interleaved_medians(samplers, repeats, max(1, warmup))
    for label in ("pallas", "xla"):
        t_f, t_fb = t[label, "fwd"], t[label, "fwdbwd"]
        row[f"{label}_fwd_ms"] = t_f * 1e3
        row[f"{label}_fwdbwd_ms"] = t_fb * 1e3
        row[f"{label}_fwd_tflops"] = p.flops_fwd / t_f / 1e12
        row[f"{label}_fwdbwd_tflops"] = 3 * p.flops_fwd / t_fb / 1e12
    row["fwd_ratio"] = row["pallas_fwd_tflops"] / row["xla_fwd_tflops"]
    row["fwdbwd_ratio"] = row["pallas_fwdbwd_tflops"] / row["xla_fwdbwd_tflops"]
    return row


def markdown_table(rows) -> str:
    """The benchmark rows as a markdown table (TFLOP/s and Pallas/XLA ratios)."""
    head = ("| shape (M x K x N) | act | Pallas fwd TFLOP/s | XLA fwd TFLOP/s | fwd ratio "
            "| Pallas fwd+bwd TFLOP/s | XLA fwd+bwd TFLOP/s | fwd+bwd ratio | blocks (m, n, k, warps, stages) |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']}: {r['m']} x {r['k']} x {r['n']} | {r['activation']} "
                         f"| failed: {r['error'].splitlines()[0][:200]} |||||||")
            continue
        c = r["config"]
        blocks = "default" if c is None else (
            f"{c['block_m']}, {c['block_n']}, {c['block_k']}, {c['num_warps']}, {c['num_stages']}")
        lines.append(
            f"| {r['name']}: {r['m']} x {r['k']} x {r['n']} | {r['activation']} | {r['pallas_fwd_tflops']:.4g} "
            f"| {r['xla_fwd_tflops']:.4g} | {r['fwd_ratio']:.3f} | {r['pallas_fwdbwd_tflops']:.4g} "
            f"| {r['xla_fwdbwd_tflops']:.4g} | {r['fwdbwd_ratio']:.3f} | {blocks} |")
    return head + "\n".join(lines) + "\n"
