"""experiments: flags from nested configs, process set-up in main (not on import), the logging
flags reaching the training loops, and the language-model experiments end to end (tiny)."""
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from jaxnet.models.transformer import TransformerConfig

EXPERIMENTS = ("bench_checkpoint", "bench_kernels", "bench_lm", "bench_parallel", "bench_peak", "bench_seed", "gpu_check", "lm", "recsys",
               "seed_simple_net", "sweep", "vision")
TRAINING = ("lm", "recsys", "seed_simple_net", "vision")


@dataclasses.dataclass(frozen=True)
class Inner:
    # Width of the thing.
    width: int = 8
    use_bias: bool = True
    sizes: tuple[int, ...] = (1, 2)
    dtype: object = jnp.float32
    vocab: int = 3

    def __post_init__(self):
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")


@dataclasses.dataclass(frozen=True)
class Outer:
    # How many steps.
    steps: int = 10
    verbose: bool = False
    model: Inner = Inner(width=16)
    derived: ClassVar[tuple[str, ...]] = ("model.vocab",)


def test_nested_fields_are_prefixed_flags_and_untouched_ones_keep_the_outer_default():
    config, flags = common.parse_config(Outer, ["--model.width", "32", "--steps", "3"], name="t")
    assert config == Outer(steps=3, model=Inner(width=32))
    assert flags == common.RunFlags(workdir=flags.workdir, argv=("--model.width", "32", "--steps", "3"))
    assert str(flags.workdir) == "runs/t"
    config, _ = common.parse_config(Outer, ["--model.no-use-bias", "--model.sizes", "4", "5", "6",
                                            "--model.dtype", "bfloat16", "--verbose"], name="t")
    assert config.model == Inner(width=16, use_bias=False, sizes=(4, 5, 6), dtype=jnp.bfloat16)
    assert config.verbose and jnp.dtype(config.model.dtype) == jnp.bfloat16
    default, _ = common.parse_config(Outer, [], name="t")
    assert default.model is Outer().model or default.model == Inner(width=16)
    assert default.model.dtype is jnp.float32  # not re-parsed when not given


