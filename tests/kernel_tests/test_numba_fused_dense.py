"""Property tests of ``kernels.fused_dense(..., backend="numba")``: values and all three gradients
against the jax.numpy reference and an independent float64 NumPy reference, over shapes, dtypes,
activations and value ranges; transforms (jit, vmap, checkpoint, shard_map; vmap's batchings in
full in test_numba_vmap.py); trace counts; bad inputs (in a subprocess); and a model trained on
the kernel against the same model on XLA.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import kernels
from kernels import reference
from kernels.activations import ACTIVATIONS

ACTS = sorted(ACTIVATIONS)

# --- Tolerances -----------------------------------------------------------------------------
# One table, keyed by dtype. u is the unit roundoff of the accumulation dtype (bfloat16/float16
# accumulate in float32). A length-L dot product summed in ANY order is within gamma_L ~ L*u of
# the exact value relative to sum|a||b| (Higham, Accuracy and Stability, 3.1); both the kernel
# and the reference are such sums, so the comparison allows `dot` = 2 of them, on L + 2 terms
# (the bias add and the cast). This worst-case bound grows with L, not sqrt(L): correlated
# rounding (e.g. integer-valued or constant data) does reach it, random data stays ~sqrt(L).
# `act_ulps` covers the activation's own rounding: libm in Numba versus XLA's float32 polynomial
# approximations of erf/tanh/exp, a few ulps each and compounded in gelu/silu (measured <= 8;
# 32 leaves room). `store` is the final cast to the input dtype: one ulp, as both sides round
# (the comparison with the float64 reference takes half of every bound: one side, ulp/2).
TOL = {
    "float64": dict(u=2.0**-53, dot=2.0, act_ulps=32, store=0.0),
    "float32": dict(u=2.0**-24, dot=2.0, act_ulps=32, store=0.0),
    "bfloat16": dict(u=2.0**-24, dot=2.0, act_ulps=32, store=2.0**-7),
    "float16": dict(u=2.0**-24, dot=2.0, act_ulps=32, store=2.0**-10),
}
def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _bounds(x, w, b, dy, act, dtype):
    """Float64 references and per-element error bounds for y, dx, dw and db.

    x: [M, K], w: [K, N], b: [N] or None, dy: [M, N] (as float64 NumPy).
    """
    t = TOL[dtype]
    u, K, M = t["u"], x.shape[1], x.shape[0]
    a = ACTIVATIONS[act]
    z = x @ w + (0 if b is None else b)
    y, *grads = reference.fused_dense_vjp_numpy(x, w, b, dy, activation=act)
    zs = np.abs(x) @ np.abs(w) + (0 if b is None else np.abs(b))  # scale of z's rounding
    dz = t["dot"] * u * (K + 2) * zs
    # Underflow: the accumulation's smallest normal (a flushed subnormal), plus the stored dtype's
    # subnormal step: a result below its smallest normal rounds to that grid (float16: 2^-24,
    # half of it on one side; found by the thorough profile: gelu of -8.3e-9 stored as -0.0).
    tiny = np.finfo(np.float32 if dtype != "float64" else np.float64).tiny
    tiny += float(jnp.finfo(dtype).smallest_subnormal)
    # Errors in z reach y through sup|act'| (d1) and the gradient's act'(z) through sup|act''| (d2).
    # relu's act'' is a jump at 0: its tests keep |z| away from 0 instead.
    y_tol = a.d1 * dz + t["act_ulps"] * u * (np.abs(y) + np.abs(z)) + t["store"] * np.abs(y) + tiny
    with np.errstate(over="ignore"):
        d1 = a.np_grad(z)
    g = dy * d1
    # Evaluating act' moves it by act_ulps ulps times its sensitivity S(z) (derivative_scale: more
    # than sup|act'| where gelu_tanh's or silu's saturating tanh/sigmoid cancels; float32 autodiff
    # of the reference is 6.5x over sup|act'| * 4u near |z| = 5, docs/verifying-kernels.md).
    dg = np.abs(dy) * (a.d2 * dz + t["act_ulps"] * u * (np.abs(d1) + np.maximum(1.0, a.derivative_scale(z))))
    ag = np.abs(g)
    n = w.shape[1]
    tols = (t["dot"] * u * (n + 2) * (ag @ np.abs(w.T)) + dg @ np.abs(w.T),
            t["dot"] * u * (M + 2) * (np.abs(x.T) @ ag) + np.abs(x.T) @ dg,
            t["dot"] * u * (M + 2) * ag.sum(0) + dg.sum(0))
    # Low-precision gradients are cast back to the input dtype too.
    tols = tuple(tl + t["store"] * np.abs(g.sum(0) if gr is None else gr) + tiny for tl, gr in zip(tols, grads))
    return z, dz, (y, *grads), (y_tol, *tols)


def _assert_close(name, got, want, tol):
    got = _f64(got)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    bad = ~(err <= tol)  # also catches nan where the reference is finite
    bad &= ~(np.isnan(want) & np.isnan(got))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} elements off, e.g. at {i}: got {got[i]!r}, "
                             f"want {want[i]!r}, |err| {err[i]:.3g} > tol {tol[i]:.3g}")


# --- Strategies -----------------------------------------------------------------------------
# Sizes: 1s, primes, powers of two and their neighbours; K also in the thousands.
SIZES = [1, 2, 3, 7, 13, 16, 31, 64, 97, 128]
KS = SIZES + [257, 1024, 2053, 4099]


@st.composite
def problems(draw, dtypes=("float32", "float64")):
    """A fused-dense problem: leading dims of x, K, N, dtype, activation, bias or not, value range."""
    k = draw(st.sampled_from(KS), label="K")
    n = draw(st.sampled_from(SIZES), label="N")
    lead = draw(st.sampled_from([(), (0,), (1,), (5,), (31,), (64,), (2, 3), (3, 0, 2), (129,)]), label="lead")
    # Bound the work per example so the suite stays in budget (K in the thousands: small M, N).
    assume(math.prod(lead) * k * n <= 600_000)
    return dict(
        lead=lead, k=k, n=n,
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
        act=draw(st.sampled_from(ACTS), label="activation"),
        bias=draw(st.booleans(), label="bias"),
        values=draw(st.sampled_from(["normal", "tiny", "large", "integers", "sparse"]), label="values"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
    )


def _arrays(p):
    """x: [*lead, K], w: [K, N], b: [N] or None, dy: [*lead, N] as float64 NumPy."""
    rng = np.random.default_rng(p["seed"])
    shapes = [(*p["lead"], p["k"]), (p["k"], p["n"]), (p["n"],), (*p["lead"], p["n"])]
    scale = 1 / math.sqrt(p["k"])

    def draw(shape, s):
        if p["values"] == "integers":  # exact in every dtype: ties (z == 0) happen
            return rng.integers(-2, 3, shape).astype(np.float64)
        v = rng.standard_normal(shape) * s
        if p["values"] == "tiny":
            v *= 1e-3
        elif p["values"] == "large":
            v *= 30.0  # saturates tanh/sigmoid/gelu tails
        elif p["values"] == "sparse":
            v *= rng.random(shape) < 0.2
        return v

    x, w, b, dy = draw(shapes[0], 1.0), draw(shapes[1], scale), draw(shapes[2], 1.0), draw(shapes[3], 1.0)
    return x, w, (b if p["bias"] else None), dy


def _as(a, dtype):
    return None if a is None else jnp.asarray(a, dtype)


def _fwd_and_vjp(backend, act):
    """Jitted ``(y, (dx, dw, db))`` of ``kernels.fused_dense`` on ``backend``; "reference" is
    ``kernels.reference.fused_dense`` (plain jax.numpy, not the "xla" backend: that one rounds
    low-precision gradients differently)."""
    fd = reference.fused_dense if backend == "reference" else functools.partial(kernels.fused_dense, backend=backend)

    def run(x, w, b, dy):
        y, vjp = jax.vjp(lambda x, w, b: fd(x, w, b, activation=act), x, w, b)
        return y, vjp(dy)
    return jax.jit(run)


def _check_problem(p):
    dtype = jnp.dtype(p["dtype"])
    # Round the inputs to the dtype first: the float64 references see exactly what the kernels see.
    x, w, b, dy = (_f64(_as(a, dtype)) for a in _arrays(p))
    lead, k, n = p["lead"], p["k"], p["n"]
    m = math.prod(lead)
    z, dz, want, tols = _bounds(x.reshape(m, k), w, b, dy.reshape(m, n), p["act"], p["dtype"])
    if p["act"] == "relu" and p["values"] != "integers":
        # relu' jumps at 0: where rounding can flip the sign of z the two implementations may
        # legitimately disagree; such draws are vanishingly rare with continuous values.
        assume(not np.any((np.abs(z) <= dz) & (z != 0)))
    args = (_as(x, dtype), _as(w, dtype), _as(b, dtype), _as(dy, dtype))
    y, (gx, gw, gb) = _fwd_and_vjp("numba", p["act"])(*args)
    yr, (gxr, gwr, gbr) = _fwd_and_vjp("reference", p["act"])(*args)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert gx.dtype == dtype and gw.dtype == dtype and (gb is None) == (b is None)
    # Against the float64 NumPy reference: within one implementation's error bound (dot=1 of 2).
    names = ("y", "dx", "dw", "db")
    gots = (y.reshape(m, n), gx.reshape(m, k), gw, gb)
    refs = (yr.reshape(m, n), gxr.reshape(m, k), gwr, gbr)
    for name, got, ref, want_, tol in zip(names, gots, refs, want, tols):
        if got is None:
            continue
        _assert_close(f"{name} vs float64 numpy", got, want_, tol / 2)
        # Against the jax reference: both sides' errors (the full bound).
        _assert_close(f"{name} vs jax reference", got, _f64(ref), tol)


@given(problems())
def test_values_and_gradients_match_references(problem):
    with jax.enable_x64(True):
        _check_problem(problem)


@settings(max_examples=8)
@given(problems())
def test_thread_pool_path_matches_references(problem):
    # Big problems share GEMM blocks with XLA's thread pool; force that path on every size.
    with _pool(), jax.enable_x64(True):
        _check_problem(problem)


# (M, K, N) that reach each branch of kernels/numba_cpu/_kernels.py's forward and backward
# (thresholds NARROW_N, TINY_W, DOT_MIN_N, NR, UNPACKED_MAX_M*, DW_TRANSPOSE_MIN_N there, and the derived
# blocking's dwt); the drawn problems rarely reach M >= 256.
KERNEL_PATHS = {
    "tiny w: loops along M": (50, 7, 3),
    "tiny w, one input (K = 1)": (40, 1, 64),
    "one column, K <= 15: row-wise forward and backward, M not a multiple of 8": (261, 5, 1),
    "one column, K = 15 (the row-wise backward's widest)": (45, 15, 1),
    "one column, 16 <= K <= 64: row-wise forward, backward along M": (99, 37, 1),
    "tiny w, x transposed in register blocks": (50, 16, 4),
    "narrow N: dot-form forward, dw via dw.T": (300, 40, 13),
    "dx dot form, dw via strided x.T": (20, 1100, 97),
    "64 rows: w and g read in place, partial panels": (64, 48, 40),
    "M >= 256: dx panel form, dw via strided x.T": (260, 300, 300),
    "K < M, N > 32: dw via strided x.T, M not a multiple of 4 (db's row tail)": (303, 100, 70),
    "rows of x >= 4 KiB, N >= 512: dw from x transposed first": (36, 1030, 520),
}


@pytest.mark.parametrize("pool", [False, True], ids=["calling-thread", "xla-pool"])
@pytest.mark.parametrize("shape", KERNEL_PATHS.values(), ids=KERNEL_PATHS.keys())
def test_every_kernel_path_matches_references(shape, pool):
    m, k, n = shape
    with _pool(pool), jax.enable_x64(True):
        for act, dtype in (("gelu", "float32"), ("sigmoid", "float64")):
            _check_problem(dict(lead=(m,), k=k, n=n, dtype=dtype, act=act, bias=True, values="normal", seed=m + k + n))


@pytest.mark.parametrize("pool", [False, True], ids=["calling-thread", "xla-pool"])
@pytest.mark.parametrize("shape", KERNEL_PATHS.values(), ids=KERNEL_PATHS.keys())
def test_relu_gradient_with_and_without_exact_zeros(shape, pool):
    """relu saves y, not z: without an exact z = 0 its gradient comes from y, and with one the
    backward recomputes z (relu'(0) = 1/2, as ``jnp.maximum`` defines it). Both cases on every
    kernel path: normal values (no ties), and x with zero rows against a bias that is 0 in
    every other column (z exactly 0 there in any summation order)."""
    m, k, n = shape
    rng = np.random.default_rng(m * k * n)
    x, w, b, dy = (rng.standard_normal(s) for s in ((m, k), (k, n), (n,), (m, n)))
    x_ties, b_ties = x.copy(), b.copy()
    x_ties[::3] = 0.0
    b_ties[::2] = 0.0
    with _pool(pool), jax.enable_x64(True):
        for xs, bs, dtype in ((x, b, jnp.float32), (x_ties, b_ties, jnp.float64), (x_ties, None, jnp.float32)):
            args = (_as(xs, dtype), _as(w, dtype), _as(bs, dtype), _as(dy, dtype))
            got = jax.tree.leaves(_fwd_and_vjp("numba", "relu")(*args))
            want = jax.tree.leaves(_fwd_and_vjp("xla", "relu")(*args))
            z = _f64(args[0]) @ _f64(args[1]) + (0 if bs is None else _f64(args[2]))
            assert (xs is x) != bool(np.any(z == 0))  # the case is what it says
            rtol = 1e-4 if dtype == jnp.float32 else 1e-12
            for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
                np.testing.assert_allclose(_f64(g), _f64(r), rtol=rtol, atol=rtol * (1 + np.abs(_f64(r)).max()),
                                           err_msg=f"{name} at {shape}, {np.dtype(dtype).name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transposes_and_panel_packing_match_numpy(dtype):
    # Register-block transposes (16 x 16, 8 x 8 in float64) with ragged edges, the element-wise
    # paths (a side under a block, tall inputs, a unit side), and w.T packed into zero-padded
    # panels, against NumPy exactly.
    from kernels.numba_cpu import _kernels
    rng = np.random.default_rng(0)
    for m, n in [(1, 7), (7, 1), (3, 5), (8, 8), (16, 16), (17, 33), (33, 17), (64, 64), (100, 37),
                 (31, 129), (256, 5), (5, 256), (48, 80), (600, 40), (520, 1030)]:
        a = rng.standard_normal((m, n)).astype(dtype)
        out = np.full((n, m), np.nan, dtype)
        _kernels.transpose(a, out)
        np.testing.assert_array_equal(out, a.T, err_msg=f"transpose {m}x{n}")
        panels = -(-m // _kernels.NR)
        wp = np.full((panels, n, _kernels.NR), np.nan, dtype)
        _kernels.pack_panels_t(a, wp)  # a as w.T: [N = m, K = n]
        want = np.zeros((panels * _kernels.NR, n), dtype)
        want[:m] = a
        np.testing.assert_array_equal(wp, want.reshape(panels, _kernels.NR, n).transpose(0, 2, 1),
                                      err_msg=f"pack_panels_t {m}x{n}")


@settings(max_examples=8)
@given(problems(dtypes=("bfloat16", "float16")))
def test_low_precision_inputs_accumulate_in_float32(problem):
    # Outputs and gradients come back in the input dtype; references computed from the same
    # (already rounded) inputs, so only the float32 accumulation and the final cast differ.
    _check_problem(problem)


@pytest.mark.parametrize("act", ACTS)
def test_check_grads_float64(act):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, w, b = (jnp.asarray(rng.standard_normal(s)) for s in [(5, 7), (7, 3), (3,)])
        if act == "relu":  # keep |z| away from relu's kink, where finite differences are meaningless
            w, b = 0.05 * w, b + 3.0 * jnp.sign(b)
        f = lambda x, w, b: kernels.fused_dense(x, w, b, activation=act, backend="numba")  # noqa: E731
        # Reverse mode, the fused backward (forward mode and second order: test_forward_mode.py).
        check_grads(f, (x, w, b), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
        check_grads(jax.jit(f), (x, w, b), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@contextlib.contextmanager
def _pool(on=True):
    """Every problem shares its blocks with XLA's thread pool (or none), whatever its size."""
    from kernels.numba_cpu import backend

    with backend.use_blocking(backend.blocking().replace(parallel_min_macs=1 if on else 1 << 62)):
        assert backend.share_attribute(1, 1, 1) == on
        yield


# --- Transforms -----------------------------------------------------------------------------
def _data(shape_x=(6, 4, 33), n=17, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], shape_x), jax.random.normal(k[1], (shape_x[-1], n)) / 6,
            jax.random.normal(k[2], (n,)))


