"""Checkpoints of a ``TrainState`` on Orbax, with content hashes that Orbax does not keep.

A checkpoint is a folder ``<directory>/<step>/`` written by Orbax's ``CheckpointManager`` (into a
temporary folder renamed on commit, so a crash mid-write leaves the previous checkpoints as they
were), holding:

- ``state/``: every array of the state, under its dotted path (``params.fc1.kernel``,
  ``opt_state.0.mu.fc1.kernel``, ``rng`` as its key data);
- ``meta/``: JSON: the step, and per array its shape, dtype and the SHA-256 of its bytes;
- ``config/``: JSON: the run's config, when one was given;
- ``jaxnet_files.json``: the size and SHA-256 of every file above, written (atomically) after
  Orbax's commit. Only a folder that has it counts as a checkpoint (``steps``, ``latest_step``).

``restore`` checks the files against their hashes before reading, the model (``like``) against the
saved shapes and dtypes before loading anything, and every array read against its hash after:
Orbax alone restores a flipped byte silently. Nothing is unpickled: Orbax stores arrays with
TensorStore and the rest is JSON. In a multi-process job every process calls ``save`` and
``restore`` (Orbax coordinates the writes); process 0 writes the manifest and deletes old steps.

    ckpt.save("runs/x/checkpoints", state, config=config)   # step from state.step
    state = ckpt.restore("runs/x/checkpoints", like=state)  # the newest checkpoint
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.files import write_atomic

FILES_MANIFEST = "jaxnet_files.json"
FORMAT = 1
_SHOWN = 8  # differing paths listed in a mismatch error


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, or does not fit the state it is restored into."""


# ---------------------------------------------------------------------------------------------
# The state as named arrays


