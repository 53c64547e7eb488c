"""Will it fit? The sharded train step of a model, built abstractly and compiled for a mesh.

    jaxnet plan --model gpt-1b --mesh data=8 --strategy fsdp --batch-size 16
    jaxnet plan --model gpt-1b --mesh data=4,model=2 --strategy fsdp+tp --remat --dtype bfloat16

Nothing is allocated: the state comes from ``jax.eval_shape``, the step (``make_train_step``
with AdamW, cross-entropy, the strategy's shardings) is lowered and compiled for the mesh on fake
CPU devices (``jax_num_cpu_devices``, set before JAX starts). From the compiled program:

- **memory per device**: arguments + outputs + temporaries - donated (aliased) buffers, from
  XLA's memory analysis, against ``--device-memory-gb``;
- **FLOPs per step**: XLA's cost analysis of one device's program times the devices, beside the
  analytic ``6 N + 12 L C T`` per token (``flops_per_token``; with ``--remat`` XLA's count is
  higher by the recomputed forward passes);
- **collective bytes per step and device**: the result sizes of every all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute in the compiled HLO.

XLA counts a loop body once. With ``--accumulate k`` the micro-batch loop holds almost the whole
step, so both figures are multiplied by k: right for the FLOPs, an upper bound for collectives
that run once per step outside the loop.

The CPU compiler's buffer assignment stands in for the accelerator's: the verdict is an estimate
(same shapes, same shardings, another compiler's temporaries).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

# Shipped configs: the language experiment's model, and a GPT-style ~1.27B-parameter model.
MODELS = {
    "lm": dict(vocab_size=96, block_size=128, num_layers=4, num_heads=4, embed_dim=192, mlp_ratio=4),
    "gpt-125m": dict(vocab_size=50304, block_size=1024, num_layers=12, num_heads=12, embed_dim=768, mlp_ratio=4),
    "gpt-1b": dict(vocab_size=32000, block_size=2048, num_layers=24, num_heads=16, embed_dim=2048, mlp_ratio=4),
}
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                         r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    model: str = "gpt-1b"
    mesh: str = "data=8"
    strategy: str = "fsdp"
    batch_size: int = 8
    accumulate: int = 1
    remat: bool = False
    dtype: str = "float32"
    device_memory_gb: float = 80.0


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", text):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Result bytes of each kind of collective in an HLO module's text (each op counted once)."""
    out: dict[str, int] = {}
    for shape, kind in _COLLECTIVE.findall(hlo):
        out[kind] = out.get(kind, 0) + _shape_bytes(shape)
    return out


