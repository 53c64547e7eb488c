"""Cheaper models: post-training int8 quantisation of dense layers (``quantize``, run by
``apply_quantized``) and knowledge distillation into a smaller student (``WithTeacher``,
``DistillLoss``, a teacher ``Ensemble``, or the teacher's logits computed once:
``WithTeacherLogits``); guide: docs/compression.md."""
from jaxnet.compress.apply import apply_quantized, quantized
from jaxnet.compress.distill import (
    HIDDEN_PROJECTION,
    DistillLoss,
    Ensemble,
    WithTeacher,
    WithTeacherLogits,
    distill_state,
    ensemble_variables,
    student_variables,
    teacher_logits,
    with_logits,
)
from jaxnet.compress.quantize import (
    QuantRule,
    as_rule,
    bytes_before_after,
    check_quantized,
    dense_layers,
    quantize,
    quantize_weight,
)
from jaxnet.compress.store import load_quantized, save_quantized

__all__ = [
    "DistillLoss",
    "Ensemble",
    "HIDDEN_PROJECTION",
    "QuantRule",
    "WithTeacher",
    "WithTeacherLogits",
    "apply_quantized",
    "as_rule",
    "bytes_before_after",
    "check_quantized",
    "dense_layers",
    "distill_state",
    "ensemble_variables",
    "load_quantized",
    "quantize",
    "quantize_weight",
    "quantized",
    "save_quantized",
    "student_variables",
    "teacher_logits",
    "with_logits",
]
