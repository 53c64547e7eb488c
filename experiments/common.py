"""What every experiment shares: flags from a frozen config dataclass, and the result line.

An experiment is ``python -m experiments.NAME [--flags]``: its flags are its config's fields
(``--epochs 500``, ``--compare-torch``), it writes into ``--workdir`` (default ``runs/NAME/``) and
ends by printing one line, the JSON object of its final metrics, also saved as
``<workdir>/result.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import typing


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def parse_config(config_cls, argv=None, *, name: str, description: str | None = None):
    """Builds ``config_cls`` from command-line flags named after its fields.

    Returns ``(config, workdir)``. Booleans take ``--flag`` / ``--no-flag``; tuples take several values.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = config_cls()
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        hint = hints[field.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(hint) is tuple:
            (elem, *_) = typing.get_args(hint)
            parser.add_argument(flag, type=elem, nargs="+", default=default)
        else:
            kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--workdir", default=f"runs/{name}", help="where outputs go")
    args = vars(parser.parse_args(argv))
    workdir = pathlib.Path(args.pop("workdir"))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return config_cls(**values), workdir


def finish(result: dict, workdir: pathlib.Path) -> dict:
    """Saves ``result`` as ``<workdir>/result.json`` and prints it as the last line."""
    workdir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result, sort_keys=False)
    (workdir / "result.json").write_text(line + "\n")
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
