"""jaxnet.testing.strategies: the shapes, values and calls the harness draws."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet.testing import strategies as jst


@given(shape=jst.fused_dense_shapes(max_elements=4096))
def test_shapes_respect_the_memory_budget(shape):
    batch, k, n = shape
    rows = math.prod(batch)
    assert rows * k + k * n + rows * n <= 4096
    assert len(batch) <= 2 and k >= 0 and n >= 0


def test_sizes_include_edges_primes_and_block_neighbours():
    for s in (0, 1, 2, 3, 7, 13, 127, 8, 16, 15, 17, 33, 65, 129):
        assert s in jst.SIZES


@settings(max_examples=30)
@given(call=jst.fused_dense_calls(dtypes=("float32", "bfloat16", "float16")))
def test_calls_follow_the_contract(call):
    x, w, b = call.args
    assert x.shape[-1] == w.shape[0]
    assert b is None or b.shape == (w.shape[1],)
    assert x.dtype == w.dtype and (b is None or b.dtype == x.dtype)
    assert call.kwargs["activation"] in jst.ACTIVATIONS
    # The repr rebuilds the call exactly.
    again = eval(repr(call), {"make_fused_dense_call": jst.make_fused_dense_call})
    for a, c in zip(call.args, again.args):
        assert (a is None and c is None) or np.array_equal(np.asarray(a, np.float64), np.asarray(c, np.float64), equal_nan=True)


def test_value_kinds():
    zeros = jst.make_fused_dense_call((6,), 5, 4, values="zeros", seed=1)
    x = zeros.args[0]
    assert np.all(x[0] == 0) and np.any(np.signbit(x) & (x == 0))  # a zero row and negative zeros
    kink = jst.make_fused_dense_call((3,), 7, 5, values="kink", seed=2)
    x, w, b = (np.asarray(a, np.float64) for a in kink.args)
    assert np.all(x == np.round(x))
    np.testing.assert_array_equal(x[0] @ w + b, 0.0)  # pre-activations exactly at relu's kink
    large = jst.make_fused_dense_call((4,), 64, 4, dtype="float16", values="large", seed=3)
    assert np.all(np.isfinite(np.asarray(large.args[0], np.float64)))
    assert jst.large_scale("float16", 64) ** 2 * 64 < 65504


def test_specials_are_planted():
    call = jst.make_fused_dense_call((2,), 3, 2, specials=(("x", 0.0, -0.0), ("w", 0.99, "L")))
    x, w, _ = call.args
    assert x.reshape(-1)[0] == 0 and np.signbit(x.reshape(-1)[0])
    assert w.reshape(-1)[-1] == jst.large_scale("float32", 3)


@pytest.mark.parametrize("drawn", [(((np.ones(2),), {"a": 1})), jst.make_fused_dense_call()])
def test_as_call(drawn):
    call = jst.as_call(drawn)
    assert isinstance(call, jst.Call) and isinstance(call.kwargs, dict)
    assert "float" in call.describe()


@given(st.data())
def test_strategies_are_importable_building_blocks(data):
    assert data.draw(jst.dtypes(("bfloat16",)), label="dtype") == "bfloat16"
    assert data.draw(jst.activations(), label="act") in jst.ACTIVATIONS
    assert 0 <= data.draw(jst.sizes(33), label="size") <= 33
