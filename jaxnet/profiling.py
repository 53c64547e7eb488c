"""Where a jitted step's time goes on the CPU: a ``jax.profiler`` trace, summed per HLO instruction.

    compiled = jax.jit(step).lower(*args).compile()
    with jax.profiler.trace(folder):
        for _ in range(steps):
            out = compiled(*args)
        jax.block_until_ready(out)
    summary = step_breakdown(folder, compiled.as_text(), steps=steps)
    print(breakdown_table(summary))

XLA's CPU runtime records one trace event per instruction it runs (named as the instruction:
``fusion.12``, ``dot.3``, ``ynn_fusion.7``), on the thread that runs it. Their durations, summed,
are the step's *busy time* (two instructions running side by side both count). The compiled HLO
says what each instruction is: a ``matmul`` (a dot or convolution, alone or inside the fusion it
calls, or a custom call to a dense-layer kernel: ``MATMUL_TARGET``) or ``other`` work
(elementwise, reductions, copies and transposes, gathers, the optimizer's update), and, from its
metadata, which pass it belongs to: ``forward`` (under ``jvp(...)``), ``backward`` (under
``transpose(...)``), ``update`` (the rest of the program: the optimizer), or ``unattributed``
(no metadata: copies and transposes that XLA's layout passes added). An instruction that hands
part of its work to other threads (XLA's dots often do, the numba kernels share theirs) is counted
once, for its duration on the thread that started it: busy time undercounts the thread-seconds of
such work, never overcounts.

The bound this gives: on ``cores`` threads a step's matmuls alone take at least ``matmul busy /
cores`` seconds (``matmul_bound_s``): the step if every other instruction were free and the
matmuls ran as fast as they did here. A throughput target above ``tokens / matmul_bound_s``
cannot be met by removing other work alone.
"""
from __future__ import annotations

import collections
import functools
import gzip
import json
import os
import pathlib
import re

# An instruction line of HLO text: "%name = shape opcode(operands), ..., calls=%comp, ...".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=\{?%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
MATMUL_OPCODES = frozenset({"dot", "convolution"})
# Custom calls counted as matmuls, by target name: this project's Numba kernels
# (jaxnet_numba_fused_dense_*, jaxnet_numba_quantized_dense_*, jaxnet_numba_mlp_sgd_*) and the like.
MATMUL_TARGET = re.compile(r"dense|gemm|matmul|mlp")
KINDS = ("matmul", "other")
PASSES = ("forward", "backward", "update", "unattributed")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
    """``{name: {"kind": "matmul" | "other", "pass": one of ``PASSES``, "opcode": str}}`` for every
    instruction of the compiled module ``hlo_text`` (``compiled.as_text()``); an instruction is a
    matmul if it is a dot or convolution, a custom call whose target ``MATMUL_TARGET`` matches, or
    calls a computation that holds one, at any depth."""
    if not isinstance(hlo_text, str) or "HloModule" not in hlo_text:
        raise ValueError("hlo_instructions: expected the text of a compiled HLO module (compiled.as_text()), "
                         f"got {type(hlo_text).__name__} {str(hlo_text)[:60]!r}")
    lines: dict[str, tuple[str, str, bool]] = {}  # name -> (opcode, line, a matmul itself)
    holds: dict[str, set[str]] = collections.defaultdict(set)  # computation -> "matmul" and callees
    computation = None
    for line in hlo_text.splitlines():
        if (c := _COMPUTATION.match(line)) and not _INSTRUCTION.match(line):
            computation = c.group(1)
            continue
        if (m := _INSTRUCTION.match(line)) is None:
            continue
        name, opcode = m.groups()
        target = _TARGET.search(line) if opcode == "custom-call" else None
        itself = opcode in MATMUL_OPCODES or bool(target and MATMUL_TARGET.search(target.group(1)))
        lines[name] = (opcode, line, itself)
        if computation is not None:
            holds[computation].update(["matmul"] * itself + ["%" + c for c in _CALLS.findall(line)])

    @functools.cache  # HLO computations call each other without cycles: each is answered once
    def has_matmul(comp: str) -> bool:
        return "matmul" in holds[comp] or any(has_matmul(c[1:]) for c in holds[comp] if c.startswith("%"))

    out = {}
    for name, (opcode, line, itself) in lines.items():
        matmul = itself or any(has_matmul(c) for c in _CALLS.findall(line))
        op_name = (m.group(1) if (m := _OP_NAME.search(line)) else "")
        step_pass = ("unattributed" if not op_name else "backward" if "transpose(" in op_name
                     else "forward" if "jvp(" in op_name else "update")
        out[name] = {"kind": "matmul" if matmul else "other", "pass": step_pass, "opcode": opcode}
    return out


