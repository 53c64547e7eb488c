"""Forward mode and second derivatives through ``kernels.fused_dense`` and ``MLP`` on every backend
(issue 19, point 4): ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` of a scalar loss, Hessian-vector
products (forward over reverse) and reverse over forward, against the same transformations of
``kernels.reference.fused_dense``; and ``jax.grad`` still runs each backend's fused backward.

Tolerance (one table: the bound below). Every compared quantity is, per element, a sum of at most
``L = M + K + N + 1`` products (the forward dot over K and the bias, the backward dots over N and
over the M rows, chained) of factors bounded by the inputs (uniform in [-1, 1]) and by the
activation's first and second derivatives; candidate and reference evaluate them in float32 in
different orders (and the kernels' transcendental functions against XLA's), so they differ by at
most ``SAFETY * ACT_ULPS * L * eps32`` relative to the largest such product, which the largest
element of the reference bounds from below only up to cancellation: ``(1 + max|ref|)`` covers a
quantity that cancels to ~0. ``SAFETY`` and ``ACT_ULPS`` are jaxnet.testing.tolerances' constants.
relu examples keep ``|z| >= 1e-3``: at its kink the derivative depends on z's rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kernels
from jaxnet.models import MLP
from jaxnet.testing.profiles import profile_name
from jaxnet.testing.tolerances import ACT_ULPS, SAFETY
from kernels import activations, reference

BACKENDS = kernels.available_backends()
EXAMPLES = 2 if profile_name() == "ci" else settings.default.max_examples
EPS32 = float(jnp.finfo(jnp.float32).eps)


def _assert_close(got, want, length, what):
    for path, g, r in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert g.shape == r.shape, f"{what}{jax.tree_util.keystr(path[0])}: shape {g.shape} != {r.shape}"
        bound = SAFETY * ACT_ULPS * length * EPS32 * (1 + np.abs(r).max(initial=0))
        err = np.abs(g - r).max(initial=0)
        assert err <= bound, f"{what}{jax.tree_util.keystr(path[0])}: |err| {err:.3g} > {bound:.3g}"


def _transforms(dense, tangents):
    """jvp, jacfwd, hessian of a scalar loss, HVP (forward over reverse), reverse over forward."""
    loss = lambda x, w, b: jnp.sum(jnp.sin(dense(x, w, b)))  # noqa: E731 - curvature for identity too
    args = (0, 1, 2)

    def run(x, w, b):
        p = (x, w, b)
        return {
            "jvp": jax.jvp(dense, p, tangents),
            "jacfwd": jax.jacfwd(dense, args)(*p),
            "hessian": jax.hessian(loss, args)(*p),
            "hvp": jax.jvp(jax.grad(loss, args), p, tangents)[1],
            "grad of jvp": jax.grad(lambda *p: jnp.sum(jax.jvp(dense, p, tangents)[1] ** 2), args)(*p),
        }
    return jax.jit(run)


@st.composite
def problems(draw):
    return dict(
        m=draw(st.integers(1, 3), label="M"), k=draw(st.integers(1, 3), label="K"),
        n=draw(st.integers(1, 3), label="N"),
        act=draw(st.sampled_from(activations.NAMES), label="activation"),
        seed=draw(st.integers(0, 2**31 - 1), label="seed"),
    )


def _arrays(p):
    keys = jax.random.split(jax.random.key(p["seed"]), 6)
    shapes = [(p["m"], p["k"]), (p["k"], p["n"]), (p["n"],)] * 2
    return [jax.random.uniform(kk, s, jnp.float32, -1, 1) for kk, s in zip(keys, shapes)]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(p=problems())
def test_forward_mode_and_second_derivatives_match_the_reference(backend, p):
    x, w, b, *tangents = _arrays(p)
    if p["act"] == "relu":
        assume(float(jnp.abs(x @ w + b).min()) >= 1e-3)
    got = _transforms(lambda x, w, b: kernels.fused_dense(x, w, b, activation=p["act"], backend=backend),
                      tuple(tangents))(x, w, b)
    want = _transforms(lambda x, w, b: reference.fused_dense(x, w, b, activation=p["act"]), tuple(tangents))(x, w, b)
    _assert_close(got, want, p["m"] + p["k"] + p["n"] + 1, f"{backend}/{p['act']} ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_hessian_vector_product_matches_the_reference(backend):
    """A 3-4-4-2 MLP (gelu): HVP of a loss in the parameters and ``jax.hessian`` in the input."""
    x = jax.random.uniform(jax.random.key(1), (2, 3), jnp.float32, -1, 1)
    model = MLP((4, 4, 2), activation="gelu", backend=backend)
    params = model.init(jax.random.key(0), x)["params"]
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float32)).reshape(a.shape), params)

    def reference_mlp(params, x):  # the same layers through the reference
        n = len(params)
        for i in range(n):
            layer = params[f"layers_{i}"]
            x = reference.fused_dense(x, layer["kernel"], layer["bias"], activation="gelu" if i < n - 1 else "identity")
        return x

    def checks(apply):
        loss = lambda params, x: jnp.sum(jnp.sin(apply(params, x)))  # noqa: E731
        return jax.jit(lambda params, x: {
            "hvp": jax.jvp(lambda q: jax.grad(loss)(q, x), (params,), (v,))[1],
            "hessian in x": jax.hessian(loss, 1)(params, x),
            "jacfwd in x": jax.jacfwd(apply, 1)(params, x),
        })(params, x)

    got = checks(lambda params, x: model.apply({"params": params}, x))
    want = checks(reference_mlp)
    # Three layers chained: the longest path sums over every width and the two rows.
    _assert_close(got, want, 2 + 3 + 4 + 4 + 2 + 3, f"MLP({backend}) ")


KERNEL_IN_GRAD = {"numba": "jaxnet_numba_fused_dense_backward", "pallas": "fused_dense_dx"}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in KERNEL_IN_GRAD])
def test_grad_still_runs_the_fused_backward(backend):
    """Reverse mode goes through the backend's backward kernel, not the transposed jnp tangent."""
    x, w, b = (jnp.ones(s, jnp.float32) for s in ((4, 3), (3, 2), (2,)))
    f = lambda x, w, b: kernels.fused_dense(x, w, b, activation="gelu", backend=backend).sum()  # noqa: E731
    lowered = lambda fn: jax.jit(fn).lower(x, w, b).as_text(debug_info=True)  # noqa: E731 - names kept
    assert KERNEL_IN_GRAD[backend] in lowered(jax.grad(f, (0, 1, 2)))
    assert KERNEL_IN_GRAD[backend] not in lowered(f)