def _f(backend, act="gelu"):
    return lambda x, w, b: kernels.fused_dense(x, w, b, activation=act, backend=backend)


def _loss(fn):
    return lambda x, w, b: jnp.sum(jnp.sin(fn(x, w, b)))


def _close(a, b, tol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jit_and_eager_grad(jit):
    x, w, b = _data()
    g = jax.grad(_loss(_f("numba")), (0, 1, 2))
    g = jax.jit(g) if jit else g
    _close(g(x, w, b), jax.grad(_loss(_f("xla")), (0, 1, 2))(x, w, b))


def test_nested_vmap_and_checkpoint():
    x, w, b = _data((3, 5, 2, 33))
    f2 = lambda f: jax.vmap(jax.vmap(jax.checkpoint(f), (0, None, None)), (0, None, None))  # noqa: E731
    got = jax.jit(jax.grad(_loss(f2(_f("numba"))), (0, 1, 2)))(x, w, b)
    _close(got, jax.grad(_loss(f2(_f("xla"))), (0, 1, 2))(x, w, b))


def test_shard_map_on_four_cpu_devices():
    assert len(jax.devices("cpu")) >= 4, "tests/conftest.py asks for 4 fake CPU devices"
    mesh = jax.make_mesh((4,), ("d",))
    x, w, b = _data((4 * 40, 33))
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))

    def per_shard(f):
        return jax.jit(jax.shard_map(lambda x, w, b: (f(x, w, b), jax.grad(_loss(f), (0, 1, 2))(x, w, b)),
                                     mesh=mesh, in_specs=(P("d"), P(), P()),
                                     out_specs=(P("d"), (P("d"), P(), P()))))
    with _pool():  # every shard also uses XLA's pool
        got = per_shard(_f("numba"))(xs, w, b)
    want = (_f("xla")(x, w, b), jax.grad(_loss(_f("xla")), (0, 1, 2))(x, w, b))
    _close(jax.device_get(got), want, 1e-4)


