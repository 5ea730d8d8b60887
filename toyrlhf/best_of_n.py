"""Best-of-n sampling over a finite set of completions, exactly.

Draw ``n`` completions i.i.d. from ``pi_ref(.|s0)`` and keep the one with the highest reward
(ties broken uniformly at random among the tied draws).  With ``F(y) = P_ref(r <= y)`` and
``F^-(y) = P_ref(r < y)``, the kept completion lies in the level set ``L = {r = y}`` with
probability ``F(y)^n - F^-(y)^n``, and within a level set it is distributed like ``pi_ref``
(exchangeability of the tied draws), so

.. math:: P_n(\\xi) = \\frac{\\pi_{ref}(\\xi)}{\\pi_{ref}(L(\\xi))}\\,
          \\big(F(r(\\xi))^n - F^-(r(\\xi))^n\\big),

which is ``F(xi)^n - F^-(xi)^n`` when rewards are distinct (Beirami et al. 2024,
arXiv:2401.01879).  Its KL to ``pi_ref`` only depends on the level sets,
``KL = sum_L P_n(L) log(P_n(L) / pi_ref(L))``, and the popular ``log n - (n-1)/n`` is only an
upper bound for discrete outputs (equality needs a continuous reward distribution); as
``n -> inf``, ``KL -> log(1 / pi_ref(L_max))``.

Everything is vectorised over prompts (one sort per prompt row) and computed in the log domain
(``F^n - G^n = F^n (1 - exp(n (log G - log F)))`` with ``expm1``), so large ``n`` is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tree import TokenTree

__all__ = [
    "BestOfN",
    "best_of_n",
    "best_of_n_logprobs",
    "best_of_n_kl",
    "best_of_n_kl_bound",
    "best_of_n_win_rate",
    "sample_best_of_n",
]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    return int(n)


@dataclass(frozen=True)
class _Levels:
    order: np.ndarray  # (P, N) argsort of the reward per prompt (ascending, stable)
    level: np.ndarray  # (P, N) level index (in sorted order) of each sorted position
    mass: np.ndarray  # (P, N) pi_ref mass of each level (padded with zeros)
    below: np.ndarray  # (P, N) pi_ref mass strictly below each level
    above: np.ndarray  # (P, N) pi_ref mass strictly above each level


def _levels(tree: TokenTree, leaf_logp_ref, reward) -> tuple[_Levels, np.ndarray, np.ndarray]:
    lq = tree.check_leaf_array("leaf_logp_ref", leaf_logp_ref, allow_neg_inf=True)
    r = tree.check_leaf_array("reward", reward)
    with np.errstate(under="ignore"):
        q = np.exp(lq)
    if np.any(np.abs(q.sum(axis=1) - 1.0) > 1e-8):
        raise ValueError("leaf_logp_ref must be a distribution over the leaves of each prompt (rows sum to 1)")
    P, N = q.shape
    # zero-probability leaves are never drawn: give them the lowest reward so they never tie
    rr = np.where(q > 0, r, -np.inf)
    order = np.argsort(rr, axis=1, kind="stable")
    rs = np.take_along_axis(rr, order, axis=1)
    qs = np.take_along_axis(q, order, axis=1)
    new = np.ones((P, N), dtype=bool)
    new[:, 1:] = rs[:, 1:] != rs[:, :-1]
    level = np.cumsum(new, axis=1) - 1
    mass = np.zeros((P, N))
    np.add.at(mass, (np.arange(P)[:, None], level), qs)
    below = np.cumsum(mass, axis=1) - mass
    above = np.cumsum(mass[:, ::-1], axis=1)[:, ::-1] - mass
    return _Levels(order, level, mass, np.maximum(below, 0.0), np.maximum(above, 0.0)), q, lq


def _level_logprob(lv: _Levels, n: int) -> np.ndarray:
    """``log(F^n - G^n)`` per level, ``F = below + mass``, ``G = below`` (``-inf`` for empty levels)."""
    F = lv.below + lv.mass
    with np.errstate(divide="ignore", invalid="ignore"):
        # log F accurately both for small F (forward sum) and F near 1 (1 - mass above)
        logF = np.where(F < 0.5, np.log(F), np.log1p(-np.minimum(lv.above, 1.0)))
        logG = np.where(lv.below < 0.5, np.log(lv.below), np.log1p(-np.minimum(lv.above + lv.mass, 1.0)))
        diff = np.where(lv.mass > 0, logG - logF, -np.inf)
        out = n * logF + np.log(-np.expm1(n * diff))
    return np.where(lv.mass > 0, out, -np.inf)


def best_of_n_logprobs(tree: TokenTree, leaf_logp_ref, reward, n: int) -> np.ndarray:
    """Exact ``log P_n(xi | s0)`` of best-of-``n`` sampling from ``pi_ref``, shape ``(P, V**H)``.

    .. math:: P_n(\\xi) = \\frac{\\pi_{ref}(\\xi)}{\\pi_{ref}(L(\\xi))}\\big(F(\\xi)^n - F^-(\\xi)^n\\big)

    (Beirami et al. 2024, arXiv:2401.01879; ties shared in proportion to ``pi_ref``).
    ``n = 1`` gives ``pi_ref``.  ``-inf`` where ``pi_ref = 0``.

    Parameters
    ----------
    leaf_logp_ref : (P, V**H) or (V**H,) log-probabilities (rows sum to 1; ``-inf`` allowed)
    reward : same shape, finite
    n : int >= 1

    Examples
    --------
    >>> tree = TokenTree(V=3, H=1)
    >>> p = np.exp(best_of_n_logprobs(tree, np.log([[0.5, 0.3, 0.2]]), [[0.0, 1.0, 2.0]], 2))
    >>> p.round(3).tolist()  # F^2 - F^-^2: 0.25, 0.64-0.25, 1-0.64
    [[0.25, 0.39, 0.36]]
    """
    n = _check_n(n)
    lv, q, lq = _levels(tree, leaf_logp_ref, reward)
    L = _level_logprob(lv, n)
    with np.errstate(divide="ignore"):
        log_mass = np.log(lv.mass)
    per_level = L - np.where(lv.mass > 0, log_mass, 0.0)  # log P_n(L) - log pi_ref(L)
    P = q.shape[0]
    rows = np.arange(P)[:, None]
    out = np.full(q.shape, -np.inf)
    sorted_lq = np.take_along_axis(lq, lv.order, axis=1)
    vals = np.where(np.isfinite(sorted_lq), sorted_lq + per_level[rows, lv.level], -np.inf)
    out[rows, lv.order] = vals
    return out


def best_of_n_kl(tree: TokenTree, leaf_logp_ref, reward, n: int) -> np.ndarray:
    """Exact ``KL(P_n || pi_ref)`` per prompt, shape ``(P,)``.

    .. math:: \\mathrm{KL} = \\sum_L P_n(L) \\log\\frac{P_n(L)}{\\pi_{ref}(L)}

    (the ratio is constant on each level set).  At most :func:`best_of_n_kl_bound`
    (Beirami et al. 2024, arXiv:2401.01879).
    """
    n = _check_n(n)
    lv, _, _ = _levels(tree, leaf_logp_ref, reward)
    L = _level_logprob(lv, n)
    pos = lv.mass > 0
    with np.errstate(divide="ignore", under="ignore"):
        pn = np.where(pos, np.exp(L), 0.0)
        ratio = np.where(pos & (pn > 0), L - np.log(np.where(pos, lv.mass, 1.0)), 0.0)
    return np.sum(pn * ratio, axis=1)


def best_of_n_kl_bound(n) -> np.ndarray:
    """``log n - (n - 1)/n``: the KL of best-of-``n`` for a continuous reward, an upper bound otherwise."""
    n = np.asarray(n, dtype=float)
    if np.any(n < 1) or np.any(n != np.floor(n)):
        raise ValueError(f"n must be positive integers, got {n!r}")
    out = np.log(n) - (n - 1) / n
    return out[()] if out.ndim == 0 else out


def best_of_n_win_rate(tree: TokenTree, leaf_logp_ref, reward, n: int) -> np.ndarray:
    """Exact win rate of best-of-``n`` against one ``pi_ref`` sample, per prompt, ties counted 1/2.

    .. math:: W_n = \\sum_L P_n(L)\\,\\big[\\pi_{ref}(r < y_L) + \\tfrac12 \\pi_{ref}(L)\\big]

    For distinct rewards with no atoms this tends to ``n / (n + 1)``.
    """
    n = _check_n(n)
    lv, _, _ = _levels(tree, leaf_logp_ref, reward)
    L = _level_logprob(lv, n)
    with np.errstate(under="ignore"):
        pn = np.where(lv.mass > 0, np.exp(L), 0.0)
    return np.sum(pn * (lv.below + 0.5 * lv.mass), axis=1)


@dataclass(frozen=True)
class BestOfN:
    """Best-of-``n`` summary: leaf log-probs ``logp (P, N)``, ``kl (P,)``, ``win_rate (P,)``, ``bound``."""

    n: int
    logp: np.ndarray
    kl: np.ndarray
    win_rate: np.ndarray
    bound: float


def best_of_n(tree: TokenTree, leaf_logp_ref, reward, n: int) -> BestOfN:
    """All exact best-of-``n`` quantities at once (see the module docstring)."""
    return BestOfN(
        n=_check_n(n),
        logp=best_of_n_logprobs(tree, leaf_logp_ref, reward, n),
        kl=best_of_n_kl(tree, leaf_logp_ref, reward, n),
        win_rate=best_of_n_win_rate(tree, leaf_logp_ref, reward, n),
        bound=float(best_of_n_kl_bound(n)),
    )


def sample_best_of_n(
    tree: TokenTree, leaf_logp_ref, reward, n: int, size: int, rng: np.random.Generator, prompt: int = 0
) -> np.ndarray:
    """Brute force: ``size`` best-of-``n`` draws for one prompt (leaf indices), vectorised.

    Draws a ``(size, n)`` block from ``pi_ref(.|prompt)`` by inverse CDF and keeps, per row, the
    highest reward, breaking ties by an independent uniform key.
    """
    n = _check_n(n)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    lq = tree.check_leaf_array("leaf_logp_ref", leaf_logp_ref, allow_neg_inf=True)[prompt]
    r = tree.check_leaf_array("reward", reward)[prompt]
    with np.errstate(under="ignore"):
        cdf = np.cumsum(np.exp(lq))
    cdf /= cdf[-1]
    draws = np.minimum(np.searchsorted(cdf, rng.random((size, n)), side="right"), lq.size - 1)
    rd = r[draws]
    best = rd == rd.max(axis=1, keepdims=True)
    key = np.where(best, rng.random((size, n)), -1.0)
    return draws[np.arange(size), key.argmax(axis=1)]
