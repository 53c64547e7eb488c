"""PNG figures of attributions and attention (matplotlib: the optional "plots" extra).

    attribution_grid(images, {"saliency": s, "integrated gradients": ig}, "attr.png")
    attention_maps(weights[:, 0], tokens, "attention.png", rollout=flow[0])

Both return the path written, or None when matplotlib is not installed. Attributions are drawn
on a diverging scale centred on 0 (red: raises the score, blue: lowers it), each panel scaled to
its own largest magnitude: the methods' units differ.
"""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np

from jaxnet.files import atomic_path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> str:
    with atomic_path(path) as tmp:  # whole or not at all
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return str(path)


def attribution_grid(images, attributions: Mapping[str, np.ndarray], path: str | pathlib.Path, *,
                     labels: Sequence[str] | None = None, title: str | None = None) -> str | None:
    """One row per image: the image, then its attribution by each method.

    Args:
      images: ``[N, H, W]`` or ``[N, H, W, 1]``; attributions: method name -> array of the same
        shape (or ``[N, H*W]``, reshaped); labels: one caption per row (e.g. the class explained).
    """
    plt = _pyplot()
    if plt is None:
        return None
    images = np.asarray(images, np.float32)
    images = images.reshape(images.shape[:3])
    n, h, w = images.shape
    cols = 1 + len(attributions)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n + 0.4), dpi=110, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i], cmap="gray_r")
        if labels is not None:
            axes[i, 0].set_ylabel(labels[i], fontsize=7)
        for j, (name, attr) in enumerate(attributions.items(), start=1):
            a = np.asarray(attr, np.float32)[i].reshape(h, w)
            scale = float(np.abs(a).max()) or 1.0
            axes[i, j].imshow(a, cmap="bwr", vmin=-scale, vmax=scale)
            if i == 0:
                axes[i, j].set_title(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def attention_maps(weights, tokens: Sequence[str], path: str | pathlib.Path, *, rollout=None,
                   title: str | None = None) -> str | None:
    """Heat maps of one sequence's attention: a row of heads per layer, then the rollout.

    Args:
      weights: ``[L, H, T, T]`` (``attention_weights(...)[:, b]``); tokens: the ``T`` tokens' text,
        for the axes; rollout: ``[T, T]`` (``rollout(...)[b]``) drawn as one more panel, or None.
    """
    plt = _pyplot()
    if plt is None:
        return None
    w = np.asarray(weights, np.float32)
    layers, heads, t, _ = w.shape
    shown = [repr(tok)[1:-1] or " " for tok in tokens]
    rows = layers + (rollout is not None)
    fig, axes = plt.subplots(rows, heads, figsize=(2.6 * heads, 2.6 * rows + 0.3), dpi=110, squeeze=False)
    panels = [(axes[l, h], w[l, h], f"layer {l}, head {h}") for l in range(layers) for h in range(heads)]
    if rollout is not None:
        panels.append((axes[-1, 0], np.asarray(rollout, np.float32), "rollout (all layers)"))
        for ax in axes[-1, 1:]:
            ax.axis("off")
    for ax, m, name in panels:
        ax.imshow(m, cmap="viridis", vmin=0.0)
        ax.set_title(name, fontsize=7)
        ax.set_xticks(range(t), shown, fontsize=4)
        ax.set_yticks(range(t), shown, fontsize=4)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


__all__ = ["attention_maps", "attribution_grid"]