@pytest.mark.parametrize("pool", [False, True], ids=["calling-thread", "xla-pool"])
def test_concurrent_calls_from_threads(pool):
    # The handlers hold no global state and no lock: many host threads may run them at once,
    # each possibly sharing its blocks with XLA's thread pool.
    from concurrent.futures import ThreadPoolExecutor

    x, w, b = _data((256, 64), n=48)
    f = jax.jit(jax.value_and_grad(_loss(_f("numba", "tanh")), (0, 1, 2)))
    want = jax.value_and_grad(_loss(_f("xla", "tanh")), (0, 1, 2))(x, w, b)
    with _pool(pool):
        jax.block_until_ready(f(x, w, b))  # traced here: the pool setting does not reach other threads
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda i: jax.device_get(f(x * 1.0, w, b)), range(32)))
    for o in outs:
        _close(o, want, 1e-4)


IMPORT_ONLY = textwrap.dedent("""
    import pathlib, sys
    numba_cache, in_tree = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    # Numba's in-tree cache files: none may be deleted (the old import-time clean-up did that).
    # Other test processes may add files there meanwhile (the compile checks above and below
    # cover this import writing any).
    listing = lambda d: {p.name for p in d.iterdir() if p.suffix in (".nbi", ".nbc")} if d.is_dir() else set()
    before = listing(in_tree)
    import jaxnet, kernels, kernels.numba_cpu
    from kernels import host_memory
    loaded = [m for m in ("kernels.numba_cpu._kernels", "kernels.numba_cpu._handlers") if m in sys.modules]
    assert not loaded, loaded
    assert not any(numba_cache.iterdir()), list(numba_cache.iterdir())
    assert before <= listing(in_tree), sorted(before - listing(in_tree))[:5]
    assert host_memory._state["applied"] is None
    print("OK")
""")


