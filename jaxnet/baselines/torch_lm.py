"""``jaxnet.models.TransformerLM`` written again in PyTorch: the baseline for training throughput.

    run, n_params = torch_trainer(config, windows)   # config: a TransformerConfig
    seconds = run(10)                                 # ten AdamW updates, timed

The same network as ``TransformerLM(config)``: pre-LayerNorm GPT blocks (fused QKV, tanh-GELU MLP,
tied embeddings scaled by 1/sqrt(C), rotary positions with jaxnet's own tables or a learned table,
dropout on the embeddings and residual branches), trained with AdamW and gradient clipping, one
full update per step. Attention is ``F.scaled_dot_product_attention(is_causal=True)``, PyTorch's
fused CPU attention. Needs torch (``pip install 'jaxnet[torch]'``).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence


# The settings of TransformerConfig this baseline implements only one way.
SUPPORTED = {"activation": "gelu_tanh", "tie_embeddings": True, "use_bias": True, "attention_dropout_rate": 0.0}


def check_supported(config) -> None:
    """Raises ValueError naming the first setting of ``config`` that ``torch_gpt`` does not implement."""
    for name, value in SUPPORTED.items():
        if getattr(config, name) != value:
            raise ValueError(f"the PyTorch baseline implements only {name}={value!r}, got {getattr(config, name)!r}")


def torch_gpt(config):
    """A PyTorch ``nn.Module`` equal in structure to ``TransformerLM(config)``.

    ``module(idx, targets)`` returns the mean cross-entropy; ``idx, targets: [B, T] long``.

    Raises:
      ValueError: a setting this baseline does not implement (another activation, untied
        embeddings, no biases, attention dropout).
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from jaxnet.models.transformer import rotary_tables

    check_supported(config)
    c, h, p, v = config.embed_dim, config.num_heads, config.dropout_rate, config.vocab_size
    rope = None
    if config.positions == "rotary":
        # jaxnet's own tables (float64 angles rounded once), so both sides rotate identically.
        rope = tuple(torch.from_numpy(t.copy()) for t in rotary_tables(config.block_size, c // h, config.rope_base))

    def rotate(x):  # x: (B, H, T, D)
        cos, sin = (r[: x.shape[2]] for r in rope)  # (T, D/2)
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
            hidden = config.mlp_ratio * c
            self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, c))
            self.drop = nn.Dropout(p)

        def forward(self, x):
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.drop(self.mlp(self.ln2(x)))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(v, c)
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
            return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1))

    return GPT()


def torch_trainer(config, windows: Sequence[tuple], *, threads: int = 0, autocast: bool = False,
                  learning_rate: float = 1e-3, weight_decay: float = 0.1, clip_norm: float = 1.0,
                  seed: int = 0) -> tuple[Callable[[int], float], int]:
    """``(run, n_params)``: ``run(n)`` makes ``n`` training updates and returns their seconds.

    Args:
      config: a ``TransformerConfig`` (see ``torch_gpt``).
      windows: ``(x, y)`` pairs of ``[B, T]`` int arrays, used in turn, one per update.
      threads: PyTorch's intra-op threads (0: ``os.cpu_count()``).
      autocast: forward and loss under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (bf16
        matmuls, f32 parameters): the partner of a bfloat16 ``config.dtype``.
    """
    import torch

    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(seed)
    model = torch_gpt(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    batches = [(torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)) for x, y in windows]
    box = {"i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            x, y = batches[box["i"] % len(batches)]
            box["i"] += 1
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
        return time.perf_counter() - t

    return run, sum(q.numel() for q in model.parameters())


__all__ = ["SUPPORTED", "check_supported", "torch_gpt", "torch_trainer"]
