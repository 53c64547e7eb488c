"""Property tests of the many-MLP SGD kernel (``kernels.numba_cpu.mlp_sgd.train``) against its
jax.numpy reference (``kernels.reference.mlp_sgd``): parameters and every metric after a few
epochs, over layer stacks, activations, biases, batch sizes, model counts and masks drawn by
hypothesis; bad inputs get a clear error.

Tolerance (``_bounds``). Both sides run the same float32 operations; what differs is the order of
each sum (the kernel sums the batch in vector lanes, XLA in its own order) and contraction into
FMAs. A sum of L terms in any order is within ``gamma_L = L u`` of the exact value relative to the
sum of the terms' magnitudes (Higham, 3.1), so two such sums differ by at most ``2 L u`` of it.
``_bounds`` carries that through one step in float64: the forward error of each pre-activation
(its own sum, plus the error of its inputs through |W| and the activation's Lipschitz constant
1), the output's error into the loss and into the top gradient, and each gradient element's own
sum over the batch and the error of both its factors; the update then adds ``lr`` times that and
the rounding of ``p + u`` (two ulps of p, one per side). ``E`` epochs at these small rates (the
step barely changes the magnitudes) allow ``E`` times one step's bound, doubled for the change in
magnitudes over the epochs; the loss and norms of each epoch are bounded by the same magnitudes.
A ReLU whose input sits within its error bound of 0 may switch in one run and not the other;
with data from a normal generator that has probability ~1e-6 per element, so it is not excluded.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import reference
from kernels.numba_cpu import mlp_sgd

U = 2.0**-24
LIPSCHITZ = {"identity": 1.0, "relu": 1.0, "tanh": 1.0, "sigmoid": 0.25}  # sup |act'|


def _act(name, z):
    return {"identity": lambda v: v, "relu": lambda v: np.maximum(v, 0), "tanh": np.tanh,
            "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[name](z)


def _bounds(x, y, weights, biases, acts, lr):
    """Per-model float64 error bounds of one step: (params' bound per layer (W, b), loss, norm)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n, F = y.shape
    out_w, out_b, out_loss, out_norm = [], [], [], []
    for c in range(len(lr)):
        W = [np.asarray(w[c], np.float64) for w in weights]
        B = [None if b is None else np.asarray(b[c], np.float64) for b in biases]
        hs, mags, errs, zs = [x], [np.abs(x)], [np.zeros_like(x)], []
        for w, b, act in zip(W, B, acts):
            z = hs[-1] @ w + (0 if b is None else b)
            mag = mags[-1] @ np.abs(w) + (0 if b is None else np.abs(b))
            L = w.shape[0] + 1
            err = 2 * L * U * mag + errs[-1] @ np.abs(w) * (1 + 2 * L * U) + 2 * U * np.abs(z)
            zs.append(z)
            hs.append(_act(act, z))
            mags.append(np.abs(hs[-1]) + err)
            errs.append(LIPSCHITZ[act] * err + 4 * U * np.abs(hs[-1]))
        d = hs[-1] - y
        loss_err = (2 * np.sum(np.abs(d) * errs[-1]) + 2 * n * F * U * np.sum(d * d)) / (n * F)
        top = 2 * np.abs(d) / (n * F)
        top_err = 2 * errs[-1] / (n * F) + 4 * U * top
        gw, gb, g_abs = [], [], 0.0
        for l in range(len(W) - 1, -1, -1):
            deriv = LIPSCHITZ[acts[l]]
            dz = top * deriv
            dz_err = top_err * deriv + 4 * U * dz
            gw.append(2 * (n + 1) * U * mags[l].T @ dz + errs[l].T @ dz + mags[l].T @ dz_err)
            gb.append(2 * (n + 1) * U * dz.sum(0) + dz_err.sum(0))
            g_abs += np.sum((mags[l].T @ dz) ** 2) + np.sum(dz.sum(0) ** 2)
            N = W[l].shape[1]
            top = dz @ np.abs(W[l]).T
            top_err = dz_err @ np.abs(W[l]).T + 2 * (N + 1) * U * top
        gw, gb = gw[::-1], gb[::-1]
        out_w.append([lr[c] * e + 2 * U * np.abs(w) for e, w in zip(gw, W)])
        out_b.append([None if b is None else lr[c] * e + 2 * U * np.abs(b) for e, b in zip(gb, B)])
        out_loss.append(loss_err)
        # |g| is within the root of the summed squared element bounds of the exact norm, on each side.
        out_norm.append(2 * np.sqrt(sum(np.sum(e * e) for e in gw + gb)) + 4 * U * np.sqrt(g_abs))
    return out_w, out_b, np.array(out_loss), np.array(out_norm)


@st.composite
def problems(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 8))] + [draw(st.integers(1, 7)) for _ in range(depth)]
    acts = [draw(st.sampled_from(mlp_sgd.supported_activations())) for _ in range(depth)]
    return dict(n=draw(st.integers(1, 40)), widths=widths, acts=acts, models=draw(st.integers(1, 4)),
                bias=[draw(st.booleans()) for _ in range(depth)], epochs=draw(st.integers(1, 3)),
                schedule=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _make(p):
    rng = np.random.default_rng(p["seed"])
    n, widths, C = p["n"], p["widths"], p["models"]
    x = rng.standard_normal((n, widths[0])).astype(np.float32)
    y = rng.standard_normal((n, widths[-1])).astype(np.float32)
    weights = [(rng.uniform(-1, 1, (C, k, m)) / np.sqrt(k)).astype(np.float32) for k, m in zip(widths, widths[1:])]
    biases = [rng.uniform(-0.5, 0.5, (C, m)).astype(np.float32) if has else None
              for m, has in zip(widths[1:], p["bias"])]
    # One rate per model, or one per model and epoch (a schedule).
    lr = rng.uniform(1e-3, 0.05, (C, p["epochs"]) if p["schedule"] else C).astype(np.float32)
    active = rng.random(C) < 0.8
    return x, y, weights, biases, lr, active


@settings(max_examples=40, deadline=None)
@given(problems())
def test_train_matches_reference(p):
    x, y, weights, biases, lr, active = _make(p)
    acts, E = tuple(p["acts"]), p["epochs"]
    args = (jnp.asarray(x), jnp.asarray(y), [jnp.asarray(w) for w in weights],
            [None if b is None else jnp.asarray(b) for b in biases], acts, jnp.asarray(lr), jnp.asarray(active), E)
    got = jax.jit(mlp_sgd.train, static_argnums=(4, 7))(*args)
    want = jax.jit(reference.mlp_sgd, static_argnums=(4, 7))(*args)
    top_rate = lr.max(axis=1) if lr.ndim == 2 else lr  # the bound of the largest step
    bw, bb, bloss, bnorm = _bounds(x, y, weights, biases, acts, top_rate)
    grow = 2 * E
    for c in range(p["models"]):
        for l in range(len(weights)):
            if not active[c]:  # returned as given, bit for bit
                np.testing.assert_array_equal(np.asarray(got[0][l][c]), weights[l][c])
                continue
            gap = np.abs(np.asarray(got[0][l][c], np.float64) - np.asarray(want[0][l][c], np.float64))
            assert np.all(gap <= grow * bw[c][l]), (c, l, np.max(gap - grow * bw[c][l]))
            if biases[l] is not None:
                gap = np.abs(np.asarray(got[1][l][c], np.float64) - np.asarray(want[1][l][c], np.float64))
                assert np.all(gap <= grow * bb[c][l]), (c, l, "bias")
        m_got = {k: np.asarray(v[c], np.float64) for k, v in got[2].items()}
        m_want = {k: np.asarray(v[c], np.float64) for k, v in want[2].items()}
        if not active[c]:
            assert all(np.all(v == 0) for v in m_got.values())
            continue
        assert np.all(np.abs(m_got["loss"] - m_want["loss"]) <= grow * bloss[c])
        assert np.all(np.abs(m_got["grad_norm"] - m_want["grad_norm"]) <= grow * bnorm[c])
        assert np.all(np.abs(m_got["update_norm"] - m_want["update_norm"]) <= grow * top_rate[c] * bnorm[c] * 1.01)
        np.testing.assert_array_equal(m_got["nonfinite_leaf"], -1)


def test_nonfinite_gradient_names_first_leaf_in_callers_order():
    """A NaN target makes every gradient NaN: the smallest id of the caller's order is reported."""
    x = jnp.ones((4, 3), jnp.float32)
    y = jnp.asarray([[0.0], [np.nan], [1.0], [2.0]], jnp.float32)
    w = [jnp.full((2, 3, 2), 0.1, jnp.float32), jnp.full((2, 2, 1), 0.1, jnp.float32)]
    b = [jnp.zeros((2, 2), jnp.float32), jnp.zeros((2, 1), jnp.float32)]
    ids = [(3, 1), (2, 0)]  # the last layer's bias comes first in this order
    args = (x, y, w, b, ("relu", "identity"), jnp.asarray([0.01, 0.01], jnp.float32), jnp.ones(2, bool), 2)
    got = mlp_sgd.train(*args, leaf_ids=ids)[2]["nonfinite_leaf"]
    want = reference.mlp_sgd(*args, leaf_ids=ids)[2]["nonfinite_leaf"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), 0)