def test_import_changes_nothing_on_disk_or_in_the_process(tmp_path):
    # Importing jaxnet and kernels compiles nothing, touches no cache (Numba's, wherever it is)
    # and leaves malloc alone.
    in_tree = pathlib.Path(kernels.__file__).parent / "numba_cpu" / "__pycache__"
    proc = subprocess.run([sys.executable, "-c", IMPORT_ONLY, str(tmp_path), str(in_tree)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]


def test_first_use_leaves_malloc_alone():
    # Setting malloc is an entry point's choice (jaxnet.runtime.keep_host_memory), not a side
    # effect of the first kernel call.
    code = ("import kernels, jax.numpy as jnp\n"
            "from kernels import host_memory\n"
            "kernels.fused_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), backend='numba').block_until_ready()\n"
            "print(host_memory._state['applied'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None"]


FIRST_CALL = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    import kernels
    from kernels.numba_cpu import _handlers
    f = lambda x, w, b: jnp.sum(kernels.fused_dense(x, w, b, activation="relu", backend="numba"))
    jax.block_until_ready(jax.jit(jax.value_and_grad(f, (0, 1, 2)))(jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones(4)))
    print(json.dumps({"_".join(key): compiled.cache_hits for key, compiled in _handlers._COMPILED.items()}))
""")


def test_first_call_compiles_only_its_activation_and_the_next_process_loads_it():
    # A float32 relu forward and backward compiles float32's shared units and relu's own, none
    # of another activation or of float64; a second process loads every one from Numba's cache.
    import json

    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    units = set(runs[0])
    assert set(runs[1]) == units, runs
    assert {"blocks_float32", "task_float32", "forward_float32", "backward_float32", "handler_forward_float32_relu",
            "handler_backward_float32_relu"} <= units, units
    assert {u for u in units if u.startswith(("activate_", "gradient_"))} == {"activate_relu_float32",
                                                                             "gradient_relu_float32"}, units
    assert not [u for u in units if "float64" in u], units
    assert all(hits == 1 for hits in runs[1].values()), runs[1]


def test_stale_numba_cache_is_dropped(tmp_path):
    from kernels.numba_cpu import _cache

    assert pathlib.Path(kernels.__file__).parent / "activations.py" in _cache.sources()  # codes are compiled in
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for d, stamp in ((stale, "an older digest"), (fresh, _cache.digest())):
        d.mkdir()
        (d / "numba_sources.sha256").write_text(stamp)
        for name in ("_kernels.forward-1.py311.nbi", "_kernels.forward-1.py311.1.nbc"):
            (d / name).write_bytes(b"x")
    assert _cache.drop_if_stale(stale) and _cache.drop_if_stale(fresh) is False
    assert sorted(p.name for p in stale.iterdir()) == ["numba_sources.sha256"]
    assert (stale / "numba_sources.sha256").read_text() == _cache.digest()
    assert len(list(fresh.iterdir())) == 3
    # The package's own cache was checked before its first handler was compiled or loaded.
    from kernels.numba_cpu import backend
    backend._target("forward", "float32", "relu")
    assert (_cache.cache_dir() / "numba_sources.sha256").read_text() == _cache.digest()


def test_modules_outside_the_cache_digest_hold_no_compiled_function():
    # Editing these modules keeps Numba's cache (a cold rebuild takes minutes): safe only while
    # nothing compiled lives in them.
    import importlib

    from numba.core.ccallback import CFunc
    from numba.core.registry import CPUDispatcher

    from kernels.numba_cpu import _cache

    assert "backend.py" in _cache.NOT_COMPILED and "_kernels.py" in {p.name for p in _cache.sources()}
    for name in _cache.NOT_COMPILED:
        module = importlib.import_module("kernels.numba_cpu" + ("" if name == "__init__.py" else "." + name[:-3]))
        compiled = [k for k, v in vars(module).items() if isinstance(v, (CPUDispatcher, CFunc))]
        assert not compiled, (name, compiled)


def test_share_is_a_flag_and_the_task_a_link_time_symbol():
    # The executable carries share = 0/1, never an address; the handler finds its dtype's task
    # through a symbol this process registered (so cached machine code is right in any process).
    import numba
    from kernels.numba_cpu import _handlers, _link

    x, w = jnp.ones((512, 256)), jnp.ones((256, 128))
    for m, want in ((512, "share = 1"), (4, "share = 0")):
        text = jax.jit(lambda x, w: kernels.fused_dense(x, w, backend="numba")).lower(x[:m], w).as_text()
        assert want in text and "task" not in text
    for dtype, nbtype in (("float32", numba.float32), ("float64", numba.float64)):
        _handlers.handler("forward", dtype, "relu")
        address = numba.njit(lambda: _link.address("task", nbtype))()
        assert address == _handlers.unit("task", dtype).address != 0


SHARED_IN_A_NEW_PROCESS = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    hits = []
    jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e.endswith("cache_hits") else None)
    import kernels
    from kernels.numba_cpu import backend

    def ticks():  # CPU time (clock ticks) of each thread of this process
        out = {}
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[t] = int(fields[11]) + int(fields[12])
        return out

    k = jax.random.split(jax.random.key(0), 3)
    x, w, b = (jax.random.normal(k[0], (1024, 1024)), jax.random.normal(k[1], (1024, 1024)) / 32,
               jax.random.normal(k[2], (1024,)))
    fd = lambda x, w, b: kernels.fused_dense(x, w, b, activation="gelu", backend="numba")
    loss = lambda x, w, b: jnp.sum(jnp.sin(fd(x, w, b)))
    f, g = jax.jit(fd), jax.jit(jax.grad(loss, (0, 1, 2)))
    y, grads = f(x, w, b).block_until_ready(), jax.block_until_ready(g(x, w, b))
    t0 = ticks()
    for _ in range(8):
        f(x, w, b).block_until_ready()
    t1 = ticks()
    busy = sorted((t1[t] - t0.get(t, 0) for t in t1), reverse=True)
    # The same functions on the calling thread only (traced again: new HLO).
    with backend.use_blocking(backend.blocking().replace(parallel_min_macs=1 << 62)):
        f1, g1 = jax.jit(lambda *a: fd(*a)), jax.jit(jax.grad(lambda *a: loss(*a), (0, 1, 2)))
        y1, grads1 = f1(x, w, b), g1(x, w, b)
    same = bool(np.array_equal(y, y1) and all(np.array_equal(a, c) for a, c in zip(grads, grads1)))
    print(json.dumps(dict(hits=len(hits), busy=busy[:3], same=same, y=float(jnp.sum(y)))))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads per-thread CPU time from /proc")
def test_persistent_compilation_cache_keeps_threads_in_a_new_process(tmp_path):
    # With JAX's persistent cache on, a big problem still shares its blocks with XLA's pool, also
    # when a second process loads the executables from the cache; results are bit-identical to
    # the calling-thread-only kernels.
    import json

    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", SHARED_IN_A_NEW_PROCESS, str(tmp_path)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["hits"] == 0 and second["hits"] >= 2, runs  # the second process ran cached executables
    assert first["y"] == second["y"], runs
    for run in runs:
        assert run["same"], run
        # The forward ran on more than one thread: the second busiest did a real share of it
        # (without sharing it does none; the margin is for other jobs on the machine).
        assert run["busy"][1] >= 0.1 * run["busy"][0] > 0, run


def test_thread_pool_repeated_calls_stay_correct():
    # Helpers may still be finishing a block when the calling thread runs out of work; every
    # buffer they read must outlive them (a premature free reads recycled memory: wrong values
    # or a crash). Many calls on shapes with several blocks per thread give that race room.
    x, w, b = _data((300, 200), n=260)
    for act in ("gelu", "tanh"):
        f = jax.jit(jax.value_and_grad(_loss(_f("numba", act)), (0, 1, 2)))
        want = jax.value_and_grad(_loss(_f("xla", act)), (0, 1, 2))(x, w, b)
        with _pool():
            outs = [f(x, w, b) for _ in range(12)]  # dispatched back to back
        for o in outs:
            _close(jax.device_get(o), want, 1e-4)


STRESS = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    import kernels
    shapes = [(1024, 1024, 1024), (512, 512, 512), (256, 64, 128), (2048, 1024, 1024),
              (4096, 256, 256), (8, 4096, 4096), (256, 4096, 64)]
    fns = []
    for act in ("relu", "gelu", "tanh"):
        f = lambda x, w, b, act=act: kernels.fused_dense(x, w, b, activation=act, backend="numba")
        fb = lambda x, w, b, dy, f=f: (lambda yv: (yv[0], yv[1](dy)))(jax.vjp(f, x, w, b))
        fns += [jax.jit(f), jax.jit(fb)]
    t0 = time.time()
    while time.time() - t0 < float(sys.argv[1]):
        for m, k, n in shapes:
            x, w, b, dy = jnp.ones((m, k)) / 100, jnp.ones((k, n)) / 100, jnp.ones(n), jnp.ones((m, n))
            outs = [fn(x, w, b, dy) if i % 2 else fn(x, w, b) for i, fn in enumerate(fns) for _ in range(3)]
            jax.block_until_ready(outs)
    print("OK")
""")


