"""scikit-learn classifiers as anchors for image classification (``pip install 'jaxnet[data]'``).

    scores = sklearn_anchors(train, test)   # {"svc_rbf": {"test_accuracy": ..., "wall_s": ...}, ...}

Each fits on the flattened pixels as loaded (in [0, 1]), the same split the network sees: an SVC
(RBF, C=10, γ=0.05), an MLPClassifier (256 hidden) and LogisticRegression.
"""
from __future__ import annotations

import time

import numpy as np


def sklearn_anchors(train, test) -> dict:
    """Test accuracy and fit time of each anchor; ``train``, ``test``: ``ImageData`` (``x [n, ...]``, ``y [n]``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    xtr, xte = train.x.reshape(len(train.x), -1), test.x.reshape(len(test.x), -1)
    anchors = {
        "svc_rbf": SVC(C=10, gamma=0.05),
        "mlp_classifier_256": MLPClassifier((256,), max_iter=1000, random_state=0),
        "logistic_regression": LogisticRegression(max_iter=5000),
    }
    out = {}
    for name, est in anchors.items():
        start = time.perf_counter()
        est.fit(xtr, train.y)
        out[name] = {"test_accuracy": float(np.mean(est.predict(xte) == test.y)),
                     "wall_s": round(time.perf_counter() - start, 2)}
    return out


__all__ = ["sklearn_anchors"]
