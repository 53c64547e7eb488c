"""Meshes and shardings: data, fully-sharded and tensor parallelism on ``jax.sharding``.

    mesh = make_mesh("data=2,model=2")                 # over jax.make_mesh; None: all devices on data
    layout = Layout.for_state(state, mesh, "fsdp+tp")  # where every array of a TrainState goes
    state = layout.place(state)                        # jax.device_put onto the mesh

Parameters get their shardings from the logical axis names their layers give them
(``jaxnet.nn.named_init``: a ``FusedDense`` kernel is ``("embed", "mlp")`` or ``("mlp",
"embed")``, attention ``("embed", "heads")``, embeddings ``("vocab", "embed")``) and one rule
table per strategy (``RULES``), the logical-axis-rules pattern of Flax and MaxText:

- ``"dp"``: parameters replicated, the batch split over ``data``;
- ``"fsdp"``: parameters and optimiser state split over ``data`` (on their first named dimension
  that divides), gathered where a layer needs them; the batch split over ``data``;
- ``"tp"``: ``mlp`` and ``heads`` dimensions split over ``model`` (a layer's outputs, then the next
  layer's inputs: one all-reduce per pair), the batch split over ``data`` if the mesh has it;
- ``"fsdp+tp"``: both.

A dimension that does not divide by its mesh axis stays whole; unnamed parameters are replicated.
XLA's partitioner (GSPMD/Shardy) inserts the collectives.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AXES = ("data", "model")
STRATEGIES = ("dp", "fsdp", "tp", "fsdp+tp")
# Logical axis name -> mesh axis, per strategy; Flax uses each mesh axis at most once per array,
# taking the first rule that applies to each dimension in order.
_FSDP = (("embed", "data"), ("mlp", "data"), ("heads", "data"), ("vocab", "data"))
_TP = (("mlp", "model"), ("heads", "model"))
RULES: dict[str, tuple[tuple[str, str], ...]] = {"dp": (), "fsdp": _FSDP, "tp": _TP, "fsdp+tp": _TP + _FSDP}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 120) -> int:
    """Joins this process to a multi-process JAX job (``jax.distributed.initialize``).

    Arguments default to ``JAXNET_COORDINATOR`` (``host:port`` of process 0),
    ``JAXNET_NUM_PROCESSES`` and ``JAXNET_PROCESS_ID``, which ``python -m jaxnet.launch`` sets;
    without them (one process) nothing happens. On the CPU the collectives go over gloo. Call it
    before JAX runs anything (every experiment's ``prepare_process`` does). Returns this
    process's index.

    Raises:
      ValueError: some of the three given without the others, or an id out of range.
    """
    import os

    coordinator = coordinator or os.environ.get("JAXNET_COORDINATOR")
    num = num_processes if num_processes is not None else os.environ.get("JAXNET_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("JAXNET_PROCESS_ID")
    if coordinator is None and num is None and pid is None:
        return 0
    if coordinator is None or num is None or pid is None:
        raise ValueError(f"a multi-process job needs the coordinator, the number of processes and this process's id "
                         f"(JAXNET_COORDINATOR, JAXNET_NUM_PROCESSES, JAXNET_PROCESS_ID); got {coordinator!r}, "
                         f"{num!r}, {pid!r}")
    num, pid = int(num), int(pid)
    if not 0 <= pid < num:
        raise ValueError(f"process id {pid} is not in [0, {num})")
    if jax.distributed.is_initialized():
        return jax.process_index()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                               initialization_timeout=timeout_s)
    _exit_on_uncaught_exception()
    return jax.process_index()


def _exit_on_uncaught_exception() -> None:
    """Makes an uncaught exception end this process at once (status 1, after the traceback):
    otherwise it would wait in JAX's shutdown barrier for peers blocked in a collective, the
    launcher would never see it exit, and the job would hang."""
    import os
    import sys

    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def is_main_process() -> bool:
    """Whether this process writes logs, plots, checkpoints' manifests and results (process 0)."""
    return jax.process_index() == 0


def parse_mesh_spec(spec: str | None, num_devices: int | None) -> dict[str, int]:
    """``"data=2,model=2"`` -> ``{"data": 2, "model": 2}``; None -> ``{"data": num_devices}``.
    ``num_devices=None`` skips the check that the sizes multiply to the device count.

    Raises:
      ValueError: an unknown axis name, a size below 1, a repeated axis, or sizes whose product
        is not ``num_devices``.
    """
    if spec is None or not spec.strip():
        if num_devices is None:
            raise ValueError("an empty mesh spec needs the device count")
        return {"data": num_devices}
    shape: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or name not in AXES or not size.strip().isdigit() or int(size) < 1 or name in shape:
            raise ValueError(f"mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES} "
                             f"(each once) and SIZE >= 1, e.g. 'data=4' or 'data=2,model=2'; bad part {part!r}")
        shape[name] = int(size)
    if num_devices is not None and math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} has {math.prod(shape.values())} devices; this process sees "
                         f"{num_devices} ({jax.devices()[0].platform}); on the CPU, JAX_NUM_CPU_DEVICES=N "
                         f"makes N devices")
    return shape


