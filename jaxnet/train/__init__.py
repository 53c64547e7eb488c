"""Training: the state pytree, pure steps, and ``fit``."""
from jaxnet.train.loop import FitResult, evaluate, fit
from jaxnet.train.step import TrainState, make_eval_step, make_train_step, split_keys

__all__ = ["FitResult", "TrainState", "evaluate", "fit", "make_eval_step", "make_train_step", "split_keys"]