@pytest.mark.slow
def test_stress_thread_pool_in_a_subprocess():
    # Back-to-back big calls of every kind for a minute: the run that found a helper reading
    # scratch its caller had already freed (it crashed within ~30 s).
    proc = subprocess.run([sys.executable, "-c", STRESS, "60"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.parametrize("layout", ["x.T", "w.T", "strided", "broadcast"])
def test_non_row_major_operands(layout):
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((33, 24)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((17, 33)) / 6, jnp.float32)
    b = jnp.asarray(rng.standard_normal(34), jnp.float32)
    make = {  # each builds (x, w, b) from views XLA must lay out before the FFI call
        "x.T": lambda a, wt, b: (a.T, wt.T, b[:17]),
        "w.T": lambda a, wt, b: (a[:, :24].T, wt.T, b[17:]),
        "strided": lambda a, wt, b: (a[::-1, ::2].T, wt[::-1, ::-1].T, b[::2]),
        "broadcast": lambda a, wt, b: (jnp.broadcast_to(a[:, :1], (33, 5)).T, wt.T, b[:17]),
    }[layout]
    for backend_fn in (lambda be: jax.jit(lambda a, wt, b: _f(be)(*make(a, wt, b))),
                       lambda be: jax.jit(jax.grad(lambda a, wt, b: _loss(_f(be))(*make(a, wt, b)), (0, 1)))):
        _close(backend_fn("numba")(a, wt, b), backend_fn("xla")(a, wt, b))
    # Eager transposes too (jax arrays are row-major; the transpose is an XLA op).
    x, w, bb = make(a, wt, b)
    _close(kernels.fused_dense(x, w, bb, backend="numba"), reference.fused_dense(x, w, bb))


def test_zero_size_batch_and_outputs():
    w, b = jnp.ones((7, 3)), jnp.ones(3)
    for x in (jnp.zeros((0, 7)), jnp.zeros((4, 0, 7))):
        y = kernels.fused_dense(x, w, b, backend="numba")
        assert y.shape == (*x.shape[:-1], 3)
        gw, gb = jax.grad(lambda w, b: jnp.sum(kernels.fused_dense(x, w, b, backend="numba")), (0, 1))(w, b)
        assert not gw.any() and not gb.any()
    # N = 0 and K = 0.
    assert kernels.fused_dense(jnp.ones((4, 7)), jnp.ones((7, 0)), backend="numba").shape == (4, 0)
    y = kernels.fused_dense(jnp.ones((4, 0)), jnp.ones((0, 3)), jnp.arange(3.0), activation="identity",
                            backend="numba")
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(3.0), (4, 3)))


