"""The numba GEMMs' cache blocking (``kernels.numba_cpu.blocking``): derived from a machine
description with the cache-fit properties of its model, valid for any machine, carried to the
kernel as call attributes, correct in values and gradients with every blocking (the derived ones
and small ones that force many and partial blocks), and the tuned entry's keying, invalidation
and reset (``kernels.numba_cpu.tune``). Every test writes tuning files into its own ``tmp_path``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax._src import core  # trace_state_clean: whether a trace is active in this thread
from hypothesis import strategies as st

import kernels
from jaxnet.testing.tolerances import FusedDenseBounds
from kernels import machine, reference
from kernels.machine import Machine
from kernels.numba_cpu import backend, blocking, tune
from kernels.numba_cpu._kernels import MR, NR
from kernels.numba_cpu.blocking import PAGE, Blocking, derive, register_tile, tile_rows

AVX512 = frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"})
KIB, MIB = 1 << 10, 1 << 20
MACHINES = {
    "amd_epyc": Machine("AMD EPYC", AVX512 | {"avx512_bf16"}, cores=2, l1d=32 * KIB, l2=MIB, l3=32 * MIB),
    "intel_xeon": Machine("Intel Xeon", AVX512 | {"amx_tile"}, cores=2, l1d=48 * KIB, l2=2 * MIB, l3=105 * MIB),
    "avx2": Machine("AVX2 desktop", frozenset({"avx", "avx2", "fma"}), cores=4, l1d=32 * KIB, l2=256 * KIB,
                    l3=8 * MIB),
    "one_core": Machine("AMD EPYC", AVX512, cores=1, l1d=32 * KIB, l2=MIB, l3=32 * MIB),
}
MACHINES_ISA = sorted({m.isa for m in MACHINES.values()}, key=sorted)


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(machine.TUNING_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(blocking.ENV, "stored")  # tuning at first use: its own tests, with "tuned"
    blocking.chosen.cache_clear()
    yield tmp_path
    blocking.chosen.cache_clear()


def _assert_fits(b: Blocking, m: Machine, dtype: str):
    """The model's cache-fit properties (``blocking``'s module docstring), for the machine's tile."""
    rows32, nr = register_tile(m.vector_bits)
    s, mr = np.dtype(dtype).itemsize, tile_rows(dtype, rows32)
    assert b.validate(rows32) is b
    assert b.kc * (mr + nr) * s <= m.l1d - PAGE, "X strip + W micro-panel leave one L1 way free"
    assert (b.kc * s) % m.line == 0, "kc is whole cache lines"
    assert b.pg * b.kc * nr * s <= m.l2 // 2, "a block's packed panels fit half of L2"
    assert b.pmb % rows32 == 0 and b.pmb >= blocking.MIN_STRIPS * mr
    if b.pmb > blocking.MIN_STRIPS * mr:  # above the reuse floor: C and X blocks fit the other half
        assert b.pmb * (b.pg * nr + b.kc) * s <= m.l2 // 2
        assert b.pmb <= max(rows32, blocking.ROWS_SHARED // (2 * m.cores))
    assert 4 * b.lb * s <= m.l1d // 2 and b.nb * b.lb * s <= m.l2 // 2 and b.mb == b.nb
    if m.cores == 1:
        assert b.parallel_min_macs == blocking.NEVER


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MACHINES))
def test_derive_fits_the_caches(name, dtype):
    _assert_fits(derive(MACHINES[name], dtype), MACHINES[name], dtype)


