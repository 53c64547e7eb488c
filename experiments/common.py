"""What every experiment shares: process set-up, flags from a frozen config dataclass, the result line.

An experiment is ``python -m experiments.NAME [--flags]``. Its ``main`` starts with
``prepare_process()`` (before JAX runs anything), then ``parse_config``: the flags are the config's
fields (``--epochs 500``, ``--compare-torch``), a nested config's fields take its name as a prefix
(``--model.embed-dim 256``); it writes into ``--workdir`` (default ``runs/NAME/``) and ends with
``finish``: one line, the JSON object of its final metrics, also saved as ``<workdir>/result.json``.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import json
import os
import pathlib
import re
import shutil
import sys
import types
import typing

from jaxnet.files import write_atomic


def prepare_process(*, single_arena: bool = False) -> bool:
    """Process-wide settings every experiment opts into; call first in ``main``, before JAX runs.

    Keeps freed host memory in the process (``jaxnet.runtime.keep_host_memory``): without it
    compiled programs, and the Numba kernels' scratch, page-fault their temporary buffers afresh
    on every call; and joins a multi-process job when ``python -m jaxnet.launch`` (or the
    ``JAXNET_*`` variables) asks for one (``jaxnet.parallel.initialize``). Importing
    ``experiments`` or ``jaxnet`` changes nothing; this call does.

    Args:
      single_arena: every thread allocates from the main heap, for steps whose temporaries are
        larger than a thread's heap (the language models'); it slows small programs, so only
        they ask (see kernels/host_memory.py).

    Returns:
      What ``keep_host_memory`` returns: whether the settings are in place.
    """
    from jaxnet import parallel, runtime

    kept = runtime.keep_host_memory(single_arena=single_arena)
    parallel.initialize()  # joins a multi-process job when python -m jaxnet.launch started this one
    return kept


# Experiments checkpoint by default: a killed run resumes with --resume.
CHECKPOINT_EVERY = 1000
# What a run writes, at any depth of its workdir (a study may keep one run per sub-folder).
RUN_FILES = ("metrics.jsonl", "loss_curve.png", "result.json", "checkpoints", "tensorboard", "profile")


def earlier_run_files(workdir: pathlib.Path, depth: int = 2) -> list[pathlib.Path]:
    """The ``RUN_FILES`` in ``workdir`` and its sub-folders down to ``depth`` levels."""
    found, level = [], [workdir]
    for _ in range(depth + 1):
        found += [d / name for d in level for name in RUN_FILES if os.path.lexists(d / name)]
        level = [c for d in level if d.is_dir() and not d.is_symlink() for c in d.iterdir()
                 if c.is_dir() and not c.is_symlink() and c.name not in RUN_FILES]
    return found


def clear_earlier_run(files: list[pathlib.Path]) -> None:
    """Removes what ``earlier_run_files`` found (a symbolic link itself, never what it points to)."""
    for path in files:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags ``parse_config`` adds to every config: where outputs go and what the loops log."""

    # Outputs: metrics.jsonl, loss_curve.png, result.json, ...
    workdir: pathlib.Path
    # Also write TensorBoard event files under <workdir>/tensorboard (needs tensorboardX).
    tensorboard: bool = False
    # (start, stop): a jax.profiler trace of those training steps under <workdir>/profile.
    profile_steps: tuple[int, int] | None = None
    # Steps between checkpoints under <workdir>/.../checkpoints (0: none during training); also on
    # SIGTERM/SIGINT, and the final weights always (the studies save them).
    checkpoint_every: int = CHECKPOINT_EVERY
    # Continue from the newest checkpoint that verifies (the config must be the same).
    resume: bool = False
    # Replace an earlier run's files in the workdir (RUN_FILES) instead of refusing to start.
    overwrite: bool = False
    # A device mesh ("data=4", "data=2,model=2"; None: one device) and how the model is laid on it.
    mesh: str | None = None
    strategy: str = "dp"
    # The command-line arguments the run was given (recorded in its result).
    argv: tuple[str, ...] = ()

    @property
    def fit_options(self) -> dict:
        """Keywords for the studies' ``run`` (and so ``fit`` / ``fit_stream``): ``tensorboard``,
        ``profile_steps``, ``checkpoint_every``, ``resume``, ``mesh`` (a ``jax.sharding.Mesh`` or
        None) and ``strategy``."""
        mesh = None
        if self.mesh is not None:
            from jaxnet.parallel import make_mesh

            mesh = make_mesh(self.mesh)
        return {"tensorboard": self.tensorboard, "profile_steps": self.profile_steps,
                "checkpoint_every": self.checkpoint_every, "resume": self.resume, "mesh": mesh,
                "strategy": self.strategy}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _dtype(text: str):
    """A dtype flag's value (``bfloat16``, ``float32``) as a NumPy dtype; JAX's names included."""
    import jax.numpy as jnp

    try:
        return jnp.dtype(text)
    except TypeError as e:
        raise argparse.ArgumentTypeError(f"not a dtype: {text!r}") from e


