"""Training: the state pytree, pure steps, ``fit``, ``fit_stream``, ``fit_many`` (sweeps), their log
writers and checkpoints (``jaxnet.train.checkpoint``)."""
from jaxnet.train import checkpoint, sweep
from jaxnet.train.loop import (FitResult, check_finite, check_labels, evaluate, fit, parameter_names, predict,
                               summarize_steps)
from jaxnet.train.step import TrainState, make_eval_step, make_train_step, split_keys
from jaxnet.train.stream import (ClockScheduleState, StreamResult, clock_factor, clock_schedule, evaluate_stream,
                                 fit_stream, set_clock_fraction, token_log_probs)
from jaxnet.train.sweep import fit_many
from jaxnet.train.writers import (JsonlWriter, LossCurveWriter, ProfileTrace, RunLog, TensorBoardWriter, Writer,
                                  save_loss_curve)

__all__ = ["ClockScheduleState", "FitResult", "JsonlWriter", "LossCurveWriter", "ProfileTrace", "RunLog",
           "StreamResult", "TensorBoardWriter", "TrainState", "Writer", "check_finite", "check_labels", "clock_factor",
           "checkpoint", "clock_schedule", "evaluate", "evaluate_stream", "fit", "fit_many", "fit_stream", "make_eval_step",
           "make_train_step", "parameter_names", "predict", "save_loss_curve", "set_clock_fraction", "split_keys", "summarize_steps", "sweep",
           "token_log_probs"]
