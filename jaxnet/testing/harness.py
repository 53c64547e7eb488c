"""``assert_matches_reference``: hunt for an input where a kernel and its reference disagree.

One Hypothesis search draws calls (by default of the fused-dense contract) and, for each, runs
every enabled check against the reference:

  forward   the candidate called eagerly, element by element within the tolerance model
            (``jaxnet.testing.tolerances``); its shape and dtype; finite wherever the reference is.
  jit       the same under ``jax.jit``.
  vmap      ``jax.jit(jax.vmap(candidate))`` over a batch of two calls (x, w or all batched).
  grad_*    the VJP with respect to every float positional argument (grad_x, grad_w, grad_b),
            under jit, for a random cotangent, against the reference's VJP.

When an example fails, Hypothesis shrinks it to the smallest failing call it can find; the
failure is recorded with the checks it broke, those checks are set aside, and the search starts
again for the rest. So a report says, per check, "passed N examples" or the smallest
counterexample -- not only the first thing that went wrong.

For the fused-dense contract, targeted calls follow the search: per activation, one call in the
most precise dtype drawn whose pre-activations are a fixed grid over [-8, 8]
(``strategies.probe_call``), where an activation and a look-alike (gelu and its tanh
approximation) differ by far more than that dtype's tolerance. They check values and gradients.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jaxnet.testing import candidates, profiles, strategies as jst
from jaxnet.testing.tolerances import FusedDenseBounds, GenericTolerance

CHECK_GROUPS = ("forward", "jit", "vmap", "grad")
ARG_NAMES = ("x", "w", "b")
VMAP_AXES = ("all", "x", "w")  # which arguments carry the vmapped axis (fused-dense contract)


@dataclasses.dataclass
class Failure:
    """What broke: the check, the (smallest) call, and the worst element or the exception."""
    check: str
    call: jst.Call
    message: str
    extra: dict = dataclasses.field(default_factory=dict)

    def format(self) -> str:
        lines = [f"check: {self.check} ({CHECK_DOC.get(_group(self.check), '')})",
                 f"  call:      {self.call.describe()}",
                 f"  rebuild:   {self.call!r}"]
        if self.extra:
            lines.append("  with:      " + ", ".join(f"{k}={v!r}" for k, v in self.extra.items()))
        lines.append(f"  {self.message}")
        return "\n".join(lines)


CHECK_DOC = {
    "forward": "candidate called eagerly vs reference",
    "jit": "jax.jit(candidate) vs reference",
    "vmap": "jax.jit(jax.vmap(candidate)) vs reference per slice",
    "grad": "VJP under jit vs the reference's VJP",
}


def _group(check: str) -> str:
    return "grad" if check.startswith("grad_") else check


@dataclasses.dataclass
class CheckResult:
    name: str
    examples: int = 0
    worst_ratio: float = 0.0  # max |err| / tol over every example checked (> 1: out of tolerance)
    failure: Failure | None = None

    @property
    def status(self) -> str:
        """"FAIL" when it has a counterexample or was out of tolerance on any example (a run that
        stops at the first failure keeps only that check's counterexample), "ok" when it passed
        on at least one example, "-" when it did not run."""
        if self.failure or self.worst_ratio > 1.0:
            return "FAIL"
        return "ok" if self.examples else "-"


@dataclasses.dataclass
class Report:
    """The outcome of ``verify``: one ``CheckResult`` per check, in order."""
    candidate: str
    reference: str
    results: dict
    examples: int
    seconds: float
    notes: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.failure is None for r in self.results.values())

    @property
    def failures(self) -> list:
        return [r.failure for r in self.results.values() if r.failure]

    def format(self) -> str:
        from jaxnet.testing import report
        return report.format_report(self)


class _Counterexample(AssertionError):
    def __init__(self, call, failures):
        super().__init__("; ".join(f.check for f in failures))
        self.call, self.failures = call, failures


def _to_jax(a):
    return jnp.asarray(a) if isinstance(a, np.ndarray) else a


def _is_float_array(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}: {text[0][:300] if text else ''}"


def compare(check: str, got, expected, tol) -> tuple[str | None, float]:
    """Compares one output; returns ``(message or None, max |err|/tol)``.

    Both sides are upcast to float64 (bfloat16 included) before subtracting. Elements where the
    expected value is not finite are not compared; elsewhere a non-finite result fails.
    """
    if not (hasattr(got, "shape") and hasattr(got, "dtype")):
        return f"returned {type(got).__name__}, not an array", np.inf
    if tuple(np.shape(got)) != tuple(np.shape(expected)):
        return f"shape {tuple(np.shape(got))} != expected {tuple(np.shape(expected))}", np.inf
    if np.dtype(got.dtype) != np.dtype(expected.dtype):
        return f"dtype {np.dtype(got.dtype).name} != expected {np.dtype(expected.dtype).name}", np.inf
    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), e.shape)
    if e.size == 0:
        return None, 0.0
    finite = np.isfinite(e)
    bad = finite & ~np.isfinite(g)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"non-finite where the reference is finite: {check}[{_idx(idx)}] = {g[idx]!r}, "
                f"expected {e[idx]!r} ({int(bad.sum())} of {bad.size} elements)"), np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(g - e), 0.0)
        ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1.0), np.where(err > 0, np.inf, 0.0))
    flat = int(np.argmax(ratio))
    worst = float(ratio.reshape(-1)[flat])
    if worst <= 1.0:
        return None, worst
    idx = np.unravel_index(flat, e.shape)
    n_bad = int((ratio > 1.0).sum())
    return (f"worst element: {check}[{_idx(idx)}] = {g[idx]:.9g}, expected {e[idx]:.9g}; "
            f"|err| {err[idx]:.3g} > tol {tol[idx]:.3g} ({worst:.3g}x the tolerance; "
            f"{n_bad} of {e.size} elements out)"), worst


def _idx(idx) -> str:
    return ", ".join(str(int(i)) for i in idx)


# Jitted wrappers by (function, kind, kwargs, extra), kept across ``verify`` calls: the "ci" profile
# is derandomized, so successive searches draw the same shapes and the reference compiles once.
_JIT_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_JIT_CACHE_SIZE = 64


def _jitted(fn, kind: str, kwargs: dict, extra=()):
    key = (id(fn), kind, tuple(sorted(kwargs.items())), extra)
    hit = _JIT_CACHE.get(key)
    if hit is not None and hit[0] is fn:
        _JIT_CACHE.move_to_end(key)
        return hit[1]
    bound = functools.partial(fn, **kwargs)
    if kind == "forward":
        jitted = jax.jit(bound)
    elif kind == "vmap":
        jitted = jax.jit(jax.vmap(bound, in_axes=extra))
    else:  # "vjp": (args, g) -> (y, grads w.r.t. args[i] for i in extra)
        diff = extra

        def vjp(args, g):
            def f(*d):
                full = list(args)
                for p, v in zip(diff, d):
                    full[p] = v
                return bound(*full)
            y, pull = jax.vjp(f, *(args[p] for p in diff))
            return y, pull(g)
        jitted = jax.jit(vjp)
    _JIT_CACHE[key] = (fn, jitted)  # holding fn keeps its id from being reused
    while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
        _JIT_CACHE.popitem(last=False)
    return jitted


class _Runner:
    """Runs the checks of one example.

    Per example the reference runs once, jitted, returning its value and (if grads are checked)
    its VJP together; everything else it needs (tolerances, cotangents, the vmap batch) is
    NumPy on the host, so no eager jax op compiles anything but the candidate's own.
    """

    def __init__(self, candidate, reference, fused: bool, tolerance, progress=None):
        self.candidate, self.reference = candidate, reference
        self.fused, self.tolerance = fused, tolerance
        self.progress = progress

    def _jit(self, role: str, kind: str, kwargs: dict, extra=()):
        return _jitted(self.candidate if role == "candidate" else self.reference, kind, kwargs, extra)

    def _bounds(self, args, kw):
        """Per-call bounds (``forward``, ``grads``, ``kink_mask``), or None for a tolerance of ``expected`` alone."""
        if not self.fused:
            from_inputs = getattr(self.tolerance, "from_inputs", None)
            return None if from_inputs is None else from_inputs(args, kw)
        x, w, b = args
        return FusedDenseBounds.from_inputs(x, w, b, kw.get("activation", "relu"))

    def _forward_tol(self, bounds, y_ref):
        return bounds.forward(y_ref) if bounds is not None else self.tolerance(y_ref)

    def _reference(self, args, kw, g, diff):
        """Reference value (and gradients if ``g`` is given) as NumPy."""
        if g is None:
            return np.asarray(self._jit("reference", "forward", kw)(*args)), None
        y, grads = self._jit("reference", "vjp", kw, diff)(args, g)
        return np.asarray(y), [np.asarray(t) for t in grads]

    def evaluate(self, call: jst.Call, groups: set, done: set, extra: dict) -> tuple[list, dict]:
        """Runs the checks of ``groups`` not in ``done`` on one call; returns (failures, {check: err/tol})."""
        args, kw = call.args, call.kwargs  # NumPy (or None) positionals; jit takes them as they are
        jargs = tuple(_to_jax(a) for a in args)
        failures, ratios = [], {}

        def record(check, fn, expected, tol, **info):
            if self.progress is not None:
                self.progress(check, call)
            try:
                got = jax.block_until_ready(fn())
                msg, r = compare(check, got, expected, tol)
            except (Exception, SystemExit) as e:  # raising on a valid call (even exit) fails that check
                msg, r = _short(e), np.inf
            ratios[check] = r
            if msg:
                failures.append(Failure(check, call, msg, info))

        bounds = self._bounds(args, kw)
        names = ARG_NAMES if self.fused else tuple(f"arg{i}" for i in range(len(args)))
        diff = tuple(i for i, a in enumerate(args) if _is_float_array(a))
        want_grads = "grad" in groups and any(f"grad_{names[i]}" not in done for i in diff)
        g = None
        if want_grads or ("vmap" in groups and "grad" in groups):  # one reference program per shape
            g = self._cotangent(args, kw, bounds, extra.get("cotangent_seed", 0))
        y_ref, ref_grads = self._reference(args, kw, g, diff)
        tol = self._forward_tol(bounds, y_ref)
        if "forward" in groups and "forward" not in done:
            record("forward", lambda: self.candidate(*jargs, **kw), y_ref, tol)
        if "jit" in groups and "jit" not in done:
            record("jit", lambda: self._jit("candidate", "forward", kw)(*args), y_ref, tol)
        if "vmap" in groups and "vmap" not in done:
            self._vmap(call, args, kw, y_ref, tol, g, diff, extra.get("vmap_axes", "all"), record)
        if want_grads:
            self._grads(args, kw, names, diff, bounds, g, ref_grads, done, extra, record)
        return failures, ratios

    def _cotangent(self, args, kw, bounds, seed):
        y_aval = jax.eval_shape(functools.partial(self.reference, **kw), *args)
        g = np.random.default_rng(seed).standard_normal(y_aval.shape).astype(y_aval.dtype)
        if bounds is not None:  # no check may hinge on which side of a kink a rounded z fell
            g = np.where(bounds.kink_mask(), np.zeros_like(g), g)
        return g

    def _vmap(self, call, args, kw, y_ref, tol, g, diff, axes, record):
        if self.fused:
            x, w, b = args
            flip = (lambda a: None if a is None else np.ascontiguousarray(a[..., ::-1]))
            second = (-x if axes in ("all", "x") else x,
                      flip(w) if axes in ("all", "w") else w,
                      flip(b) if axes in ("all", "w") else b)
            batched = {"all": (0, 0, 0), "x": (0, None, None), "w": (None, 0, 0)}[axes]
            in_axes = tuple(None if a is None else ax for a, ax in zip(args, batched))
        else:
            second = args
            in_axes = tuple(0 if hasattr(a, "shape") else None for a in args)
        y2, _ = self._reference(second, kw, g, diff)
        tol2 = self._forward_tol(self._bounds(second, kw), y2)
        stacked = tuple(a if ax is None else np.stack([a, s]) for a, s, ax in zip(args, second, in_axes))
        expected = np.stack([y_ref, y2])
        record("vmap", lambda: self._jit("candidate", "vmap", kw, in_axes)(*stacked), expected,
               np.stack([np.broadcast_to(tol, y_ref.shape), np.broadcast_to(tol2, y2.shape)]), vmap_axes=axes)

    def _grads(self, args, kw, names, diff, bounds, g, ref_grads, done, extra, record):
        ref = dict(zip((names[i] for i in diff), ref_grads))
        tols = bounds.grads(g, ref) if bounds is not None else {k: self.tolerance(v) for k, v in ref.items()}
        holder = {}

        def cand(name):
            if "out" not in holder:
                _, grads = self._jit("candidate", "vjp", kw, diff)(args, g)
                holder["out"] = dict(zip((names[i] for i in diff), grads))
            return holder["out"][name]

        for name in ref:
            if f"grad_{name}" not in done:
                record(f"grad_{name}", functools.partial(cand, name), ref[name], tols[name],
                       cotangent_seed=extra.get("cotangent_seed", 0))


def verify(candidate: Callable, reference: Callable | None = None, *, args=None,
           dtypes: Iterable[str] = jst.DEFAULT_DTYPES, activations: Iterable[str] = jst.ACTIVATIONS,
           max_examples: int | None = None, profile: str | None = None, check_grads: bool = True,
           check_jit: bool = True, check_vmap: bool = True, shrink: int = 30, tolerance=None,
           max_elements: int = jst.DEFAULT_MAX_ELEMENTS, keep_going: bool = True,
           name: str | None = None, skip: Iterable[str] = (),
           progress: Callable[[str, jst.Call], None] | None = None) -> Report:
    """Runs the checks and returns a ``Report`` (does not raise on mismatches).

    Same arguments as ``assert_matches_reference``, and:
      keep_going: after a failure, search again for counterexamples to the checks that have not
        failed yet, so the report has a verdict per check (default). False: stop at the first.
      name: the candidate's name in the report.
      skip: checks not to run (e.g. ``("vmap", "grad_b")``); they are absent from the report.
      progress: called as ``progress(check, call)`` just before each check runs the candidate
        (``jaxnet verify`` uses it to know which check a crashed or hung candidate was in).
    """
    if reference is None:
        from kernels import reference as kref
        reference = kref.fused_dense
    fused = args is None or tolerance == "fused_dense"
    args_given = args
    if args is None and "float64" in tuple(dtypes) and not jax.config.jax_enable_x64:
        # JAX would run float64 inputs as float32 and report float32 rounding as mismatches.
        raise ValueError("dtypes include float64 but JAX's x64 mode is off: run under "
                         "jax.enable_x64(True) (or set JAX_ENABLE_X64=1), or leave float64 out")
    if args is None:
        args = jst.fused_dense_calls(dtypes=tuple(dtypes), activations=tuple(activations),
                                     max_elements=max_elements)
    if tolerance in (None, "fused_dense"):
        tolerance = None if fused else GenericTolerance()
    elif isinstance(tolerance, (int, float)):
        tolerance = GenericTolerance(int(tolerance))
    runner = _Runner(candidate, reference, fused, tolerance, progress)

    groups = {"forward"} | ({"jit"} if check_jit else set()) | ({"vmap"} if check_vmap else set())
    groups |= {"grad"} if check_grads else set()
    names = [g for g in ("forward", "jit", "vmap") if g in groups]
    if check_grads and fused:
        names += [f"grad_{n}" for n in ARG_NAMES]
    skip = set(skip)
    results = {c: CheckResult(c) for c in names if c not in skip}
    base = profiles.get_profile(profile)
    phases = tuple(p for p in base.phases if shrink > 0 or p != Phase.shrink)
    run_settings = settings(
        base, max_examples=max_examples or base.max_examples, deadline=None, database=None,
        report_multiple_bugs=False, print_blob=False, phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    done: set = set(skip)  # checks that already have their counterexample (or are not run)
    examples = 0
    start = time.perf_counter()
    notes = []

    def tally(ratios):
        for c, r in ratios.items():
            res = results.setdefault(c, CheckResult(c))
            res.worst_ratio = max(res.worst_ratio, r)
            res.examples += r <= 1.0

    def retire(failures):
        for f in failures:
            results.setdefault(f.check, CheckResult(f.check)).failure = f
            done.add(f.check)

    for _ in range(len(CHECK_GROUPS) + 8):  # each round retires at least one check
        failing: set = set()  # the calls seen failing this round
        shrunk = 0
        smallest: list = []  # [(elements, failures)] of the smallest call seen failing this round

        @run_settings
        @given(st.data())
        def search(data):
            nonlocal examples, shrunk
            call = jst.as_call(data.draw(args, label="call"))
            extra = {}
            if "vmap" in groups and fused:
                extra["vmap_axes"] = data.draw(st.sampled_from(VMAP_AXES), label="vmap in_axes")
            if "grad" in groups:
                extra["cotangent_seed"] = data.draw(st.integers(0, 2**16 - 1), label="cotangent seed")
            key = (repr(call), tuple(sorted(extra.items())))
            if failing and key not in failing:  # shrinking: spend at most `shrink` examples on it
                if shrunk >= shrink:
                    return  # budget spent: report as passing without running, so Hypothesis settles
                shrunk += 1
            failures, ratios = runner.evaluate(call, groups, done, extra)
            examples += 1
            tally(ratios)
            if failures:
                failing.add(key)
                size = sum(int(np.size(a)) for a in call.args if a is not None)
                if not smallest or size < smallest[0][0]:
                    smallest[:] = [(size, failures)]
                raise _Counterexample(call, failures)

        try:
            search()
            break
        except Exception as e:  # noqa: BLE001 - we look for our own counterexample inside
            ce = _find_counterexample(e)
            if ce is None:
                raise
            if ce is not e:
                notes.append(f"flaky: {type(e).__name__} (failed once, then passed on replay)")
            # Hypothesis's "simplest" is by its choice sequence; ours is the fewest elements.
            retire(smallest[0][1] if smallest else ce.failures)
            if set(results) <= done or not keep_going:
                break
    # Then the targeted calls: a grid a random search may never reach. After the search, so that
    # what the search finds is reported shrunk; the probes catch what it missed.
    if fused and args_given is None and (keep_going or not any(r.failure for r in results.values())):
        for call in jst.probe_calls((jst.most_precise(dtypes),), tuple(activations)):
            if set(results) <= done:
                break
            # The math only: how jit and vmap trace the kernel is the random search's job.
            failures, ratios = runner.evaluate(call, groups & {"forward", "grad"}, done, {"cotangent_seed": 0})
            examples += 1
            tally(ratios)
            retire(failures)
            if failures and not keep_going:
                break
    return Report(name or candidates.name(candidate), candidates.name(reference), results, examples,
                  time.perf_counter() - start, notes)


def _find_counterexample(e: BaseException):
    if isinstance(e, _Counterexample):
        return e
    for sub in getattr(e, "exceptions", ()) or ():
        found = _find_counterexample(sub)
        if found is not None:
            return found
    return None


def assert_matches_reference(candidate: Callable, reference: Callable | None = None, *, args=None,
                             dtypes: Iterable[str] = jst.DEFAULT_DTYPES,
                             activations: Iterable[str] = jst.ACTIVATIONS,
                             max_examples: int | None = None, profile: str | None = None,
                             check_grads: bool = True, check_jit: bool = True, check_vmap: bool = True,
                             shrink: int = 30, tolerance=None,
                             max_elements: int = jst.DEFAULT_MAX_ELEMENTS, keep_going: bool = False) -> Report:
    """Hunts for a call where ``candidate`` and ``reference`` disagree; raises ``AssertionError`` if found.

    Args:
      candidate: the function under test, called ``candidate(*args, **kwargs)``.
      reference: the definition of correct (default ``kernels.reference.fused_dense``).
      args: a Hypothesis strategy drawing ``(args, kwargs)`` pairs or ``strategies.Call``s. Default:
        the fused-dense contract ``(x, w, b), {"activation": ...}`` from ``fused_dense_calls``,
        checked with the tolerance model of ``jaxnet.testing.tolerances``. Positional arguments
        must be arrays or None (they are traced); put strings and flags in kwargs.
      dtypes, activations: what the default strategy draws.
      max_examples: examples per search (default: the profile's).
      profile: "ci" or "thorough" (default: ``$JAXNET_HYPOTHESIS_PROFILE``, else "ci": the same
        search as ``jaxnet verify``). After the search, the default contract runs one targeted
        call per activation in the most precise of ``dtypes`` (``strategies.probe_call``).
      check_grads, check_jit, check_vmap: turn checks off (forward always runs). The vmap and
        gradient checks run under ``jax.jit`` whatever ``check_jit`` says.
      shrink: how many examples Hypothesis may spend shrinking a failure towards the smallest
        call (each costs compiles); 0 reports the first failing call as found.
      tolerance: for non-default ``args``: an accumulation length (int), a ``GenericTolerance``,
        a callable ``expected -> per-element tol``, "fused_dense" for calls of that contract, or
        an object whose ``from_inputs(args, kwargs)`` returns the call's bounds, with the methods
        of ``tolerances.FusedDenseBounds`` (``forward(y_ref)``, ``grads(g, grads_ref)`` keyed
        "arg0", "arg1", ..., ``kink_mask()``): tolerances derived from the inputs.
      max_elements: memory budget per call for the default strategy (x + w + y elements).
      keep_going: after the first failure, keep searching for the checks that still pass, so
        the message has a verdict per check (slower; ``verify`` and ``jaxnet verify`` do).

    Returns:
      The ``Report`` (all checks passed).

    Call it from a plain test function, not from inside another ``@given`` test (it runs its own
    Hypothesis search).

    Raises:
      AssertionError: with, per failing check, the smallest counterexample: shapes, dtype,
        activation, the worst element (index, got, expected), the tolerance it broke, and a
        ``make_fused_dense_call(...)`` expression that rebuilds the call.
    """
    report = verify(candidate, reference, args=args, dtypes=dtypes, activations=activations,
                    max_examples=max_examples, profile=profile, check_grads=check_grads,
                    check_jit=check_jit, check_vmap=check_vmap, shrink=shrink, tolerance=tolerance,
                    max_elements=max_elements, keep_going=keep_going)
    if not report.ok:
        raise AssertionError(report.format())
    return report
