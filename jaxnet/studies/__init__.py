"""Studies as library code: each has a config and a ``run(config, workdir, ...)`` that trains,
evaluates and returns the final metrics; ``experiments/NAME.py`` is the command line over it.

- ``lm``: a character (or word) TransformerLM on a text corpus, with a Kneser–Ney baseline.
- ``vision``: a CNN or MLP on images (scikit-learn's digits by default), several seeds.
- ``recsys``: matrix factorisation, NCF and two-tower recommenders on generated or MovieLens ratings.

The seed example's equivalent is ``jaxnet.seed.run``. Each saves the final weights of every model
it trains with ``save_weights``.
"""
from __future__ import annotations

import pathlib


def save_weights(folder, state, config) -> str:
    """Saves a trained ``state`` as the checkpoint of its step in ``<folder>/checkpoints`` (with
    ``config``), whatever the run's ``checkpoint_every`` was: a no-op when the training loop's last
    checkpoint already holds it. Returns that checkpoint's folder, ``<folder>/checkpoints/<step>``,
    which ``jaxnet.train.checkpoint.restore`` reads back."""
    from jaxnet.train import checkpoint

    ckpt_dir = pathlib.Path(folder) / "checkpoints"
    return str(ckpt_dir / checkpoint.save(ckpt_dir, state, config=config).name)


__all__ = ["save_weights"]
