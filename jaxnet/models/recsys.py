"""Embedding recommenders: biased matrix factorisation, NCF (GMF + MLP towers), and a two-tower model.

Every model maps ``x: int [B, 2]`` (user id, item id) pairs to ``[B]`` scores: a predicted rating
(explicit feedback, trained with ``losses.mse``) or a logit (implicit feedback, trained with
``losses.binary_cross_entropy`` against sampled negatives). Ids index embedding tables, so they
must be dense, ``0..num_users-1`` and ``0..num_items-1`` (``jaxnet.data.ratings.reindex``).
Dense layers run on ``kernels.fused_dense`` (``backend`` selects the kernel).

    model = NCF(num_users=943, num_items=1682)
    variables = model.init(jax.random.key(0), pairs[:1])
    logits = model.apply(variables, pairs)        # (B,)
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxnet.models.mlp import MLP
from jaxnet.nn import named_init


def _split_ids(x):
    """``x: int [B, 2]`` -> ``(user [B], item [B])``."""
    if x.ndim != 2 or x.shape[-1] != 2:
        raise ValueError(f"expected (user, item) id pairs [B, 2], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"ids must be integers, got dtype {x.dtype}")
    return x[:, 0], x[:, 1]


def _embed(num: int, dim: int, std: float, name: str) -> nn.Embed:
    return nn.Embed(num, dim, embedding_init=named_init(nn.initializers.normal(std), ("vocab", "embed")), name=name)


class MatrixFactorization(nn.Module):
    """Biased MF: ``score = offset + b_u + b_i + p_u · q_i``.

    Attributes:
      num_users, num_items: table sizes.
      dim: factor dimension.
      offset: a constant added to every score (e.g. the training mean rating), not learned.
      init_std: standard deviation of the initial factors (biases start at 0).
    """

    num_users: int
    num_items: int
    dim: int = 32
    offset: float = 0.0
    init_std: float = 0.1

    @property
    def id_limits(self) -> tuple[int, int]:
        """Exclusive bounds of the id columns of ``x``: (user, item); ``fit`` and ``evaluate``
        check ids against them before training (an id past a table reads a clamped row)."""
        return self.num_users, self.num_items

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        user, item = _split_ids(x)
        p = _embed(self.num_users, self.dim, self.init_std, "user_factors")(user)  # (B, D)
        q = _embed(self.num_items, self.dim, self.init_std, "item_factors")(item)  # (B, D)
        bu = _embed(self.num_users, 1, 0.0, "user_bias")(user)[:, 0]
        bi = _embed(self.num_items, 1, 0.0, "item_bias")(item)[:, 0]
        return self.offset + bu + bi + jnp.sum(p * q, axis=-1)


class NCF(nn.Module):
    """Neural collaborative filtering (He et al., 2017, "NeuMF"): a GMF tower (elementwise product
    of embeddings) and an MLP tower (concatenated embeddings through dense layers), joined by a
    last dense layer to one score.

    Attributes:
      num_users, num_items: table sizes.
      gmf_dim: embedding size of the GMF tower.
      mlp_dim: embedding size of the MLP tower (its input is ``2 * mlp_dim`` wide).
      mlp_features: hidden widths of the MLP tower.
      dropout_rate: dropout in the MLP tower when ``train=True``.
      init_std: standard deviation of the initial embeddings.
      backend: kernel backend of the dense layers.
    """

    num_users: int
    num_items: int
    gmf_dim: int = 32
    mlp_dim: int = 32
    mlp_features: Sequence[int] = (64, 32, 16)
    dropout_rate: float = 0.0
    init_std: float = 0.01
    backend: str = "xla"

    @property
    def id_limits(self) -> tuple[int, int]:
        """Exclusive bounds of the id columns of ``x``: (user, item); ``fit`` and ``evaluate``
        check ids against them before training (an id past a table reads a clamped row)."""
        return self.num_users, self.num_items

    @nn.compact
    def __call__(self, x, train: bool = False):
        user, item = _split_ids(x)
        gmf = (_embed(self.num_users, self.gmf_dim, self.init_std, "gmf_user")(user)
               * _embed(self.num_items, self.gmf_dim, self.init_std, "gmf_item")(item))  # (B, Dg)
        mlp_in = jnp.concatenate([_embed(self.num_users, self.mlp_dim, self.init_std, "mlp_user")(user),
                                  _embed(self.num_items, self.mlp_dim, self.init_std, "mlp_item")(item)], -1)
        # Every MLP layer is followed by the activation: append the last width's ReLU by hand.
        h = MLP(tuple(self.mlp_features), dropout_rate=self.dropout_rate, init_scheme="lecun",
                backend=self.backend, name="mlp")(mlp_in, train=train)  # (B, H)
        h = nn.relu(h)
        joint = jnp.concatenate([gmf, h], axis=-1)
        return MLP((1,), init_scheme="lecun", backend=self.backend, name="predict")(joint)[:, 0]


class TwoTower(nn.Module):
    """Two-tower retrieval: ``score = u(user) · v(item)`` with each tower an embedding followed by
    dense layers. Item vectors depend on the item alone, so a catalogue can be embedded once and
    searched by inner product (``user_vectors`` / ``item_vectors``).

    Attributes:
      num_users, num_items: table sizes.
      dim: embedding size.
      tower_features: widths of each tower's dense layers; the last is the output vector size.
      init_std: standard deviation of the initial embeddings.
      backend: kernel backend of the dense layers.
    """

    num_users: int
    num_items: int
    dim: int = 32
    tower_features: Sequence[int] = (64, 32)
    init_std: float = 0.1
    backend: str = "xla"

    def setup(self):
        self.user_embedding = _embed(self.num_users, self.dim, self.init_std, "user_embedding")
        self.item_embedding = _embed(self.num_items, self.dim, self.init_std, "item_embedding")
        self.user_tower = MLP(tuple(self.tower_features), init_scheme="lecun", backend=self.backend)
        self.item_tower = MLP(tuple(self.tower_features), init_scheme="lecun", backend=self.backend)

    def user_vectors(self, user):
        """``int [B]`` -> ``[B, tower_features[-1]]``."""
        return self.user_tower(self.user_embedding(user))

    def item_vectors(self, item):
        """``int [B]`` -> ``[B, tower_features[-1]]``."""
        return self.item_tower(self.item_embedding(item))

    def __call__(self, x, train: bool = False):
        del train
        user, item = _split_ids(x)
        return jnp.sum(self.user_vectors(user) * self.item_vectors(item), axis=-1)
