"""Numba's compile pipeline for this package: every function it compiles prefers full-width vectors.

LLVM tunes several AVX-512 CPUs to prefer 256-bit vectors (its ``prefer-256-bit`` tuning: Intel's
Skylake-X to Sapphire Rapids server cores and Ice Lake / Rocket Lake client cores, among them the
Intel Xeon these kernels were measured on), so Numba's loops ran in ymm registers there and the
GEMM reached half of XLA's speed. The function attribute ``"prefer-vector-width"="512"`` on each
function compiled with ``Compiler`` overrides that tuning for those functions alone: Numba's target
machine, and any other Numba code in the process, are untouched. On CPUs without AVX-512 LLVM caps
the width at the widest vector the CPU has, so the attribute is right on every x86-64 machine
(figures in docs/benchmarks.md, "Full-width vectors on Intel").
"""
from __future__ import annotations

from numba.core import compiler, lowering, typed_passes
from numba.core.compiler_machinery import register_pass

ATTRIBUTE = '"prefer-vector-width"="512"'


class _Lower(lowering.Lower):
    def setup_function(self, fndesc):
        super().setup_function(fndesc)
        # llvmlite's FunctionAttributes.add takes only LLVM's keyword attributes; a key="value"
        # attribute is valid IR in the same place, so it goes into the set as written.
        set.add(self.function.attributes, ATTRIBUTE)


@register_pass(mutates_CFG=True, analysis_only=False)
class _NativeLowering(typed_passes.NativeLowering):
    _name = "jaxnet_native_lowering"

    @property
    def lowering_class(self):
        return _Lower


class Compiler(compiler.CompilerBase):
    """Numba's nopython pipeline with ``_NativeLowering`` in place of its lowering pass."""

    def define_pipelines(self):
        pm = compiler.DefaultPassBuilder.define_nopython_pipeline(self.state)
        [at] = [i for i, (pss, _) in enumerate(pm.passes) if pss is typed_passes.NativeLowering]
        pm.passes[at] = (_NativeLowering, "native lowering, full-width vectors")
        pm.finalize()
        return [pm]
