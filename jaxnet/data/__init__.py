"""Data: synthetic sets, real-format loaders, and input checks."""
from jaxnet.data.checks import as_float_array, check_same_length, check_supervised
from jaxnet.data.synthetic import RegressionData, make_regression, train_val_split

__all__ = ["RegressionData", "as_float_array", "check_same_length", "check_supervised",
           "make_regression", "train_val_split"]