def plan(config: PlanConfig) -> dict:
    """Builds, lowers and compiles the sharded step; returns the figures (see the module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxnet import losses, parallel
    from jaxnet.models import TransformerConfig, TransformerLM
    from jaxnet.models.transformer import count_params, flops_per_token
    from jaxnet.train import TrainState, make_train_step

    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; shipped: {sorted(MODELS)}")
    t0 = time.perf_counter()
    mesh = parallel.make_mesh(config.mesh)
    cfg = TransformerConfig(**MODELS[config.model], dtype=jnp.dtype(config.dtype), remat=config.remat)
    model = TransformerLM(cfg)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    sample = np.zeros((1, cfg.block_size), np.int32)
    state = jax.eval_shape(lambda: TrainState.create(model=model, tx=tx, sample_x=sample))
    layout = parallel.Layout.for_state(state, mesh, config.strategy, sample_x=sample)
    step = layout.wrap_step(make_train_step(losses.cross_entropy, micro_batches=config.accumulate))

    def sharded_step(state, batch):
        return step(state, batch, state.rng)

    batch = {"x": jax.ShapeDtypeStruct((config.batch_size, cfg.block_size), jnp.int32, sharding=layout.batch),
             "y": jax.ShapeDtypeStruct((config.batch_size, cfg.block_size), jnp.int32, sharding=layout.batch)}
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, layout.state)
    jitted = jax.jit(sharded_step, donate_argnums=0, out_shardings=(layout.state, layout.replicated))
    lowered = jitted.lower(abstract, batch)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower

    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    loops = config.accumulate  # the micro-batch loop's body holds (almost) the whole step
    xla_flops = float(cost.get("flops", 0.0)) * mesh.size * loops
    tokens = config.batch_size * cfg.block_size
    analytic = flops_per_token(cfg) * tokens
    coll = {k: v * loops for k, v in collective_bytes(compiled.as_text()).items()}
    limit = config.device_memory_gb * 1e9
    params = count_params(cfg)
    result = {
        "plan": config.model, "mesh": config.mesh, "strategy": config.strategy, "devices": int(mesh.size),
        "batch_size": config.batch_size, "block_size": cfg.block_size, "accumulate": config.accumulate,
        "remat": config.remat, "dtype": config.dtype,
        "params": params,
        "state_bytes_total": int(sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(state))),
        "per_device_bytes": int(per_device),
        "per_device_arguments_bytes": int(mem.argument_size_in_bytes),
        "per_device_temp_bytes": int(mem.temp_size_in_bytes),
        "device_memory_bytes": int(limit),
        "fits": bool(per_device <= limit),
        "flops_per_step_xla": xla_flops,
        "flops_per_step_analytic": float(analytic),
        "xla_over_analytic": round(xla_flops / analytic, 3) if analytic else None,
        "collective_bytes_per_device": coll,
        "lower_s": round(t_lower, 2), "compile_s": round(t_compile, 2),
    }
    return result


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(r: dict) -> str:
    """The plan as lines a person reads (the JSON line follows them)."""
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines = [
        f"{r['plan']}: {r['params']:,} parameters; train state (params + AdamW moments) {_gb(r['state_bytes_total'])}",
        f"mesh {r['mesh']} ({r['devices']} devices), strategy {r['strategy']}, batch {r['batch_size']} x "
        f"{r['block_size']} tokens, accumulate {r['accumulate']}, remat {r['remat']}, {r['dtype']}",
        f"per device: {_gb(r['per_device_bytes'])} (arguments {_gb(r['per_device_arguments_bytes'])}, temporaries "
        f"{_gb(r['per_device_temp_bytes'])}) -> {verdict} in {_gb(r['device_memory_bytes'])}",
        f"FLOPs per step: {r['flops_per_step_xla']:.3e} (XLA) vs {r['flops_per_step_analytic']:.3e} (6N + 12LCT), "
        f"ratio {r['xla_over_analytic']}",
        "collectives per step and device: " + (", ".join(f"{k} {_gb(v)}" for k, v in
                                                         sorted(r["collective_bytes_per_device"].items())) or "none"),
        f"lowered in {r['lower_s']} s, compiled in {r['compile_s']} s",
    ]
    return "\n".join(lines)


def main(args) -> int:
    """``jaxnet plan``: sets the fake device count from ``--mesh`` before JAX starts, then plans."""
    config = PlanConfig(model=args.model, mesh=args.mesh, strategy=args.strategy, batch_size=args.batch_size,
                        accumulate=args.accumulate, remat=args.remat, dtype=args.dtype,
                        device_memory_gb=args.device_memory_gb)
    import jax

    from jaxnet.parallel import parse_mesh_spec

    try:
        devices = math.prod(parse_mesh_spec(config.mesh, None).values())
    except ValueError as e:
        print(f"jaxnet plan: {e}", file=sys.stderr)
        return 2
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError as e:  # JAX already started in this process with another device count
        print(f"jaxnet plan: cannot make {devices} CPU devices here ({e})", file=sys.stderr)
        return 2
    result = plan(config)
    print(report(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


__all__ = ["MODELS", "PlanConfig", "collective_bytes", "main", "plan", "report"]
