"""Studies as library code: each has a config and a ``run(config, workdir, ...)`` that trains,
evaluates and returns the final metrics; ``experiments/NAME.py`` is the command line over it.

- ``lm``: a character (or word) TransformerLM on a text corpus, with a Kneser–Ney baseline.
- ``vision``: a CNN or MLP on images (scikit-learn's digits by default), several seeds.
- ``recsys``: matrix factorisation, NCF and two-tower recommenders on generated or MovieLens ratings.

The seed example's equivalent is ``jaxnet.seed.run``.
"""
