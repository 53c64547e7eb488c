"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes, no download.

    train, test = digits_split()              # stratified 25% test split, seed 0: 1,347 / 450 images

Pixels are scaled from scikit-learn's 0..16 to [0, 1] (the scale of the scikit-learn anchors in
experiments/vision.py); ``jaxnet.data.images.standardize`` centres them for a network.
"""
from __future__ import annotations

import numpy as np

from jaxnet.data.images import ImageData, stratified_split


def load_digits() -> ImageData:
    """All 1,797 digits: ``x: float32 [1797, 8, 8, 1]`` in [0, 1], ``y: int32 [1797]``."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    return ImageData(x, bunch.target.astype(np.int32), tuple(str(c) for c in bunch.target_names))


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[ImageData, ImageData]:
    """``(train, test)``: the deterministic stratified split the issue's anchors are measured on."""
    return stratified_split(load_digits(), test_fraction=test_fraction, seed=seed)