def test_derive_follows_the_machine():
    amd, intel, avx2 = (derive(MACHINES[n]) for n in ("amd_epyc", "intel_xeon", "avx2"))
    # This project's 2-core EPYC: the constants measured good there, but kc (BLIS's L1 split,
    # 176; 512 before, measured alike: docs/benchmarks.md) and pg (the L2 half that kc leaves).
    assert (amd.pmb, amd.mb, amd.nb, amd.lb, amd.parallel_min_macs) == (64, 128, 128, 1024, 1 << 19)
    assert (amd.kc, amd.pg) == (176, 23)
    assert amd.dwt == intel.dwt == avx2.dwt == PAGE  # rows from which dW's strided reads share one L1 set
    assert intel.kc > amd.kc and intel.lb > amd.lb and intel.nb > amd.nb  # 48 KiB L1d, 2 MiB L2
    assert avx2.pg < amd.pg and avx2.nb < amd.nb  # 256 KiB L2
    # More cores: smaller row blocks to share, and a lower threshold for sharing at all.
    many = derive(dataclasses.replace(MACHINES["amd_epyc"], cores=16))
    assert many.pmb < amd.pmb and many.parallel_min_macs < amd.parallel_min_macs
    assert derive(MACHINES["one_core"]).pmb > amd.pmb


@given(l1d=st.sampled_from([8, 16, 24, 32, 48, 64, 80]).map(lambda k: k * KIB),
       l2=st.sampled_from([128, 256, 512, 1024, 1280, 2048, 4096]).map(lambda k: k * KIB),
       cores=st.integers(1, 256), line=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(["float32", "float64"]), isa=st.sampled_from([frozenset(), *MACHINES_ISA]))
def test_derive_is_valid_for_any_machine(l1d, l2, cores, line, dtype, isa):
    m = Machine("any", isa, cores=cores, l1d=l1d, l2=max(l2, l1d), l3=0, line=line)
    b = derive(m, dtype)
    rows32, nr = register_tile(m.vector_bits)
    if l1d - PAGE >= (tile_rows(dtype, rows32) + nr) * line and l2 >= 4 * l1d:  # room for the model's blocks
        _assert_fits(b, m, dtype)
    else:
        assert b.validate(rows32) is b


def test_derive_with_unknown_caches_and_bad_dtype():
    b = derive(Machine("unknown", frozenset(), cores=0, l1d=0, l2=0, l3=0))
    assert b.validate() is b and b.parallel_min_macs == blocking.NEVER
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        derive(MACHINES["amd_epyc"], "bfloat16")


@pytest.mark.parametrize("field, value", [("kc", 0), ("pg", -1), ("pmb", MR + MR // 2), ("lb", 2.5), ("nb", True),
                                          ("dwt", 0), ("parallel_min_macs", 1 << 63)])
def test_validate_names_the_bad_field(field, value):
    b = derive(MACHINES["amd_epyc"]).replace(**{field: value})
    with pytest.raises(ValueError, match=f"Blocking.{field} "):
        b.validate()


# --- The kernel with every blocking ---------------------------------------------------------
# Small blockings: many blocks, partial blocks on every side, odd gemm_nt blocks, several
# reduction passes; every problem shared with XLA's pool (parallel_min_macs = 1).
SMALL = [Blocking(kc=7, pg=1, pmb=8, mb=5, nb=3, lb=7, dwt=64, parallel_min_macs=1),
         Blocking(kc=64, pg=3, pmb=16, mb=4, nb=8, lb=32, dwt=1 << 40, parallel_min_macs=1)]
BLOCKINGS = {**{f"small{i}": b for i, b in enumerate(SMALL)},  # each machine's caches, the tile compiled here
             **{name: derive(m, tile=(MR, NR)) for name, m in MACHINES.items()}}
# (M, K, N, activation, values): packed panels with a partial last one, dX and dW as panel GEMMs;
# W read in place (M <= 32), dX by gemm_nt (M < 64, N >= 64); N < 16 (forward by gemm_nt, dW
# through dW.T); relu on integers (exact sums: ties, so the backward recomputes z).
SHAPES = [(70, 300, 100, "gelu", "normal"), (20, 200, 70, "silu", "normal"), (40, 50, 9, "tanh", "normal"),
          (130, 40, 33, "relu", "integers")]


def _problem(m, k, n, values, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if values == "integers":
        arrays = [rng.integers(-2, 3, s) for s in [(m, k), (k, n), (n,), (m, n)]]
    else:
        arrays = [rng.standard_normal(s) / np.sqrt(k if i == 1 else 1) for i, s in enumerate([(m, k), (k, n), (n,),
                                                                                             (m, n)])]
    return [jnp.asarray(a, dtype) for a in arrays]


def _check(blk, shape, dtype):
    m, k, n, act, values = shape
    x, w, b, dy = _problem(m, k, n, values, dtype)

    def run(impl):
        def f(x, w, b):
            return impl(x, w, b, activation=act)
        y, vjp = jax.vjp(f, x, w, b)
        return (y, *vjp(dy))

    with backend.use_blocking(blk) if blk else contextlib.nullcontext():  # None: blocking.chosen's
        got = jax.jit(lambda *a: run(lambda *a, **k: kernels.fused_dense(*a, **k, backend="numba")))(x, w, b)
    want = run(reference.fused_dense)
    bounds = FusedDenseBounds.from_inputs(np.asarray(x), np.asarray(w), np.asarray(b), act)
    tols = [bounds.forward(want[0]), *bounds.grads(dy, dict(zip("xwb", want[1:]))).values()]
    for name, g, r, tol in zip(["y", "dx", "dw", "db"], got, want, tols):
        err = np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))
        assert np.all(err <= tol), (name, shape, blk, float(err.max()))


