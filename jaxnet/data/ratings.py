"""User-item ratings: MovieLens loaders, id re-indexing, splits, negative sampling, and a seeded
generator with known low-rank structure, popularity skew and noise level.

    data = load_movielens("ml-100k/u.data")          # or ".../ratings.csv" (ml-latest, ml-25m)
    data, user_ids, item_ids = reindex(data)          # dense ids 0..U-1, 0..I-1
    train, test = random_split(data, test_fraction=0.1, seed=0)      # explicit ratings
    train, test = leave_one_out(data)                                 # implicit: last item per user
    synthetic = generate_ratings(GeneratorConfig())   # offline default, noise std σ known

A ``Ratings`` holds parallel arrays, one entry per (user, item) interaction. ``pairs`` gives the
``int32 [n, 2]`` (user, item) model input of ``jaxnet.models.recsys``.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from jaxnet.arguments import check_fraction
from jaxnet.data.checks import read_text, snippet


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Interactions as parallel arrays.

    Attributes:
      user: ``int [n]`` user ids (dense ``0..num_users-1`` after ``reindex``; as in the file before).
      item: ``int [n]`` item ids, likewise.
      rating: ``float32 [n]``.
      timestamp: ``int64 [n]`` (seconds, or any order-preserving number).
      num_users, num_items: sizes of the id ranges (``max id + 1``).
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    num_users: int
    num_items: int

    def __post_init__(self):
        n = len(self.user)
        if not all(len(a) == n for a in (self.item, self.rating, self.timestamp)):
            raise ValueError("Ratings arrays must have one length: "
                             f"user {len(self.user)}, item {len(self.item)}, rating {len(self.rating)}, "
                             f"timestamp {len(self.timestamp)}")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def pairs(self) -> np.ndarray:
        """``int32 [n, 2]``: (user, item) per interaction, the input of the recommenders."""
        if len(self) and max(self.user.max(), self.item.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"ids up to {max(self.user.max(), self.item.max())} do not fit int32: "
                             "reindex(ratings) makes them dense first")
        return np.stack([self.user, self.item], axis=1).astype(np.int32)

    def subset(self, index) -> "Ratings":
        return Ratings(self.user[index], self.item[index], self.rating[index], self.timestamp[index],
                       self.num_users, self.num_items)


def _from_columns(user, item, rating, timestamp) -> Ratings:
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    return Ratings(user, item, np.asarray(rating, np.float32), np.asarray(timestamp, np.int64),
                   int(user.max()) + 1 if user.size else 0, int(item.max()) + 1 if item.size else 0)


def load_movielens(path: str | pathlib.Path, *, encoding: str = "utf-8") -> Ratings:
    """Reads a MovieLens ratings file, keeping the file's ids (``reindex`` makes them dense).

    - ``u.data`` (ml-100k): tab-separated ``user item rating timestamp``, no header;
      also ``ratings.dat`` (ml-1m), ``::``-separated.
    - ``ratings.csv`` (ml-latest, ml-20m/25m): comma-separated with a header
      ``userId,movieId,rating,timestamp``.

    The file is decoded with ``encoding`` (a byte-order mark is dropped); blank lines are skipped.
    Every row must hold the header's number of fields (4 without a header; only the first 4 are
    read): user and item ids written as integers in ``[0, 2**63 - 1)``, a finite rating (within
    float32's range) and a timestamp written as an integer (int64).

    Raises:
      ValueError: naming the file and the line (echoing at most 80 characters of it) for a row
        that breaks those rules or a wrong header; naming the file for undecodable bytes and for
        a file with no ratings (empty, or a header only).
    """
    path = pathlib.Path(path)
    lines = read_text(path, encoding).splitlines()
    rows = [ln for ln in lines if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: empty file, no ratings")
    first = 0
    if "::" in rows[0]:
        sep, n_fields = "::", 4
    elif "\t" in rows[0]:
        sep, n_fields = "\t", 4
    else:
        header = [h.strip() for h in rows[0].split(",")]
        expected = ["userId", "movieId", "rating", "timestamp"]
        if header[:4] != expected:
            raise ValueError(f"{path}:{_line_of(lines, 0)}: expected a header {','.join(expected)}, "
                             f"got {snippet(rows[0])}")
        sep, n_fields, first = ",", len(header), 1
    rows = rows[first:]
    if not rows:
        raise ValueError(f"{path}: a header but no ratings")

    def fail(k, message):  # k: index into rows
        raise ValueError(f"{path}:{_line_of(lines, first + k)}: {message}: {snippet(rows[k])}")

    columns = _parse_fast(rows, sep) if n_fields == 4 else None
    if columns is None:
        columns = _parse_rows(rows, sep, n_fields, fail)
    for what, values in zip(_FIELDS, columns):
        bad = np.flatnonzero(~_RULES[what][1](values))  # NaN compares False: caught here
        if bad.size:
            fail(int(bad[0]), f"{what} must be {_RULES[what][2]}")
    return _from_columns(*columns)


_FIELDS = ("user id", "item id", "rating", "timestamp")
_INT64 = np.iinfo(np.int64)
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a Python float: compared with one, not cast to float32
# field: (how Python parses one, the range it must lie in, that rule in words). Ids must leave room
# for num_users = max id + 1.
_RULES = {
    "user id": (int, lambda n: (n >= 0) & (n < _INT64.max), "an integer in [0, 2**63 - 1)"),
    "item id": (int, lambda n: (n >= 0) & (n < _INT64.max), "an integer in [0, 2**63 - 1)"),
    "rating": (float, lambda r: abs(r) <= _FLOAT32_MAX, "a finite number (float32)"),
    "timestamp": (int, lambda t: (t >= _INT64.min) & (t <= _INT64.max), "an integer (int64)"),
}


def _parse_fast(rows: list[str], sep: str):
    """The four columns as arrays by NumPy's C parser, or None where it refuses a row (then
    ``_parse_rows`` finds and names it). NumPy accepts a subset of what Python's ``int`` and
    ``float`` do, and parses it to the same values."""
    if sep == "::":
        rows = (row.replace("::", ":") for row in rows)  # a one-character delimiter for loadtxt
    dtype = [("user", np.int64), ("item", np.int64), ("rating", np.float64), ("timestamp", np.int64)]
    try:
        table = np.loadtxt(rows, dtype=dtype, delimiter=sep[0], comments=None, quotechar=None, ndmin=1)
    except ValueError:
        return None
    return [table[name] for name, _ in dtype]


def _parse_rows(rows: list[str], sep: str, n_fields: int, fail) -> list[np.ndarray]:
    """The four columns parsed in Python, row by row; ``fail(row, message)`` at the first bad row."""
    columns = ([], [], [], [])
    for k, row in enumerate(rows):
        fields = row.split(sep)
        if len(fields) != n_fields:
            fail(k, f"expected {n_fields} fields separated by {sep!r}, got {len(fields)}")
        for what, column, field in zip(_FIELDS, columns, fields):
            parse, in_range, must = _RULES[what]
            try:
                value = parse(field)
                ok = in_range(value)
            except ValueError:
                ok = False
            if not ok:
                fail(k, f"{what} must be {must}")
            column.append(value)
    return [np.asarray(c, np.float64 if w == "rating" else np.int64) for w, c in zip(_FIELDS, columns)]


def _line_of(lines: list[str], k: int) -> int:
    """1-based line number of the ``k``-th non-blank line (only on the error path: it scans)."""
    seen = -1
    for i, ln in enumerate(lines):
        seen += bool(ln.strip())
        if seen == k:
            return i + 1
    return len(lines)


def reindex(data: Ratings) -> tuple[Ratings, np.ndarray, np.ndarray]:
    """Maps user and item ids to dense ``0..U-1`` and ``0..I-1`` in increasing id order.

    Returns ``(ratings, user_ids, item_ids)`` where ``user_ids[new] == old`` (likewise for items).
    """
    user_ids, user = np.unique(data.user, return_inverse=True)
    item_ids, item = np.unique(data.item, return_inverse=True)
    dense = Ratings(user.astype(np.int32), item.astype(np.int32), data.rating, data.timestamp,
                    len(user_ids), len(item_ids))
    return dense, user_ids, item_ids


def random_split(data: Ratings, *, test_fraction: float, seed: int = 0) -> tuple[Ratings, Ratings]:
    """``(train, test)``: a seeded random ``test_fraction`` of the interactions is held out."""
    test_fraction = check_fraction(test_fraction, "test_fraction")
    perm = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(len(data) * test_fraction))
    return data.subset(np.sort(perm[n_test:])), data.subset(np.sort(perm[:n_test]))


def leave_one_out(data: Ratings) -> tuple[Ratings, Ratings]:
    """``(train, test)``: each user's latest interaction (largest timestamp; ties: the last row) is
    the test set, one per user with at least two interactions; everything else is training."""
    order = np.lexsort((np.arange(len(data)), data.timestamp, data.user))  # by user, then time, then row
    user_sorted = data.user[order]
    last = np.r_[user_sorted[1:] != user_sorted[:-1], True]
    count = np.bincount(data.user, minlength=data.num_users)
    held = order[last & (count[user_sorted] >= 2)]
    is_test = np.zeros(len(data), bool)
    is_test[held] = True
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.sort(held))


def interaction_keys(data: Ratings) -> np.ndarray:
    """Sorted ``int64`` codes ``user * num_items + item`` of every interaction (for membership tests)."""
    return np.unique(data.user.astype(np.int64) * data.num_items + data.item)


def sample_negatives(user: np.ndarray, num_items: int, num_negatives: int, exclude: np.ndarray, *,
                     seed: int = 0) -> np.ndarray:
    """``int32 [len(user), num_negatives]`` items drawn uniformly among those each user has not
    interacted with (``exclude``: sorted codes from ``interaction_keys``); redrawn until clean.

    Draws are with replacement across a row (as in NCF's protocol); a user must have at least one
    item left to draw.
    """
    rng = np.random.default_rng(seed)
    user = np.asarray(user, np.int64)
    out = rng.integers(0, num_items, (len(user), num_negatives))
    users = np.repeat(user, num_negatives)  # owner of each entry of out.reshape(-1)
    flat = out.reshape(-1)

    def is_seen(idx):
        codes = users[idx] * num_items + flat[idx]
        pos = np.minimum(np.searchsorted(exclude, codes), max(len(exclude) - 1, 0))
        return (exclude[pos] == codes) if len(exclude) else np.zeros(len(idx), bool)

    pending = np.arange(flat.size)
    for _ in range(20):  # rejection sampling, re-checking only the redrawn entries
        pending = pending[is_seen(pending)]
        if pending.size == 0:
            return out.astype(np.int32)
        flat[pending] = rng.integers(0, num_items, pending.size)
    # Users who have seen most items: draw from their unseen items directly.
    pending = pending[is_seen(pending)]
    for u in np.unique(users[pending]):
        seen = exclude[(exclude >= u * num_items) & (exclude < (u + 1) * num_items)] - u * num_items
        unseen = np.setdiff1d(np.arange(num_items), seen)
        if unseen.size == 0:
            raise ValueError(f"sample_negatives: user {u} has interacted with every item")
        mine = pending[users[pending] == u]
        flat[mine] = rng.choice(unseen, mine.size)
    return out.astype(np.int32)


def implicit_examples(data: Ratings, num_negatives: int, exclude: np.ndarray, *, seed: int = 0):
    """Pointwise implicit-feedback examples: each interaction as a positive (label 1) beside
    ``num_negatives`` sampled unseen items (label 0). Returns ``(pairs int32 [m, 2], labels float32 [m])``
    with ``m = len(data) * (1 + num_negatives)``."""
    neg = sample_negatives(data.user, data.num_items, num_negatives, exclude, seed=seed)
    users = np.repeat(data.user, num_negatives)
    pairs = np.concatenate([data.pairs, np.stack([users, neg.reshape(-1)], axis=1)]).astype(np.int32)
    labels = np.r_[np.ones(len(data), np.float32), np.zeros(neg.size, np.float32)]
    return pairs, labels


def ranking_candidates(test: Ratings, exclude: np.ndarray, num_negatives: int = 99, *, seed: int = 0) -> np.ndarray:
    """``int32 [n_test, 1 + num_negatives]`` items per test row: its item first, then sampled
    items the user never interacted with (the NCF leave-one-out protocol: HR@K, NDCG@K)."""
    neg = sample_negatives(test.user, test.num_items, num_negatives, exclude, seed=seed)
    return np.concatenate([test.item[:, None], neg], axis=1).astype(np.int32)


# --- the seeded generator -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """A users x items world with known structure. Variants by ``dataclasses.replace``."""

    # Users in the world.
    num_users: int = 2000
    # Items in the world (more than ratings_per_user).
    num_items: int = 1000
    # Mean interactions per user (each user's count: log-normal around it, within [20, num_items / 2]).
    ratings_per_user: int = 200
    # Rank of the true preference: rating = mu + b_u + b_i + p_u . q_i + noise.
    rank: int = 8
    # mu: the mean rating.
    global_mean: float = 3.5
    # Standard deviation of the user biases b_u, >= 0.
    user_bias_std: float = 0.3
    # Standard deviation of the item biases b_i, >= 0.
    item_bias_std: float = 0.3
    # Standard deviation of p_u . q_i (the personal part of a rating).
    affinity_std: float = 0.8
    # σ: standard deviation of the rating noise; the RMSE floor of any model.
    noise_std: float = 0.5
    # Popularity: item exposure ∝ rank^-popularity_exponent (Zipf) over a shuffled item order.
    popularity_exponent: float = 1.0
    # How strongly a user's preference (b_i + p_u . q_i, in units of its std) decides which items
    # they interact with, beside popularity: logit = log exposure + selection_strength * preference.
    selection_strength: float = 3.0
    # Seeds everything generated (the same seed, the same world).
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SyntheticRatings:
    """Generated interactions and the truth behind them.

    Attributes:
      ratings: the interactions (dense ids, timestamps a random order within each user).
      noise_std: σ, the noise in every rating.
      user_factors ``[U, rank]``, item_factors ``[I, rank]``, user_bias ``[U]``, item_bias ``[I]``,
      exposure ``[I]`` (popularity, sums to 1), global_mean, selection_strength, preference_std:
      the truth.
    """

    ratings: Ratings
    noise_std: float
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    exposure: np.ndarray
    global_mean: float
    selection_strength: float
    preference_std: float

    def expected_rating(self, user, item) -> np.ndarray:
        """The noise-free rating of (user, item) pairs."""
        return (self.global_mean + self.user_bias[user] + self.item_bias[item]
                + np.sum(self.user_factors[user] * self.item_factors[item], axis=-1))

    def selection_logits(self, user, item) -> np.ndarray:
        """What decided which items a user interacted with: ``log exposure + strength * preference``
        (an oracle ranking for implicit feedback). ``user`` and ``item`` broadcast."""
        preference = self.item_bias[item] + np.sum(self.user_factors[user] * self.item_factors[item], axis=-1)
        return np.log(self.exposure[item]) + self.selection_strength * preference / self.preference_std


def generate_ratings(config: GeneratorConfig = GeneratorConfig()) -> SyntheticRatings:
    """Draws a world from ``config.seed``: factors and biases, Zipf popularity, which items each
    user interacts with (without replacement: Gumbel top-k over popularity and preference), and
    their ratings (true rating + N(0, σ²) noise, not rounded or clipped so σ is exact)."""
    c = config
    if c.ratings_per_user >= c.num_items:
        raise ValueError(f"ratings_per_user ({c.ratings_per_user}) must be below num_items ({c.num_items})")
    rng = np.random.default_rng(c.seed)
    scale = np.sqrt(c.affinity_std / np.sqrt(c.rank))  # so that p . q has std affinity_std
    p = rng.normal(0, scale, (c.num_users, c.rank))
    q = rng.normal(0, scale, (c.num_items, c.rank))
    bu = rng.normal(0, c.user_bias_std, c.num_users)
    bi = rng.normal(0, c.item_bias_std, c.num_items)
    exposure = np.arange(1, c.num_items + 1, dtype=np.float64) ** -c.popularity_exponent
    exposure = rng.permutation(exposure / exposure.sum())
    counts = np.clip(np.round(rng.lognormal(np.log(c.ratings_per_user) - 0.125, 0.5, c.num_users)),
                     20, c.num_items // 2).astype(np.int64)
    preference_std = float(np.sqrt(c.item_bias_std**2 + c.affinity_std**2)) or 1.0
    world = SyntheticRatings(None, float(c.noise_std), p, q, bu, bi, exposure, c.global_mean,
                             c.selection_strength, preference_std)
    logits = world.selection_logits(np.arange(c.num_users)[:, None], np.arange(c.num_items)[None, :])  # (U, I)
    gumbel = -np.log(-np.log(rng.uniform(size=logits.shape)))
    ranked = np.argsort(-(logits + gumbel), axis=1)  # (U, I): each user's draw order
    users = np.repeat(np.arange(c.num_users), counts)
    items = np.concatenate([ranked[u, :counts[u]] for u in range(c.num_users)])
    truth = c.global_mean + bu[users] + bi[items] + np.sum(p[users] * q[items], axis=1)
    rating = truth + rng.normal(0, c.noise_std, len(users))
    timestamp = np.concatenate([rng.permutation(k) for k in counts])
    data = Ratings(users.astype(np.int32), items.astype(np.int32), rating.astype(np.float32),
                   timestamp.astype(np.int64), c.num_users, c.num_items)
    return dataclasses.replace(world, ratings=data)
