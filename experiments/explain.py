"""Attribution: which pixels a digits classifier's answer rests on, and where a character LM looks.

    python -m experiments.explain                      # MLP + CNN on digits, a small char LM
    python -m experiments.explain --lm-steps 1000      # a better-trained LM for the attention maps

Trains an MLP and a small CNN on scikit-learn's digits (pixels in [0, 1]) and a 2-layer character
TransformerLM on ``pydoc_data.topics``, then explains them with ``jaxnet.explain``: saliency,
input x gradient, SmoothGrad, integrated gradients and occlusion of the true class's logit for one
test digit per class (``attributions_mlp.png``, ``attributions_cnn.png``), integrated gradients'
convergence delta over all 450 test digits at 10 to 100 steps (``ig_completeness``), and the LM's
attention maps per head with their rollout over a sentence (``attention.png``). The study itself
is ``jaxnet.studies.explain``; docs/explain.md has the methods, conventions and figures measured.
"""
from __future__ import annotations

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.studies.explain import Config, run

__all__ = ["Config", "main"]


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="explain", description=__doc__.splitlines()[0])
    enable_compilation_cache()
    return finish(run(config, flags.workdir, **flags.fit_options), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