@pytest.mark.parametrize("change, message", [
    (dict(x=np.zeros((4, 3), np.int32)), "x must be float32"),
    (dict(y=np.zeros((5, 1), np.float32)), r"x \[n, K\] and y \[n, F\]"),
    (dict(acts=("gelu", "identity")), "activation 'gelu' of layer 0"),
    (dict(w0=np.zeros((2, 4, 2), np.float32)), r"weights\[0\] must be \[C=2, K=3, N\]"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(lr=np.zeros((2, 3), np.float32)), r"lr must be \[C\] or \[C, epochs=2\]"),
    (dict(lr=np.zeros((3,), np.float32)), r"weights\[0\] must be \[C=3"),
])
def test_bad_input_is_named(change, message):
    x = change.get("x", np.ones((4, 3), np.float32))
    y = change.get("y", np.ones((4, 1), np.float32))
    w = [change.get("w0", np.ones((2, 3, 2), np.float32)), np.ones((2, 2, 1), np.float32)]
    lr = change.get("lr", np.full((2,), 0.01, np.float32))
    with pytest.raises((TypeError, ValueError), match=message):
        mlp_sgd.train(jnp.asarray(x), jnp.asarray(y), [jnp.asarray(a) for a in w], [None, None],
                      change.get("acts", ("relu", "identity")), jnp.asarray(lr), jnp.ones(lr.shape, bool),
                      change.get("epochs", 2))
