"""Weights files that run no code: safetensors round trips, PyTorch files read weights-only, pickled
code refused (and proven not to have run), corrupt and truncated files named in the error."""
import json
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.interop import (
    UnsafeFileError,
    flatten,
    load_safetensors,
    load_torch_file,
    load_torch_state_dict,
    safetensors_metadata,
    save_safetensors,
    unflatten,
)
from jaxnet.models import MLP, SimpleNet

TORCH_REASON = "PyTorch is the optional 'torch' extra (make test installs it)"


def _bits(a):
    """The raw bytes' view of an array: equal bits, not merely equal values (-0.0, NaN payloads)."""
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _assert_trees_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
        np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_variables_round_trip_bit_exactly(tmp_path, dtype):
    model = MLP((7, 5, 2), activation="relu")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
    path = tmp_path / "mlp.safetensors"
    save_safetensors(path, variables, metadata={"step": "12"})
    flat = load_safetensors(path)
    assert list(flat)[:2] == ["params.layers_0.bias", "params.layers_0.kernel"]
    assert flat["params.layers_0.kernel"].shape == (4, 7) and flat["params.layers_0.kernel"].dtype == dtype
    back = unflatten(flat)
    _assert_trees_bit_equal(back, variables)
    x = jnp.ones((3, 4), dtype)
    np.testing.assert_array_equal(model.apply(back, x), model.apply(variables, x))
    assert safetensors_metadata(path) == {"step": "12"}


def test_bound_model_and_mixed_dtypes_round_trip(tmp_path):
    net = SimpleNet().bind(SimpleNet().init(jax.random.key(1), jnp.zeros((1, 10))))
    tree = {"model": net.variables, "step": np.int32(7), "scale": jnp.array(-0.0, jnp.bfloat16)}
    save_safetensors(tmp_path / "a.safetensors", tree)
    _assert_trees_bit_equal(unflatten(load_safetensors(tmp_path / "a.safetensors")), tree)
    save_safetensors(tmp_path / "b.safetensors", net)  # a bound model saves its variables
    assert set(load_safetensors(tmp_path / "b.safetensors")) == set(flatten(net.variables))


def test_flatten_and_unflatten_refuse_ambiguous_names():
    a = np.zeros(2)
    assert list(flatten({"params": {"fc1": {"kernel": a}}, "fc2.bias": a})) == ["params.fc1.kernel", "fc2.bias"]
    with pytest.raises(ValueError, match="both named 'a.b'"):
        flatten({"a.b": a, "a": {"b": a}})
    with pytest.raises(TypeError, match="key 0"):
        flatten({"params": {0: a}})
    with pytest.raises(ValueError, match="'a.b' lies under 'a'"):
        unflatten({"a": a, "a.b": a})
    with pytest.raises(ValueError, match="'a' is an array and also the prefix"):
        unflatten({"a.b": a, "a": a})