@pytest.mark.parametrize("name", sorted(BLOCKINGS))
def test_kernel_matches_reference_with_every_blocking(name):
    for shape in SHAPES:
        _check(BLOCKINGS[name], shape, "float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dw_transposes_x_from_the_blockings_row_size(dtype):
    """dW from x transposed first (rows of 160 or 320 bytes >= dwt = 64; g has 520 >= 512
    columns) and from x.T read in place (dwt = 2^40), both against the reference."""
    shape = (36, 40, 520, "gelu", "normal")
    with jax.enable_x64(dtype == "float64"):
        for blk in SMALL:
            _check(blk, shape, dtype)


@pytest.mark.parametrize("blk", [SMALL[0], derive(MACHINES["intel_xeon"], "float64", (MR, NR))],
                         ids=["small0", "intel"])
def test_kernel_matches_reference_float64(blk):
    with jax.enable_x64(True):
        for shape in SHAPES[::3]:
            _check(blk, shape, "float64")


def test_blocking_travels_as_attributes():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 20))

    def hlo():  # a new function each time: traced afresh
        return jax.jit(lambda x, w: kernels.fused_dense(x, w, None, backend="numba")).lower(x, w).as_text()
    with backend.use_blocking(SMALL[0]):
        assert "kc = 7 : i64" in hlo() and "mb = 5 : i64" in hlo() and "share = 1 : i64" in hlo()
    default = backend.blocking("float32")
    assert default == derive(machine.describe()) and f"kc = {default.kc} : i64" in hlo()


