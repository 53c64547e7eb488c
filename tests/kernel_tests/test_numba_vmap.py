"""``kernels.fused_dense(..., backend="numba")`` under ``jax.vmap`` (issue 20, point 7).

A batch over x alone folds into M (one forward call on ``[B*M, K]``, no copy of w), nested vmaps
too; every other batching (w or b batched, gradients) stays correct. Values and gradients (the
gradient of a vmapped loss, and vmap of a gradient) against the float64 NumPy reference, element
by element, within ``jaxnet.testing.tolerances``' bounds; the compiled programs' temporaries
against the size of B copies of w.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kernels
from jaxnet.testing.profiles import profile_name
from jaxnet.testing.tolerances import FusedDenseBounds
from kernels import reference
from kernels.activations import ACTIVATIONS

# Each example compiles its own program: few of them under the "ci" profile (and the explicit
# examples below).
EXAMPLES = 6 if profile_name() == "ci" else settings.default.max_examples
# The inner vmap's in_axes for (x, w, b): x alone (it folds; also from axis 1), then batchings
# that cannot fold. An optional outer vmap maps x (in_axes (0, None, None)).
BATCHINGS = {"x": (0, None, None), "x at axis 1": (1, None, None), "w": (None, 0, None), "b": (0, None, 0),
             "x and w": (0, 0, None), "all": (0, 0, 0)}
TRANSFORMS = ("forward", "grad of vmap", "vmap of grad")
# The per-element accumulation length behind each gradient (in units of the problem's sizes).
TERMS = {"x": "n", "w": "m", "b": "m"}


@st.composite
def vmapped_problems(draw):
    """Batch sizes, shapes, dtype, activation, which operands the inner vmap maps, the transform.
    The first value of each list is not degenerate (B, M > 1): Hypothesis starts from it."""
    batching = draw(st.sampled_from(list(BATCHINGS)), label="batching")
    return dict(
        batching=batching,
        transform=draw(st.sampled_from(TRANSFORMS), label="transform"),
        outer=draw(st.sampled_from([1, 2, 3]), label="outer batch (1: no outer vmap)"),
        b=draw(st.sampled_from([3, 1, 5]), label="B"),
        m=draw(st.sampled_from([2, 1, 8]), label="M"),
        k=draw(st.sampled_from([5, 1, 33]), label="K"),
        n=draw(st.sampled_from([4, 1, 17]), label="N"),
        dtype=draw(st.sampled_from(["float32", "float64"]), label="dtype"),
        act=draw(st.sampled_from(sorted(ACTIVATIONS)), label="activation"),
        # Small integers: exact sums, so relu meets z exactly 0 (its derivative 1/2 there).
        values=draw(st.sampled_from(["normal", "integers"]), label="values"),
        # "vmap of grad": one cotangent for every element (unbatched) or one each.
        shared_g=draw(st.booleans(), label="one cotangent for all"),
        bias=batching in ("b", "all") or draw(st.booleans(), label="bias"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
    )


def _case(batching, transform, outer, act="gelu", dtype="float32", bias=True, values="normal", shared_g=False):
    return dict(batching=batching, transform=transform, outer=outer, b=3, m=2, k=5, n=4, dtype=dtype, act=act,
                values=values, shared_g=shared_g, bias=bias, seed=1)


def _element_axes(p):
    """Which element axes, (outer, inner), each operand has."""
    axes = BATCHINGS[p["batching"]]
    return {"x": (p["outer"] > 1, axes[0] is not None), "w": (False, axes[1] is not None),
            "b": (False, axes[2] is not None)}


def _inputs(p):
    """x, w, b (None without a bias) and g (the cotangent of y) as float64 NumPy rounded to the
    dtype, each with its element axes in front (outer, then inner); g has both."""
    rng = np.random.default_rng(p["seed"])
    sizes = (p["outer"], p["b"])

    def draw(name, shape, scale=1.0):
        lead = [s for s, on in zip(sizes, _element_axes(p)[name]) if on]
        if p["values"] == "integers":
            return rng.integers(-2, 3, (*lead, *shape)).astype(np.float64)
        return np.asarray(rng.standard_normal((*lead, *shape)) * scale, p["dtype"]).astype(np.float64)

    x = draw("x", (p["m"], p["k"]))
    w = draw("w", (p["k"], p["n"]), 1 / math.sqrt(p["k"]))
    b = draw("b", (p["n"],)) if p["bias"] else None
    g = np.asarray(rng.standard_normal((*sizes, p["m"], p["n"])), p["dtype"]).astype(np.float64)
    if p["shared_g"] and p["transform"] == "vmap of grad":
        g = np.broadcast_to(g[:1, :1], g.shape).copy()
    return x, w, b, g


def _expected(p, x, w, b, g):
    """Float64 results and tolerances, shaped as the transform returns them (without the outer
    axis when there is no outer vmap). Zeroes g where relu's kink makes the derivative ambiguous.

    Each element (o, j) is an unbatched problem with its own bounds. A gradient is per element
    in "vmap of grad", and in "grad of vmap" the sum over the element axes its operand lacks; the
    sum's tolerance is the elements' summed, scaled from L to count*L terms (L: an element's own
    accumulation length, N for dx and M for dw and db): a bound for any order of summation.
    """
    sizes, has = (p["outer"], p["b"]), _element_axes(p)

    def pick(a, name, o, j):
        if a is None:
            return None
        return a[tuple(i for i, on in zip((o, j), has[name]) if on)]

    res = {k: np.zeros((*sizes, *s)) for k, s in
           (("y", (p["m"], p["n"])), ("dx", (p["m"], p["k"])), ("dw", (p["k"], p["n"])), ("db", (p["n"],)))}
    tol = {k: np.zeros_like(v) for k, v in res.items()}
    elements = [(o, j) for o in range(p["outer"]) for j in range(p["b"])]
    bounds = {(o, j): FusedDenseBounds.from_inputs(np.asarray(pick(x, "x", o, j), p["dtype"]), pick(w, "w", o, j),
                                                   pick(b, "b", o, j), p["act"]) for o, j in elements}
    kinks = np.stack([bounds[e].kink_mask() for e in elements]).reshape(g.shape)
    if p["shared_g"] and p["transform"] == "vmap of grad":  # one g for all: zero it at every element's kinks
        kinks[:] = kinks.any((0, 1))
    g[kinks] = 0.0
    for o, j in elements:
        xe, we, be = pick(x, "x", o, j), pick(w, "w", o, j), pick(b, "b", o, j)
        y, dx, dw, db = reference.fused_dense_vjp_numpy(xe, we, be, g[o, j], activation=p["act"])
        want = {"x": dx, "w": dw} if be is None else {"x": dx, "w": dw, "b": db}
        res["y"][o, j], tol["y"][o, j] = y, bounds[o, j].forward(y)
        for name, t in bounds[o, j].grads(g[o, j], want).items():
            res["d" + name][o, j], tol["d" + name][o, j] = want[name], t
    names = ["y"] if p["transform"] == "forward" else ["y", "dx", "dw"] + (["db"] if b is not None else [])
    out = {}
    for name in names:
        v, t = res[name], tol[name]
        if name != "y" and p["transform"] == "grad of vmap":  # leaves the operand's own axes
            summed = tuple(a for a, on in enumerate(has[name[1:]]) if not on)
            count, terms = math.prod(sizes[a] for a in summed), p[TERMS[name[1:]]]
            v, t = v.sum(summed), t.sum(summed) * (count * terms + 1) / (terms + 1)
        elif p["outer"] == 1:  # no outer vmap: no outer axis
            v, t = v[0], t[0]
        out[name] = (v, t)
    return out


def _transform(p):
    """The jitted transform of the numba ``fused_dense`` the problem names, returning a dict of
    y and the gradients of ``sum(y * g)`` (so that g is y's cotangent)."""
    axes = BATCHINGS[p["batching"]]
    fd = lambda x, w, b: kernels.fused_dense(x, w, b, activation=p["act"], backend="numba")  # noqa: E731

    def with_grads(f):
        def run(x, w, b, g):
            y, vjp = jax.vjp(f, x, w, b)
            return {"y": y, **dict(zip(("dx", "dw", "db"), vjp(g)))}
        return run

    nest = (lambda f, ax: f) if p["outer"] == 1 else (lambda f, ax: jax.vmap(f, ax))
    if p["transform"] == "forward":
        f = nest(jax.vmap(fd, axes), (0, None, None))
        return jax.jit(lambda x, w, b, g: {"y": f(x, w, b)})
    if p["transform"] == "grad of vmap":
        return jax.jit(with_grads(nest(jax.vmap(fd, axes), (0, None, None))))
    g_axis = None if p["shared_g"] else 0
    return jax.jit(nest(jax.vmap(with_grads(fd), (*axes, g_axis)), (0, None, None, g_axis)))


@settings(max_examples=EXAMPLES)
@given(vmapped_problems())
# The folds (forward, nested, x from axis 1), and each other path under each transform, always.
@example(_case("x", "forward", 2, "relu"))
@example(_case("x", "grad of vmap", 1, "relu", values="integers"))
@example(_case("x", "vmap of grad", 2, "relu", "float64", bias=False, values="integers"))
@example(_case("x at axis 1", "grad of vmap", 2, "relu", "float64"))
@example(_case("x", "vmap of grad", 2, "silu", bias=False))
@example(_case("x", "vmap of grad", 1, "sigmoid", shared_g=True))
@example(_case("b", "grad of vmap", 1, "tanh"))
@example(_case("w", "vmap of grad", 2, "identity", "float64"))
@example(_case("x and w", "grad of vmap", 1, "sigmoid"))
def test_vmapped_values_and_gradients_match_reference(problem):
    p = problem
    with jax.enable_x64(True):
        x, w, b, g = _inputs(p)
        want = _expected(p, x, w, b, g)
        dt = jnp.dtype(p["dtype"])
        xt = np.moveaxis(x, -3, -2) if p["batching"] == "x at axis 1" else x  # the inner batch at axis 1
        g_in = g if p["outer"] > 1 else g[0]
        if p["shared_g"] and p["transform"] == "vmap of grad":
            g_in = g[0, 0]
        got = _transform(p)(jnp.asarray(xt, dt), jnp.asarray(w, dt), None if b is None else jnp.asarray(b, dt),
                            jnp.asarray(g_in, dt))
    if p["batching"] == "x at axis 1" and p["transform"] == "grad of vmap":
        got["dx"] = np.moveaxis(np.asarray(got["dx"]), -2, -3)  # dx comes in x's layout
    assert set(k for k, v in got.items() if v is not None) == set(want), (sorted(got), sorted(want))
    for name, (value, tol) in want.items():
        v = np.asarray(got[name], np.float64)
        assert got[name].dtype == dt and v.shape == value.shape, (name, got[name].dtype, v.shape, value.shape)
        err = np.abs(v - value)
        bad = ~(err <= tol)  # also catches nan
        assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} elements off; e.g. |err| {err[bad][0]:.3g} "
                               f"> tol {tol[bad][0]:.3g} ({p['batching']}, {p['transform']})")


