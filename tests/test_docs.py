"""The guides in docs/ run as written (issue 19, point 5).

Every ```python block of a guide runs, in order, in one namespace, in a fresh working directory
that holds a copy of tests/data at ``tests/data`` (the paths the guides use from the repository
root); nothing is downloaded. A line ending in ``# -> TEXT`` promises that TEXT appears in what
its block prints, and the test holds the guide to it. Blocks marked ```bash or ```console are
not run. Option tables whose header names a documented callable (``| `fit` option | default |``)
must list that callable's real defaults.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = ("training.md", "language-models.md", "recommendation.md", "data.md", "sweeps.md")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
PROMISE = re.compile(r"#\s*->\s*(.+?)\s*$", re.M)


def code_blocks(text: str, language: str = "python") -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced block in ``language``; ``line``: 1-based line of its first code line."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def run_guide(text: str, name: str) -> list[str]:
    """Runs ``text``'s python blocks in order in one namespace; returns what each printed.

    Compiled under ``name`` with the block's own line numbers, so a traceback points into the
    guide. Raises ``AssertionError`` when a block's printed output lacks a ``# -> TEXT`` promise.
    """
    namespace = {"__name__": "__main__"}
    outputs = []
    for line, code in code_blocks(text):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile("\n" * (line - 1) + code, name, "exec"), namespace)
        printed = out.getvalue()
        for promise in PROMISE.findall(code):
            assert promise in printed, (f"{name}, block at line {line}: promised {promise!r} in its output, "
                                        f"which was:\n{printed[-2000:]}")
        outputs.append(printed)
    return outputs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_runs_as_written(guide, workdir):
    text = (ROOT / "docs" / guide).read_text()
    assert len(code_blocks(text)) >= 3, f"docs/{guide} has fewer than 3 python blocks"
    run_guide(text, f"docs/{guide}")


def test_the_runner_fails_on_a_broken_promise_or_block_and_skips_shell_blocks(workdir):
    """A wrong promised output fails, so does an exception in any block; ```bash blocks do not run."""
    run_guide("```python\nx = 2\nprint(x * 21)  # -> 42\n```\n", "ok.md")
    with pytest.raises(AssertionError, match="promised '43'"):
        run_guide("```python\nprint(42)  # -> 43\n```\n", "bad.md")
    with pytest.raises(NameError):  # the blocks share one namespace, in order: y is not defined yet
        run_guide("```python\nprint(y)\n```\n\n```python\ny = 1\n```\n", "order.md")
    bash = "```bash\nexit 1\n```\n```python\nprint('ran')  # -> ran\n```\n"
    assert run_guide(bash, "bash.md") == ["ran\n"]


def test_readme_links_every_guide_and_the_guides_links_exist():
    readme = (ROOT / "README.md").read_text()
    for guide in GUIDES:
        assert f"(docs/{guide})" in readme, f"README.md does not link docs/{guide}"
        text = (ROOT / "docs" / guide).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" not in target:
                assert (ROOT / "docs" / target).resolve().exists(), f"docs/{guide}: broken link {target}"
        for path in set(re.findall(r"`((?:experiments|jaxnet|tests|kernels)/[\w/.-]+\.(?:py|md))`", text)):
            assert (ROOT / path).exists(), f"docs/{guide} names {path}, which does not exist"


def _documented():
    """The callables whose option tables the guides carry, by the name in a table's header."""
    from jaxnet.data import images, ratings, text
    from jaxnet.models import NCF, MatrixFactorization, TransformerConfig, TwoTower
    from jaxnet.models.transformer import generate
    from jaxnet.train import fit, fit_many, fit_stream

    return {f.__name__: f for f in (fit, fit_many, fit_stream, generate, TransformerConfig, MatrixFactorization, NCF, TwoTower,
                                    ratings.load_movielens, ratings.GeneratorConfig, text.load_ptb, images.load_npz,
                                    images.load_folder)}


def _defaults(obj) -> dict:
    """Parameter or field name -> default (``inspect.Parameter.empty`` when required)."""
    if dataclasses.is_dataclass(obj):  # configs and Flax modules (whose parent and name are Flax's own)
        return {f.name: f.default for f in dataclasses.fields(obj) if f.name not in ("parent", "name")}
    sig = inspect.signature(getattr(obj, "__wrapped__", obj))
    return {p.name: p.default for p in sig.parameters.values()}


def _option_rows(text: str):
    """``(callable name, option, default)`` of every row of a table headed ``| `name` option | default |``.

    A row may name several options: ``| `a`, `b` | `1` |`` gives both the default 1, ``| `a`, `b` |
    `1`, `2` |`` pairs them; ``required`` marks options without a default.
    """
    for table in re.finditer(r"^\| `(\w+)` option \| default \|.*\n\|[-| :]+\|\n((?:\|.*\n)+)", text, re.M):
        for row in table.group(2).splitlines():
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            options = re.findall(r"`(\w+)`", cells[0])
            defaults = ["required"] if cells[1] == "required" else re.findall(r"`([^`]*)`", cells[1])
            assert len(defaults) in (1, len(options)), f"table row {row!r}: defaults do not match the options"
            for option, default in zip(options, defaults * len(options) if len(defaults) == 1 else defaults):
                yield table.group(1), option, default


@pytest.mark.parametrize("guide", GUIDES)
def test_option_tables_give_the_real_defaults(guide):
    import jax.numpy as jnp

    from jaxnet import losses

    documented = _documented()
    rows = list(_option_rows((ROOT / "docs" / guide).read_text()))
    assert rows, f"docs/{guide} has no option table"
    for name, option, shown in rows:
        defaults = _defaults(documented[name])
        assert option in defaults, f"docs/{guide}: {name} has no option {option!r}"
        real = defaults[option]
        if shown == "required":
            assert real is inspect.Parameter.empty or real is dataclasses.MISSING, f"{name}({option}=) has a default"
            continue
        value = eval(shown, {"__builtins__": {}, "jnp": jnp, "losses": losses})  # `2**31`, `jnp.float32`, ...
        assert value == real or value is real, f"docs/{guide}: {name}({option}=) defaults to {real!r}, not {shown}"