def make_mesh(spec: str | None = None, *, devices=None) -> jax.sharding.Mesh:
    """A mesh over ``devices`` (default: all of them) from a spec like ``"data=4"`` or
    ``"data=2,model=2"``; None puts every device on ``data``. Axes are ``Auto``: XLA propagates
    shardings and inserts the collectives."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def run_info(mesh, strategy: str, shard: "DataShard | None" = None) -> dict:
    """What a result records of a sharded run: ``{"mesh": "data=2,model=2", "strategy": ...,
    "devices": 4}`` and, given the run's ``shard`` (``process_shard``), ``"process_local"`` and
    ``"data_split"`` (why) (``{}`` without a mesh)."""
    if mesh is None:
        return {}
    spec = ",".join(f"{name}={size}" for name, size in mesh.shape.items())
    return {"mesh": spec, "strategy": strategy, "devices": int(mesh.size), **(shard.info() if shard else {})}


class DataShard(NamedTuple):
    """What ``process_shard`` returns: the data this process passes to ``fit`` / ``fit_stream``,
    the ``process_local`` argument that goes with them, and why (for the run's result)."""

    data: Any
    process_local: bool
    reason: str

    def info(self) -> dict:
        """``{"process_local": bool, "data_split": reason}``, for a run's result."""
        return {"process_local": self.process_local, "data_split": self.reason}


def process_shard(data, mesh, *, name: str = "data") -> DataShard:
    """This process's rows of every array in ``data``, for ``fit(..., process_local=True)``.

    ``data`` is a pytree of arrays ``[n_i, ...]`` holding all their rows (``(x, y)``,
    ``{"train": (x, y), "val": (x, y)}``, a token stream ``[N]`` for ``fit_stream``); every
    process passes the same. ``NamedSharding(mesh, P("data"))`` gives the rows of data position
    ``p`` of ``D`` to the devices there, rows ``[p n/D, (p + 1) n/D)``; each array is cut to the
    positions this process's devices hold, in order (on a mesh from ``make_mesh``: process ``i``
    of ``P`` keeps rows ``[i n/P, (i + 1) n/P)``), so the global array ``fit`` builds from the
    processes' parts is the original one, row for row, and training matches one process.

    When that cannot be done, ``data`` comes back unchanged with ``process_local=False`` (every
    process holds all rows, as without this call) and the reason: no mesh, one process, no
    ``data`` axis across the processes, an array whose rows do not divide by ``D``, or processes
    that share data positions (e.g. ``model`` across processes).

    Raises:
      ValueError: ``data`` has no arrays, or one without a row axis (naming ``name``).
    """
    leaves = jax.tree.leaves(data)
    if not leaves or any(np.ndim(a) == 0 for a in leaves):
        raise ValueError(f"process_shard: {name} must hold arrays with a row axis; got "
                         f"{[np.shape(a) for a in leaves][:4]}")
    whole = lambda why: DataShard(data, False, f"{why}: every process holds all rows")  # noqa: E731
    if mesh is None:
        return DataShard(data, False, "no mesh: one device holds all rows")
    owners = np.vectorize(lambda d: d.process_index, otypes=[int])(np.asarray(mesh.devices))
    processes = len(set(owners.flat))
    if processes == 1:
        return DataShard(data, False, "one process: it holds all rows")
    spec = ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    if mesh.shape.get("data", 1) == 1:
        return whole(f"the mesh {spec} has no data axis across its {processes} processes")
    # Per data position, the processes whose devices sit there: each must have exactly one, and
    # every process the same number of positions, or the processes' parts overlap or differ.
    by_position = np.moveaxis(owners, list(mesh.axis_names).index("data"), 0).reshape(mesh.shape["data"], -1)
    position_owner = [set(row) for row in by_position.tolist()]
    held = collections.Counter(min(o) for o in position_owner)
    mine = [p for p, o in enumerate(position_owner) if o == {jax.process_index()}]
    if any(len(o) > 1 for o in position_owner) or len(set(held.values())) != 1 or not mine:
        return whole(f"the processes share or unevenly hold the data positions of the mesh {spec}")
    positions = len(position_owner)
    for a in leaves:
        if np.shape(a)[0] % positions:
            return whole(f"{name}: {np.shape(a)[0]} rows do not divide over the mesh's data axis (size "
                         f"{positions}, on {processes} processes)")

    def cut(a):
        block = np.shape(a)[0] // positions
        if mine == list(range(mine[0], mine[-1] + 1)):  # contiguous: a view, not a copy
            return a[mine[0] * block:(mine[-1] + 1) * block]
        return np.concatenate([a[p * block:(p + 1) * block] for p in mine])

    return DataShard(jax.tree.map(cut, data), True,
                     f"{name}: each of {processes} processes passes only its own 1/{processes} of the rows")


def logical_specs(model: nn.Module, sample_x) -> Any:
    """The params pytree of ``model`` with a ``PartitionSpec`` of logical names per parameter
    (``PartitionSpec()`` for unnamed ones), from an abstract ``init`` (nothing is allocated)."""
    from jaxnet.nn import logical_axes
    from jaxnet.train.step import mode_kwargs

    with logical_axes():
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_x, **mode_kwargs(model, False)))
    return nn.get_partition_spec(abstract)["params"]


