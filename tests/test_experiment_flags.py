"""Every experiment's ``--help`` says everything: each flag's meaning and default, and for a flag
with a fixed set of values (a ``Literal`` field) the values, which parsing enforces before the
experiment loads anything."""
import dataclasses
import importlib
import json
import pkgutil
import re
import typing

import pytest

import experiments
from experiments import common

# Every module of experiments/ but the shared helpers: a new experiment is covered without an edit here.
EXPERIMENTS = tuple(sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if m.name != "common"))
# Flags whose values are a fixed set.
CHOICES = {
    "bench_kernels": ("--backends", "--activation", "--dtype"),
    "bench_lm": ("--model.activation", "--model.positions", "--model.backend"),
    "gpu_check": ("--dtype",),
    "lm": ("--model.activation", "--model.positions", "--model.backend", "--optimizer.name", "--optimizer.schedule",
           "--strategy"),
    "recsys": ("--task", "--implicit-models", "--backend", "--strategy"),
    "seed_simple_net": ("--backend", "--strategy"),
    "vision": ("--model", "--backend", "--strategy"),
}


class _Parser(Exception):
    pass


def _parser(name: str, monkeypatch):
    """The parser ``experiments.NAME.main`` builds (nothing else runs)."""
    module = importlib.import_module(f"experiments.{name}")

    def capture(config_cls, argv=None, **kwargs):
        raise _Parser(common.make_parser(config_cls, argv, **kwargs))

    monkeypatch.setattr(module, "prepare_process", lambda **kwargs: None)
    monkeypatch.setattr(module, "parse_config", capture)
    with pytest.raises(_Parser) as caught:
        module.main([])
    return caught.value.args[0]


def _entries(parser, monkeypatch) -> dict[str, tuple[str, str]]:
    """``--help`` as the user sees it: flag -> (its invocation, e.g. ``--task {a,b}``, its help)."""
    monkeypatch.setenv("COLUMNS", "2000")  # one entry per line (and its help on the next, if long)
    entries: dict[str, list[str]] = {}
    for line in parser.format_help().splitlines():
        if re.match(r"  -", line):
            invocation, _, text = line.strip().partition("  ")
            entries[invocation.split()[0].rstrip(",")] = [invocation, text.strip()]
        elif entries and line.startswith("    ") and not line.strip().startswith("-"):
            entries[list(entries)[-1]][1] += " " + line.strip()
    return {flag: (inv, text.strip()) for flag, (inv, text) in entries.items()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_flag_says_what_it_does_and_its_default(name, monkeypatch):
    entries = _entries(_parser(name, monkeypatch), monkeypatch)
    entries.pop("-h")
    assert len(entries) > 3
    bad = [f"{flag}: {text!r}" for flag, (_, text) in entries.items()
           if not re.fullmatch(r"\S.*\S\s*\(default: [^)]+\).*", text)]
    assert not bad, f"flags without a description or default in experiments.{name} --help:\n" + "\n".join(bad)


def test_the_defaults_shown_are_the_configs(monkeypatch):
    entries = _entries(_parser("lm", monkeypatch), monkeypatch)
    assert entries["--batch-size"][1].endswith("(default: 32)")
    assert entries["--data-dir"][1].endswith("(default: '')")
    assert entries["--model.dropout-rate"][1].endswith("(default: 0.2)")  # the lm's, not TransformerConfig's 0.1
    assert entries["--model.dtype"][1].endswith("(default: bfloat16)")
    assert entries["--progress"][1].endswith("(default: on)")
    recsys = _entries(_parser("recsys", monkeypatch), monkeypatch)
    assert recsys["--implicit-models"][1].endswith("(default: mf ncf two_tower)")  # as typed on the command line


@pytest.mark.parametrize("name, flag", [(name, flag) for name, flags in CHOICES.items() for flag in flags])
def test_fixed_sets_of_values_are_listed_and_enforced_at_parsing(name, flag, monkeypatch, capsys):
    parser = _parser(name, monkeypatch)
    invocation, _ = _entries(parser, monkeypatch)[flag]
    listed = re.search(r"\{([^}]+)\}", invocation)
    assert listed and len(listed.group(1).split(",")) >= 2, invocation
    parser.parse_args([flag, listed.group(1).split(",")[-1]])  # a listed value parses
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([flag, "nonesuch"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: invalid choice: 'nonesuch'" in capsys.readouterr().err


@pytest.mark.parametrize("name, argv", [("vision", ["--backend", "nonesuch"]),
                                        ("recsys", ["--implicit-models", "mf", "gru"]),
                                        ("lm", ["--model.positions", "alibi"])])
def test_a_bad_choice_stops_the_experiment_before_it_loads_data(name, argv, monkeypatch, capsys):
    study = importlib.import_module(f"jaxnet.studies.{name}")
    monkeypatch.setattr(study, "load", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"experiments.{name}").main(argv)
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class Pick:
    # Which one.
    kind: typing.Literal["a", "b"] = "a"
    # Several.
    kinds: tuple[typing.Literal["a", "b"], ...] = ("a",)


def test_a_literal_field_is_a_choice_from_the_command_line_and_from_a_config_file(tmp_path, capsys):
    config, _ = common.parse_config(Pick, ["--kind", "b", "--kinds", "b", "a"], name="t", trains=False)
    assert config == Pick(kind="b", kinds=("b", "a"))
    path = tmp_path / "c.json"
    for bad, message in [({"kind": "c"}, "config key 'kind': expected one of ['a', 'b'], got 'c' (str)"),
                         ({"kinds": ["a", "z"]}, "config key 'kinds[1]': expected one of ['a', 'b'], got 'z'")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            common.parse_config(Pick, ["--config", str(path)], name="t", trains=False)
        assert message in capsys.readouterr().err


def test_the_backend_choices_are_the_registered_backends():
    import kernels
    from kernels import dispatch

    names = typing.get_args(dispatch.BackendName)
    assert "auto" in names and set(kernels.available_backends()) <= set(names)
    for name in names:
        try:
            dispatch.resolve(name)
        except ValueError as e:  # not available in this process is fine; unknown is not
            assert "unknown backend" not in str(e)