def _is_dtype(value) -> bool:
    if not (isinstance(value, type) or hasattr(value, "kind")):  # a name ("a", "float32") is a str field
        return False
    try:
        import numpy as np

        np.dtype(value)
    except (TypeError, ValueError):
        return False
    return True


def _field_comments(cls) -> dict[str, str]:
    """The ``# comment`` lines right above each field in the source of ``cls`` and its bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                block.append(text.lstrip("#").strip())
            elif m := re.match(r"(\w+)\s*:", text):
                if block:
                    comments[m.group(1)] = " ".join(block)
                block = []
            else:
                block = []
    return comments


class _Bool(argparse.Action):
    """``--name`` sets True, ``--prefix.no-name`` (``--no-name`` at the top level) sets False."""

    def __init__(self, option_strings, dest, negative: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negative = negative

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string != self.negative)


def _add_fields(parser, cls, defaults, prefix: str, skip: frozenset[str]) -> None:
    """Adds one flag per field of the dataclass ``cls`` (nested dataclasses: prefixed flags)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    group = parser if not prefix else parser.add_argument_group(
        f"{prefix[:-1]} ({cls.__name__})", "its fields, as --" + prefix + "NAME")
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        if path in skip:
            continue
        default, hint = getattr(defaults, field.name), hints[field.name]
        if dataclasses.is_dataclass(hint):
            _add_fields(parser, hint, default, path + ".", skip)
            continue
        if _is_callable(hint):  # code (OptimizerConfig.decay_filter), not a value a flag can give
            continue
        name = field.name.replace("_", "-")
        flag = f"--{prefix}{name}"
        text = comments.get(field.name, "")
        # argparse formats help with %: the comment and the default are escaped, not expanded.
        help_text = f"{text} (default: {_shown(default)})".lstrip().replace("%", "%%")
        if hint is bool:
            negative = f"--{prefix}no-{name}"
            group.add_argument(flag, negative, action=_Bool, negative=negative, dest=path, default=default,
                               help=help_text)
            continue
        kwargs: dict = {"dest": path, "default": default, "help": help_text}
        if typing.get_origin(hint) is tuple:
            elem = typing.get_args(hint)[0]
            kwargs.update(nargs="+", **_value_kwargs(elem))
            if elem is bool:
                kwargs["type"] = _parse_bool
        elif _is_dtype(default):
            kwargs.update(type=_dtype, metavar="DTYPE")
        else:
            kind = hint
            if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: an X
                kind = next(a for a in typing.get_args(hint) if a is not type(None))
            kwargs.update(_value_kwargs(str if kind is typing.Any else kind))
        group.add_argument(flag, **kwargs)


