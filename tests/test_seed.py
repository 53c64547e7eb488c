"""The seed example: PyTorch parity of the 1000-epoch loop, and the experiment's outputs."""
import json

import jax
import jax.numpy as jnp
import pytest

from jaxnet import seed

torch = pytest.importorskip("torch", reason="PyTorch is the optional 'torch' extra (make test installs it)")


def _jaxnet_and_torch(config):
    data = seed.make_data(config)
    state = seed.make_state(config, data)
    init = jax.tree.map(jnp.copy, state.params)
    jax_curve = seed.train_jaxnet(config, data, state).column("loss")
    torch_curve, _ = seed.train_torch(config, data, init)
    return jax_curve, torch_curve


@pytest.mark.parametrize("config", [seed.SeedConfig(), seed.SeedConfig(seed=11, n_samples=500)],
                         ids=["seed-default", "seed11-n500"])
def test_loss_curves_agree_with_the_seeds_pytorch_loop(config):
    jax_curve, torch_curve = _jaxnet_and_torch(config)
    gap = seed.curve_gap(jax_curve, torch_curve)
    assert gap["max_rel_gap"] <= seed.float32_curve_tolerance(config.epochs), gap
    assert jax_curve[-1] < 0.5 * jax_curve[0]  # and the loop does learn


def test_the_parity_tolerance_catches_a_different_learning_rate():
    """A 1% change of the learning rate on one side must break the float32 tolerance."""
    config = seed.SeedConfig(epochs=300)
    data = seed.make_data(config)
    state = seed.make_state(config, data)
    init = jax.tree.map(jnp.copy, state.params)
    jax_curve = seed.train_jaxnet(config, data, state).column("loss")
    torch_curve, _ = seed.train_torch(config.replace(learning_rate=0.0101), data, init)
    assert seed.curve_gap(jax_curve, torch_curve)["max_rel_gap"] > seed.float32_curve_tolerance(config.epochs)


def test_experiment_prints_losses_and_a_json_result(tmp_path, capsys):
    from experiments import seed_simple_net

    result = seed_simple_net.main(["--epochs", "200", "--compare-torch", "--workdir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["100", "200"]
    assert json.loads(lines[-1]) == result == json.loads((tmp_path / "result.json").read_text())
    assert result["curves_agree"] and result["epochs"] == 200
    assert result["final_loss"] < result["initial_loss"]
    assert (tmp_path / "loss_curve.png").exists() and (tmp_path / "metrics.jsonl").exists()
