"""`jaxnet verify`: the console script end to end, and main(argv) on a broken candidate."""
import os
import subprocess
import sys
from pathlib import Path

from jaxnet import cli


def _jaxnet():
    script = Path(sys.executable).parent / "jaxnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "jaxnet.cli"]


def test_console_script_verifies_the_xla_backend():
    env = dict(os.environ, JAXNET_HYPOTHESIS_PROFILE="ci")
    out = subprocess.run(_jaxnet() + ["verify", "--backend", "xla", "--examples", "3"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:7] == ["backend", "forward", "jit", "vmap", "grad_x", "grad_w", "grad_b"]
    assert table[1].startswith("xla ") and "FAIL" not in table[1] and "13/13" in table[1]
    assert "1 of 1 verified" in out.stdout


def test_a_broken_candidate_fails_with_its_counterexample(capsys):
    rc = cli.main(["verify", "--candidate", "jaxnet.testing.mutants:tail_dropped", "--examples", "3",
                   "--shrink", "3", "--no-bad-inputs"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "jaxnet.testing.mutants:tail_dropped  FAIL     FAIL" in out
    assert "FAIL check: forward" in out and "worst element: forward[" in out and "make_fused_dense_call(" in out
    assert "FAILED: jaxnet.testing.mutants:tail_dropped" in out


def test_unknown_backend_is_a_usage_error(capsys):
    assert cli.main(["verify", "--backend", "no_such_backend"]) == 2
    assert "not available here" in capsys.readouterr().err


def test_float64_runs_in_x64_mode(capsys):
    # Without x64 mode JAX would run float64 inputs as float32 and every backend would "fail".
    rc = cli.main(["verify", "--backend", "xla", "--dtypes", "float64", "--examples", "5", "--no-bad-inputs"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 of 1 verified" in out


def test_verify_refuses_float64_without_x64():
    import jax
    import pytest

    from jaxnet.testing import verify

    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="x64 mode is off"):
        verify(lambda x, w, b=None, activation="relu": x, dtypes=("float64",))


def test_a_candidate_in_the_current_directory_is_found(tmp_path, monkeypatch):
    import sys

    from jaxnet.testing import candidates

    (tmp_path / "my_kernel_in_cwd.py").write_text("def fused(x, w, b=None, *, activation='relu'):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = candidates.resolve("my_kernel_in_cwd:fused")
    assert fn.__name__ == "fused" and sys.path[-1] == str(tmp_path)  # searched last: it shadows nothing