# --- No copies of w -----------------------------------------------------------------------
# x and y are 8 KiB; B copies of w would be 256 KiB.
B, M, K, N = 16, 2, 64, 64
W_COPIES = B * K * N * 4  # bytes


def _fd(x, w, b):
    return kernels.fused_dense(x, w, b, activation="relu", backend="numba")


def _data(shape_x):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], shape_x), jax.random.normal(keys[1], (K, N)) / 8,
            jax.random.normal(keys[2], (N,)))


def _loss(f):
    return lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))


def _close(got, want):
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "vmap of vmap"])
def test_batch_over_x_is_one_forward_call_on_b_times_m_rows(nested):
    x, w, b = _data((4, 4, M, K) if nested else (B, M, K))
    batched = lambda f: jax.vmap(f, (0, None, None))  # noqa: E731
    fn = (lambda f: batched(batched(f))) if nested else batched
    lowered = jax.jit(fn(_fd)).lower(x, w, b)
    calls = [ln for ln in lowered.as_text().splitlines() if "custom_call @jaxnet_numba_fused_dense_forward" in ln]
    assert len(calls) == 1 and f"(tensor<{B * M}x{K}xf32>, tensor<{K}x{N}xf32>, tensor<{N}xf32>)" in calls[0], calls
    # Before the fold, broadcast_all made B copies of w (and the handler looped over them).
    assert lowered.compile().memory_analysis().temp_size_in_bytes < W_COPIES / 4
    _close(jax.jit(fn(_fd))(x, w, b), fn(lambda x, w, b: reference.fused_dense(x, w, b))(x, w, b))


