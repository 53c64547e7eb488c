"""What the kernels rely on from one JAX version, checked on whichever JAX runs the suite.

Each test here fails when the installed jax/jaxlib stops behaving the way the code assumes, so
that a new JAX (``make test-compat``) names what moved instead of crashing or quietly slowing:

- ``kernels/numba_cpu/_ffi.py`` reads XLA's FFI call frame at hard-coded byte offsets: they are
  compared with ``offsetof`` in the ``c_api.h`` that ships with this jaxlib.
- ``kernels/pallas_gpu`` uses the Pallas Triton lowering: there, deprecated from JAX 0.11 (a
  DeprecationWarning at each lowering, none before), and lowered off-GPU for an abstract device
  from 0.11. The lowering itself is ``test_kernels_lower_through_the_triton_lowering``.
- ``kernels/xla.py`` lays its backward dots out for XLA's CPU fast path (YNNPACK fusions): every
  dot of a dense layer's gradient (float32 and bfloat16) and of a bfloat16 einsum's lands there.
  That bf16 dots keep bf16 operands is ``test_compiled_gradient_dots_take_bfloat16_operands``
  (test_xla_fused_dense.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from kernels import xla
from kernels.numba_cpu import _ffi
from kernels.pallas_gpu import BlockConfig
from kernels.pallas_gpu import ops as pallas_ops

JAX_VERSION = tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:2])
HEADER = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"

# _ffi's constant -> the C expression that must equal it under this jaxlib's c_api.h.
# (jaxlib 0.11 renamed XLA_FFI_Extension_Base to XLA_FFI_InternalExtension: EXT below.)
FFI_LAYOUT = {
    "FRAME_EXTENSION_START": "offsetof(XLA_FFI_CallFrame, extension_start)",
    "FRAME_API": "offsetof(XLA_FFI_CallFrame, api)",
    "FRAME_CTX": "offsetof(XLA_FFI_CallFrame, ctx)",
    "FRAME_ARGS_SIZE": "offsetof(XLA_FFI_CallFrame, args) + offsetof(XLA_FFI_Args, size)",
    "FRAME_ARGS": "offsetof(XLA_FFI_CallFrame, args) + offsetof(XLA_FFI_Args, args)",
    "FRAME_RETS_SIZE": "offsetof(XLA_FFI_CallFrame, rets) + offsetof(XLA_FFI_Rets, size)",
    "FRAME_RETS": "offsetof(XLA_FFI_CallFrame, rets) + offsetof(XLA_FFI_Rets, rets)",
    "FRAME_ATTRS_SIZE": "offsetof(XLA_FFI_CallFrame, attrs) + offsetof(XLA_FFI_Attrs, size)",
    "FRAME_ATTRS_TYPES": "offsetof(XLA_FFI_CallFrame, attrs) + offsetof(XLA_FFI_Attrs, types)",
    "FRAME_ATTRS": "offsetof(XLA_FFI_CallFrame, attrs) + offsetof(XLA_FFI_Attrs, attrs)",
    "BUFFER_DTYPE": "offsetof(XLA_FFI_Buffer, dtype)",
    "BUFFER_DATA": "offsetof(XLA_FFI_Buffer, data)",
    "BUFFER_RANK": "offsetof(XLA_FFI_Buffer, rank)",
    "BUFFER_DIMS": "offsetof(XLA_FFI_Buffer, dims)",
    "SCALAR_DTYPE": "offsetof(XLA_FFI_Scalar, dtype)",
    "SCALAR_VALUE": "offsetof(XLA_FFI_Scalar, value)",
    "EXTENSION_TYPE": "offsetof(EXT, type)",
    "EXTENSION_METADATA_TYPE": "XLA_FFI_Extension_Metadata",
    "METADATA_EXTENSION_METADATA": "offsetof(XLA_FFI_Metadata_Extension, metadata)",
    "METADATA_API_VERSION": "offsetof(XLA_FFI_Metadata, api_version)",
    "METADATA_TRAITS": "offsetof(XLA_FFI_Metadata, traits)",
    "API_VERSION_STRUCT_SIZE": "XLA_FFI_Api_Version_STRUCT_SIZE",
    "API_MAJOR": "XLA_FFI_API_MAJOR",
    "API_ERROR_CREATE": "offsetof(XLA_FFI_Api, XLA_FFI_Error_Create)",
    "API_ERROR_DESTROY": "offsetof(XLA_FFI_Api, XLA_FFI_Error_Destroy)",
    "API_THREADPOOL_SCHEDULE": "offsetof(XLA_FFI_Api, XLA_FFI_ThreadPool_Schedule)",
    "API_THREADPOOL_NUM_THREADS": "offsetof(XLA_FFI_Api, XLA_FFI_ThreadPool_NumThreads)",
    "ERROR_CREATE_ARGS_SIZE": "XLA_FFI_Error_Create_Args_STRUCT_SIZE",
    "ERROR_DESTROY_ARGS_SIZE": "XLA_FFI_Error_Destroy_Args_STRUCT_SIZE",
    "SCHEDULE_ARGS_SIZE": "XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE",
    "NUM_THREADS_ARGS_SIZE": "XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE",
    "ERROR_INVALID_ARGUMENT": "XLA_FFI_Error_Code_INVALID_ARGUMENT",
    "ATTR_SCALAR": "XLA_FFI_AttrType_SCALAR",
    "DTYPE_S64": "XLA_FFI_DataType_S64",
    "DTYPE_F32": "XLA_FFI_DataType_F32",
    "DTYPE_F64": "XLA_FFI_DataType_F64",
}
# answer_metadata writes the version fields at these offsets inside XLA_FFI_Api_Version.
FFI_VERSION_FIELDS = {8: "offsetof(XLA_FFI_Api_Version, extension_start)",
                      16: "offsetof(XLA_FFI_Api_Version, major_version)",
                      20: "offsetof(XLA_FFI_Api_Version, minor_version)"}


def _header_values(exprs: list[str], tmp_path) -> list[int]:
    """Evaluates C constant expressions against this jaxlib's c_api.h with the C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH to read c_api.h's struct layout")
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"xla/ffi/api/c_api.h\"\n"
        "#if XLA_FFI_API_MINOR >= 4\ntypedef XLA_FFI_InternalExtension EXT;\n"
        "#else\ntypedef XLA_FFI_Extension_Base EXT;\n#endif\nint main(void) {\n"
        + "".join(f"  printf(\"%lld\\n\", (long long)({e}));\n" for e in exprs) + "  return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=c11", "-I", jax.ffi.include_dir(), str(src), "-o", str(exe)], check=True,
                   capture_output=True, timeout=60)
    return [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                           timeout=10).stdout.split()]