def test_kernel_rejects_a_bad_blocking_attribute():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 20))
    attrs = {**SMALL[0].attributes(), "pmb": np.int64(MR + MR // 2)}
    target = backend._target("forward", "float32", "relu")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((4, 20), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"pmb a multiple of {MR}"):
        jax.block_until_ready(call(x, w, act=np.int64(1), share=np.int64(0), **attrs))


# --- The tuned entry ------------------------------------------------------------------------
def test_tuned_entry_is_used_and_keyed(monkeypatch, tmp_path):
    here = machine.describe()
    tuned = derive(here).replace(kc=256, pg=8)
    machine.TuningCache(blocking.CACHE_KIND).put({"float32": tuned.as_dict()})
    assert blocking.load("float32") == tuned and blocking.chosen("float32") == tuned
    assert blocking.load("float64") is None  # tuned for float32 only
    assert blocking.load("float32", dataclasses.replace(here, model="another CPU")) is None
    assert blocking.load("float32", dataclasses.replace(here, l2=here.l2 * 2)) is None
    monkeypatch.setenv(blocking.ENV, "derived")
    blocking.chosen.cache_clear()
    assert blocking.chosen("float32") == derive(here)
    monkeypatch.setattr(machine, "versions", lambda: {**{k: "0" for k in ("jaxnet", "jax", "jaxlib")}, "numba": "9"})
    assert blocking.load("float32") is None  # other versions: another key


@pytest.mark.parametrize("content", ["{not json", '{"key": 1, "value": 2}', "[1, 2]"])
def test_corrupted_entry_is_ignored(content):
    cache = machine.TuningCache(blocking.CACHE_KIND)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text(content)
    assert blocking.load("float32") is None and blocking.chosen("float32") == derive(machine.describe())


@pytest.mark.parametrize("entry", [{"kc": 0}, {"kc": 64, "pg": 1}, {**SMALL[0].as_dict(), "pmb": MR + MR // 2},
                                   {**SMALL[0].as_dict(), "extra": 1}, "kc=64"])
def test_invalid_entry_is_ignored(entry):
    machine.TuningCache(blocking.CACHE_KIND).put({"float32": entry})
    assert blocking.load("float32") is None


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv(blocking.ENV, "fastest")
    with pytest.raises(ValueError, match=blocking.ENV):
        blocking.chosen("float32")


def test_pick_keeps_the_derived_blocking_within_the_noise():
    blks = tune.candidates(derive(MACHINES["amd_epyc"]))
    assert blks[0] == derive(MACHINES["amd_epyc"]) and len(blks) == len(set(blks)) >= 5
    assert {b.dwt for b in blks} == {PAGE // 2, PAGE, 2 * PAGE}  # tune.SHAPES' float32 rows: 2 and 4 KiB
    shape = (512, 512, 512)
    times = [{shape: [1.0, 1.0, 1.0]} for _ in blks]
    times[2] = {shape: [0.98, 0.98, 0.98]}  # 2% better: within MIN_GAIN
    assert tune.pick(blks, times)[0] == 0
    times[3] = {shape: [0.9, 0.9, 0.9]}  # 10% better
    assert tune.pick(blks, times)[0] == 3
    times[0] = {shape: [0.8, 1.0, 1.2]}  # noisy derived timing: 10% is not enough
    assert tune.pick(blks, times)[0] == 0


def _fake_measure(winner: int, calls: list):
    """``tune.measure`` that runs nothing: candidate ``winner`` 20% faster than the rest (0: the
    derived blocking ties with every candidate), sharing 10% faster at every size."""
    def measure(blockings, shapes=((512, 512, 512),), **kw):
        assert core.trace_state_clean(), "tune.measure ran inside a caller's trace"
        calls.append(len(blockings))
        if shapes == tune.THRESHOLD_SHAPES:
            return [{s: [1.0 if i == 0 else 0.9] * 3 for s in shapes} for i in range(len(blockings))]
        return [{s: [0.8 if winner and i == winner else 1.0] * 3 for s in shapes} for i in range(len(blockings))]
    return measure


@pytest.mark.parametrize("winner", [0, 1], ids=["derived kept", "a neighbour won"])
def test_first_use_tunes_once_and_later_processes_read_it(monkeypatch, winner):
    base, calls = derive(machine.describe()), []
    monkeypatch.setattr(tune, "measure", _fake_measure(winner, calls))
    monkeypatch.setenv(blocking.ENV, "tuned")
    want = tune.candidates(base)[winner]
    got = backend.blocking("float32")
    assert got == want and blocking.load("float32") == want  # stored, the derived blocking too
    assert len(calls) == 2  # candidates, then the threads threshold
    blocking.chosen.cache_clear()  # as a new process: read, not measured
    assert blocking.chosen("float32") == want and len(calls) == 2
    # First met while tracing a caller's jit: measured outside the trace, then the call runs.
    tune.reset()
    blocking.chosen.cache_clear()
    x, w = jnp.ones((4, 8)), jnp.ones((8, 20))
    y = jax.jit(lambda x, w: kernels.fused_dense(x, w, None, backend="numba"))(x, w)
    np.testing.assert_allclose(y, np.full((4, 20), 8.0))
    assert len(calls) == 4 and blocking.load("float32") == want
    # "stored" and "derived" never measure.
    tune.reset()
    for policy in ("stored", "derived"):
        monkeypatch.setenv(blocking.ENV, policy)
        blocking.chosen.cache_clear()
        assert blocking.chosen("float32") == base and len(calls) == 4


def test_first_use_inside_a_jit_tunes_on_the_kernel(monkeypatch):
    """Not faked: the first numba call, met while tracing a jitted VJP, times two candidates
    and the threads threshold on the kernel (small shapes), uses and stores a valid blocking
    (at these tiny shapes sharing may win later than the model says, or nowhere: then it is only
    noted, for the next process to measure again) and returns the reference's values."""
    base = derive(machine.describe())
    monkeypatch.setattr(tune, "SHAPES", ((48, 40, 33),))
    monkeypatch.setattr(tune, "THRESHOLD_SHAPES", ((16, 16, 16), (32, 16, 16)))
    monkeypatch.setattr(tune, "candidates", lambda b: [b, b.replace(kc=max(b.kc // 2, 16))])
    monkeypatch.setenv(blocking.ENV, "tuned")
    _check(None, (20, 30, 70, "gelu", "normal"), "float32")  # the blocking in force: chosen() in the trace
    got = blocking.chosen("float32")
    assert got in (base.replace(parallel_min_macs=got.parallel_min_macs),
                   base.replace(kc=max(base.kc // 2, 16), parallel_min_macs=got.parallel_min_macs))
    stored, value = blocking.load("float32"), machine.TuningCache(blocking.CACHE_KIND).get()
    assert stored == got or (stored is None and value.get(tune._sighting_key("float32")) == got.parallel_min_macs)


# Two processes meet the first use at once; each would measure for a second and pick its own
# winner (candidate 1 or 2, by the parity of its pid). Prints what it runs.
_RACE = """
import os, sys, time
from kernels import autotune, machine, timing
from kernels.numba_cpu import backend, tune

def log_and_wait(name):
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()} {name}\\n")
    time.sleep(1.0)

winner = 1 + os.getpid() % 2
if sys.argv[1] == "blocking":
    def measure(blockings, shapes=tune.SHAPES, **kw):
        log_and_wait("measure")
        if [b.parallel_min_macs for b in blockings] == [tune.NEVER, 1]:  # the thread threshold: sharing wins
            # (a threshold above the model's would not be stored at once)
            return [{s: [t] * 3 for s in shapes} for t in (1.0, 0.5)]
        return [{s: [0.8 if i == winner else 1.0] * 3 for s in shapes} for i in range(len(blockings))]
    tune.measure = measure
    print(backend.blocking("float32").as_dict())
else:
    fast = ["numba", "xla"][winner - 1]
    def samples(samplers, repeats, warmup=0):
        log_and_wait("samples")
        return {name: [1.0 if name.startswith(fast) else 2.0] * repeats for name in samplers}
    timing.timed_call = lambda fn, args, **kw: (lambda: 0.0)
    timing.interleaved_samples = samples
    print(autotune.choose(64, 64, 64, "float32", "relu", ["xla", "numba"]))
"""


@pytest.mark.parametrize("what", ["blocking", "auto"])
def test_processes_meeting_the_first_use_at_once_measure_once(tmp_path, what):
    """The tuning cache's lock: one process measures, the other waits and reads its entry, so
    both run the same blocking (or backend)."""
    log = tmp_path / "measured.txt"
    env = {**os.environ, machine.TUNING_DIR_ENV: str(tmp_path / "tuning"), blocking.ENV: "tuned"}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, what, str(log)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    measured_by = {line.split()[0] for line in log.read_text().splitlines()}
    assert len(measured_by) == 1, log.read_text()
    assert outs[0][0] == outs[1][0], outs


def test_where_the_tuning_folder_cannot_be_written_the_tuned_blocking_is_used_and_a_warning_says_so(
        monkeypatch, tmp_path):
    blocked = tmp_path / "a file"  # the tuning folder's path is a file: nothing under it can be written
    blocked.write_text("")
    monkeypatch.setenv(machine.TUNING_DIR_ENV, str(blocked))
    monkeypatch.setenv(blocking.ENV, "tuned")
    monkeypatch.setattr(tune, "measure", _fake_measure(1, []))
    with pytest.warns(RuntimeWarning, match="cannot store nothing in"):
        assert machine.TuningCache(blocking.CACHE_KIND).store({}, "nothing") is False
    with pytest.warns(RuntimeWarning, match="cannot store kernels.numba_cpu.tune's blocking in .*a file"):
        got = blocking.chosen("float32")
    assert got == tune.candidates(derive(machine.describe()))[1] and blocking.load("float32") is None


@pytest.mark.parametrize("first, second", [(1, 5), (5, 3), (6, 6), (6, 2), (4, 0)],
                         ids=["1M then 16M", "16M then 4M", "never twice", "never then 2M", "8M then the model's"])
def test_a_threshold_above_the_models_is_stored_only_when_the_next_process_measures_too(monkeypatch, first, second):
    """A host that lends this VM's other vCPU elsewhere for a while makes sharing lose where it
    would win (docs/benchmarks.md): a threshold above the model's is used by the process that
    measured it and only noted; the next process measures again and stores the smaller of the
    two (and so does a tuning run over a stored entry). ``first`` and ``second``: the index of the
    threshold shape from which sharing wins in each process (6: at none, "never")."""
    two_cores = MACHINES["amd_epyc"]  # whatever this machine has: sharing is measured on 2 cores or more
    monkeypatch.setattr(tune, "describe", lambda: two_cores)
    macs = [math.prod(s) for s in tune.THRESHOLD_SHAPES]
    derived = derive(two_cores).parallel_min_macs
    assert derived <= macs[0] < macs[3]  # the model says sharing pays from the smallest shape timed

    def measure(wins_from):
        def fake(blockings, shapes=((512, 512, 512),), **kw):
            if shapes == tune.THRESHOLD_SHAPES:  # one thread, then shared
                return [{s: [1.0] * 3 for s in shapes},
                        {s: [0.9 if i >= wins_from else 1.2] * 3 for i, s in enumerate(shapes)}]
            return [{s: [1.0] * 3 for s in shapes} for _ in blockings]
        return fake

    def threshold(index):  # what pick_threshold makes of a win from shape ``index`` on
        return min(derived, macs[0]) if index == 0 else 2 * macs[-1] if index == len(macs) else macs[index]

    monkeypatch.setattr(tune, "measure", measure(first))
    one = tune.tune("float32", log=lambda *a: None)
    assert one["blocking"]["parallel_min_macs"] == threshold(first)  # this process runs what it measured
    assert one["stored"] is False and blocking.load("float32", two_cores) is None  # the next process tunes again
    monkeypatch.setattr(tune, "measure", measure(second))
    two = tune.tune("float32", log=lambda *a: None)
    want = min(threshold(first), threshold(second))
    assert two["stored"] is True and two["blocking"]["parallel_min_macs"] == want
    assert blocking.load("float32", two_cores).parallel_min_macs == want
    # Tuned again (the command, at will): the stored threshold counts as the measurement before.
    monkeypatch.setattr(tune, "measure", measure(first))
    assert tune.tune("float32", log=lambda *a: None)["blocking"]["parallel_min_macs"] == want
    assert blocking.load("float32", two_cores).parallel_min_macs == want
    # With nothing stored, the note gone: a sighting is a first one again.
    machine.TuningCache(blocking.CACHE_KIND, two_cores).path.unlink()
    assert tune.tune("float32", log=lambda *a: None)["stored"] is False and blocking.load("float32", two_cores) is None


def test_a_threshold_at_or_below_the_models_is_stored_at_once(monkeypatch):
    def fake(blockings, shapes=((512, 512, 512),), **kw):
        if shapes == tune.THRESHOLD_SHAPES:  # sharing wins at every shape
            return [{s: [1.0] * 3 for s in shapes}, {s: [0.5] * 3 for s in shapes}]
        return [{s: [1.0] * 3 for s in shapes} for _ in blockings]

    two_cores = MACHINES["amd_epyc"]
    monkeypatch.setattr(tune, "describe", lambda: two_cores)
    monkeypatch.setattr(tune, "measure", fake)
    assert tune.tune("float32", log=lambda *a: None)["stored"] is True
    assert blocking.load("float32", two_cores).parallel_min_macs == derive(two_cores).parallel_min_macs


def test_tune_stores_a_winner_and_reset_forgets_it(monkeypatch, capsys):
    base = derive(machine.describe())
    monkeypatch.setattr(tune, "measure", _fake_measure(1, []))
    summary = tune.tune("float32", log=lambda *a: None)
    # Sharing wins from the smallest shape on: the derived threshold (at most its 2^19) is kept.
    assert summary["choice"] == "tuned" and blocking.load("float32") == tune.candidates(base)[1]
    blocking.chosen.cache_clear()
    assert blocking.chosen("float32") == tune.candidates(base)[1]
    tune.main(["--reset"])
    assert "reset" in capsys.readouterr().out and blocking.load("float32") is None


def test_pick_threshold_takes_where_sharing_starts_to_win_for_good():
    shapes = tune.THRESHOLD_SHAPES
    macs = [math.prod(s) for s in shapes]
    single = {s: [1.0] * 3 for s in shapes}

    def shared(*ratios):
        return {s: [r] * 3 for s, r in zip(shapes, ratios)}
    assert macs == sorted(macs) and macs[0] == 1 << 19 and macs[-1] == 1 << 24
    assert tune.pick_threshold(single, shared(1.2, 1.1, 1.01, 0.9, 0.8, 0.6), 1 << 19) == macs[3]
    assert tune.pick_threshold(single, shared(0.9, 1.1, 0.95, 0.9, 0.8, 0.6), 1 << 19) == macs[2]  # a lone early win
    assert tune.pick_threshold(single, shared(0.9, 0.9, 0.9, 0.9, 0.9, 0.9), 1 << 18) == 1 << 18  # derived, lower
    assert tune.pick_threshold(single, shared(0.9, 0.9, 0.9, 0.9, 0.9, 0.9), 1 << 20) == macs[0]
    assert tune.pick_threshold(single, shared(1.2, 1.1, 1.0, 0.98, 1.0, 0.99), 1 << 19) == 2 * macs[-1]  # never
    assert tune.pick_threshold(single, shared(0.9, 0.9, 0.9, 0.9, 0.9, 1.0), 1 << 19) == 2 * macs[-1]


def test_measure_times_each_blocking_on_the_kernel():
    blks, shapes = [SMALL[0], derive(machine.describe())], ((48, 40, 33), (20, 30, 70))
    times = tune.measure(blks, shapes=shapes, repeats=3, warmup=0)
    assert [sorted(t) for t in times] == [sorted(shapes)] * 2
    assert all(len(ts) == 3 and min(ts) > 0 for t in times for ts in t.values())


def test_kernels_compile_for_full_width_vectors():
    """Every function of the package is compiled with ``_pipeline.Compiler``, whose functions carry
    LLVM's "prefer-vector-width"="512": LLVM tunes Intel's AVX-512 cores (Skylake-X to Sapphire
    Rapids, Rocket Lake) to prefer 256-bit vectors, which halved the GEMM's speed there. On a
    machine with AVX-512 the vectorised loop then runs in zmm registers."""
    import llvmlite.binding as llvm
    from numba import njit

    from kernels.numba_cpu import _handlers, _kernels, _pipeline, _quantized

    for options in (_kernels._OPTS, _kernels._STRICT, _quantized._OPTS):
        assert options["pipeline_class"] is _pipeline.Compiler
    kernels.fused_dense(jnp.ones((4, 3)), jnp.ones((3, 2)), backend="numba").block_until_ready()
    units = {key: cf._compiler.pipeline_class for key, cf in _handlers._COMPILED.items()}
    assert units and all(cls is _pipeline.Compiler for cls in units.values()), units

    def axpy(a, x, y):
        for i in range(x.size):
            y[i] += a * x[i]

    wide = njit(fastmath=True, pipeline_class=_pipeline.Compiler)(axpy)
    x, y = np.arange(100, dtype=np.float32), np.ones(100, np.float32)
    wide(np.float32(2), x, y)
    np.testing.assert_array_equal(y, 1 + 2 * np.arange(100, dtype=np.float32))  # same values
    sig = wide.signatures[0]
    assert _pipeline.ATTRIBUTE in wide.inspect_llvm(sig)
    if "+avx512f" in llvm.get_host_cpu_features().flatten().split(","):
        assert "zmm" in wide.inspect_asm(sig)