# Temporaries allowed, against B copies of w (what broadcast_all added to each before). In "grad
# of vmap", dw is per element until JAX sums it (it batches a custom_vjp's backward, for the xla
# backend too): with M = 1 XLA fuses that einsum and sum (no [B, K, N] array), with M = 2 it keeps
# one [B, K, N]. In "vmap of grad" in x alone, dw is dropped.
GRADIENTS = {
    "grad of vmap, M = 1": (lambda f: jax.grad(_loss(jax.vmap(f, (0, None, None))), (0, 1, 2)), 1, 0.25),
    "grad of vmap, M = 2": (lambda f: jax.grad(_loss(jax.vmap(f, (0, None, None))), (0, 1, 2)), 2, 1.5),
    "vmap of grad in x": (lambda f: jax.vmap(jax.grad(_loss(f)), (0, None, None)), 2, 0.25),
}


@pytest.mark.parametrize("transform", GRADIENTS)
def test_gradients_make_no_copies_of_w(transform):
    fn, m, limit = GRADIENTS[transform]
    x, w, b = _data((B, m, K))
    compiled = jax.jit(fn(_fd)).lower(x, w, b).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < limit * W_COPIES
    _close(compiled(x, w, b), fn(lambda x, w, b: reference.fused_dense(x, w, b))(x, w, b))