def test_failed_save_keeps_the_old_file_and_names_the_bad_entry(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"w": np.ones(3, np.float32)})
    with pytest.raises(TypeError, match=r"'params.name' has dtype <U3"):
        save_safetensors(path, {"params": {"name": np.array("abc")}})
    with pytest.raises(TypeError, match="metadata must map strings to strings"):
        save_safetensors(path, {"w": np.zeros(3, np.float32)}, metadata={"step": 3})
    np.testing.assert_array_equal(load_safetensors(path)["w"], np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary file left behind


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_torch_state_dict(SimpleNet(), tmp_path / "nope.safetensors")


def _header_file(path, header: dict, data: bytes = b"\0" * 24):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("damage, error", [
    ("truncated", "incomplete metadata"),
    ("header only", "header too small"),
    ("empty", "header too small"),
    ("broken json", "invalid JSON"),
    ("huge header length", "header too large"),
    ("huge shape", "incomplete metadata"),
    ("shape overflows", "overflow"),
])
def test_corrupt_safetensors_file_is_named(tmp_path, damage, error):
    good = tmp_path / "good.safetensors"
    save_safetensors(good, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    a = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    if damage == "truncated":
        bad.write_bytes(raw[:-5])
    elif damage == "header only":
        bad.write_bytes(raw[:5])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "broken json":
        bad.write_bytes(raw[:8] + raw[8:].replace(b"}", b"]", 1))
    elif damage == "huge header length":  # would ask for 4 EiB of header before any check
        bad.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    elif damage == "huge shape":  # 4 TiB of float32 claimed by a 24-byte file
        _header_file(bad, {"a": {**a, "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}})
    else:
        _header_file(bad, {"a": {**a, "shape": [2**31, 2**31, 2**31]}})
    with pytest.raises(ValueError, match=rf"bad.safetensors: not a valid safetensors file.*{error}"):
        load_safetensors(bad)


def test_non_floating_weights_are_named_with_the_file(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_safetensors(path, {"fc1.weight": np.ones((5, 10), np.int32), "fc1.bias": np.ones(5, np.float32),
                            "fc2.weight": np.ones((1, 5), np.float32), "fc2.bias": np.ones(1, np.float32)})
    with pytest.raises(TypeError, match=r"ints.safetensors\['fc1.weight'\] has dtype int32; expected floating"):
        load_torch_state_dict(SimpleNet(), path)


# ---- PyTorch files ---------------------------------------------------------------------------

class _RunsCode:
    """Unpickling this calls os.system, which would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _PlainObject:
    """Not code by itself, but a class the unpickler would have to import and build."""


def _sequential(torch, widths):
    layers = []
    for k, n in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(k, n), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def test_torch_safetensors_file_computes_the_same_function(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from safetensors.torch import save_file

    from jaxnet.seed import torch_simple_net

    torch.manual_seed(0)
    net_t = torch_simple_net()
    path = tmp_path / "net.safetensors"
    save_file(net_t.state_dict(), path)
    x = np.random.default_rng(0).standard_normal((9, 10)).astype(np.float32)
    want = net_t(torch.from_numpy(x)).detach().numpy()
    for source in (load_safetensors(path), path):  # the arrays, or the file itself
        net = load_torch_state_dict(SimpleNet(), source)
        np.testing.assert_array_equal(net.variables["params"]["fc1"]["kernel"], net_t.fc1.weight.detach().numpy().T)
        np.testing.assert_allclose(net(x), want, rtol=1e-5, atol=1e-6)
    # Pairing by order needs layer 10 after layer 2: safetensors keeps no order, names come back natural.
    seq = _sequential(torch, [3] + [4] * 6 + [2])  # Linear modules "0", "2", ..., "10", "12"
    save_file(seq.state_dict(), tmp_path / "seq.safetensors")
    net = load_torch_state_dict(MLP((4,) * 6 + (2,), activation="tanh"), tmp_path / "seq.safetensors")
    x = x[:, :3]
    np.testing.assert_allclose(net(x), seq(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_torch_file_reads_weights_bit_exactly(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.save({"fc.weight": w.to(torch.bfloat16), "fc.bias": torch.zeros(3), "sub": {"x": w}}, tmp_path / "m.pt")
    got = load_torch_file(tmp_path / "m.pt")
    assert list(got) == ["fc.weight", "fc.bias", "sub.x"]
    assert got["fc.weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(got["fc.weight"]), w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(got["sub.x"], w.numpy())
    # torch tensors save straight to safetensors, still bit for bit.
    save_safetensors(tmp_path / "m.safetensors", {"bf": w.to(torch.bfloat16), "f": w})
    back = load_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(_bits(back["bf"]), _bits(got["fc.weight"]))
    np.testing.assert_array_equal(_bits(back["f"]), _bits(w.numpy()))


def _pickle_bearing(torch, kind, path, marker):
    if kind == "torch.save of code":
        torch.save({"w": torch.ones(2), "evil": _RunsCode(marker)}, path)
    elif kind == "torch.save of a class":
        torch.save({"w": torch.ones(2), "obj": _PlainObject()}, path)
    else:  # a bare pickle, the legacy .pt format, written by hand
        with open(path, "wb") as f:
            pickle.dump({"w": _RunsCode(marker)}, f, protocol=int(kind[-1]))


@pytest.mark.parametrize("kind", ["torch.save of code", "torch.save of a class", "pickle protocol 2",
                                  "pickle protocol 4"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, kind):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _pickle_bearing(torch, kind, path, marker)
    with pytest.raises(UnsafeFileError, match=r"evil.pt: refused: loading it would execute code.*safetensors"):
        load_torch_file(path)
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_torch_state_dict(SimpleNet(), path)
    renamed = tmp_path / "evil.safetensors"  # the same bytes under the trusted format's name
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="evil.safetensors: not a valid safetensors file.*load_torch_file"):
        load_safetensors(renamed)
    assert not marker.exists(), "the pickled payload ran"


def test_torch_file_that_is_not_a_state_dict_is_named(tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt: holds a list, not a state dict"):
        load_torch_file(tmp_path / "list.pt")
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt.pt: entry 'epoch' is a int, not a tensor"):
        load_torch_file(tmp_path / "ckpt.pt")
    torch.save({"w": torch.ones(4)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut.pt: not a readable PyTorch file \(corrupt or truncated\?\)"):
        load_torch_file(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch_file(tmp_path / "nope.pt")