def _shown(default) -> str:
    """A default as it would be typed: ``on``/``off``, a dtype's name, a tuple's values space-separated."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return " ".join(_shown(v) for v in default) or "(none)"
    if isinstance(default, str):
        return default if default.strip() == default and default else repr(default)
    if _is_dtype(default):
        import numpy as np

        return np.dtype(default).name
    return str(default)


def _value_kwargs(kind) -> dict:
    """``type`` and ``metavar`` (or ``choices``, shown as ``{a,b}`` and checked by argparse) for
    one value of type ``kind``: a ``Literal[...]`` allows only its values."""
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        return {"type": type(choices[0]), "choices": choices}
    return {"type": kind, "metavar": getattr(kind, "__name__", "X").upper()}


def _build(cls, defaults, values: dict, prefix: str):
    """``defaults`` with every field given in ``values`` (keyed by dotted path) replaced."""
    hints = typing.get_type_hints(cls)
    changes = {}
    for field in dataclasses.fields(cls):
        path, default = prefix + field.name, getattr(defaults, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            value = _build(hints[field.name], default, values, path + ".")
        elif path in values:
            value = values[path]
            value = tuple(value) if isinstance(value, list) else value
        else:
            continue
        if value is not default:
            changes[field.name] = value
    return dataclasses.replace(defaults, **changes) if changes else defaults


def _coerce(value, hint, default, path: str):
    """One JSON value as a field of type ``hint``; a ``ValueError`` naming ``path`` when it is not one."""
    def bad(expected: str):
        from jaxnet.data.checks import snippet

        return ValueError(f"config key {path!r}: expected {expected}, got {snippet(value)} ({type(value).__name__})")

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if _is_dtype(default):
        if not isinstance(value, str):
            raise bad("a dtype name such as 'float32'")
        try:
            return _dtype(value)
        except argparse.ArgumentTypeError:
            raise bad("a dtype name such as 'float32'") from None
    if hint is typing.Any:
        return value
    if _is_callable(hint):  # saved by name (config_to_json); a config file cannot name other code
        from jaxnet.train.checkpoint import config_to_json

        if value != config_to_json(default):
            raise bad(f"{config_to_json(default)!r} (a function is set in code, not in a config file)")
        return default
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_coerce(v, args[0], None, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


def _is_callable(hint) -> bool:
    return typing.get_origin(hint) is collections.abc.Callable


def _moved(data: dict, moved: dict[str, str]) -> dict:
    """``data`` with each old top-level key of ``moved`` put at its new place ``"outer.name"``."""
    out = dict(data)
    for old, new in moved.items():
        outer, name = new.split(".")
        if old in out and isinstance(out.get(outer, {}), dict):
            if name in out.get(outer, {}):
                raise ValueError(f"config has both {old!r} (its old place) and {new!r}: give one")
            out[outer] = {**out.get(outer, {}), name: out.pop(old)}
    return out


def config_from_dict(config_cls, data: dict, *, defaults=None, prefix: str = ""):
    """``config_cls`` from JSON values (e.g. a saved ``config/metadata`` or a ``--config`` file).

    Keys are field names (nested configs as nested objects); missing keys keep ``defaults``
    (``config_cls()``). Nothing is executed: values are checked against the field types. Keys a
    config saved before a field moved into a nested config (``config_cls.moved``, a ``ClassVar``
    of old key -> ``"outer.name"``) are read at their new place.

    Raises:
      ValueError: an unknown key (listing the valid ones) or an ill-typed value (naming the key,
        the type expected and the value).
    """
    defaults = config_cls() if defaults is None else defaults
    if not isinstance(data, dict):
        raise ValueError(f"config {prefix.rstrip('.') or ''}: expected a JSON object, got {type(data).__name__}")
    data = _moved(data, getattr(config_cls, "moved", {}))
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; valid keys"
                         f"{' of ' + prefix.rstrip('.') if prefix else ''}: {sorted(fields)}")
    changes = {}
    for name, value in data.items():
        default, hint = getattr(defaults, name), hints[name]
        if dataclasses.is_dataclass(hint):
            changes[name] = config_from_dict(hint, value, defaults=default, prefix=f"{prefix}{name}.")
        else:
            changes[name] = _coerce(value, hint, default, prefix + name)
    try:
        return dataclasses.replace(defaults, **changes)
    except (TypeError, ValueError) as e:  # the config's own checks
        raise ValueError(f"config{' ' + prefix.rstrip('.') if prefix else ''}: {e}") from None


def make_parser(config_cls, argv=None, *, name: str, description: str | None = None, trains: bool = True,
                defaults=None) -> argparse.ArgumentParser:
    """The ``argparse`` parser ``parse_config`` uses: a flag per field of ``config_cls``, with the
    comment above the field as its help, then the default and, for a ``Literal`` field, its values.

    ``defaults``: the config the flags start from (``config_cls()`` when None); a ``--config``
    file in ``argv`` (read first) applies on top of it.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    parser.add_argument("--config", metavar="FILE.json", default=None,
                        help="start from this JSON config (field names as keys, nested configs as objects; "
                             "a checkpoint's config/metadata and a run's result.json work); the other flags "
                             "override it (default: none, the defaults below)")
    skip = frozenset(getattr(config_cls, "derived", ()))
    defaults = config_cls() if defaults is None else defaults
    config_file = _config_file(argv)
    if config_file is not None:
        try:
            loaded = json.loads(pathlib.Path(config_file).read_text())
            if isinstance(loaded, dict) and "config" in loaded and "run" in loaded:  # a result.json
                loaded = loaded["config"]
            defaults = config_from_dict(config_cls, loaded, defaults=defaults)
        except (OSError, ValueError) as e:
            parser.error(f"--config {config_file}: {e}")
    parser.set_defaults(_config=defaults)  # what parse_config builds on (no flag sets it)
    _add_fields(parser, config_cls, defaults, "", skip)
    run = parser.add_argument_group("outputs")
    run.add_argument("--workdir", default=f"runs/{name}", help="where outputs go (default: %(default)s)")
    if trains:
        run.add_argument("--tensorboard", action=_Bool, negative="--no-tensorboard", default=False,
                         help="also write TensorBoard event files under <workdir>/tensorboard (needs tensorboardX) "
                              "(default: off)")
        run.add_argument("--profile-steps", type=int, nargs=2, metavar=("START", "STOP"), default=None,
                         help="a jax.profiler trace of training steps START+1..STOP under <workdir>/profile, "
                              "0 <= START < STOP (default: none)")
        run.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="STEPS",
                         help="steps between checkpoints under the workdir's checkpoints/ folders, >= 0 (0: none "
                              "during training); one is also written when SIGTERM or SIGINT arrives, and the final "
                              "weights always are (their path is the result's \"weights\") (default: %(default)s)")
        run.add_argument("--resume", action=_Bool, negative="--no-resume", default=False,
                         help="continue from the newest checkpoint in the workdir that verifies; the run ends as "
                              "it would have without the interruption. The config must be the one saved with it "
                              "(default: off)")
        run.add_argument("--overwrite", action=_Bool, negative="--no-overwrite", default=False,
                         help="replace an earlier run's files in the workdir (" + ", ".join(RUN_FILES) + "); "
                              "without it (or --resume) a workdir holding them is refused before anything "
                              "loads (default: off)")
        run.add_argument("--mesh", default=None, metavar="SPEC",
                         help="train on a device mesh: 'data=4', 'data=2,model=2' (default: one device; on the "
                              "CPU, JAX_NUM_CPU_DEVICES=N gives N devices)")
        run.add_argument("--strategy", default="dp", choices=("dp", "fsdp", "tp", "fsdp+tp"),
                         help="how parameters lie on the mesh: replicated (dp), split over data (fsdp), layers "
                              "split over model (tp), or both (default: %(default)s); see docs/scaling.md")
    return parser