def trace_file(folder) -> pathlib.Path:
    """The newest ``*.trace.json.gz`` that ``jax.profiler`` wrote under ``folder``."""
    files = sorted(pathlib.Path(folder).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {folder} (was jax.profiler.trace run there?)")
    return files[-1]


def instruction_seconds(folder, names) -> dict[str, float]:
    """Seconds per instruction of ``names`` (a collection of HLO instruction names), summed over
    the trace's complete events of that name, from the newest trace under ``folder``."""
    path = trace_file(folder)
    try:
        with gzip.open(path) as f:
            events = json.load(f).get("traceEvents", [])
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"instruction_seconds: cannot read the trace {path}: {e}") from e
    names = set(names)
    seconds: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            seconds[e["name"]] += e.get("dur", 0) * 1e-6  # trace durations are in microseconds
    return dict(seconds)


def step_breakdown(folder, hlo_text: str, *, steps: int, cores: int | None = None, top: int = 8) -> dict:
    """Busy seconds per step of a traced, compiled step, by kind and by pass.

    Args:
      folder: where ``jax.profiler`` traced ``steps`` calls of the executable (and nothing else
        compiled from the same HLO).
      hlo_text: ``compiled.as_text()`` of that executable.
      steps: the calls traced (>= 1); the sums are divided by it.
      cores: threads the step may use (default ``os.cpu_count()``), for ``matmul_bound_s``.
      top: how many of the longest instructions to list.

    Returns:
      ``{"busy_s", "by_kind": {kind: s}, "by_pass": {pass: {kind: s}}, "matmul_bound_s",
      "cores", "instructions_seen", "top": [{"name", "kind", "pass", "opcode", "s"}]}``, seconds
      per step.

    Raises:
      ValueError: ``steps`` < 1, an unreadable trace, or a trace that holds none of the module's
        instructions (another program traced, or a runtime that names events otherwise).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"step_breakdown: steps must be an int >= 1, got {steps!r}")
    cores = cores or os.cpu_count() or 1
    info = hlo_instructions(hlo_text)
    seconds = instruction_seconds(folder, info)
    if not seconds:
        raise ValueError(f"step_breakdown: the trace under {folder} holds none of this module's "
                         f"{len(info)} instructions (another program, or events named otherwise)")
    by_kind = {k: 0.0 for k in KINDS}
    by_pass = {p: {k: 0.0 for k in KINDS} for p in PASSES}
    for name, s in seconds.items():
        by_kind[info[name]["kind"]] += s / steps
        by_pass[info[name]["pass"]][info[name]["kind"]] += s / steps
    longest = sorted(seconds, key=seconds.get, reverse=True)[:top]
    return {"busy_s": sum(by_kind.values()), "by_kind": by_kind, "by_pass": by_pass,
            "matmul_bound_s": by_kind["matmul"] / cores, "cores": cores, "instructions_seen": len(seconds),
            "top": [{"name": n, **info[n], "s": seconds[n] / steps} for n in longest]}


def breakdown_table(summary: dict) -> str:
    """``step_breakdown``'s result as a Markdown table of milliseconds per step."""
    rows = ["| pass | matmul ms | other ms |", "|---|---:|---:|"]
    for p, kinds in summary["by_pass"].items():
        rows.append(f"| {p} | {kinds['matmul'] * 1e3:.1f} | {kinds['other'] * 1e3:.1f} |")
    k = summary["by_kind"]
    rows.append(f"| all (busy {summary['busy_s'] * 1e3:.1f}) | {k['matmul'] * 1e3:.1f} | {k['other'] * 1e3:.1f} |")
    return "\n".join(rows)


__all__ = ["KINDS", "MATMUL_TARGET", "PASSES", "breakdown_table", "hlo_instructions", "instruction_seconds",
           "step_breakdown", "trace_file"]