@pytest.mark.parametrize("argv, message", [
    (["--model.vocab", "5"], "unrecognized arguments: --model.vocab"),  # derived from the data
    (["--width", "5"], "unrecognized arguments: --width"),  # nested fields only with their prefix
    (["--model.width", "wide"], "invalid int value"),
    (["--model.dtype", "float7"], "not a dtype"),
    (["--model.width", "0"], "width must be positive"),  # the config's own check, as a usage error
    (["--profile-steps", "5", "2"], "--profile-steps needs 0 <= START < STOP"),
    (["--profile-steps", "5"], "expected 2 arguments"),
    (["--mesh", "data=3"], "--mesh: mesh spec 'data=3' has 3 devices; this process sees 4"),
    (["--mesh", "rows=4"], "bad part 'rows=4'"),
    (["--strategy", "zero3"], "invalid choice: 'zero3'"),
])
def test_bad_flags_exit_with_a_usage_error_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_config(Outer, argv, name="t")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_nested_fields_with_their_defaults_and_comments(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(Outer, ["--help"], name="t")
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.width INT Width of the thing. (default: 16)" in out
    assert "--model.use-bias, --model.no-use-bias (default: on)" in out
    assert "--model.dtype DTYPE (default: float32)" in out and "(default: 1 2)" in out
    assert "--steps INT How many steps. (default: 10)" in out
    assert "--tensorboard" in out and "--profile-steps START STOP" in out
    assert "--model.vocab" not in out


def test_logging_flags_parse_and_only_training_experiments_take_them(capsys):
    _, flags = common.parse_config(Outer, ["--tensorboard", "--profile-steps", "2", "4", "--workdir", "w"], name="t")
    assert flags.fit_options == {"tensorboard": True, "profile_steps": (2, 4), "checkpoint_every": 1000,
                                 "resume": False, "mesh": None, "strategy": "dp"} and str(flags.workdir) == "w"
    _, flags = common.parse_config(Outer, ["--checkpoint-every", "0", "--resume"], name="t")
    assert flags.checkpoint_every == 0 and flags.resume
    with pytest.raises(SystemExit):
        common.parse_config(Outer, ["--tensorboard"], name="t", trains=False)
    assert "unrecognized arguments: --tensorboard" in capsys.readouterr().err


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_help_lists_its_flags(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m experiments.{name}" in out and "--workdir" in out
    assert ("--tensorboard" in out) == (name in TRAINING)
    assert ("--checkpoint-every" in out) == ("--resume" in out) == (name in TRAINING)
    if name in ("lm", "bench_lm"):
        assert "--model.embed-dim" in out and "--model.vocab-size" not in out


def test_importing_the_experiments_changes_no_process_setting():
    code = ("import experiments, " + ", ".join(f"experiments.{n}" for n in EXPERIMENTS) + "\n"
            "import jaxnet.studies.lm, jaxnet.studies.vision, jaxnet.studies.recsys\n"
            "from kernels import host_memory as h\nprint(h._state['applied'], h._state['single_arena'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "False"]


class _Called(Exception):
    pass


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_main_prepares_the_process_first(name, monkeypatch):
    module = importlib.import_module(f"experiments.{name}")
    calls = []

    def prepare(**kwargs):
        calls.append(kwargs)
        raise _Called

    monkeypatch.setattr(module, "prepare_process", prepare)
    monkeypatch.setattr(module, "parse_config", lambda *a, **k: pytest.fail("parsed before prepare_process"))
    with pytest.raises(_Called):
        module.main([])
    # One arena only where a step's temporaries outgrow a thread's heap (the language models).
    assert calls == ([{"single_arena": True}] if name in ("lm", "bench_lm") else [{}])


def test_prepare_process_applies_the_allocator_settings():
    code = ("from experiments.common import prepare_process\nfrom kernels import host_memory as h\n"
            "print(prepare_process(), h._state['single_arena'], prepare_process(single_arena=True))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAXNET_KEEP_HOST_MEMORY": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    first, arena, second = out.stdout.split()
    assert arena == "False" and first == second  # True on glibc; False (a no-op) elsewhere


class _Reached(Exception):
    pass


def _stop(seen: dict):
    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise _Reached
    return fake


LOGGING = ["--tensorboard", "--profile-steps", "1", "3", "--checkpoint-every", "7", "--resume",
           "--mesh", "data=2,model=2", "--strategy", "fsdp+tp"]


@pytest.mark.parametrize("name, target, argv", [
    ("lm", "jaxnet.train.stream.fit_stream", ["--data-dir", "tests/data/ptb", "--model.num-layers", "1",
                                              "--model.embed-dim", "16", "--model.num-heads", "2",
                                              "--model.block-size", "8", "--steps", "2"]),
    ("vision", "jaxnet.train.fit", ["--seeds", "1", "--epochs", "1", "--no-baselines"]),
    ("recsys", "jaxnet.train.fit", ["--generator.num-users", "30", "--generator.num-items", "25",
                                    "--generator.ratings-per-user", "20"]),
    ("seed_simple_net", "jaxnet.seed.fit", ["--epochs", "2"]),
])
def test_logging_flags_reach_the_training_loop(name, target, argv, monkeypatch, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    seen = {}
    monkeypatch.setattr(target, _stop(seen))
    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    with pytest.raises(_Reached):
        module.main(argv + LOGGING + ["--workdir", str(tmp_path)])
    assert seen["tensorboard"] is True and seen["profile_steps"] == (1, 3)
    assert str(seen["workdir"]).startswith(str(tmp_path))
    assert seen["checkpoint_every"] == 7 and seen["resume"] is True
    assert dict(seen["mesh"].shape) == {"data": 2, "model": 2} and seen["strategy"] == "fsdp+tp"
    assert str(seen["checkpoint_dir"]).startswith(str(tmp_path)) and seen["config"] is not None


def test_a_config_file_sets_defaults_and_bad_keys_are_named(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 4, "model": {"width": 9, "dtype": "bfloat16", "sizes": [3]}}))
    config, _ = common.parse_config(Outer, ["--config", str(path), "--model.width", "12"], name="t")
    assert config == Outer(steps=4, model=Inner(width=12, dtype=jnp.bfloat16, sizes=(3,)))
    for bad, message in [({"stepz": 1}, "unknown config keys ['stepz']; valid keys: ['model', 'steps', 'verbose']"),
                         ({"model": {"wide": 1}}, "unknown config keys ['model.wide']; valid keys of model: "),
                         ({"steps": "4"}, "config key 'steps': expected an integer, got '4' (str)"),
                         ({"verbose": 1}, "config key 'verbose': expected true or false, got 1"),
                         ({"model": {"sizes": [1, "x"]}}, "config key 'model.sizes[1]': expected an integer"),
                         ({"model": {"width": 0}}, "width must be positive")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            common.parse_config(Outer, ["--config", str(path)], name="t")
        assert message in capsys.readouterr().err, bad


def test_seed_experiment_resumes_from_its_checkpoints_to_the_same_result(tmp_path, monkeypatch):
    from experiments import seed_simple_net
    from jaxnet.train import checkpoint

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    argv = ["--epochs", "90", "--log-every", "0", "--checkpoint-every", "20", "--workdir", str(tmp_path)]
    straight = seed_simple_net.main(argv)
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.steps(ckpt) == [60, 80, 90]  # keep=3
    for step in (80, 90):
        checkpoint._remove(ckpt / str(step))
    resumed = seed_simple_net.main(argv + ["--resume"])
    assert resumed["final_loss"] == straight["final_loss"] and resumed["initial_loss"] == straight["initial_loss"]
    with pytest.raises(checkpoint.CheckpointError, match="learning_rate: saved 0.01, given 0.02"):
        seed_simple_net.main(argv + ["--resume", "--learning-rate", "0.02"])


def test_recsys_generator_is_nested_and_task_is_checked(capsys):
    from experiments import recsys

    config, _ = common.parse_config(recsys.Config, ["--generator.num-users", "60", "--generator.seed", "3"],
                                    name="recsys")
    assert config.generator.num_users == 60 and config.generator.seed == 3 and config.seed == 0
    assert config.generator.num_items == recsys.Config().generator.num_items
    with pytest.raises(SystemExit):
        common.parse_config(recsys.Config, ["--task", "both-ways"], name="recsys")
    assert "invalid choice: 'both-ways' (choose from 'both', 'explicit', 'implicit')" in capsys.readouterr().err


def test_lm_experiment_end_to_end_on_the_ptb_sample_then_generates_from_its_saved_weights(tmp_path, monkeypatch,
                                                                                          capsys):
    from experiments import lm
    from jaxnet.train import checkpoint

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    result = lm.main(["--data-dir", "tests/data/ptb", "--model.num-layers", "1", "--model.embed-dim", "16",
                      "--model.num-heads", "2", "--model.block-size", "8", "--batch-size", "4", "--steps", "20",
                      "--optimizer.warmup-steps", "2", "--eval-every", "10", "--log-every", "10", "--eval-stride", "4",
                      "--max-new-tokens", "4", "--temperature", "0", "--no-progress", "--checkpoint-every", "0",
                      "--workdir", str(tmp_path)])
    assert result["level"] == "word" and result["steps"] == 20 and result["params"] > 0
    assert math.isfinite(result["val_perplexity"]) and math.isfinite(result["test_perplexity"])
    assert result["ngram_kn3_val_perplexity"] > 1
    # The interpolated model (weight 0.3 on the n-gram): -log of a mixture is at most the mixed
    # -logs (convexity), so its perplexity is at most the worse model's (the n-gram's figure also
    # scores the first held-out word, which the network does not: 1% slack).
    assert result["ngram_weight"] == 0.3
    for split in ("val", "test"):
        worse = max(result[f"{split}_perplexity"], result[f"ngram_kn3_{split}_perplexity"])
        assert 1 < result[f"interpolated_{split}_perplexity"] <= 1.01 * worse
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "loss_curve.png").exists() and (tmp_path / "metrics.jsonl").exists()
    # The final weights are saved even with --checkpoint-every 0, and the result names them.
    assert result["weights"] == str(tmp_path / "checkpoints" / "20") and checkpoint.steps(tmp_path / "checkpoints") == [20]

    # --generate with no model flags: the tiny model must come back from the saved config, and with
    # the trained weights its greedy continuation (temperature 0, also from the saved config) is the
    # one the run printed after training, cut to the --max-new-tokens given now.
    capsys.readouterr()
    out = lm.main(["--generate", "--workdir", str(tmp_path), "--prompt", "the company said", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.strip() == out["text"]
    assert out["text"].split() == result["samples"][0].split()[:3 + 2]
    assert out["weights"] == result["weights"]
    # A run saved before the optimiser was nested has its fields flat: they load into optimizer.
    saved = checkpoint.load_config(tmp_path / "checkpoints")
    flat = {**{k: v for k, v in saved.items() if k != "optimizer"},
            **{k: saved["optimizer"][k] for k in lm.Config.moved}}
    monkeypatch.setattr(checkpoint, "load_config", lambda *a, **k: flat)
    old = lm.main(["--generate", "--workdir", str(tmp_path), "--prompt", "the company said", "--max-new-tokens", "2"])
    assert old["text"] == out["text"]
    with pytest.raises(SystemExit, match="no checkpoint in .*nothing.checkpoints; train first"):
        lm.main(["--generate", "--workdir", str(tmp_path / "nothing")])


def test_lm_time_budget_follows_the_clock_schedule(tmp_path, monkeypatch):
    """steps 0: a constant AdamW chained with clock_schedule, ending at the max_epochs cap here."""
    from jaxnet.studies import lm

    opt = lm.make_optimizer(lm.Config())
    assert len(opt.init({"w": jnp.zeros(2)})) == 2  # (AdamW's chain, the clock's state)
    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    config = lm.Config(data_dir="tests/data/ptb", model=TransformerConfig(num_layers=1, embed_dim=16, num_heads=2,
                                                                          block_size=8),
                       batch_size=4, max_epochs=2, optimizer=lm.Config().optimizer.replace(warmup_steps=2), eval_every=100, log_every=4, eval_stride=4,
                       max_new_tokens=2, progress=False)
    result = lm.run(config, tmp_path)
    assert result["schedule"].startswith("time") and not result["stopped_by_time"]
    assert result["steps"] == math.ceil(2 * result["n_train"] / (4 * 8)) and result["epochs"] >= 2


def test_a_lm_tuning_run_lists_the_interpolated_figure_at_every_weight(tmp_path, monkeypatch):
    """--tune-fraction: the weight of the n-gram is chosen from this table, which runs from the
    network alone (weight 0) to the n-gram's share at 0.6."""
    from jaxnet.studies import lm

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    config = lm.Config(data_dir="tests/data/ptb", tune_fraction=0.3, steps=4, batch_size=2, eval_every=4,
                       log_every=4, eval_stride=4, max_new_tokens=1, progress=False,
                       model=TransformerConfig(num_layers=1, embed_dim=16, num_heads=2, block_size=8),
                       optimizer=lm.Config().optimizer.replace(warmup_steps=1))
    result = lm.run(config, tmp_path)
    table = result["interpolated_val_perplexity_by_weight"]
    assert list(table) == [str(w) for w in lm.TUNING_WEIGHTS] and lm.TUNING_WEIGHTS[:2] == (0.0, 0.05)
    assert table["0.0"] == result["val_perplexity"] and table["0.3"] == result["interpolated_val_perplexity"]
    assert len(set(table.values())) > 1


def _lm_updates(tx, n: int) -> np.ndarray:
    """``n`` updates of ``tx`` on a tiny tree (gradient norm 3: clipping acts), the clock at t/n."""
    import jax
    from jaxnet.train.stream import set_clock_fraction

    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    grads = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.full(2, -2.0)}

    def body(state, t):
        updates, state = tx.update(grads, set_clock_fraction(state, t / n), params)
        return state, updates

    updates = jax.lax.scan(body, tx.init(params), jnp.arange(n))[1]
    return np.concatenate([u.reshape(n, -1) for u in jax.tree.leaves(updates)], axis=1)  # [n, 6]


def test_lm_optimizer_is_the_nested_config_and_builds_the_same_updates_as_before(tmp_path):
    """Before the nesting, lm built AdamW (then 5e-3, wd 0.1, b2 0.99, clip 1) with warm-up 100 and a
    cosine to 0.05, over `steps` or (steps 0) the clock: the same updates must come out."""
    import optax

    from experiments import lm as lm_experiment
    from jaxnet import optim
    from jaxnet.studies import lm
    from jaxnet.train.checkpoint import config_to_json
    from jaxnet.train.stream import clock_schedule

    def before(lr, steps):
        base = optim.OptimizerConfig(name="adamw", learning_rate=lr, weight_decay=0.1, b2=0.99, clip_norm=1.0)
        if not steps:
            return optax.chain(optim.make_optimizer(base), clock_schedule(100, 0.05))
        return optim.make_optimizer(base.replace(schedule="warmup_cosine", warmup_steps=min(100, steps - 1),
                                                 total_steps=steps, final_lr_fraction=0.05))

    for steps in (0, 150):  # the default rate is 8e-3 since the tuning split chose it
        np.testing.assert_array_equal(_lm_updates(lm.make_optimizer(lm.Config(steps=steps)), 150),
                                      _lm_updates(before(8e-3, steps), 150))
    config, _ = common.parse_config(lm_experiment.Config, ["--optimizer.learning-rate", "0.02", "--steps", "150",
                                                           "--workdir", str(tmp_path)], name="lm")
    assert config.optimizer == lm.Config().optimizer.replace(learning_rate=0.02)
    np.testing.assert_array_equal(_lm_updates(lm.make_optimizer(config), 150), _lm_updates(before(0.02, 150), 150))
    with pytest.raises(ValueError, match="steps 0 .* needs optimizer.schedule 'warmup_cosine'.*got 'constant'"):
        lm.Config(optimizer=lm.Config().optimizer.replace(schedule="constant"))
    help_text = common.make_parser(lm_experiment.Config, [], name="lm").format_help()
    assert "--optimizer.weight-decay" in help_text and "--learning-rate" not in help_text
    assert "--optimizer.total-steps" not in help_text and "decay-filter" not in help_text  # from steps; code
    assert "---" not in help_text  # OptimizerConfig's "# --- schedule ---" headings describe no field
    # The decay filter is saved by name (its str() holds an address, which would differ on --resume).
    assert config_to_json(lm.Config())["optimizer"]["decay_filter"] == "jaxnet.regularizers.is_weight"


def test_a_flat_lm_config_from_before_the_nesting_loads_into_optimizer():
    from experiments import lm as lm_experiment
    from jaxnet.train.checkpoint import config_to_json

    new = lm_experiment.Config()
    assert common.config_from_dict(lm_experiment.Config, config_to_json(new)) == new
    config = common.config_from_dict(lm_experiment.Config, {"steps": 20, "learning_rate": 0.01, "warmup_steps": 2,
                                                            "final_lr_fraction": 0.1, "weight_decay": 0.0,
                                                            "b2": 0.9, "clip_norm": 2.0})
    assert config.optimizer == new.optimizer.replace(learning_rate=0.01, warmup_steps=2, final_lr_fraction=0.1,
                                                     weight_decay=0.0, b2=0.9, clip_norm=2.0)
    with pytest.raises(ValueError, match="both 'b2' .* and 'optimizer.b2'"):
        common.config_from_dict(lm_experiment.Config, {"b2": 0.9, "optimizer": {"b2": 0.95}})
    with pytest.raises(ValueError, match="'optimizer.decay_filter': expected 'jaxnet.regularizers.is_weight'"):
        common.config_from_dict(lm_experiment.Config, {"optimizer": {"decay_filter": "os.system"}})


def test_the_pytorch_lm_baseline_has_the_same_parameters_and_refuses_what_it_lacks():
    pytest.importorskip("torch")
    from jaxnet.baselines import torch_lm
    from jaxnet.models.transformer import count_params

    for positions in ("rotary", "learned"):
        config = TransformerConfig(vocab_size=11, block_size=8, num_layers=2, embed_dim=16, num_heads=2,
                                   positions=positions)
        run, n_params = torch_lm.torch_trainer(config, [(np.zeros((2, 8), int), np.ones((2, 8), int))], threads=1)
        assert n_params == count_params(config)
        assert run(1) > 0
    with pytest.raises(ValueError, match="activation='gelu_tanh'"):
        torch_lm.check_supported(TransformerConfig(activation="relu"))


@pytest.mark.slow  # ~10 s, mostly importing torch in the child and compiling
def test_bench_lm_runs_both_sides(tmp_path):
    pytest.importorskip("torch")
    from experiments import bench_lm

    result = bench_lm.main(["--model.num-layers", "1", "--model.embed-dim", "16", "--model.num-heads", "2",
                            "--model.block-size", "8", "--batch-size", "2", "--steps", "1", "--repeats", "1",
                            "--warmup", "1", "--workdir", str(tmp_path)])
    assert result["params"] == result["pytorch_params"]
    assert result["jaxnet_tokens_per_s"] > 0 and result["speedup_vs_pytorch"] > 0
    assert result["dtype"] == "float32" and result["block_size"] == 8


def test_bench_lm_pairs_each_round_s_two_sides():
    """Speed-ups per round (PyTorch's step time over jaxnet's in the same round) and their median,
    beside the ratio of the two sides' medians: a slow spell that hits one round's two sides
    alike leaves its ratio alone."""
    from experiments import bench_lm

    config = bench_lm.Config(model=TransformerConfig(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2,
                                                     block_size=8), batch_size=2)
    times = {"jaxnet": [1.0, 3.0, 1.1], "pytorch": [1.5, 4.8, 1.54]}  # round 2: both slow
    result = bench_lm.throughput_result(config, times, torch_params=1, load_before=0.0)
    assert result["speedup_vs_pytorch_per_repeat"] == [1.5, 1.6, 1.4]
    assert result["speedup_vs_pytorch_paired"] == 1.5
    # The ratio of the medians, as before (of tokens/s rounded to 0.1).
    assert result["speedup_vs_pytorch"] == pytest.approx(1.54 / 1.1, abs=0.01)


def test_bench_lm_breakdown_splits_the_traced_steps(tmp_path):
    from experiments import bench_lm

    result = bench_lm.main(["--model.num-layers", "1", "--model.embed-dim", "16", "--model.num-heads", "2",
                            "--model.block-size", "8", "--batch-size", "2", "--steps", "2", "--repeats", "1",
                            "--warmup", "1", "--no-torch", "--breakdown", "--workdir", str(tmp_path)])
    b = result["breakdown"]
    assert b["by_kind_ms"]["matmul"] > 0 and b["by_kind_ms"]["other"] > 0
    assert b["by_pass_ms"]["forward"]["matmul"] > 0 and b["by_pass_ms"]["backward"]["matmul"] > 0
    assert b["by_pass_ms"]["update"]["matmul"] == 0  # AdamW has no matmul
    assert b["matmul_bound_tokens_per_s"] > result["jaxnet_tokens_per_s"]  # the bound is above what ran
    assert list((tmp_path / "profile").glob("**/*.trace.json.gz"))


def test_bench_peak_sets_each_dot_against_its_instructions_peak(tmp_path):
    from experiments import bench_peak
    from kernels.numba_cpu import peak

    result = bench_peak.main(["--sizes", "64", "--shapes", "40x33x70", "--repeats", "2", "--warmup", "1",
                              "--peak-seconds", "0.005", "--workdir", str(tmp_path)])
    kinds = set(peak.instructions())
    assert {k for k in result["peaks"]} == kinds
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    for name, kind in bench_peak.VARIANTS.items():
        if kind not in kinds:
            assert f"{name}_us" not in rows[0]
            continue
        for row, flops in zip(rows, (2 * 64**3, 2 * 40 * 33 * 70)):
            peak_gops = result["peaks"][kind]["gops_all_cores"]  # the fraction rounded to 1e-3, GOP/s to 0.1
            assert row[f"{name}_of_peak"] == pytest.approx(row[f"{name}_gops"] / peak_gops, abs=5e-4 + 0.05 / peak_gops)
            us = row[f"{name}_us"]  # rounded to 0.1 µs, GOP/s to 0.1: the tolerance of both roundings
            assert row[f"{name}_gops"] == pytest.approx(flops / us / 1e3, abs=0.05 + flops / us / 1e3 * 0.05 / us)
            assert row[f"{name}_fastest_of_peak"] >= row[f"{name}_of_peak"]
    assert [r["shape"] for r in rows] == ["64x64x64", "40x33x70"]
    if "bf16_dot" in kinds:
        assert result["numba_bf16_vs_xla_bf16"]["40x33x70"] == pytest.approx(  # rounded to 1e-3
            rows[1]["xla_bf16_us"] / rows[1]["numba_bf16_us"], abs=5e-4)
    assert (tmp_path / "table.md").read_text().startswith("| kind | instruction |")


def test_bench_peak_refuses_bad_sizes():
    from experiments import bench_peak

    with pytest.raises(ValueError, match="--sizes must be positive"):
        bench_peak.Config(sizes=(0,))
    with pytest.raises(ValueError, match="--shapes takes MxKxN with positive integers, got '64x0x3'"):
        bench_peak.Config(shapes=("64x0x3",))


def test_a_result_records_its_config_and_versions_and_repeats_from_them(tmp_path, monkeypatch):
    from experiments import seed_simple_net
    from jaxnet.train import checkpoint

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    first = seed_simple_net.main(["--epochs", "40", "--learning-rate", "0.02", "--log-every", "0",
                                  "--checkpoint-every", "0", "--workdir", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["config"]["epochs"] == 40 and saved["config"]["learning_rate"] == 0.02 and "seed" in saved["config"]
    assert saved["run"]["versions"]["jax"] and saved["run"]["cpu"] and "--epochs" in saved["run"]["argv"]
    cpu = saved["run"]["machine"]  # what every benchmark's result records too (experiments.common.finish)
    assert cpu["model"] == saved["run"]["cpu"] and isinstance(cpu["isa"], list) and cpu["cores"] >= 1
    assert {"l1d_bytes", "l2_bytes", "l3_bytes", "vector_bits"} <= set(cpu)
    # --checkpoint-every 0: no checkpoints while training, but the final weights, named in the result
    assert saved["weights"] == str(tmp_path / "a" / "checkpoints" / "40")
    assert checkpoint.steps(tmp_path / "a" / "checkpoints") == [40]
    again = seed_simple_net.main(["--config", str(tmp_path / "a" / "result.json"), "--workdir", str(tmp_path / "b")])
    assert again["final_loss"] == first["final_loss"] and again["config"] == first["config"]


def test_import_jaxnet_exposes_its_subpackages_without_importing_jax():
    code = ("import sys, jaxnet\nassert 'jax' not in sys.modules, 'import jaxnet imported jax'\n"
            "from jaxnet import models\nassert jaxnet.models.MLP and jaxnet.optim.make_optimizer and jaxnet.train.fit\n"
            "assert set(jaxnet.SUBPACKAGES) <= set(dir(jaxnet))\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    import pkgutil

    import jaxnet
    public = {m.name for m in pkgutil.iter_modules(jaxnet.__path__) if not m.name.startswith("_")}
    assert public == set(jaxnet.SUBPACKAGES), "jaxnet.SUBPACKAGES must list every public module (jaxnet.explain was missing)"


def test_a_bad_model_choice_fails_at_parsing(capsys):
    from experiments import vision

    with pytest.raises(SystemExit):
        vision.main(["--model", "resnet"])
    assert "argument --model: invalid choice: 'resnet' (choose from 'cnn', 'mlp')" in capsys.readouterr().err


def test_a_workdir_with_an_earlier_run_is_refused_before_loading_unless_told(tmp_path, capsys):
    """A new run never overwrites an earlier one's files: refused at parsing; --overwrite replaces
    them (only the run files: anything else in the folder stays), --resume continues."""
    from experiments import seed_simple_net
    from experiments.common import parse_config

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "result.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    args = ["--workdir", str(tmp_path)]
    with pytest.raises(SystemExit):
        parse_config(seed_simple_net.Config, args, name="seed_simple_net")
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--overwrite" in err and "--resume" in err
    assert (tmp_path / "result.json").exists()
    parse_config(seed_simple_net.Config, args + ["--resume"], name="seed_simple_net")
    assert (tmp_path / "result.json").exists()
    parse_config(seed_simple_net.Config, args + ["--overwrite"], name="seed_simple_net")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_lm_tuning_split_holds_out_the_end_of_the_training_text_and_never_reads_the_held_out_text():
    from jaxnet.studies import lm

    full = lm.load(lm.Config())
    tuned = lm.load(lm.Config(tune_fraction=0.1))
    cut = len(full.train) - round(0.1 * len(full.train))
    assert np.array_equal(tuned.train, full.train[:cut]) and np.array_equal(tuned.val, full.train[cut:])
    assert tuned.test is None and tuned.vocab == full.vocab and "tuning split" in tuned.name
    assert len(tuned.train) + len(tuned.val) == len(full.train)  # nothing of full.val in either
    ptb = lm.load(lm.Config(data_dir="tests/data/ptb", tune_fraction=0.25))
    assert ptb.test is None and len(ptb.val) == round(0.25 * len(lm.load(lm.Config(data_dir="tests/data/ptb")).train))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="tune_fraction must be in"):
            lm.Config(tune_fraction=bad)


def test_the_sweep_checks_models_spread_over_its_grid():
    """The baselines train the first and the last model (the lowest and the highest rate) and
    models evenly between, never one twice."""
    from experiments.sweep import spread

    assert spread(4, 1000) == [0, 333, 666, 999]
    assert spread(2, 6) == [0, 5] and spread(1, 6) == [0]
    assert spread(10, 3) == [0, 1, 2] and spread(0, 5) == []


def test_sweep_experiment_end_to_end_on_a_tiny_grid(tmp_path, monkeypatch):
    backend = "auto"  # xla and numba measured under the sweep, the faster one run
    pytest.importorskip("torch", reason="the sweep times the seed's PyTorch loop beside it (make test installs torch)")
    from experiments import sweep

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    argv = ["--seeds", "3", "--learning-rates", "2", "--epochs", "20", "--torch-runs", "2", "--torch-threads", "1",
            "--fit-runs", "2", "--warm-runs", "1", "--no-progress", "--backend", backend, "--workdir",
            str(tmp_path)]
    result = sweep.main(argv)
    assert result["models"] == 6 and result["backend"] == backend
    assert result["best_learning_rate"] in result["learning_rates"] == [0.001, 0.1]
    # Each timed baseline trained the same models to the same losses, within the stated tolerances.
    assert result["max_rel_gap_vs_fit"] <= result["fit_tolerance"]
    assert result["max_rel_gap_vs_torch"] <= result["torch_tolerance"]
    assert result["models_outside_fit_tolerance"] == result["models_outside_torch_tolerance"] == 0
    assert result["sweep_warm_ms_per_model"] > 0 and result["speedup_vs_torch"] > 0
    # The seed task is plain full-batch SGD of a dense stack: the fused engine, timed beside the vmapped one.
    assert result["engine"] == "fused" and result["vmap_warm_s"] > 0 and result["speedup_vs_vmap"] > 0
    assert result["max_rel_gap_vs_vmap"] <= result["fit_tolerance"]
    assert result["models_outside_fit_tolerance_vs_vmap"] == 0
    assert json.loads((tmp_path / "result.json").read_text())["mean_final_loss_by_rate"] == \
        result["mean_final_loss_by_rate"]
    with pytest.raises(SystemExit, match="holds an earlier run"):
        sweep.main(argv)
