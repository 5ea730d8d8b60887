"""Monte-Carlo estimators of ``KL(p || p_ref)`` and their exact bias and variance on the tree.

With samples ``x ~ p`` (the policy) and ``ratio = p_ref(x) / p(x)``, Schulman's three
single-sample estimators (J. Schulman, "Approximating KL divergence", blog post, 2020) are

.. math::
    k_1 = -\\log r, \\qquad k_2 = \\tfrac12 (\\log r)^2, \\qquad k_3 = (r - 1) - \\log r .

``k1`` is unbiased but takes negative values; ``k2`` is biased (its mean is an
f-divergence that agrees with KL to second order) but has low variance; ``k3`` is
non-negative (``log r <= r - 1``) and unbiased when ``E_p[r] = 1``, i.e. when ``p > 0``
wherever ``p_ref > 0``.  Where the policy has zeros that ``p_ref`` does not,
``E_p[r] = 1 - p_ref(p = 0)`` and ``k3`` underestimates the KL by exactly that mass (a bias
that enumeration exposes and no amount of sampling from ``p`` can).

On a token tree everything is enumerable, so this module computes the *exact* mean and
variance of each estimator, with no sampling:

* per token (:func:`token_kl_moments`): at every node ``s``, the estimator applied to the
  conditional ratio ``pi_ref(a|s) / pi(a|s)`` with ``a ~ pi(.|s)`` estimates the token KL
  ``KL(pi(.|s) || pi_ref(.|s))``;
* per sequence (:func:`sequence_kl_moments`): the estimator applied to the sequence ratio
  ``P_ref(xi) / P(xi)`` (``per="sequence"``), or the per-token estimators summed along the
  completion (``per="token_sum"``, the per-token KL penalty of PPO-style RLHF, Ouyang et al.
  2022, arXiv:2203.02155), both with ``xi ~ P`` and both estimating ``KL(P || P_ref)``.

The derivative of each estimator with respect to ``log p`` (:func:`kl_estimate_grad`) is what a
"KL in the loss" implementation back-propagates (Tang & Munos 2025, arXiv:2506.09477):
``k1`` gives a zero-mean gradient, ``k2`` the reverse-KL gradient of the token KL, ``k3`` the
gradient of the *forward* token KL ``KL(pi_ref || pi)``.

Conventions: log domain throughout; a sample with ``p(x) = 0`` cannot occur, so its estimator
value is reported as 0 and carries no weight; ``p_ref(x) = 0 < p(x)`` gives ``+inf`` for all
three estimators (the KL is infinite).  No function returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .policies import leaf_logprobs
from .tree import TokenTree

__all__ = [
    "ESTIMATORS",
    "check_estimator",
    "kl_estimate",
    "kl_estimate_grad",
    "KLMoments",
    "TokenKLMoments",
    "token_kl_moments",
    "sequence_kl_moments",
    "expected_kl_gradient",
    "kl_gradient",
]

#: The estimator names, in the order of the leading axis of every moments array.
ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def check_estimator(estimator) -> str:
    """Return ``estimator`` if it is one of :data:`ESTIMATORS`, else raise a ValueError."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator


def _log_ratio(logp, logp_ref):
    """``log r = logp_ref - logp`` where ``logp`` is finite; 0 where ``logp = -inf``."""
    logp = np.asarray(logp, dtype=float)
    logp_ref = np.asarray(logp_ref, dtype=float)
    if np.isnan(logp).any() or np.any(logp > 1e-9):
        raise ValueError("logp must be log-probabilities (<= 0, no NaN)")
    if np.isnan(logp_ref).any() or np.any(logp_ref > 1e-9):
        raise ValueError("logp_ref must be log-probabilities (<= 0, no NaN)")
    logp, logp_ref = np.broadcast_arrays(logp, logp_ref)
    possible = np.isfinite(logp)
    lr = np.zeros(logp.shape)
    lr[possible] = logp_ref[possible] - logp[possible]  # -inf where p_ref = 0
    return lr, possible