def _fit(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """``spec`` without the mesh axes that do not divide their dimension (those stay whole)."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axis if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def mesh_spec(names, shape, mesh, strategy: str) -> PartitionSpec:
    """The mesh axes of an array whose dimensions have the logical ``names`` (None: unnamed), by
    ``strategy``'s rules; a mesh axis that does not divide its dimension is dropped. No names:
    replicated (``PartitionSpec()``)."""
    names = tuple(names)
    if not names:
        return PartitionSpec()
    rules = [(name, axis) for name, axis in RULES[strategy] if axis in mesh.shape]
    return _fit(nn.logical_to_mesh_axes(names, rules), shape, mesh)


def param_shardings(params, specs, mesh, strategy: str):
    """NamedShardings for ``params`` from their logical ``specs`` under ``strategy``'s rules."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return jax.tree.map(lambda p, logical: NamedSharding(mesh, mesh_spec(logical, np.shape(p), mesh, strategy)),
                        params, specs)


_ACTIVE = contextvars.ContextVar("jaxnet_active_layout", default=None)


@contextlib.contextmanager
def active(layout: "Layout | None"):
    """While tracing a step inside this context, ``FusedDense`` layers with a custom kernel
    backend (numba, pallas) run ``sharded_dense``: the kernel on each device's block."""
    token = _ACTIVE.set(layout)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_layout() -> "Layout | None":
    """The layout of ``active``, or None."""
    return _ACTIVE.get()


