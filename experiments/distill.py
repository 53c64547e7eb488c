"""Knowledge distillation: teacher, student from scratch and the same student distilled, on digits and text.

    python -m experiments.distill                         # both tasks, 2 min 38 s on 2 quiet cores (AMD EPYC Zen 5)
    python -m experiments.distill --tasks digits          # the digits alone (about 1 min)
    python -m experiments.distill --tasks digits --digits.tune-fraction 0.2   # choosing settings: test unread
    python -m experiments.distill --lm.teacher-steps 2000 --lm.student-steps 1500   # longer LM runs

Digits (scikit-learn's 8x8, the 450-image test split of ``experiments.vision``): five CNN teachers
from five seeds (two blocks of 32 and 64 channels, 128-wide head, 30 epochs) teaching as one
ensemble (their mean logits, ``jaxnet.compress.Ensemble``; ``--digits.teachers 1`` for one) and
an MLP student on the pixels (one hidden layer of 32), 5 seeds per student, 60 epochs; the
students train on the transfer set (every training image at each 1-pixel shift, 9 views), the
distilled one with
``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` at T = 4, alpha = 0.9
(``jaxnet.compress.DistillLoss``; the teacher's logits on the transfer set computed once,
``WithTeacherLogits``; T chosen on
``--digits.tune-fraction 0.2`` runs, which score held-out training digits, the test digits unread). Character LM
(``pydoc_data.topics``, the last 10% held out): a 2-layer, 128-wide TransformerLM teacher (400
updates) and a 2-layer, 64-wide student with as many heads (300 updates), T = 2, alpha = 0.5, and
the teacher's attention maps and value relations (MiniLM) and its blocks' outputs (TinyBERT) as
extra targets (``--lm.attention-weight``, ``--lm.hidden-weight``).

Reports each model's test accuracy (and cross-entropy) or held-out bits per character and the
fraction of the student-teacher gap that distillation closes (issue 22's target: at least half;
for the digits also in cross-entropy, ``gap_closed_nll``); the study itself
is ``jaxnet.studies.distill``. Writes each model's metrics.jsonl, loss_curve.png and final weights
under ``<workdir>/<task>/<model>``, and result.json. Measured: docs/benchmarks.md ("Distillation").
"""
from __future__ import annotations

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.studies.distill import Config, run

__all__ = ["Config", "main"]


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="distill", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    return finish(run(config, flags.workdir, **flags.fit_options), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