def kl_estimate(logp, logp_ref, estimator: str) -> np.ndarray:
    """Single-sample KL estimator values for samples ``x ~ p`` (elementwise).

    .. math:: k_1 = -\\log r,\\quad k_2 = \\tfrac12(\\log r)^2,\\quad k_3 = (r-1) - \\log r,
              \\qquad r = p_{ref}(x)/p(x)

    (Schulman 2020, "Approximating KL divergence").  ``k3`` is evaluated as
    ``expm1(log r) - log r``, accurate for small ``log r``.

    Parameters
    ----------
    logp, logp_ref : array_like (broadcastable)
        ``log p(x)`` and ``log p_ref(x)`` of the samples.  ``-inf`` is allowed in both.
    estimator : {"k1", "k2", "k3"}

    Returns
    -------
    ndarray
        Estimator values; ``+inf`` where ``p_ref(x) = 0 < p(x)``; 0 where ``p(x) = 0`` (no
        such sample can be drawn).  ``k3`` overflows to ``+inf`` only for ``r > e^709``.

    Examples
    --------
    >>> kl_estimate(np.log(0.5), np.log(0.25), "k3").round(4)  # r = 1/2
    np.float64(0.1931)
    """
    check_estimator(estimator)
    lr, possible = _log_ratio(logp, logp_ref)
    if estimator == "k1":
        out = -lr
    elif estimator == "k2":
        out = 0.5 * lr * lr
    else:
        with np.errstate(over="ignore"):
            out = np.expm1(lr) - lr
    out = np.where(possible, out, 0.0)
    return out[()] if out.ndim == 0 else out


def kl_estimate_grad(logp, logp_ref, estimator: str) -> np.ndarray:
    """Derivative of the estimator value with respect to ``log p`` (``p_ref`` held fixed).

    .. math:: \\partial_{\\log p} k_1 = 1,\\quad \\partial_{\\log p} k_2 = -\\log r,
              \\quad \\partial_{\\log p} k_3 = 1 - r

    This is the per-sample coefficient of ``grad log p`` when the estimator is used as a loss
    and differentiated ("KL in the loss", as in GRPO; Shao et al. 2024, arXiv:2402.03300;
    analysed by Tang & Munos 2025, arXiv:2506.09477).  0 where ``p(x) = 0``; ``-inf`` for
    ``k3`` where ``r`` overflows.
    """
    check_estimator(estimator)
    lr, possible = _log_ratio(logp, logp_ref)
    if estimator == "k1":
        out = np.ones_like(lr)
    elif estimator == "k2":
        out = -lr
    else:
        with np.errstate(over="ignore"):
            out = -np.expm1(lr)
    out = np.where(possible, out, 0.0)
    return out[()] if out.ndim == 0 else out


