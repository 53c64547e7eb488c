"""PyTorch state_dict import/export: transposition, pairing by name and by order, round trips."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the optional 'torch' extra (make test installs it)")

from jaxnet.interop import export_torch_state_dict, load_torch_state_dict  # noqa: E402
from jaxnet.models import MLP, SimpleNet  # noqa: E402
from jaxnet.seed import torch_simple_net  # noqa: E402


def _sequential(widths, act=torch.nn.Tanh):
    layers = []
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(k, n))
        if i < len(widths) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers)


def test_seed_net_from_torch_computes_the_same_function():
    torch.manual_seed(0)
    net_t = torch_simple_net()
    net = load_torch_state_dict(SimpleNet(), net_t.state_dict())
    np.testing.assert_array_equal(net.variables["params"]["fc1"]["kernel"], net_t.fc1.weight.detach().numpy().T)
    x = np.random.default_rng(0).standard_normal((9, 10)).astype(np.float32)
    # Same float32 products, summed in other orders: a few ulps of the output's scale.
    np.testing.assert_allclose(net(x), net_t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_sequential_pairs_by_order_past_ten_layers():
    torch.manual_seed(1)
    widths = [6] + [4] * 11 + [3]  # 12 Linear layers: layers_10 and layers_11 must follow layers_9
    seq = _sequential(widths)
    net = load_torch_state_dict(MLP(tuple(widths[1:]), activation="tanh"), seq.state_dict())
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(net(x), seq(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_round_trip_jaxnet_torch_jaxnet_is_exact():
    model = MLP((7, 5, 2), activation="relu")
    params = model.init(jax.random.key(3), jnp.zeros((1, 4)))["params"]
    state_dict = export_torch_state_dict({"params": params}, prefixes=["0", "2", "4"])
    seq = _sequential([4, 7, 5, 2], act=torch.nn.ReLU)
    seq.load_state_dict(state_dict)  # strict: every key and shape must match PyTorch's own
    back = load_torch_state_dict(model, seq.state_dict()).variables["params"]
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, back)))


def test_export_accepts_numpy_output_and_bound_models():
    net = load_torch_state_dict(SimpleNet(), torch_simple_net().state_dict())
    sd = export_torch_state_dict(net, as_torch=False)
    assert list(sd) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert sd["fc1.weight"].shape == (5, 10) and isinstance(sd["fc1.weight"], np.ndarray)


def test_shape_mismatch_names_layer_and_shapes():
    seq = _sequential([10, 6, 1])
    with pytest.raises(ValueError, match=r"layer 'layers_0'.*\(6, 10\).*\(10, 5\)"):
        load_torch_state_dict(MLP((5, 1)), seq.state_dict())


def test_layer_count_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"3 dense layers .* 2 2-D weights"):
        load_torch_state_dict(MLP((6, 6, 1)), _sequential([10, 6, 1]).state_dict())


def test_missing_bias_is_reported():
    sd = {k: v for k, v in torch_simple_net().state_dict().items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match="fc2.bias"):
        load_torch_state_dict(SimpleNet(), sd)


def test_bfloat16_torch_weights_load_exactly():
    # torch's bfloat16 has no NumPy dtype: the bits go through ml_dtypes' bfloat16, then float32 exactly.
    net_t = torch_simple_net().to(torch.bfloat16)
    net = load_torch_state_dict(SimpleNet(), net_t.state_dict())
    np.testing.assert_array_equal(net.variables["params"]["fc1"]["kernel"], net_t.fc1.weight.detach().float().numpy().T)