def path_name(path) -> str:
    """A pytree key path as a dotted name: ``params.fc1.kernel``, ``opt_state.0.mu.fc1.kernel``."""
    def one(key):
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return ".".join(one(k) for k in path)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaves(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``([(dotted path, leaf), ...], treedef)``; paths must be unique."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(path_name(path) or "value", leaf) for path, leaf in with_paths]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"the state has several leaves named {dup[:_SHOWN]}: rename them")
    return named, treedef


def _describe(leaf) -> dict:
    """``{"shape", "dtype"}`` of what is stored for ``leaf`` (a PRNG key: its key data, and impl)."""
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return {"shape": list(data.shape), "dtype": str(data.dtype), "key_impl": str(jax.random.key_impl(leaf))}
    return {"shape": list(np.shape(leaf)), "dtype": str(jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)}


def _host_array(leaf) -> np.ndarray:
    """The whole array on this host (gathered from the other processes when they hold parts)."""
    from jaxnet.parallel import fetch

    return fetch(jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def _sync(name: str) -> None:
    """Every process waits here for the others (one process: nothing)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def array_hash(a: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order (shape and dtype are recorded beside it)."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _fmt(entry: dict | None) -> str:
    return "absent" if entry is None else f"{entry['dtype']}{entry['shape']}"


# ---------------------------------------------------------------------------------------------
# Files: hashes, the atomic manifest, listing


def _file_hash(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(step_dir: pathlib.Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != FILES_MANIFEST):
        files[str(path.relative_to(step_dir))] = {"size": path.stat().st_size, "sha256": _file_hash(path)}
    return files


def steps(directory) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, oldest first (not verified)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / FILES_MANIFEST).is_file())


def latest_step(directory) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None (not verified: ``restore``
    checks it)."""
    found = steps(directory)
    return found[-1] if found else None


def _manager(directory: pathlib.Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    # One folder per array (no OCDBT): a damaged file's path names the array it holds.
    handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _remove(step_dir: pathlib.Path) -> None:
    """Un-marks the checkpoint first, so a crash mid-delete leaves no half folder that claims to be one."""
    (step_dir / FILES_MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(step_dir, ignore_errors=True)


def _prune(directory: pathlib.Path, keep: int | None) -> None:
    """Keeps the newest ``keep`` complete checkpoints; removes incomplete step folders older than
    the newest complete one (a write that was killed after Orbax's commit)."""
    complete = steps(directory)
    if not complete:
        return
    newest = complete[-1]
    for p in directory.iterdir():
        if p.name.isdigit() and int(p.name) < newest and not (p / FILES_MANIFEST).is_file():
            _remove(p)
    if keep is not None:
        for step in complete[:-keep] if keep > 0 else complete:
            _remove(directory / str(step))


# ---------------------------------------------------------------------------------------------
# Configs as JSON


def config_to_json(config) -> Any:
    """A config (dataclass, dict, ...) as plain JSON values: dtypes and functions by name, paths and
    other objects as strings, tuples as lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {str(k): config_to_json(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_json(v) for v in config]
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    if isinstance(config, (np.generic,)):
        return config.item()
    if isinstance(config, type) or hasattr(config, "kind"):  # a dtype
        try:
            return np.dtype(config).name
        except TypeError:
            pass
    if callable(config) and hasattr(config, "__qualname__"):  # by name: its str() holds an address
        return f"{config.__module__}.{config.__qualname__}"
    return str(config)


def config_differences(saved, given) -> list[str]:
    """``"key: saved X, given Y"`` for every leaf where two JSON configs differ (dotted keys)."""
    out: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path or 'config'}: saved {a!r}, given {b!r}")

    walk(saved, given, "")
    return out


# ---------------------------------------------------------------------------------------------
# save / restore


class _QuietMerge(logging.Filter):
    """Drops Orbax's log line, at every save without OCDBT, that there is nothing to merge."""

    def filter(self, record):
        return "Skipping merge of OCDBT" not in record.getMessage()


def save(directory, state, *, config=None, keep: int | None = None) -> pathlib.Path:
    """Writes ``state`` as the checkpoint of step ``int(state.step)``; returns its folder.

    Args:
      directory: the run's checkpoint folder (created if missing).
      state: a ``TrainState`` (any pytree of arrays with a ``step`` works).
      config: the run's config (dataclass or dict), saved as JSON beside the arrays.
      keep: keep only this many newest checkpoints (None: all).

    Saving a step that already has a checkpoint is a no-op when the arrays are the same and a
    ``CheckpointError`` when they differ (a checkpoint is never overwritten).
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    step = int(state.step)
    named, _ = _leaves(state)
    arrays, entries = {}, []
    for name, leaf in named:
        a = _host_array(leaf)
        arrays[name] = a
        entries.append({"name": name, **_describe(leaf), "sha256": array_hash(a)})
    step_dir = directory / str(step)
    if (step_dir / FILES_MANIFEST).is_file():
        saved = _read_meta(directory, step)
        if saved.get("arrays") == entries:
            return step_dir
        raise CheckpointError(f"{step_dir} already holds a different checkpoint of step {step}; "
                              f"remove it or save into another directory")
    if step_dir.exists() and jax.process_index() == 0:  # Orbax committed it, the run died before the manifest
        shutil.rmtree(step_dir)
    _sync(f"jaxnet_checkpoint_clear_{step}")
    meta = {"format": FORMAT, "step": step, "jax": jax.__version__, "arrays": entries}
    items = {"state": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(meta)}
    if config is not None:
        items["config"] = ocp.args.JsonSave(config_to_json(config))
    absl_log = logging.getLogger("absl")
    if not any(isinstance(f, _QuietMerge) for f in absl_log.filters):
        absl_log.addFilter(_QuietMerge())
    with _manager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
    if jax.process_index() == 0:  # one writer of the manifest and the deletions
        write_atomic(step_dir / FILES_MANIFEST,
                      json.dumps({"format": FORMAT, "step": step, "files": _hash_files(step_dir)}, indent=1))
        _prune(directory, keep)
    _sync(f"jaxnet_checkpoint_done_{step}")
    return step_dir


def _read_json(path: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is not readable JSON ({e})") from None


def _read_meta(directory: pathlib.Path, step: int) -> dict:
    return _read_json(directory / str(step) / "meta" / "metadata", f"checkpoint step {step}")


def verify_files(directory, step: int) -> list[str]:
    """Problems with the files of one checkpoint against its manifest (empty list: all intact)."""
    step_dir = pathlib.Path(directory) / str(step)
    manifest = _read_json(step_dir / FILES_MANIFEST, f"checkpoint step {step}")
    problems = []
    for rel, want in manifest["files"].items():
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{rel} has {size} bytes, {want['size']} were written (truncated or altered)")
        elif _file_hash(path) != want["sha256"]:
            problems.append(f"{rel} does not match the SHA-256 recorded at save (altered)")
    return problems


def load_config(directory, *, step: int | None = None) -> Any:
    """The config saved with a checkpoint (JSON values), or None when it was saved without one."""
    directory = pathlib.Path(directory)
    step = _resolve_step(directory, step)
    path = directory / str(step) / "config" / "metadata"
    return _read_json(path, f"checkpoint step {step}") if path.exists() else None


def _resolve_step(directory: pathlib.Path, step: int | None) -> int:
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory} (no <step>/{FILES_MANIFEST})")
    elif not (directory / str(step) / FILES_MANIFEST).is_file():
        raise CheckpointError(f"no checkpoint of step {step} in {directory}; there are: {steps(directory)}")
    return step


def _restore_arrays(directory: pathlib.Path, step: int, entries: list[dict], shardings: dict) -> dict:
    import orbax.checkpoint as ocp

    target = {e["name"]: jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]),
                                              sharding=shardings.get(e["name"])) for e in entries}
    with _manager(directory) as manager:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return dict(out["state"])


def _hash_mismatches(arrays: dict, entries: list[dict]) -> list[str]:
    return [e["name"] for e in entries if array_hash(_host_array(arrays[e["name"]])) != e["sha256"]]


def restore(directory, like, *, step: int | None = None):
    """Reads a checkpoint back into a state shaped like ``like``.

    Args:
      directory: the run's checkpoint folder.
      like: a state of the same model and optimiser (e.g. a fresh ``TrainState.create``); it gives
        the tree structure, the static parts (model, optimiser) and, for ``jax.Array`` leaves,
        where the arrays go (their shardings). Its values are not used.
      step: which checkpoint (default: the newest complete one).

    Returns:
      A state like ``like`` holding the checkpoint's arrays.

    Raises:
      CheckpointError: no checkpoint; a file missing, truncated or altered (naming the files, and
        the arrays whose content no longer matches); a tree whose paths, shapes or dtypes differ
        from the checkpoint's (listing the first differing paths with both). Nothing is loaded
        into the state in any of these cases.
    """
    directory = pathlib.Path(directory).absolute()
    step = _resolve_step(directory, step)
    where = f"checkpoint {directory / str(step)}"
    problems = verify_files(directory, step)
    if problems:
        arrays = sorted({p.split("/")[1] for p in problems if p.startswith("state/") and p.count("/") >= 2})
        reach = f"; arrays affected: {', '.join(arrays)}" if arrays else ""
        raise CheckpointError(f"{where} is damaged: " + "; ".join(problems[:_SHOWN]) + reach)
    meta = _read_meta(directory, step)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {meta.get('format')!r}; this jaxnet reads format {FORMAT}")

    named, treedef = _leaves(like)
    saved = {e["name"]: e for e in meta["arrays"]}
    wanted = {name: _describe(leaf) for name, leaf in named}
    differ = [f"{n}: checkpoint {_fmt(saved[n])}, model {_fmt(wanted[n])}" for n in wanted
              if n in saved and any(saved[n].get(k) != wanted[n].get(k) for k in ("shape", "dtype", "key_impl"))]
    model_only = [f"{n}: checkpoint absent, model {_fmt(wanted[n])}" for n in wanted if n not in saved]
    saved_only = [f"{n}: checkpoint {_fmt(saved[n])}, model absent" for n in saved if n not in wanted]
    if differ or model_only or saved_only:
        lines = []
        for group in (differ, model_only, saved_only):
            lines += group[:_SHOWN] + ([f"... and {len(group) - _SHOWN} more like it"] if len(group) > _SHOWN else [])
        total = len(differ) + len(model_only) + len(saved_only)
        raise CheckpointError(f"{where} does not fit the state it is restored into ({total} arrays differ; "
                              f"nothing was loaded):\n  " + "\n  ".join(lines))

    shardings = {name: leaf.sharding for name, leaf in named
                 if isinstance(leaf, jax.Array) and not _is_key(leaf)}
    try:
        arrays = _restore_arrays(directory, step, meta["arrays"], shardings)
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        raise CheckpointError(f"{where} could not be read: {type(e).__name__}: {str(e)[:500]}") from e
    bad = _hash_mismatches(arrays, meta["arrays"])
    if bad:
        raise CheckpointError(f"{where}: arrays read back differ from those saved (SHA-256): {', '.join(bad[:_SHOWN])}")
    leaves = []
    for name, leaf in named:
        a = arrays[name]
        if _is_key(leaf):
            a = jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(leaf))
        elif isinstance(leaf, jax.Array):
            a = jax.device_put(a, leaf.sharding)
        else:
            a = np.asarray(a)
        leaves.append(a)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------
# What the training loops use


def run_options(workdir, *, checkpoint_every: int | None, resume: bool = False, config=None) -> dict:
    """``fit`` / ``fit_stream`` keywords that checkpoint a run into ``<workdir>/checkpoints``.

    ``checkpoint_every``: steps between checkpoints; 0 or None with ``resume=False``: no
    checkpoints (``{}``), None with ``resume``: only at the end and on a signal.
    """
    if not checkpoint_every and not resume:
        return {}
    if workdir is None:
        raise ValueError(f"checkpoint_every={checkpoint_every}, resume={resume} need a workdir to hold the checkpoints")
    return {"checkpoint_dir": pathlib.Path(workdir) / "checkpoints", "checkpoint_every": checkpoint_every or None,
            "resume": resume, "config": config}



def open_for_run(state, *, checkpoint_dir, checkpoint_every: int | None, keep: int | None, resume: bool,
                 config=None):
    """``(checkpointer or None, state)`` for a training loop: what ``fit`` and ``fit_stream`` do
    with their checkpoint keywords (``state`` replaced by the newest good checkpoint on ``resume``)."""
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir: the folder to resume from")
        return None, state
    ckpt = Checkpointer(checkpoint_dir, every=checkpoint_every, keep=keep, config=config)
    return ckpt, ckpt.resume(state) if resume else state


class Checkpointer:
    """Checkpoints for a training loop: every ``every`` steps, at the end, and on SIGTERM/SIGINT.

    Used as a context manager around the loop: inside it, SIGTERM and SIGINT only set
    ``interrupted``; the loop then calls ``save`` at the step it reached and ``exit_if_interrupted``,
    which re-delivers the signal with the previous handlers back in place (so the process ends as
    it would have, with the checkpoint written).

    Args:
      directory: the checkpoint folder.
      every: steps between checkpoints (None: only at the end and on a signal).
      keep: how many newest checkpoints to keep.
      config: the run's config, saved with each checkpoint and compared on resume.
    """

    def __init__(self, directory, *, every: int | None, keep: int | None, config=None):
        if every is not None and every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.directory = pathlib.Path(directory)
        self.every, self.keep, self.config = every, keep, config
        self.interrupted: int | None = None
        self.saved: list[int] = []
        self.save_s: list[float] = []
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal stays ignored
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _on_signal(self, signum, frame):
        del frame
        self.interrupted = signum

    def steps_to_next(self, step: int) -> int | None:
        """Updates from ``step`` to the next multiple of ``every`` (None without ``every``)."""
        return None if self.every is None else self.every - step % self.every

    def due(self, step: int) -> bool:
        """Whether to save at ``step``: a multiple of ``every``, or a signal arrived."""
        return self.interrupted is not None or (self.every is not None and step > 0 and step % self.every == 0)

    def save(self, state) -> None:
        t0 = time.perf_counter()
        save(self.directory, state, config=self.config, keep=self.keep)
        self.save_s.append(time.perf_counter() - t0)
        self.saved.append(int(state.step))

    def exit_if_interrupted(self) -> None:
        """After a signal: handlers back as they were, then the signal again (default: the process
        ends; SIGINT under Python's handler: ``KeyboardInterrupt``)."""
        if self.interrupted is not None:
            signum, self.interrupted = self.interrupted, None
            self.__exit__(None, None, None)
            signal.raise_signal(signum)

    def resume(self, like):
        """The newest checkpoint that verifies, restored like ``like``; ``like`` itself when there
        is none. A checkpoint that fails is skipped with a warning naming it and why; a config that
        differs from this run's raises ``CheckpointError`` naming the keys."""
        for step in reversed(steps(self.directory)):
            try:
                state = restore(self.directory, like, step=step)
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint step {step}: {e}", RuntimeWarning, stacklevel=3)
                continue
            if self.config is not None:
                saved = load_config(self.directory, step=step)
                diffs = config_differences(saved, config_to_json(self.config)) if saved is not None else []
                if diffs:
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(step)} was written with another config; resuming "
                        f"would mix two runs. Differences:\n  " + "\n  ".join(diffs[:_SHOWN]))
            return state
        return like


__all__ = ["CheckpointError", "Checkpointer", "array_hash", "config_differences", "config_to_json",
           "latest_step", "load_config", "open_for_run", "path_name", "restore", "run_options", "save", "steps",
           "verify_files"]
