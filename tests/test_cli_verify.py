"""`jaxnet verify`: the console script end to end, and main(argv) on a broken candidate."""
import os
import re
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


def test_gelu_computed_by_its_tanh_approximation_fails(capsys):
    """The issue's case: a few random examples miss it; the probe grid does not."""
    rc = cli.main(["verify", "--candidate", "jaxnet.testing.mutants:gelu_as_tanh", "--examples", "3",
                   "--no-bad-inputs"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "rebuild:   probe_call('gelu', 'float32')" in out and "FAIL check: grad_x" in out
    row = out.split("\n\n")[1].splitlines()[1].split()
    assert float(row[-3]) > 100  # "worst": how many tolerances out


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


EVIL = '''
import os, time
import jax
from kernels import reference

def dies_when_eager(x, w, b=None, *, activation="relu"):
    if not isinstance(x, jax.core.Tracer):
        os._exit(0)  # exit status 0, no table: must not read as a pass
    return reference.fused_dense(x, w, b, activation=activation)

def hangs_when_eager(x, w, b=None, *, activation="relu"):
    while not isinstance(x, jax.core.Tracer):
        time.sleep(0.05)
    return reference.fused_dense(x, w, b, activation=activation)
'''


def test_a_candidate_that_exits_or_hangs_fails_the_check_it_was_in(tmp_path):
    """Each candidate runs in a child process: os._exit(0) and a hang are failures of the eager
    check, the other checks still get their verdict, and a hypothesis.py in the current
    directory is never imported (the children start with python -P)."""
    (tmp_path / "evil_kernels.py").write_text(EVIL)
    (tmp_path / "hypothesis.py").write_text("import os\nos._exit(3)\n")
    out = subprocess.run(_jaxnet() + ["verify", "--candidate", "evil_kernels:dies_when_eager",
                                      "--candidate", "evil_kernels:hangs_when_eager", "--dtypes", "float32",
                                      "--examples", "2", "--shrink", "0", "--timeout", "5", "--no-bad-inputs"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, JAXNET_HYPOTHESIS_PROFILE="ci"))
    assert out.returncode == 1, out.stdout + out.stderr
    table = [re.split(r"\s{2,}", line) for line in out.stdout.split("\n\n")[1].splitlines()]
    rows = {r[0]: dict(zip(table[0][1:], r[1:])) for r in table[1:]}
    for name in ("evil_kernels:dies_when_eager", "evil_kernels:hangs_when_eager"):
        row = rows[name]
        assert row["forward"] == "FAIL" and row["worst"] == "inf", row
        assert all(row[c].startswith("ok") for c in ("jit", "vmap", "grad_x", "grad_w", "grad_b")), row
    assert "process exited with status 0 during this check" in out.stdout
    assert "no answer within 5s" in out.stdout
    assert "0 of 2 verified" in out.stdout


def test_the_malformed_call_worker_does_not_import_from_the_current_directory(tmp_path, monkeypatch):
    import pickle

    from jaxnet.testing.worker import Worker

    (tmp_path / "hypothesis.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    (tmp_path / "my_kernel.py").write_text("def fused(x, w, b=None, *, activation='relu'):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    with Worker("jaxnet.testing.bad_inputs:_worker", pickle.dumps(("my_kernel:fused", [])), ("0",)) as w:
        assert w.next_event(120) == {"event": "done"}, w.stderr_tail()
    assert not (tmp_path / "ran").exists()  # the installed hypothesis was imported, not ./hypothesis.py