# =========================================================================== exact moments
def _weighted_moments(p: np.ndarray, k: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of values ``k`` under weights ``p`` (summing to 1 along ``axis``).

    Entries with ``p = 0`` are ignored.  A ``+inf`` value with positive weight gives an infinite
    mean and variance.  Two-pass variance (no cancellation).
    """
    pos = p > 0
    kk = np.where(pos, k, 0.0)
    inf_mass = np.any(pos & np.isinf(kk), axis=axis)
    kk_fin = np.where(np.isinf(kk), 0.0, kk)
    with np.errstate(over="ignore"):
        mean = np.sum(p * kk_fin, axis=axis)
        dev = np.where(pos, kk_fin - np.expand_dims(mean, axis), 0.0)
        var = np.sum(p * dev * dev, axis=axis)
    mean = np.where(inf_mass, np.inf, mean)
    var = np.where(inf_mass, np.inf, var)
    return mean, var


@dataclass(frozen=True)
class KLMoments:
    """Exact moments of the three KL estimators of the *sequence* KL, per prompt.

    Attributes
    ----------
    per : str
        ``"sequence"`` (estimator of the sequence ratio) or ``"token_sum"`` (per-token
        estimators summed along the completion).
    true_kl : (P,) array
        ``KL(P_pi(.|s0) || P_ref(.|s0))``.
    mean, var : (3, P) arrays
        ``E[k]`` and ``Var[k]`` for ``k1, k2, k3`` (order of :data:`ESTIMATORS`), one sample
        ``xi ~ P_pi(.|s0)``.
    """

    per: str
    true_kl: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @property
    def bias(self) -> np.ndarray:
        """``E[k] - KL``, shape ``(3, P)`` (``+inf`` where the KL is infinite is reported as 0)."""
        with np.errstate(invalid="ignore"):
            b = self.mean - self.true_kl[None, :]
        return np.where(np.isinf(self.true_kl)[None, :] & np.isinf(self.mean), 0.0, b)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation of one sample, shape ``(3, P)``."""
        return np.sqrt(self.var)

    def marginal(self, rho0) -> tuple[float, np.ndarray, np.ndarray]:
        """Moments when the prompt is also drawn, ``s0 ~ rho0``: ``(true_kl, mean (3,), var (3,))``.

        Law of total variance: ``Var = E_s0[Var(k|s0)] + Var_s0(E[k|s0])``.
        """
        w = np.asarray(rho0, dtype=float)
        true = float(np.sum(w * self.true_kl))
        mean, var_of_means = _weighted_moments(np.broadcast_to(w, self.mean.shape), self.mean, axis=1)
        with np.errstate(invalid="ignore"):
            within = np.sum(np.where(w > 0, w * self.var, 0.0), axis=1)
        return true, mean, within + var_of_means


@dataclass(frozen=True)
class TokenKLMoments:
    """Exact per-node moments of the token-level KL estimators.

    Attributes
    ----------
    true_kl : tuple of H arrays (P, V**h)
        ``KL(pi(.|s) || pi_ref(.|s))`` at every depth-``h`` node.
    mean, var : tuple of H arrays (3, P, V**h)
        Mean and variance of ``k1, k2, k3`` at every node for one token ``a ~ pi(.|s)``.
    reach : tuple of H arrays (P, V**h)
        Probability ``d_h(s)`` that a completion from ``pi`` passes through the node.
    """

    true_kl: tuple
    mean: tuple
    var: tuple
    reach: tuple

    def by_depth(self, rho0) -> tuple[np.ndarray, np.ndarray]:
        """Visitation-weighted bias and standard deviation per depth, shapes ``(3, H)``.

        ``bias[k, h] = E_{s0, s ~ d_h}[E[k|s] - KL(s)]`` and
        ``std[k, h] = sqrt(E_{s0, s ~ d_h}[Var(k|s)])`` (the root-mean conditional variance).
        """
        w = np.asarray(rho0, dtype=float)[:, None]
        H = len(self.true_kl)
        bias = np.zeros((len(ESTIMATORS), H))
        std = np.zeros((len(ESTIMATORS), H))
        for h in range(H):
            d = w * self.reach[h]
            pos = d > 0
            for k in range(len(ESTIMATORS)):
                with np.errstate(invalid="ignore"):
                    b = self.mean[h][k] - self.true_kl[h]
                b = np.where(np.isinf(self.true_kl[h]) & np.isinf(self.mean[h][k]), 0.0, b)
                bias[k, h] = np.sum(np.where(pos, d * b, 0.0))
                std[k, h] = np.sqrt(np.sum(np.where(pos, d * self.var[h][k], 0.0)))
        return bias, std


def _token_estimators(tree: TokenTree, log_pi, log_pi_ref):
    """Per level: ``pi`` (P, V**h, V) and the three estimators' values at every edge."""
    out = []
    for h in range(tree.H):
        lp = np.asarray(log_pi[h], dtype=float)
        lq = np.asarray(log_pi_ref[h], dtype=float)
        with np.errstate(under="ignore"):
            p = np.exp(lp)
        ks = np.stack([kl_estimate(lp, lq, e) for e in ESTIMATORS])
        out.append((p, ks))
    return out


def token_kl_moments(tree: TokenTree, log_pi, log_pi_ref) -> TokenKLMoments:
    """Exact mean and variance of ``k1, k2, k3`` for one token at every node of the tree.

    .. math:: E_{a\\sim\\pi(\\cdot|s)}[k_j], \\quad \\mathrm{Var}_{a\\sim\\pi(\\cdot|s)}[k_j],
              \\qquad r = \\pi_{ref}(a|s)/\\pi(a|s)

    against the token KL ``sum_a pi (log pi - log pi_ref)`` (Schulman 2020).  ``k1`` is
    unbiased; ``k3`` is unbiased where ``pi(.|s) > 0`` wherever ``pi_ref(.|s) > 0`` and otherwise
    low by ``pi_ref(pi = 0 | s)``.  Cost ``O(edges)``.

    Examples
    --------
    >>> from toyrlhf.policies import uniform_policy, random_policy
    >>> tree = TokenTree(V=3, H=2)
    >>> m = token_kl_moments(tree, random_policy(tree, np.random.default_rng(0)), uniform_policy(tree))
    >>> bool(np.allclose(m.mean[1][0], m.true_kl[1]) and np.allclose(m.mean[1][2], m.true_kl[1]))
    True
    """
    log_pi = tree.check_levels("log_pi", log_pi)
    log_pi_ref = tree.check_levels("log_pi_ref", log_pi_ref)
    true, mean, var, reach = [], [], [], []
    r = np.ones((tree.P, 1))
    for p, ks in _token_estimators(tree, log_pi, log_pi_ref):
        m, v = _weighted_moments(np.broadcast_to(p, ks.shape), ks, axis=-1)
        true.append(m[0])  # E[k1] is the token KL by definition
        mean.append(m)
        var.append(v)
        reach.append(r)
        with np.errstate(under="ignore"):
            r = (r[..., None] * p).reshape(tree.P, -1)
    return TokenKLMoments(tuple(true), tuple(mean), tuple(var), tuple(reach))


def sequence_kl_moments(tree: TokenTree, log_pi, log_pi_ref, per: str = "sequence") -> KLMoments:
    """Exact mean and variance of the KL estimators of ``KL(P_pi || P_ref)``, per prompt.

    ``per="sequence"``: ``k_j`` of the sequence ratio ``r(xi) = P_ref(xi)/P_pi(xi)``.
    ``per="token_sum"``: ``sum_h k_j`` of the per-token ratios along ``xi`` (the per-token KL
    penalty; for ``k1`` the two coincide).  ``xi ~ P_pi``; moments by enumerating the leaves,
    cost ``O(leaves)``.  By the chain rule of KL, ``E[sum_h k_j] = KL`` for ``j = 1`` and, when
    ``pi`` has full support on ``supp pi_ref``, for ``j = 3``.

    Examples
    --------
    >>> from toyrlhf.policies import uniform_policy, random_policy
    >>> tree = TokenTree(V=2, H=3)
    >>> m = sequence_kl_moments(tree, random_policy(tree, np.random.default_rng(1)), uniform_policy(tree))
    >>> bool(np.allclose(m.bias[0], 0) and np.allclose(m.bias[2], 0) and np.all(m.bias[1] != 0))
    True
    """
    if per not in ("sequence", "token_sum"):
        raise ValueError(f"per must be 'sequence' or 'token_sum', got {per!r}")
    log_pi = tree.check_levels("log_pi", log_pi)
    log_pi_ref = tree.check_levels("log_pi_ref", log_pi_ref)
    lp = leaf_logprobs(tree, log_pi)
    lq = leaf_logprobs(tree, log_pi_ref)
    with np.errstate(under="ignore"):
        p = np.exp(lp)
    if per == "sequence":
        ks = np.stack([kl_estimate(lp, lq, e) for e in ESTIMATORS])
    else:
        levels = [ks for _, ks in _token_estimators(tree, log_pi, log_pi_ref)]
        acc = levels[0].reshape(len(ESTIMATORS), tree.P, tree.V)
        for h in range(1, tree.H):
            acc = (acc[..., None] + levels[h]).reshape(len(ESTIMATORS), tree.P, -1)
        ks = acc
    mean, var = _weighted_moments(np.broadcast_to(p, ks.shape), ks, axis=-1)
    true, _ = _weighted_moments(p, kl_estimate(lp, lq, "k1"), axis=-1)
    return KLMoments(per, true, mean, var)


# =========================================================================== gradients of KL penalties
_MODES = ("reward", "loss")


def expected_kl_gradient(policy_class, theta, log_pi_ref, estimator: str, mode: str) -> np.ndarray:
    """Exact expectation of the sampled gradient of a per-token KL penalty, ``O(leaves)``.

    For completions ``xi ~ P_theta`` with per-token estimators ``k_t = k(pi_theta(a_t|s_t),
    pi_ref(a_t|s_t))``:

    * ``mode="reward"`` (the penalty as a detached reward, PPO-style): the score-function
      estimate ``sum_t grad log pi(a_t|s_t) sum_{t' >= t} k_{t'}``; with ``k1`` its expectation
      is exactly ``grad KL(P_theta || P_ref)``;
    * ``mode="loss"`` (the estimator differentiated as a loss, GRPO-style):
      ``sum_t d k_t / d log pi(a_t|s_t) grad log pi(a_t|s_t)``; in expectation ``k1`` gives 0,
      ``k2`` the per-token reverse-KL gradient *without* the effect of a token on later states,
      ``k3`` the per-token gradient of the forward KL ``KL(pi_ref || pi)`` (Tang & Munos 2025,
      arXiv:2506.09477).

    Computed by enumeration: ``sum_h sum_s d_h(s) sum_a pi(a|s) w(s, a) grad log pi(a|s)`` with
    ``w = Q_k(s, a) - V_k(s)`` (reward) or ``w = dk/dlog pi`` (loss), pulled back by the policy
    class.  Compare with :func:`kl_gradient`.
    """
    from .online._paths import edge_weights_to_leaf_weights, node_reach
    from .online.exact import soft_values

    check_estimator(estimator)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    tree = policy_class.tree
    log_pi = policy_class.conditionals(theta)
    log_pi_ref = tree.check_levels("log_pi_ref", log_pi_ref)
    reach = node_reach(tree, log_pi)
    if mode == "reward":
        costs = tuple(kl_estimate(log_pi[h], log_pi_ref[h], estimator) for h in range(tree.H))
        if any(np.any(np.isinf(c)) for c in costs):
            raise ValueError("the policy puts mass where pi_ref has none: the KL is infinite")
        sv = soft_values(tree, log_pi, np.zeros((tree.P, tree.n_leaves)), costs)
        coef = [sv.advantage(h) for h in range(tree.H)]
    else:
        coef = [kl_estimate_grad(log_pi[h], log_pi_ref[h], estimator) for h in range(tree.H)]
    G = []
    for h in range(tree.H):
        with np.errstate(under="ignore"):
            w = tree.rho0[:, None, None] * reach[h][..., None] * np.exp(log_pi[h])
        G.append(np.where(w > 0, w * coef[h], 0.0))
    g = edge_weights_to_leaf_weights(tree, log_pi, G)
    return policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi)


def kl_gradient(policy_class, theta, log_pi_ref) -> np.ndarray:
    """The true gradient ``grad_theta E_{s0} KL(P_theta || P_ref)``, exactly.

    .. math:: \\nabla \\mathrm{KL} = E_{s_0} \\sum_\\xi P_\\theta(\\xi)
              \\log\\frac{P_\\theta(\\xi)}{P_{ref}(\\xi)}\\, \\nabla \\log P_\\theta(\\xi)
    """
    tree = policy_class.tree
    log_pi = policy_class.conditionals(theta)
    lp = leaf_logprobs(tree, log_pi)
    lq = leaf_logprobs(tree, tree.check_levels("log_pi_ref", log_pi_ref))
    with np.errstate(under="ignore"):
        p = np.exp(lp)
    pos = p > 0
    if np.any(pos & np.isneginf(lq)):
        raise ValueError("the policy puts mass where pi_ref has none: the KL is infinite")
    L = np.zeros_like(lp)
    L[pos] = lp[pos] - lq[pos]
    kl = (p * L).sum(axis=1, keepdims=True)
    g = tree.rho0[:, None] * p * (L - kl)
    return policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi)