def test_no_retrace_or_recompile_per_call():
    traces = []

    @jax.jit
    def step(x, w, b):
        traces.append(1)  # runs only when jax traces
        return jax.grad(_loss(_f("numba")), (0, 1, 2))(x, w, b)

    x, w, b = _data((16, 33))
    for i in range(5):
        jax.block_until_ready(step(x + i, w, b))
    assert len(traces) == 1
    step(jnp.ones((8, 33)), w, b)  # a new shape traces once more: one handler serves every shape
    assert len(traces) == 2


def test_backend_is_registered_and_auto_on_cpu():
    assert "numba" in kernels.available_backends()
    x, w, b = _data((8, 33))
    _close(kernels.fused_dense(x, w, b, backend="auto"), reference.fused_dense(x, w, b))


# --- Bad inputs, each in a fresh process: a crash fails the test instead of the run ------------
BAD_INPUTS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import kernels
    from kernels.numba_cpu import backend as nb

    f = lambda *a, **k: kernels.fused_dense(*a, backend="numba", **k)
    cases = {
        "K mismatch": lambda: f(jnp.ones((3, 4)), jnp.ones((5, 2))),
        "w rank": lambda: f(jnp.ones((3, 4)), jnp.ones((4, 2, 1))),
        "x scalar": lambda: f(jnp.ones(()), jnp.ones((1, 2))),
        "b shape": lambda: f(jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones(3)),
        "b rank": lambda: f(jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones((1, 2))),
        "int dtype": lambda: f(jnp.ones((3, 4), jnp.int32), jnp.ones((4, 2))),
        "complex dtype": lambda: f(jnp.ones((3, 4), jnp.complex64), jnp.ones((4, 2))),
        "list": lambda: f([[1.0]], jnp.ones((1, 2))),
        "activation": lambda: f(jnp.ones((3, 4)), jnp.ones((4, 2)), activation="swish"),
        "backend": lambda: kernels.fused_dense(jnp.ones((3, 4)), jnp.ones((4, 2)), backend="numbaa"),
        "under jit": lambda: jax.jit(f)(jnp.ones((3, 4)), jnp.ones((5, 2))),
    }
    for name, case in cases.items():
        try:
            case()
        except (TypeError, ValueError) as e:
            print("OK", name, type(e).__name__, str(e).splitlines()[0][:120])
        else:
            print("NO ERROR", name)

    # The raw FFI targets, called past the checks with operands that do not fit: XLA errors,
    # never a crash.
    f32 = jax.ShapeDtypeStruct
    blk = nb.blocking().attributes()  # the cache blocking that every call carries
    raw = {
        "shapes": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"), f32((3, 2), jnp.float32))(
            jnp.ones((3, 4)), jnp.ones((5, 2)), act=np.int64(1), **blk, share=np.int64(0)),
        "dtype": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"), f32((3, 2), jnp.float32))(
            jnp.ones((3, 4), jnp.int32), jnp.ones((4, 2)), act=np.int64(1), **blk, share=np.int64(0)),
        "attribute": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"), f32((3, 2), jnp.float32))(
            jnp.ones((3, 4)), jnp.ones((4, 2)), act=np.int64(99), **blk, share=np.int64(0)),
        "another activation's code": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"),
                                                             f32((3, 2), jnp.float32))(
            jnp.ones((3, 4)), jnp.ones((4, 2)), act=np.int64(2), **blk, share=np.int64(0)),
        "arity": lambda: jax.ffi.ffi_call(nb._target("backward", "float32", "relu"), f32((3, 2), jnp.float32))(
            jnp.ones((3, 4)), act=np.int64(1), **blk, share=np.int64(0)),
        "no share attribute": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"),
                                                       f32((3, 2), jnp.float32))(
            jnp.ones((3, 4)), jnp.ones((4, 2)), act=np.int64(1), **blk),
        "share not 0 or 1": lambda: jax.ffi.ffi_call(nb._target("backward", "float32", "gelu"),
                                                     (f32((3, 4), jnp.float32), f32((4, 2), jnp.float32)))(
            jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones((3, 2)), act=np.int64(2),
            **blk, share=np.int64(140000000000)),
        "rank": lambda: jax.ffi.ffi_call(nb._target("forward", "float32", "relu"), f32((3, 2), jnp.float32))(
            jnp.ones((4,)), jnp.ones((4, 2)), act=np.int64(1), **blk, share=np.int64(0)),
        "relu tie flag shape": lambda: jax.ffi.ffi_call(
            nb._target("forward", "float32", "relu"), (f32((3, 2), jnp.float32), f32((2,), jnp.float32)))(
            jnp.ones((3, 4)), jnp.ones((4, 2)), act=np.int64(1), **blk, share=np.int64(0)),
        "relu backward without tie flag": lambda: jax.ffi.ffi_call(
            nb._target("backward", "float32", "relu"), (f32((3, 4), jnp.float32), f32((4, 2), jnp.float32)))(
            jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones((3, 2)), act=np.int64(1), **blk,
            share=np.int64(0)),
        "relu backward bias shape": lambda: jax.ffi.ffi_call(
            nb._target("backward", "float32", "relu"),
            (f32((3, 4), jnp.float32), f32((4, 2), jnp.float32), f32((2,), jnp.float32)))(
            jnp.ones((3, 2)), jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones((3, 2)), jnp.ones((1,)), jnp.ones((5,)),
            act=np.int64(1), **blk, share=np.int64(0)),
    }
    for name, case in raw.items():
        try:
            jax.block_until_ready(case())
        except Exception as e:
            print("OK raw", name, type(e).__name__, str(e).splitlines()[0][:120])
        else:
            print("NO ERROR raw", name)
    print("DONE")
