"""Fractions (held-out and tuning splits) are checked in one place: every entry point that takes
one refuses a value outside (0, 1), a non-finite one or a non-number, naming the argument."""
import math

import numpy as np
import pytest

from jaxnet.arguments import check_fraction
from jaxnet.data import images, ratings, synthetic, text
from jaxnet.data.digits import load_digits
from jaxnet.studies import distill, lm

SMALL_WORLD = ratings.generate_ratings(ratings.GeneratorConfig(num_users=20, num_items=60, ratings_per_user=25))
ENTRY_POINTS = {
    "val_fraction (train_val_split)": (lambda f: synthetic.train_val_split(np.arange(10), val_fraction=f),
                                       "val_fraction", False),
    "val_fraction (split_text)": (lambda f: text.split_text("abcdefghij", f), "val_fraction", False),
    "test_fraction": (lambda f: ratings.random_split(SMALL_WORLD.ratings, test_fraction=f), "test_fraction", False),
    "test_fraction (stratified_split)": (lambda f: images.stratified_split(load_digits(), test_fraction=f),
                                         "test_fraction", False),
    "lm.Config": (lambda f: lm.Config(tune_fraction=f), "tune_fraction", True),
    "distill.DigitsConfig": (lambda f: distill.DigitsConfig(tune_fraction=f), "digits.tune_fraction", True),
    "distill.LMConfig": (lambda f: distill.LMConfig(tune_fraction=f), "lm.tune_fraction", True),
}


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_out_of_range_fractions_are_refused_by_name(entry, bad):
    call, name, _ = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=f"^{name} must be"):
        call(bad)


@pytest.mark.parametrize("bad", ["0.1", None, True])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_fractions_that_are_not_numbers_are_refused_by_name(entry, bad):
    call, name, _ = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match=f"^{name} must be a number"):
        call(bad)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_zero_means_off_only_where_documented(entry):
    call, name, zero_allowed = ENTRY_POINTS[entry]
    if zero_allowed:
        call(0.0)
    else:
        with pytest.raises(ValueError, match=rf"^{name} must be in \(0, 1\), got 0"):
            call(0.0)


def test_check_fraction_returns_a_python_float():
    value = check_fraction(np.float32(0.25), "f")
    assert type(value) is float and value == 0.25