def test_ffi_bridge_offsets_match_this_jaxlibs_header(tmp_path):
    exprs = list(FFI_LAYOUT.values()) + list(FFI_VERSION_FIELDS.values()) + ["XLA_FFI_API_MINOR"]
    values = _header_values(exprs, tmp_path)
    got = {name: getattr(_ffi, name) for name in FFI_LAYOUT} | dict(zip(FFI_VERSION_FIELDS.values(),
                                                                         FFI_VERSION_FIELDS))
    want = dict(zip([*FFI_LAYOUT, *FFI_VERSION_FIELDS.values()], values))
    moved = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not moved, f"kernels/numba_cpu/_ffi.py vs {HEADER} of jaxlib {jax.__version__} (ours, header's): {moved}"
    # The handlers announce the FFI version they were written for; XLA takes an older minor.
    assert _ffi.API_MINOR <= values[-1], f"_ffi.API_MINOR={_ffi.API_MINOR} is newer than the header's {values[-1]}"


def _lowering_warnings() -> list[warnings.WarningMessage]:
    """The warnings one Triton lowering of a small fused_dense raises."""
    x = jax.ShapeDtypeStruct((16, 16), "float32")
    w = jax.ShapeDtypeStruct((16, 16), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = pallas_ops.lower_for_gpu(x, w, grad=False, config=BlockConfig(16, 16, 16)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    return caught


def test_pallas_triton_lowering_is_deprecated_from_jax_0_11():
    """On JAX 0.10 the Triton lowering is quiet; from 0.11 JAX warns at each lowering that it is
    deprecated (the import stays quiet). This fails when JAX drops the lowering or stops (or
    starts) deprecating it: time to move the kernels to Mosaic GPU (docs/gpu.md)."""
    messages = [str(w.message) for w in _lowering_warnings() if issubclass(w.category, DeprecationWarning)]
    if JAX_VERSION >= (0, 11):
        assert any("Pallas Triton backend is deprecated" in m for m in messages), messages
    else:
        assert not messages, messages


def test_triton_lowering_off_gpu_takes_the_abstract_device():
    """From JAX 0.11 the Triton lowering reads the target GPU from the abstract mesh's device
    (0.10 assumed sm_90 without a GPU): an unknown device kind is refused there."""
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the lowering targets the GPU itself, not an abstract device")
    x = w = jax.ShapeDtypeStruct((16, 16), "float32")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        lower = lambda kind: pallas_ops.lower_for_gpu(x, w, grad=False, config=BlockConfig(16, 16, 16),  # noqa: E731
                                                      device_kind=kind)
        assert lower("NVIDIA H100").as_text().count("__gpu$xla.gpu.triton") == 1
        if JAX_VERSION >= (0, 11):
            with pytest.raises(RuntimeError, match="abstract GPU device"):
                lower("Not A GPU 9000")
        else:
            assert lower("Not A GPU 9000").as_text().count("__gpu$xla.gpu.triton") == 1


def _dots_outside_ynn_fusions(hlo: str) -> tuple[int, list[str]]:
    """(dots inside XLA CPU's YNNPACK fusions, the other dot instructions) of compiled HLO text."""
    computations, name = {}, None
    for line in hlo.splitlines():
        if m := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line):
            name = m.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    ynn = {c for lines in computations.values() for line in lines if "__ynn_fusion" in line
           for c in re.findall(r"calls=%([\w.\-]+)", line)}
    inside = sum(" dot(" in line for c in ynn for line in computations.get(c, ()))
    outside = [line.strip()[:100] for c, lines in computations.items() if c not in ynn for line in lines
               if " dot(" in line]
    return inside, outside


@pytest.mark.parametrize("dtype,spec,sa,sb", [
    ("float32", "mk,kn->mn", (64, 32), (32, 48)),  # FusedDense(xla) in float32: the custom VJP at HIGHEST
    ("bfloat16", "mk,kn->mn", (64, 32), (32, 48)),
    ("bfloat16", "bshd,bthd->bhst", (2, 16, 2, 8), (2, 16, 2, 8)),  # attention scores
])
def test_backward_dots_take_xlas_cpu_fast_path(dtype, spec, sa, sb):
    """Autodiff of the reference runs the float32 weight gradient as a dot outside these fusions
    (on Eigen, behind a transposing copy); a JAX whose CPU pipeline moves them fails here."""
    with jax.default_device(jax.devices("cpu")[0]):
        a, b = jnp.ones(sa, dtype), jnp.ones(sb, dtype)
        f = (lambda a, b: xla.fused_dense(a, b, activation="gelu")) if spec == "mk,kn->mn" else (  # noqa: E731
            lambda a, b: xla.einsum(spec, a, b))
        grad = jax.grad(lambda a, b: (f(a, b).astype(jnp.float32) ** 2).sum(), (0, 1))
        inside, outside = _dots_outside_ynn_fusions(jax.jit(grad).lower(a, b).compile().as_text())
    assert inside == 3 and not outside, (f"jax {jax.__version__}: {inside} of the forward and two gradient dots "
                                         f"in YNNPACK fusions; outside: {outside}")