def batch_split(x, layout: "Layout"):
    """Inside a step: activations ``x: [B, ...]`` split over ``data`` on B (other dimensions left
    to XLA), so that a weight split over ``data`` (fsdp) does not pull the batch after it."""
    data = layout.mesh.shape.get("data", 1)
    if data == 1 or x.ndim < 2 or x.shape[0] % data:
        return x
    spec = PartitionSpec("data", *([PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def gathered(param, axes, layout: "Layout"):
    """Inside a step: ``param`` (named ``axes``) with its ``data`` split undone, the rest kept:
    fsdp gathers each weight where a layer uses it, instead of leaving XLA to move activations."""
    if "data" not in layout.mesh.shape or not any(axis == "data" for _, axis in RULES[layout.strategy]):
        return param
    spec = mesh_spec(axes, param.shape, layout.mesh, layout.strategy)
    kept = PartitionSpec(*(None if axis == "data" else axis for axis in spec))
    return jax.lax.with_sharding_constraint(param, NamedSharding(layout.mesh, kept))


def sharded_dense(x, kernel, bias, *, axes, activation: str, backend: str, layout: "Layout"):
    """``kernels.fused_dense`` on each device's block inside ``jax.shard_map``, collectives explicit.

    ``x: [B, ..., K]``, ``kernel: [K, N]`` named ``axes`` (``FusedDense.axes``), ``bias: [N]``.
    The kernel's mesh axes come from the layout's rules: a ``data`` dimension (fsdp) is gathered
    with ``all_gather`` before use; with N split over ``model`` (column-parallel) each device
    computes its columns; with K split over ``model`` (row-parallel) each computes a partial
    ``x @ kernel`` that a ``psum`` over ``model`` completes, and the bias and activation follow
    the sum. The batch (first axis) is split over ``data`` when it divides. Gradients come from
    shard_map's own transposes (``all_gather`` -> ``psum_scatter``, replicated inputs summed).
    """
    import kernels
    from kernels.activations import get as get_activation

    mesh = layout.mesh
    k_spec = mesh_spec(axes, kernel.shape, mesh, layout.strategy)
    k_in, k_out = (tuple(k_spec) + (None, None))[:2]
    data = mesh.shape.get("data", 1)
    batch_axis = "data" if data > 1 and x.ndim > 1 and x.shape[0] % data == 0 else None
    x_spec = PartitionSpec(batch_axis, *([None] * (x.ndim - 2)), k_in if k_in == "model" else None)
    y_spec = PartitionSpec(batch_axis, *([None] * (x.ndim - 2)), k_out if k_out == "model" else None)
    b_spec = PartitionSpec(k_out)

    def gather(a, spec):
        for dim, axis in enumerate(spec):
            if axis == "data":
                a = jax.lax.all_gather(a, "data", axis=dim, tiled=True)
        return a

    def body(x, w, b):
        w = gather(w, k_spec)
        b = None if b is None else gather(b, b_spec)
        if k_in == "model":  # row-parallel: partial sums, then bias and activation on the total
            z = jax.lax.psum(kernels.fused_dense(x, w, None, activation="identity", backend=backend), "model")
            return get_activation(activation).fn(z if b is None else z + b)
        return kernels.fused_dense(x, w, b, activation=activation, backend=backend)

    # Pallas calls do not declare how their outputs vary over the mesh axes; without that check,
    # shard_map's transpose sums the cotangents of replicated inputs conservatively (still exact).
    check = backend != "pallas"
    if bias is None:
        return jax.shard_map(lambda x, w: body(x, w, None), mesh=mesh, in_specs=(x_spec, k_spec),
                             out_specs=y_spec, check_vma=check)(x, kernel)
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, k_spec, b_spec), out_specs=y_spec,
                         check_vma=check)(x, kernel, bias)


def put(array, sharding: NamedSharding):
    """``array`` laid out by ``sharding``; across several processes too, where each process builds
    its own devices' blocks from its copy (every process must hold the same values)."""
    if sharding.is_fully_addressable:
        return jax.device_put(array, sharding)
    if isinstance(array, jax.Array) and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        data = put(jax.random.key_data(array), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(array))
    host = np.asarray(jax.device_get(array))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(array) -> np.ndarray:
    """``array`` whole on this host: gathered from the other processes when they hold parts of it
    (every process must call it), else copied from the devices. The inverse of ``put``."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where a ``TrainState``'s arrays and a batch go on a mesh under a strategy.

    Attributes:
      mesh, strategy: as given.
      state: a pytree like the ``TrainState`` with a ``NamedSharding`` per array.
    """

    mesh: jax.sharding.Mesh
    strategy: str
    state: Any

    @classmethod
    def for_state(cls, state, mesh, strategy: str = "dp", sample_x=None) -> "Layout":
        """The layout of ``state`` (a ``TrainState``); ``sample_x`` shows the model its input
        (default: inferred from the first parameter is not possible, so it is required for
        models that need it: pass a batch row)."""
        if sample_x is None:
            raise ValueError("Layout.for_state needs sample_x (one input row) to name the parameters' axes")
        specs = logical_specs(state.model, sample_x)
        params = param_shardings(state.params, specs, mesh, strategy)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt = optax.tree_map_params(state.tx, lambda _, sharding: sharding, state.opt_state, params,
                                    transform_non_params=lambda _: replicated)
        rep = lambda tree: jax.tree.map(lambda _: replicated, tree)  # noqa: E731
        shardings = state.replace(step=replicated, epoch=replicated, batch_in_epoch=replicated, params=params,
                                  model_state=rep(state.model_state), opt_state=opt, rng=replicated)
        return cls(mesh, strategy, shardings)

    @property
    def batch(self) -> NamedSharding:
        """Examples split over ``data`` (replicated when the mesh has no ``data`` axis)."""
        return NamedSharding(self.mesh, PartitionSpec("data" if "data" in self.mesh.shape else None))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def place(self, state):
        """``state`` on the mesh, in this layout's shardings."""
        return jax.tree.map(put, state, self.state)

    def replicate(self, tree, name: str = "data"):
        """Every array of ``tree`` whole on every device of the mesh (e.g. a training set; every
        process passes all of it)."""
        del name
        return jax.tree.map(lambda a: put(a, self.replicated), tree)

    def from_process_local(self, tree, name: str = "data"):
        """Each process's rows of every array in ``tree`` (``[n_local, ...]``, the same n_local in
        every process) as one array of ``n_local * processes`` rows split over ``data``, process
        0's rows first; each process reads only its own part.

        Raises:
          ValueError: the processes' row counts differ, or do not split over their devices on
            ``data``, naming ``name`` and the counts.
        """
        from jax.experimental import multihost_utils

        rows = int(jax.tree.leaves(tree)[0].shape[0])
        counts = np.asarray(multihost_utils.process_allgather(np.int64(rows))).reshape(-1)
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"{name}: the processes hold {counts.tolist()} rows; process_local needs the same "
                             f"number in each")
        local_data = sum(1 for d in self.mesh.local_devices) // max(1, self.mesh.size // self.mesh.shape.get("data", 1))
        if "data" not in self.mesh.shape or rows % max(1, local_data):
            raise ValueError(f"{name}: {rows} rows per process do not split over this process's {local_data} "
                             f"devices on the mesh's data axis ({dict(self.mesh.shape)})")
        sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
            sharding, np.asarray(a), (rows * len(counts), *np.shape(a)[1:])), tree)

    def constrain_state(self, state):
        """Inside ``jit``: the state kept in this layout (so donated buffers keep their sharding)."""
        return jax.lax.with_sharding_constraint(state, self.state)

    def constrain_batch(self, batch: dict) -> dict:
        """Inside ``jit``: every array of a batch split over ``data`` on its first axis (the
        examples), where that axis divides; a scalar or an indivisible axis stays replicated."""
        def one(a):
            data = self.mesh.shape.get("data", 1)
            spec = PartitionSpec("data") if a.ndim and a.shape[0] % data == 0 and data > 1 else PartitionSpec()
            return jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec))
        return jax.tree.map(one, batch)

    def wrap_step(self, step):
        """``step(state, batch, rng) -> (state, metrics)`` laid out on the mesh: the batch split
        over ``data``, the layers told the layout (fsdp gathers, custom kernels per block), the new
        state kept in this layout. What ``fit``, ``fit_stream`` and ``jaxnet plan`` run."""
        def sharded_step(state, batch, rng):
            with active(self):
                state, metrics = step(state, self.constrain_batch(batch), rng)
            return self.constrain_state(state), metrics

        return sharded_step

    def describe(self) -> dict[str, str]:
        """``{param path: "PartitionSpec(...)"}``: what each parameter's sharding is."""
        from jaxnet.train.loop import parameter_names

        leaves = jax.tree.leaves(self.state.params, is_leaf=lambda s: isinstance(s, NamedSharding))
        return {name: str(s.spec) for name, s in zip(parameter_names(self.state.params), leaves)}


__all__ = ["AXES", "DataShard", "Layout", "RULES", "STRATEGIES", "active", "active_layout", "batch_split", "fetch",
           "gathered", "initialize", "is_main_process", "logical_specs", "make_mesh", "mesh_spec", "param_shardings",
           "parse_mesh_spec", "process_shard", "put", "run_info", "sharded_dense"]