def parse_config(config_cls, argv=None, *, name: str, description: str | None = None, trains: bool = True,
                 defaults=None):
    """Builds ``config_cls`` from command-line flags named after its fields.

    Every field is a flag ``--field-name`` with the field's default and the comment above it as
    help. A field whose type is itself a dataclass (a model's config) contributes its own fields
    as ``--field.sub-name`` (``--model.embed-dim 256``), starting from the default object the
    outer config holds; fields listed in ``config_cls.derived`` (a ``ClassVar`` of dotted paths,
    e.g. ``("model.vocab_size",)``) are set by the experiment from its data and are not flags.
    Booleans take ``--flag`` / ``--no-flag`` (nested: ``--model.no-use-bias``), tuples several
    values, dtypes a name (``bfloat16``), ``Literal[...]`` fields one of their values. Unknown
    flags, bad values and bad choices exit with a usage error, before the experiment loads anything.

    Also ``--workdir`` (default ``runs/NAME``), and for experiments that train (``trains``)
    ``--tensorboard``, ``--profile-steps START STOP``, ``--checkpoint-every STEPS``, ``--resume``,
    ``--mesh`` and ``--strategy``, for ``fit`` / ``fit_stream``. ``defaults``: as in ``make_parser``.

    Returns:
      ``(config, flags)``: the config and a ``RunFlags``.
    """
    parser = make_parser(config_cls, argv, name=name, description=description, trains=trains, defaults=defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    defaults = args.pop("_config")
    flags = RunFlags(workdir=pathlib.Path(args.pop("workdir")), tensorboard=args.pop("tensorboard", False),
                     profile_steps=tuple(p) if (p := args.pop("profile_steps", None)) is not None else None,
                     checkpoint_every=args.pop("checkpoint_every", 0), resume=args.pop("resume", False),
                     overwrite=args.pop("overwrite", False),
                     mesh=args.pop("mesh", None), strategy=args.pop("strategy", "dp"),
                     argv=tuple(sys.argv[1:] if argv is None else argv))
    if flags.mesh is not None:
        import jax

        from jaxnet.parallel import parse_mesh_spec

        try:
            parse_mesh_spec(flags.mesh, jax.device_count())
        except ValueError as e:
            parser.error(f"--mesh: {e}")
    if flags.checkpoint_every < 0:
        parser.error(f"--checkpoint-every needs STEPS >= 0, got {flags.checkpoint_every}")
    if flags.profile_steps is not None and not 0 <= flags.profile_steps[0] < flags.profile_steps[1]:
        parser.error(f"--profile-steps needs 0 <= START < STOP, got {flags.profile_steps}")
    try:
        config = _build(config_cls, defaults, args, "")
    except ValueError as e:  # a config's own check (e.g. TransformerConfig's head width)
        parser.error(str(e))
    if flags.resume and flags.overwrite:
        parser.error("--resume continues the run in the workdir and --overwrite replaces it: choose one")
    # A new run never overwrites an earlier one's files unless told to (lm --generate only reads them).
    if trains and not flags.resume and not getattr(config, "generate", False):
        earlier = earlier_run_files(flags.workdir)
        if earlier and not flags.overwrite:
            shown = ", ".join(str(p) for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
            parser.error(f"--workdir {flags.workdir} holds an earlier run ({shown}); pass --resume to continue it, "
                         f"--overwrite to replace it, or another --workdir")
        if earlier:
            import jax

            if jax.process_index() == 0:  # one process clears; only process 0 writes files
                clear_earlier_run(earlier)
    return config, flags


def _config_file(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (read before the other flags, whose defaults it sets)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config


def finish(result: dict, workdir: pathlib.Path, config=None, argv: tuple[str, ...] = ()) -> dict:
    """Saves ``result`` as ``<workdir>/result.json`` and prints it as the last line (process 0
    of a multi-process job only).

    With ``config``, the result also records it in full (``"config"``: the run repeats with
    ``--config result.json``) and where it ran (``"run"``: package versions, the CPU, the
    command-line arguments ``argv``) and the machine (``jaxnet.runtime.machine()``: CPU model, ISA
    features, cores, cache sizes).
    """
    from jaxnet import runtime
    from jaxnet.parallel import is_main_process
    from jaxnet.train.checkpoint import config_to_json

    if config is not None:
        result = {**result, "config": config_to_json(config),
                  "run": {"versions": runtime.versions(), "cpu": runtime.cpu_model(),
                          "machine": runtime.machine(), "argv": list(argv)}}
    if not is_main_process():
        return result
    workdir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result, sort_keys=False)
    write_atomic(workdir / "result.json", line + "\n")  # whole or not at all; never through a link
    print(line, flush=True)
    return result


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache so reruns skip XLA compilation.

    Default location ``$JAXNET_CACHE_DIR`` or ``~/.cache/jaxnet/xla``; ``JAXNET_CACHE_DIR=off``
    disables it. Returns the directory used, or None.
    """
    import jax

    path = path or os.environ.get("JAXNET_CACHE_DIR") or pathlib.Path.home() / ".cache" / "jaxnet" / "xla"
    if str(path) == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program, however quick to compile: small models are exactly where it pays.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)
