"""Reward classes on completions, feature maps, and gold-reward generators.

Rewards live on leaves: an array ``(P, V**H)``.  They are functions of whole completions
(non-Markovian), as in the slides ("the reward function is non-Markovian and doesn't decompose
into token-wise rewards").  A reward *class* maps parameters ``w`` to a reward array and pulls
leaf gradients back to ``w``:

* :class:`TabularReward`: one free value per (prompt, completion), the full class.
* :class:`LinearReward`: ``r_w(xi) = w . phi(xi)`` for a feature map ``phi``.

Feature maps return ``(N, d)`` (shared across prompts) or ``(P, N, d)`` arrays.  Under EOS, a
completion's tokens are those up to and including its first EOS; padding is not counted.
:func:`feature_family` nests maps into growing capacity (bag-of-tokens ⊂ + position ⊂
+ n-grams ⊂ ... ⊂ tabular), a reward-model "size" axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .tree import TokenTree

__all__ = [
    "TabularReward",
    "LinearReward",
    "bag_of_tokens",
    "position_token",
    "last_token",
    "length_features",
    "ngram_counts",
    "leaf_indicator",
    "per_prompt",
    "feature_family",
    "FAMILY_LEVELS",
    "random_linear_reward",
    "random_tabular_reward",
]


def _check_params(w, n: int) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"w must have shape ({n},), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w must be finite")
    return w


@dataclass(frozen=True, eq=False)
class TabularReward:
    """The tabular reward class: ``r_w(p, xi) = w[p * N + xi]`` (``P * V**H`` parameters)."""

    tree: TokenTree

    @property
    def n_params(self) -> int:
        return self.tree.P * self.tree.n_leaves

    def init(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def reward(self, w) -> np.ndarray:
        return _check_params(w, self.n_params).reshape(self.tree.P, self.tree.n_leaves)

    def vjp(self, g_leaf) -> np.ndarray:
        """Gradient of ``sum g * r_w`` with respect to ``w``."""
        return np.asarray(g_leaf, dtype=float).ravel().copy()

    def design(self, prompt, leaf) -> sparse.csr_array:
        """Rows ``d r(prompt, leaf) / dw`` (one-hot), a sparse ``(M, n_params)`` matrix."""
        M = len(prompt)
        cols = np.asarray(prompt) * self.tree.n_leaves + np.asarray(leaf)
        return sparse.csr_array((np.ones(M), (np.arange(M), cols)), shape=(M, self.n_params))


@dataclass(frozen=True, eq=False)
class LinearReward:
    """Linear rewards ``r_w(xi) = w . phi(xi)`` with features ``(N, d)`` or ``(P, N, d)``."""

    tree: TokenTree
    features: np.ndarray

    def __post_init__(self):
        phi = np.asarray(self.features, dtype=float)
        N = self.tree.n_leaves
        if phi.ndim == 2:
            phi = phi[None]
        if phi.ndim != 3 or phi.shape[1] != N or phi.shape[0] not in (1, self.tree.P):
            raise ValueError(f"features must have shape (N, d) or (P, N, d) with N={N}, P={self.tree.P}, got {np.shape(self.features)}")
        if not np.all(np.isfinite(phi)):
            raise ValueError("features must be finite")
        object.__setattr__(self, "features", np.broadcast_to(phi, (self.tree.P,) + phi.shape[1:]))

    @property
    def n_params(self) -> int:
        return self.features.shape[-1]

    def init(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def reward(self, w) -> np.ndarray:
        return self.features @ _check_params(w, self.n_params)

    def vjp(self, g_leaf) -> np.ndarray:
        return np.einsum("pn,pnd->d", np.asarray(g_leaf, dtype=float), self.features)

    def design(self, prompt, leaf) -> np.ndarray:
        return self.features[np.asarray(prompt), np.asarray(leaf)]


# ----------------------------------------------------------------------- feature maps
def _effective_tokens(tree: TokenTree) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``(N, H)`` and a mask of the positions that belong to the completion."""
    tok = tree.tokens()
    pos = np.arange(tree.H)[None, :]
    return tok, pos < tree.lengths()[:, None]


def bag_of_tokens(tree: TokenTree) -> np.ndarray:
    """``phi(xi)_v`` = number of occurrences of token ``v`` (``d = V``): a unigram reward."""
    tok, mask = _effective_tokens(tree)
    return np.stack([((tok == v) & mask).sum(axis=1) for v in range(tree.V)], axis=1).astype(float)


