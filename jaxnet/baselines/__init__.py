"""Baselines the learned models and kernels are measured against, each defined once:

- ``ngram``: interpolated Kneser–Ney n-gram (text).
- ``classifiers``: scikit-learn anchors (images).
- ``ratings``: global mean, user/item biases, popularity (recommendation).
- ``torch_lm``: the transformer LM in PyTorch (training throughput).

The seed example's PyTorch loop is ``jaxnet.seed_torch``; the kernels' baseline is XLA's own
``act(x @ w + b)``, ``kernels.fused_dense(..., backend="xla")``.
"""