""")


def test_bad_inputs_raise_at_trace_time_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-c", BAD_INPUTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess died ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE", proc.stdout
    assert not [ln for ln in lines if ln.startswith("NO ERROR")], proc.stdout
    # The shape errors name the shapes.
    assert any("K mismatch" in ln and "(3, 4)" in ln and "(5, 2)" in ln for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw shapes") and "do not agree" in ln for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw another activation's code") and "not the handler's activation" in ln
               for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw relu tie flag shape") and "tie flag must be [1]" in ln for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw relu backward without tie flag") and "(dy, x, w, y, t[, b])" in ln
               for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw relu backward bias shape") and "b must be [N]" in ln for ln in lines), proc.stdout
    assert any(ln.startswith("OK raw shapes") and "numba fused_dense forward: " in ln for ln in lines), proc.stdout


# --- A model trained on the kernel --------------------------------------------------------------
def test_mlp_trained_with_numba_matches_xla():
    from jaxnet.models.mlp import MLP

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 12)), jnp.float32)
    y = jnp.asarray(np.sin(np.asarray(x) @ rng.standard_normal((12, 3))), jnp.float32)
    opt = optax.adam(1e-2)

    def train(backend):
        model = MLP(features=(32, 32, 3), activation="gelu", backend=backend)
        params = model.init(jax.random.key(0), x)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))(params)
            upd, state = opt.update(g, state, params)
            return optax.apply_updates(params, upd), state, loss

        losses = []
        for _ in range(30):
            params, state, loss = step(params, state)
            losses.append(float(loss))
        return params, losses

    p_nb, l_nb = train("numba")
    p_xla, l_xla = train("xla")
    assert l_nb[-1] < 0.5 * l_nb[0]
    np.testing.assert_allclose(l_nb, l_xla, rtol=1e-4, atol=1e-6)
    _close(p_nb, p_xla, 1e-4)
