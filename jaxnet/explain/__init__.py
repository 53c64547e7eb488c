"""Attribution: which inputs a model's output rests on (issue 22, point 5).

- ``gradients``: ``saliency``, ``input_x_gradient``, ``smoothgrad`` (PAIR's and Captum's noise).
- ``integrated``: ``integrated_gradients`` (Captum's rules and convergence delta), ``path_rule``.
- ``occlusion``: ``occlusion`` (Captum's sliding windows, averaged).
- ``attention``: ``attention_weights`` of jaxnet's transformers, ``rollout``.
- ``figures``: PNGs of attributions and attention maps (matplotlib).
- ``targets``: the convention every method shares: ``f(x: [B, ...]) -> [B]``, or ``[B, C]`` with
  ``target``, the class explained.

docs/explain.md has the conventions beside PAIR's and Captum's, and the figures measured.
"""
from jaxnet.explain.attention import attention_weights, rollout
from jaxnet.explain.gradients import input_x_gradient, saliency, smoothgrad
from jaxnet.explain.integrated import METHODS, integrated_gradients, path_rule
from jaxnet.explain.occlusion import occlusion

__all__ = ["METHODS", "attention_weights", "input_x_gradient", "integrated_gradients", "occlusion", "path_rule",
           "rollout", "saliency", "smoothgrad"]
