"""Training: the state pytree, pure steps, and ``fit``."""
from jaxnet.train.loop import FitResult, evaluate, fit
from jaxnet.train.step import TrainState, make_eval_step, make_train_step, split_keys
from jaxnet.train.stream import StreamResult, evaluate_stream, fit_stream, time_schedule

__all__ = ["FitResult", "StreamResult", "TrainState", "evaluate", "evaluate_stream", "fit", "fit_stream",
           "make_eval_step", "make_train_step", "split_keys", "time_schedule"]