def position_token(tree: TokenTree) -> np.ndarray:
    """``phi(xi)_{(h, v)} = [a_h = v]`` for positions inside the completion (``d = H V``)."""
    tok, mask = _effective_tokens(tree)
    N = tree.n_leaves
    phi = np.zeros((N, tree.H, tree.V))
    hh = np.broadcast_to(np.arange(tree.H), tok.shape)
    phi[np.arange(N)[:, None], hh, tok] = mask
    return phi.reshape(N, -1)


def last_token(tree: TokenTree) -> np.ndarray:
    """One-hot of the completion's last token (its EOS if it has one) (``d = V``)."""
    tok = tree.tokens()
    last = tok[np.arange(tree.n_leaves), tree.lengths() - 1]
    return np.eye(tree.V)[last]


def length_features(tree: TokenTree) -> np.ndarray:
    """One-hot of the completion length ``1..H`` (``d = H``); constant without EOS."""
    return np.eye(tree.H)[tree.lengths() - 1]


def ngram_counts(tree: TokenTree, n: int) -> np.ndarray:
    """Counts of every ``n``-gram inside the completion (``d = V**n``)."""
    if not 1 <= n <= tree.H:
        raise ValueError(f"n must be in [1, H={tree.H}], got {n}")
    tree.require_bytes(8 * tree.n_leaves * tree.V**n, f"ngram_counts(n={n})")
    tok, mask = _effective_tokens(tree)
    N = tree.n_leaves
    phi = np.zeros((N, tree.V**n))
    powers = tree.V ** np.arange(n - 1, -1, -1)
    for start in range(tree.H - n + 1):
        gram = tok[:, start : start + n] @ powers
        inside = mask[:, start + n - 1]
        np.add.at(phi, (np.arange(N)[inside], gram[inside]), 1.0)
    return phi


def leaf_indicator(tree: TokenTree) -> np.ndarray:
    """One-hot of the completion itself (``d = V**H``): the tabular class as features."""
    tree.require_bytes(8 * tree.n_leaves**2, "leaf_indicator")
    return np.eye(tree.n_leaves)


def per_prompt(tree: TokenTree, phi: np.ndarray) -> np.ndarray:
    """Give each prompt its own copy of the weights: ``(N, d) -> (P, N, P d)`` block features."""
    phi = np.asarray(phi, dtype=float)
    N, d = phi.shape
    out = np.zeros((tree.P, N, tree.P * d))
    for p in range(tree.P):  # loop over prompts, not over leaves
        out[p, :, p * d : (p + 1) * d] = phi
    return out


#: The nested reward-model sizes of :func:`feature_family`, smallest first.
FAMILY_LEVELS = ("unigram", "position", "bigram", "trigram", "tabular")


def feature_family(tree: TokenTree, level: str | int) -> np.ndarray:
    """Nested feature maps of growing capacity (a reward-model size axis).

    ``unigram`` (bag of tokens) ⊂ ``position`` (+ position-token) ⊂ ``bigram`` (+ 2-gram
    counts) ⊂ ``trigram`` (+ 3-gram counts) ⊂ ``tabular`` (+ leaf indicators).  Each level's
    column space contains the previous one, so the reward classes are nested.  Under EOS the
    length one-hot is included from ``position`` on.
    """
    if isinstance(level, (int, np.integer)):
        if not 0 <= level < len(FAMILY_LEVELS):
            raise ValueError(f"level must be in [0, {len(FAMILY_LEVELS)}), got {level}")
        level = FAMILY_LEVELS[level]
    if level not in FAMILY_LEVELS:
        raise ValueError(f"level must be one of {FAMILY_LEVELS}, got {level!r}")
    k = FAMILY_LEVELS.index(level)
    parts = [bag_of_tokens(tree)]
    if k >= 1:
        parts.append(position_token(tree))
        if tree.eos is not None:
            parts.append(length_features(tree))
    if k >= 2 and tree.H >= 2:
        parts.append(ngram_counts(tree, 2))
    if k >= 3 and tree.H >= 3:
        parts.append(ngram_counts(tree, 3))
    if k >= 4:
        parts.append(leaf_indicator(tree))
    return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------- gold rewards
def random_linear_reward(
    tree: TokenTree, features: np.ndarray, rng: np.random.Generator, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """A gold reward ``r = phi w`` with ``w ~ N(0, scale^2 I)``; returns ``(reward (P, N), w)``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    cls = LinearReward(tree, features)
    w = scale * rng.standard_normal(cls.n_params)
    return cls.reward(w), w


def random_tabular_reward(tree: TokenTree, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A gold reward with i.i.d. ``N(0, scale^2)`` values per (prompt, completion)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return scale * rng.standard_normal((tree.P, tree.n_leaves))
