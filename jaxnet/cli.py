"""The ``jaxnet`` command: ``jaxnet <subcommand> [flags]``.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` to declare its flags and
``_run_<name>(args) -> exit status``, listed in ``SUBCOMMANDS``. Heavy imports (jax, hypothesis)
happen inside the ``_run_`` functions, so ``jaxnet --help`` is instant and one subcommand's
dependencies do not burden another.
"""
from __future__ import annotations

import argparse
import sys
import time


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify", help="property-test every kernel backend against the reference",
        description="Runs jaxnet.testing's harness on every available backend of kernels.fused_dense (or on "
                    "the backends and candidates named): first one targeted call per activation and dtype "
                    "(pre-activations on a grid over [-8, 8]: values and gradients), then a Hypothesis "
                    "search over shapes, dtypes, activations and values checking forward, jit, vmap and the "
                    "three gradients, then malformed calls that must raise. Each backend or candidate runs in "
                    "a child process (started with python -P), so a crash, an exit or a hang is reported as "
                    "a failure of the check it happened in. Prints a table of checks per backend, then each "
                    "failure's smallest counterexample. Exit status 1 on any failure, 2 on a usage error.")
    p.add_argument("--backend", action="append", metavar="B",
                   help="a backend to verify (repeatable; default: every available backend)")
    p.add_argument("--candidate", action="append", metavar="MODULE:FN",
                   help="verify a function of your own with the fused_dense signature, found in an installed "
                        "module or one in the current directory (repeatable); only the candidates are checked "
                        "unless --backend names backends too")
    p.add_argument("--examples", type=int, metavar="N", help="examples per search (default: the profile's)")
    p.add_argument("--profile", choices=("ci", "thorough"),
                   help="Hypothesis profile (default: $JAXNET_HYPOTHESIS_PROFILE or ci)")
    p.add_argument("--shrink", type=int, default=30, metavar="N",
                   help="examples spent shrinking each failure to its smallest form (default 30; 0: off)")
    p.add_argument("--dtypes", nargs="+", metavar="D", help="dtypes to draw (default: float32 bfloat16 float16; float64 turns on JAX's x64 mode)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="seconds one check (or one malformed call) may take before it counts as hung (default 120)")
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the malformed-call checks (subprocesses)")


def _run_verify(args) -> int:
    import functools

    import kernels
    from jaxnet.testing import check_bad_inputs, profiles, strategies
    from jaxnet.testing.isolated import CandidateError, verify_isolated
    from jaxnet.testing.report import format_table

    profile = profiles.profile_name(args.profile)
    available = kernels.available_backends()
    backends = args.backend if args.backend else ([] if args.candidate else available)
    unknown = [b for b in backends if b not in available]
    if unknown:
        print(f"jaxnet verify: backend(s) {unknown} not available here; available: {available}", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print(f"jaxnet verify: --timeout must be positive, got {args.timeout:g}", file=sys.stderr)
        return 2
    # A backend goes to the child processes as a partial, a --candidate as its import path.
    targets = [(b, functools.partial(kernels.fused_dense, backend=b)) for b in backends]
    targets += [(spec, spec) for spec in args.candidate or []]
    for spec in args.candidate or []:
        if ":" not in spec:
            print(f"jaxnet verify: candidate {spec!r}: expected MODULE:FN", file=sys.stderr)
            return 2
    dtypes = tuple(args.dtypes or strategies.DEFAULT_DTYPES)
    n = args.examples or profiles.get_profile(profile).max_examples
    print(f"jaxnet verify: profile {profile}, {n} examples per search, dtypes {' '.join(dtypes)}; "
          f"reference kernels.reference.fused_dense; verifying {', '.join(t for t, _ in targets)}", flush=True)
    rows, errors = [], {}
    for label, target in targets:
        t0 = time.perf_counter()
        print(f"  {label}: searching ...", end="", flush=True)
        try:
            report = verify_isolated(target, name=label, timeout=args.timeout, dtypes=dtypes,
                                     max_examples=args.examples, profile=profile, shrink=args.shrink,
                                     keep_going=True)
        except CandidateError as e:
            errors[label] = str(e)
            print(" FAIL (could not load it)", flush=True)
            rows.append((label, None, None))
            continue
        bad = None
        if not args.no_bad_inputs:
            print(" malformed calls ...", end="", flush=True)
            bad = check_bad_inputs(target, timeout=args.timeout, raise_on_failure=False)
        ok = report.ok and (bad is None or bad.ok)
        print(f" {'ok' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f}s)", flush=True)
        rows.append((label, report, bad))
    print()
    print(format_table(rows))
    failed = [(label, rep, bad) for label, rep, bad in rows if rep is None or not rep.ok or (bad and not bad.ok)]
    for label, rep, bad in failed:
        print(f"\n=== {label} ===")
        if rep is None:
            print(errors[label])
            continue
        if not rep.ok:
            print(rep.format())
        if bad is not None and not bad.ok:
            print(bad.format())
    print(f"\n{len(rows) - len(failed)} of {len(rows)} verified" + (f"; FAILED: {', '.join(l for l, _, _ in failed)}" if failed else ""))
    return 1 if failed else 0


def _add_plan(sub) -> None:
    from jaxnet.plan import MODELS, PlanConfig

    d = PlanConfig()
    p = sub.add_parser("plan", help="will a model fit: compile its sharded train step for a mesh, abstractly",
                       description="Builds a TransformerLM's train state abstractly (no weights allocated), "
                                   "compiles the sharded AdamW train step for MESH on fake CPU devices and prints "
                                   "parameters, memory per device (against --device-memory-gb), FLOPs per step "
                                   "and collective bytes, then one JSON line. See docs/scaling.md.")
    p.add_argument("--model", default=d.model, choices=sorted(MODELS), help="shipped config (default: %(default)s)")
    p.add_argument("--mesh", default=d.mesh, help="mesh spec, e.g. data=8 or data=4,model=2 (default: %(default)s)")
    p.add_argument("--strategy", default=d.strategy, choices=("dp", "fsdp", "tp", "fsdp+tp"),
                   help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"),
                   help="activation dtype; parameters stay float32 (default: %(default)s)")
    p.add_argument("--device-memory-gb", type=float, default=d.device_memory_gb,
                   help="memory of one device for the verdict (default: %(default)s)")


def _run_plan(args) -> int:
    from jaxnet.plan import main

    return main(args)


SUBCOMMANDS = {"verify": (_add_verify, _run_verify), "plan": (_add_plan, _run_plan)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxnet", description="jaxnet: kernels, models and experiments in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _ in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxnet`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
