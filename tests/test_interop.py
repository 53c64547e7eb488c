"""PyTorch state_dict import/export: transposition, pairing by name, shape and number (never by
registration order), round trips, and refusal of what cannot be placed for certain."""
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


def test_sequential_pairs_by_number_past_ten_layers():
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
    with pytest.raises(ValueError, match=r"layer 'layers_0'.*\(5, 10\).*kernel \(10, 5\).*'0.weight' \(6, 10\)"):
        load_torch_state_dict(MLP((5, 1)), seq.state_dict())
    with pytest.raises(ValueError, match=r"takes none of the input widths \[10, 6\].*expected inputs with 4"):
        load_torch_state_dict(MLP((6, 1), in_features=4), seq.state_dict())


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


# ---- what the pairing must not get wrong ---------------------------------------------------------

class _OutFirst(torch.nn.Module):
    """Registers its layers in the reverse of the order it calls them."""

    def __init__(self, widths):
        super().__init__()
        self.out = torch.nn.Linear(widths[2], widths[3])
        self.mid = torch.nn.Linear(widths[1], widths[2])
        self.inp = torch.nn.Linear(widths[0], widths[1])

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class _HeadFirst(torch.nn.Module):
    """A head registered before the ModuleList it follows: layers.0 and layers.1 pair by name."""

    def __init__(self, widths):
        super().__init__()
        self.head = torch.nn.Linear(widths[2], widths[3])
        self.layers = torch.nn.ModuleList([torch.nn.Linear(widths[0], widths[1]),
                                           torch.nn.Linear(widths[1], widths[2])])

    def forward(self, x):
        return self.head(torch.tanh(self.layers[1](torch.tanh(self.layers[0](x)))))


@pytest.mark.parametrize("cls, names", [(_OutFirst, ["inp", "mid", "out"]),
                                        (_HeadFirst, ["layers.0", "layers.1", "head"])])
def test_registration_order_is_not_call_order_round_trip(cls, names):
    torch.manual_seed(2)
    net_t = cls([3, 4, 4, 2])  # inp/layers.0 and out/head have shapes of their own; mid is square
    x = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    want = net_t(torch.from_numpy(x)).detach().numpy()
    net = load_torch_state_dict(MLP((4, 4, 2), activation="tanh"), net_t.state_dict())
    np.testing.assert_allclose(net(x), want, rtol=1e-5, atol=1e-6)
    back = cls([3, 4, 4, 2])
    back.load_state_dict(export_torch_state_dict(net, prefixes=names))  # strict: every key and shape
    np.testing.assert_array_equal(back(torch.from_numpy(x)).detach().numpy(), want)


def test_same_shapes_without_a_call_order_are_refused_until_named():
    torch.manual_seed(3)
    net_t = _OutFirst([4, 4, 4, 4])  # three (4, 4) weights named inp, mid, out: names give no order
    model = MLP((4, 4, 4), activation="tanh")
    with pytest.raises(ValueError, match=r"ambiguous: layers layers_0, layers_1, layers_2 .*\(4, 4\).*out, mid, inp"):
        load_torch_state_dict(model, net_t.state_dict())
    net = load_torch_state_dict(model, net_t.state_dict(), prefixes=["inp", "mid", "out"])
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(net(x), net_t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    # An unused Linear that fits the model with another input width: two pairings, refused.
    sd = {**_OutFirst([3, 5, 5, 2]).state_dict()}  # inp (5, 3), mid (5, 5), out (2, 5)
    with pytest.raises(ValueError, match=r"ambiguous: state_dict pairs with the model for input widths \[5, 3\]"):
        load_torch_state_dict(MLP((5, 2)), sd)


@pytest.mark.parametrize("extra, keys", [
    (torch.nn.LayerNorm(6), "1.weight, 1.bias"),
    (torch.nn.BatchNorm1d(6), "1.weight, 1.bias, 1.running_mean, 1.running_var, 1.num_batches_tracked"),
    (torch.nn.Conv1d(6, 6, 1), "1.weight, 1.bias"),  # a 3-D weight is no Linear
])
def test_entries_the_model_cannot_place_are_refused_with_their_list(extra, keys):
    seq = torch.nn.Sequential(torch.nn.Linear(4, 6), extra, torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model = MLP((6, 2), activation="tanh")
    with pytest.raises(ValueError, match=rf"no place for: {keys} \(strict=False"):
        load_torch_state_dict(model, seq.state_dict())
    with pytest.warns(UserWarning, match=rf"no place for: {keys}$"):
        net = load_torch_state_dict(model, seq.state_dict(), strict=False)
    np.testing.assert_array_equal(net.variables["params"]["layers_1"]["kernel"], seq[3].weight.detach().numpy().T)


def test_extra_keys_unused_biases_and_non_finite_weights_are_refused():
    sd = dict(torch_simple_net().state_dict())
    with pytest.raises(ValueError, match=r"no place for: extra"):
        load_torch_state_dict(SimpleNet(), {**sd, "extra": torch.ones(3)})
    with pytest.raises(ValueError, match=r"no place for: 0.bias, 2.bias"):  # the model has no biases
        load_torch_state_dict(MLP((6, 2), use_bias=False), _sequential([4, 6, 2]).state_dict())
    sd["fc1.weight"] = sd["fc1.weight"].clone()
    sd["fc1.weight"][1, 3] = float("nan")
    sd["fc2.bias"] = torch.tensor([1e300], dtype=torch.float64)  # finite in float64, inf once loaded
    with pytest.raises(ValueError, match=r"non-finite weights .*: fc1.weight at \(1, 3\), fc2.bias at \(0,\)"):
        load_torch_state_dict(SimpleNet(), sd)
    with pytest.warns(UserWarning, match=r"non-finite weights .*fc1.weight at \(1, 3\)"):
        net = load_torch_state_dict(SimpleNet(), sd, strict=False)
    assert np.isnan(net.variables["params"]["fc1"]["kernel"][3, 1])


def test_repeated_prefixes_are_refused_on_export_and_import():
    net = load_torch_state_dict(SimpleNet(), torch_simple_net().state_dict())
    with pytest.raises(ValueError, match=r"repeated prefixes .*: 0 \(strict=False"):
        export_torch_state_dict(net, prefixes=["0", "0"], as_torch=False)
    with pytest.warns(UserWarning, match="repeated prefixes"):  # the later layer is kept
        sd = export_torch_state_dict(net, prefixes=["0", "0"], as_torch=False, strict=False)
    assert list(sd) == ["0.weight", "0.bias"] and sd["0.weight"].shape == (1, 5)
    with pytest.raises(ValueError, match=r"repeated prefixes .*: fc1"):
        load_torch_state_dict(SimpleNet(), torch_simple_net().state_dict(), prefixes=["fc1", "fc1"])
    with pytest.raises(TypeError, match="prefixes must be non-empty strings"):
        export_torch_state_dict(net, prefixes=["0", 2], as_torch=False)
    with pytest.raises(TypeError, match="a list of module names, not the string 'fc1'"):
        load_torch_state_dict(SimpleNet(), torch_simple_net().state_dict(), prefixes="fc1")
