"""Exact (expectation) versions of the online algorithms: gradients and steps in ``O(leaves)``.

Everything here enumerates the tree instead of sampling, so the updates are deterministic:

* :func:`exact_policy_gradient`: ``grad J`` by the score-function identity, pulled back through
  the tree by the policy class's ``leaf_logprobs_vjp``;
* :func:`soft_values`: token-level ``Q``, ``V`` and advantages of a policy for a terminal reward
  plus per-token KL costs (a perfect critic);
* :func:`mirror_descent_step`, :func:`natural_gradient_step`: the exact KL-regularised mirror
  step on sequences and the natural policy gradient;
* :func:`ppo_exact_objective` / :func:`ppo_exact_step`: PPO's clipped surrogate in expectation;
* :func:`rebel_exact_loss` / :func:`rebel_exact_step`: REBEL's regression in expectation and its
  closed-form minimiser;
* :func:`online_dpo_exact_loss` / :func:`online_dpo_exact_step`: DPO on the population of
  on-policy pairs;
* :func:`pg_estimator_variance`: exact variance of the sampled REINFORCE estimators.

Step functions share one signature, ``step(policy_class, theta, problem, rng, **options) ->
(theta_next, info)`` with ``info`` a dict of floats, so :func:`toyrlhf.online.train` drives
exact and sampled algorithms alike (``rng`` is unused by exact steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit, log_expit

from ..kl_estimators import check_estimator, kl_estimate, kl_estimate_grad
from ..policies import LogLinearPolicy, TabularPolicy, leaf_logprobs
from ..projections import soft_optimal_policy
from ..tree import TokenTree
from ._paths import edge_weights_to_leaf_weights, node_reach
from .problem import RLProblem, check_choice, check_float, check_int

__all__ = [
    "exact_objective",
    "exact_policy_gradient",
    "exact_pg_step",
    "SoftValues",
    "token_kl_costs",
    "soft_values",
    "tilt_policy",
    "mirror_descent_step",
    "natural_gradient_step",
    "leaf_scores",
    "leaf_score_sqnorms",
    "clipped_surrogate",
    "ppo_exact_objective",
    "ppo_exact_step",
    "rebel_exact_loss",
    "rebel_exact_step",
    "online_dpo_exact_loss",
    "online_dpo_exact_step",
    "PGVariance",
    "pg_estimator_variance",
]


def _check_problem(problem) -> RLProblem:
    if not isinstance(problem, RLProblem):
        raise TypeError(f"problem must be an RLProblem, got {type(problem).__name__}")
    return problem


def ascend(theta: np.ndarray, lr: float, grad: np.ndarray) -> np.ndarray:
    """``theta + lr * grad``; may overflow to ``inf`` (the training driver then stops, naming the step)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return theta + lr * grad


def _shaped_leaf_reward(problem: RLProblem, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``R = r - beta (log P - log P_ref)`` on the support of ``P``; (R, p)."""
    with np.errstate(under="ignore"):
        p = np.exp(lp)
    pos = p > 0
    lq = problem.leaf_logp_ref
    if np.any(pos & np.isneginf(lq)):
        raise ValueError(
            "the policy puts mass where pi_ref has none: KL(P_pi || P_ref) and J are infinite, "
            "so the KL-regularised gradient is undefined"
        )
    R = np.zeros_like(lp)
    R[pos] = problem.reward[pos] - problem.beta * (lp[pos] - lq[pos])
    return R, p


def _pretrain_term(problem: RLProblem, lp: np.ndarray) -> tuple[float, np.ndarray]:
    """``gamma E_pretrain[log P]`` and its leaf weights ``gamma rho0 D`` (zeros when gamma = 0)."""
    if problem.gamma == 0 or problem.pretrain_logp is None:
        return 0.0, np.zeros_like(lp)
    d = problem.pretrain_probs()
    pos = d > 0
    if np.any(pos & np.isneginf(lp)):
        raise ValueError("the policy gives probability 0 to a completion of the pretraining distribution: "
                         "E_pretrain[log P] = -inf")
    w = problem.tree.rho0[:, None] * d
    val = float(np.sum(np.where(pos, w * np.where(pos, lp, 0.0), 0.0)))
    return problem.gamma * val, problem.gamma * w


# =========================================================================== policy gradient
def exact_objective(policy_class, theta, problem: RLProblem) -> float:
    """``J_gamma(pi_theta)`` exactly (see :class:`RLProblem`)."""
    _check_problem(problem)
    return problem.evaluate(log_pi=policy_class.conditionals(theta)).objective


def exact_policy_gradient(policy_class, theta, problem: RLProblem, log_pi=None) -> tuple[float, np.ndarray]:
    """Exact ``J_gamma(theta)`` and its gradient in ``O(leaves)``.

    .. math::
        \\nabla_\\theta J = E_{s_0}\\sum_\\xi P_\\theta(\\xi)\\,\\big[r(\\xi)
            - \\beta(\\log P_\\theta(\\xi) - \\log P_{ref}(\\xi)) - b(s_0)\\big]\\,
            \\nabla_\\theta \\log P_\\theta(\\xi)
            + \\gamma\\, E_{pretrain}[\\nabla_\\theta \\log P_\\theta]

    (the score-function / REINFORCE identity, Williams 1992; the ``-beta`` from differentiating
    ``log P`` inside the KL multiplies ``E[grad log P] = 0`` and drops out).  The baseline
    ``b(s0) = J(s0)`` changes nothing in expectation and is subtracted for accuracy.  The leaf
    weights ``g = rho0 P (R - b)`` are pulled back by ``policy_class.leaf_logprobs_vjp``.

    Returns
    -------
    J : float
    grad : (n_params,) array

    Examples
    --------
    >>> from toyrlhf.tree import TokenTree
    >>> from toyrlhf.policies import TabularPolicy, uniform_policy
    >>> tree = TokenTree(V=2, H=2)
    >>> ref = uniform_policy(tree)
    >>> problem = RLProblem(tree, ref, [[0.0, 0.0, 0.0, 1.0]], beta=1.0)
    >>> J, g = exact_policy_gradient(TabularPolicy(tree, ref), np.zeros(6), problem)
    >>> round(J, 4), g.round(4).tolist()  # E[r] = 1/4 at pi_ref, the gradient points to xi = (1, 1)
    (0.25, [-0.125, 0.125, 0.0, 0.0, -0.125, 0.125])
    """
    _check_problem(problem)
    tree = problem.tree
    log_pi = policy_class.conditionals(theta) if log_pi is None else log_pi
    lp = leaf_logprobs(tree, log_pi)
    R, p = _shaped_leaf_reward(problem, lp)
    J_s = (p * R).sum(axis=1)
    g = tree.rho0[:, None] * p * (R - J_s[:, None])
    pre_val, pre_w = _pretrain_term(problem, lp)
    J = float(np.dot(tree.rho0, J_s)) + pre_val
    return J, policy_class.leaf_logprobs_vjp(theta, g + pre_w, log_pi=log_pi)


def exact_pg_step(policy_class, theta, problem: RLProblem, rng=None, *, lr: float = 1.0):
    """One step of gradient ascent with the exact gradient: ``theta + lr grad J_gamma``."""
    lr = check_float("lr", lr)
    J, g = exact_policy_gradient(policy_class, theta, problem)
    return ascend(np.asarray(theta, dtype=float), lr, g), {"loss": -J, "grad_norm": float(np.linalg.norm(g))}


# =========================================================================== soft values
@dataclass(frozen=True, eq=False)
class SoftValues:
    """Token-level values of a policy on the tree.

    ``q[h]`` (P, V**h, V): ``Q(s, a) = c(s, a) + V(s.a)``; ``v[h]`` (P, V**h): ``V(s) = E_pi Q(s, .)``,
    with ``V(leaf) = r(leaf)``; ``advantage(h) = q[h] - v[h][..., None]``.  With the k1 KL cost
    ``c = -beta log(pi/pi_ref)``, ``v[0]`` is ``J(s0)``.
    """

    q: tuple
    v: tuple

    def advantage(self, h: int) -> np.ndarray:
        return self.q[h] - self.v[h][..., None]


def token_kl_costs(tree: TokenTree, log_pi, log_pi_ref, beta: float, estimator: str = "k1") -> tuple:
    """Per-edge KL costs ``c(s, a) = -beta k(pi(a|s), pi_ref(a|s))`` (0 where ``pi(a|s) = 0``).

    With ``k1`` the costs along a completion sum to ``-beta log(P/P_ref)``: the per-token KL
    penalty of PPO-style RLHF (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022).
    """
    check_estimator(estimator)
    out = []
    for h in range(tree.H):
        k = kl_estimate(log_pi[h], log_pi_ref[h], estimator)
        if np.any(np.isinf(k)):
            raise ValueError("the policy puts mass on a token pi_ref forbids: the per-token KL penalty is infinite")
        out.append(-beta * k)
    return tuple(out)


def soft_values(tree: TokenTree, log_pi, reward, costs=None) -> SoftValues:
    """Exact ``Q`` and ``V`` of a policy for a terminal reward plus per-edge costs, ``O(edges)``.

    .. math:: V_H(\\xi) = r(\\xi),\\quad Q_h(s,a) = c_h(s,a) + V_{h+1}(s\\cdot a),\\quad
              V_h(s) = \\sum_a \\pi(a|s) Q_h(s,a)

    (Bellman equations of the deterministic token MDP, slides 000 "Language Modeling as an MDP").
    """
    r = tree.check_leaf_array("reward", reward)
    q = [None] * tree.H
    v = [None] * tree.H
    nxt = r
    for h in range(tree.H - 1, -1, -1):
        Q = nxt.reshape(tree.P, tree.V**h, tree.V)
        if costs is not None:
            Q = Q + costs[h]
        with np.errstate(under="ignore"):
            pi = np.exp(log_pi[h])
        nxt = np.where(pi > 0, pi * Q, 0.0).sum(axis=-1)
        q[h], v[h] = Q, nxt
    return SoftValues(tuple(q), tuple(v))


# =========================================================================== mirror / natural steps
def tilt_policy(tree: TokenTree, log_pi, delta) -> tuple:
    """Conditionals of ``P_new(xi) ∝ P_pi(xi) exp(delta(xi))`` (per prompt), via soft value iteration.

    Calls :func:`toyrlhf.projections.soft_optimal_policy` with ``pi`` as the reference, reward
    ``delta`` and ``beta = 1``.  ``delta`` only matters where ``P_pi > 0``.
    """
    d = tree.check_leaf_array("delta", delta)
    return soft_optimal_policy(tree, log_pi, d, 1.0).log_pi


def _tabular_theta(policy_class, log_pi_new) -> np.ndarray:
    if not isinstance(policy_class, TabularPolicy):
        raise TypeError(f"this exact step is closed-form for TabularPolicy only, got {type(policy_class).__name__}")
    return policy_class.theta_from_policy(log_pi_new)


def mirror_descent_step(policy_class, theta, problem: RLProblem, rng=None, *, eta: float = 1.0):
    """Exact KL-regularised mirror-descent step on sequences (tabular class).

    .. math::
        P_{t+1} = \\arg\\max_P\\; \\eta\\big(E_P[r] - \\beta\\mathrm{KL}(P\\|P_{ref})\\big)
                  - \\mathrm{KL}(P\\|P_t)
        \\;\\propto\\; P_t^{\\frac{1}{1+\\eta\\beta}}\\, P_{ref}^{\\frac{\\eta\\beta}{1+\\eta\\beta}}
                  \\exp\\!\\Big(\\frac{\\eta\\, r}{1+\\eta\\beta}\\Big)

    (first-order condition ``eta r - eta beta log(P/P_ref) - log(P/P_t) = const``; the proximal
    form of mirror descent, Beck & Teboulle 2003; Tomar et al. 2020, arXiv:2005.09814).  Realised
    as conditionals by :func:`tilt_policy` (soft value iteration with ``pi_t`` as reference and
    reward ``eta (r - beta log(P_t/P_ref)) / (1 + eta beta)``).  ``log P_{t+1} - log P*``
    contracts by ``1/(1 + eta beta)`` per step, so the iterates converge to the soft-optimal
    policy for every ``eta > 0`` (one step as ``eta -> inf``).  Needs ``gamma = 0``.
    """
    _check_problem(problem)
    eta = check_float("eta", eta)
    if problem.gamma != 0:
        raise ValueError("mirror_descent_step solves the gamma = 0 objective; got gamma > 0")
    tree = problem.tree
    log_pi = policy_class.conditionals(theta)
    lp = leaf_logprobs(tree, log_pi)
    R, p = _shaped_leaf_reward(problem, lp)
    new = tilt_policy(tree, log_pi, eta * R / (1.0 + eta * problem.beta))
    return _tabular_theta(policy_class, new), {"loss": -float(np.dot(tree.rho0, (p * R).sum(axis=1)))}


def _leaf_tokens_nodes(tree: TokenTree):
    tok = np.asarray(tree.tokens())
    nodes = np.zeros_like(tok)
    for h in range(1, tree.H):
        nodes[:, h] = nodes[:, h - 1] * tree.V + tok[:, h - 1]
    return tok, nodes


def leaf_scores(policy_class, theta) -> np.ndarray:
    """Dense score vectors ``grad_theta log P_theta(xi | s0)`` of every leaf, shape ``(P, V**H, d)``.

    Tabular: ``sum_h (e_{a_h} - pi(.|s_h))`` placed in node ``s_h``'s block.  Log-linear:
    ``sum_h (psi(s_h, a_h) - E_pi psi(s_h, .))``.  Zero rows at absorbed (post-EOS) nodes.  For
    small trees (memory is checked against the tree's budget).
    """
    tree = policy_class.tree
    log_pi = policy_class.conditionals(theta)
    d = policy_class.n_params
    tree.require_bytes(8 * tree.P * tree.n_leaves * d, "leaf_scores (dense per-leaf gradients)")
    tok, nodes = _leaf_tokens_nodes(tree)
    N, V = tree.n_leaves, tree.V
    if type(policy_class) is TabularPolicy:
        S = np.zeros((tree.P, N, d))
        off = 0
        leaves = np.arange(N)
        for h in range(tree.H):
            size = tree.P * V**h * V
            for p in range(tree.P):  # loop over prompts; leaves are vectorised
                with np.errstate(under="ignore"):
                    pi = np.exp(log_pi[h][p, nodes[:, h]])  # (N, V)
                row = (tok[:, h, None] == np.arange(V)) - pi
                row[np.isneginf(log_pi[h][p, nodes[:, h]])] = 0.0
                if tree.eos is not None:
                    row[tree.absorbed(h)[nodes[:, h]]] = 0.0
                idx = off + (p * V**h + nodes[:, h])[:, None] * V + np.arange(V)
                S[p, leaves[:, None], idx] += row
            off += size
        return S
    if type(policy_class) is LogLinearPolicy:
        S = np.zeros((tree.P, N, d))
        for h in range(tree.H):
            f = np.broadcast_to(policy_class.features[h], (tree.P,) + policy_class.features[h].shape[1:])
            with np.errstate(under="ignore"):
                pi = np.exp(log_pi[h])
            c = f - np.einsum("pnv,pnvd->pnd", pi, f)[:, :, None, :]
            c = np.where(np.isneginf(log_pi[h])[..., None], 0.0, c)
            if tree.eos is not None:
                c[:, tree.absorbed(h)] = 0.0
            S += c[:, nodes[:, h], tok[:, h]]
        return S
    raise TypeError(f"leaf_scores supports TabularPolicy and LogLinearPolicy, got {type(policy_class).__name__}")


def leaf_score_sqnorms(policy_class, theta) -> np.ndarray:
    """``||grad_theta log P_theta(xi)||^2`` for every leaf, shape ``(P, V**H)``.

    Tabular (closed form, ``O(leaves)``): the blocks of different depths are disjoint, so
    ``||s(xi)||^2 = sum_h (1 - 2 pi(a_h|s_h) + ||pi(.|s_h)||^2)``.  Log-linear: from
    :func:`leaf_scores`.
    """
    tree = policy_class.tree
    if type(policy_class) is TabularPolicy:
        log_pi = policy_class.conditionals(theta)
        levels = []
        for h in range(tree.H):
            with np.errstate(under="ignore"):
                pi = np.exp(log_pi[h])
            q = 1.0 - 2.0 * pi + (pi * pi).sum(axis=-1, keepdims=True)
            if tree.eos is not None:
                q[:, tree.absorbed(h)] = 0.0
            levels.append(q)
        return leaf_logprobs(tree, levels)
    S = leaf_scores(policy_class, theta)
    return np.einsum("pnd,pnd->pn", S, S)


def natural_gradient_step(policy_class, theta, problem: RLProblem, rng=None, *, eta: float = 1.0, rcond: float = 1e-10):
    """Exact natural policy gradient step ``theta + eta F^+ grad J_gamma``.

    ``F = E_{s0, xi ~ P_theta}[s(xi) s(xi)^T]`` is the Fisher information of the sequence
    distribution (Kakade 2001).  For a :class:`~toyrlhf.policies.TabularPolicy` (and
    ``gamma = 0``) it is block diagonal, ``F_s = d(s)(diag pi_s - pi_s pi_s^T)``, and since
    ``grad_s J = d(s)(diag pi_s - pi_s pi_s^T) Q(s, .)`` the step is the closed form

    .. math:: \\pi_{t+1}(a|s) \\propto \\pi_t(a|s)\\, \\exp(\\eta\\, A_t(s, a))

    with ``A_t`` the advantage of ``pi_t`` for the terminal reward and per-token costs
    ``-beta log(pi_t/pi_ref)`` (entropy-regularised NPG, Cen et al. 2021, arXiv:2007.06558).
    Otherwise ``F`` is formed densely from :func:`leaf_scores` (small trees) and solved by least
    squares with cut-off ``rcond``.
    """
    _check_problem(problem)
    eta = check_float("eta", eta)
    tree = problem.tree
    theta = np.asarray(theta, dtype=float)
    log_pi = policy_class.conditionals(theta)
    if type(policy_class) is TabularPolicy and problem.gamma == 0:
        costs = token_kl_costs(tree, log_pi, problem.log_pi_ref, problem.beta, "k1")
        sv = soft_values(tree, log_pi, problem.reward, costs)
        step = np.concatenate([sv.advantage(h).ravel() for h in range(tree.H)])
        return ascend(theta, eta, step), {"loss": -float(np.dot(tree.rho0, sv.v[0][:, 0]))}
    J, g = exact_policy_gradient(policy_class, theta, problem, log_pi=log_pi)
    S = leaf_scores(policy_class, theta)
    with np.errstate(under="ignore"):
        w = tree.rho0[:, None] * np.exp(leaf_logprobs(tree, log_pi))
    F = np.einsum("pn,pnd,pne->de", w, S, S)
    step = np.linalg.lstsq(F, g, rcond=rcond)[0]
    return ascend(theta, eta, step), {"loss": -J}


# =========================================================================== PPO in expectation
def clipped_surrogate(log_ratio, A, clip_eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PPO's clipped surrogate per entry, its derivative in ``log rho``, and the active mask.

    .. math:: \\ell = \\min(\\rho A,\\ \\mathrm{clip}(\\rho, 1-\\epsilon, 1+\\epsilon) A)
              = \\begin{cases} A \\min(\\rho, 1+\\epsilon) & A > 0 \\\\
                                 A \\max(\\rho, 1-\\epsilon) & A < 0 \\\\ 0 & A = 0 \\end{cases},
              \\qquad \\rho = e^{\\log\\rho}

    (Schulman et al. 2017, arXiv:1707.06347, eq. 7).  ``d ell / d log rho = rho A`` where the
    unclipped term is the minimum (``active``: ``rho <= 1+eps`` for ``A > 0``, ``rho >= 1-eps`` for
    ``A < 0``) and 0 elsewhere; entries with ``A = 0`` are 0 and inactive.  The ratio is never
    exponentiated beyond where it matters: for ``A > 0`` only ``min(log rho, log(1+eps))`` is,
    so any ``log rho`` (``+inf`` included) gives the exact, bounded value and a zero gradient;
    ``log rho = -inf`` (the new policy drops the token) gives ``rho = 0``.  Only ``A < 0`` with
    ``rho |A|`` beyond the float range has no float answer (the surrogate is ``-inf`` to floating
    point and its gradient is not representable): that raises :class:`FloatingPointError`, which
    :func:`~toyrlhf.online.train` reports as :class:`~toyrlhf.online.TrainingDiverged` naming the step.
    Nothing is clipped silently.
    """
    lr = np.asarray(log_ratio, dtype=float)
    A = np.asarray(A, dtype=float)
    lr, A = np.broadcast_arrays(lr, A)
    if np.isnan(lr).any():
        raise ValueError("log_ratio contains NaN")
    if not np.all(np.isfinite(A)):
        raise ValueError("advantages must be finite")
    up, down = np.log1p(clip_eps), np.log1p(-clip_eps) if clip_eps < 1 else -np.inf
    pos, neg = A > 0, A < 0
    active = (pos & (lr <= up)) | (neg & (lr >= down))
    # the exponent is capped only where the cap is the clip itself (the value is exact)
    expo = np.where(pos, np.minimum(lr, up), np.where(neg, np.maximum(lr, down), 0.0))
    with np.errstate(over="ignore", under="ignore"):
        val = np.where(pos | neg, A * np.exp(expo), 0.0)
        grad = np.where(active, A * np.exp(np.where(active, lr, 0.0)), 0.0)
    bad = np.isinf(val) | np.isinf(grad)
    if bad.any():
        worst = float(np.max(np.where(bad, lr, -np.inf)))
        raise FloatingPointError(
            f"PPO ratio pi_theta/pi_old = exp({worst:.1f}) on a token with negative advantage: the clipped "
            "surrogate rho*A and its gradient exceed the float range (the policy moved too far from pi_old; "
            "use a smaller step size)"
        )
    return val, grad, active


def ppo_exact_objective(
    policy_class,
    theta,
    problem: RLProblem,
    log_pi_old,
    advantages,
    *,
    clip_eps: float = 0.2,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
) -> tuple[float, np.ndarray]:
    """PPO's clipped surrogate in expectation over the behaviour policy, and its gradient.

    .. math::
        L(\\theta) = E_{s_0}\\sum_h \\sum_s d^{old}_h(s) \\sum_a \\pi_{old}(a|s)
            \\min\\big(\\rho\\, A(s,a),\\ \\mathrm{clip}(\\rho, 1-\\epsilon, 1+\\epsilon) A(s,a)\\big)
            \\;[-\\;\\beta\\, E_{old}\\, k(\\pi_\\theta, \\pi_{ref})]
            \\;+\\; \\gamma\\, E_{pretrain}[\\log P_\\theta],
        \\qquad \\rho = \\pi_\\theta(a|s)/\\pi_{old}(a|s)

    (Schulman et al. 2017, arXiv:1707.06347, eq. 7, summed over the tokens of a completion; the
    bracketed KL loss only with ``kl_mode="loss"``; PPO-ptx, Ouyang et al. 2022, eq. 2).  The
    expectation over trajectories is exact: token terms depend on ``(s, a)`` only, so they are
    weighted by the visitation probability ``d_h(s)`` of ``pi_old``.  ``advantages`` is a tuple
    of per-level ``(P, V**h, V)`` arrays, e.g. ``soft_values(...).advantage(h)``.  At
    ``theta = theta_old`` the gradient equals the policy gradient.
    """
    _check_problem(problem)
    check_estimator(kl_estimator)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    clip_eps = check_float("clip_eps", clip_eps)
    tree = problem.tree
    log_pi = policy_class.conditionals(theta)
    reach = node_reach(tree, log_pi_old)
    total = 0.0
    G = []
    for h in range(tree.H):
        lo = log_pi_old[h]
        with np.errstate(under="ignore"):
            w = tree.rho0[:, None, None] * reach[h][..., None] * np.exp(lo)
        pos = w > 0
        ln = np.where(pos, log_pi[h], 0.0)
        lo0 = np.where(pos, lo, 0.0)
        A = np.where(pos, advantages[h], 0.0)
        with np.errstate(invalid="ignore"):
            log_ratio = np.where(pos, ln - lo0, 0.0)  # -inf where pi_theta drops a token pi_old plays
        surr, dsurr, _ = clipped_surrogate(log_ratio, A, clip_eps)
        total += float(np.sum(w * surr))
        Gh = w * dsurr
        if kl_mode == "loss":
            lref = np.where(pos, problem.log_pi_ref[h], 0.0)
            k = kl_estimate(ln, lref, kl_estimator)
            total -= problem.beta * float(np.sum(w * k))
            Gh = Gh - problem.beta * w * kl_estimate_grad(ln, lref, kl_estimator)
        G.append(np.where(pos, Gh, 0.0))
    g = edge_weights_to_leaf_weights(tree, log_pi, G)
    lp = leaf_logprobs(tree, log_pi)
    pre_val, pre_w = _pretrain_term(problem, lp)
    return total + pre_val, policy_class.leaf_logprobs_vjp(theta, g + pre_w, log_pi=log_pi)


def ppo_exact_step(
    policy_class,
    theta,
    problem: RLProblem,
    rng=None,
    *,
    lr: float = 1.0,
    epochs: int = 4,
    clip_eps: float = 0.2,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
):
    """One PPO iteration with exact expectations: ``epochs`` ascent steps on :func:`ppo_exact_objective`.

    The advantages are the exact ones of ``pi_old`` (a perfect critic, :func:`soft_values`) for
    the terminal reward and, with ``kl_mode="reward"``, the per-token costs
    ``-beta k(pi_old, pi_ref)``.  With ``k1`` in the reward and ``gamma = 0`` the fixed point is
    the soft-optimal policy (the surrogate's gradient at ``theta_old`` is ``grad J``).
    """
    _check_problem(problem)
    lr = check_float("lr", lr)
    epochs = check_int("epochs", epochs, 1)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    tree = problem.tree
    theta_old = np.asarray(theta, dtype=float)
    log_pi_old = policy_class.conditionals(theta_old)
    costs = token_kl_costs(tree, log_pi_old, problem.log_pi_ref, problem.beta, kl_estimator) if kl_mode == "reward" else None
    sv = soft_values(tree, log_pi_old, problem.reward, costs)
    adv = tuple(sv.advantage(h) for h in range(tree.H))
    th = theta_old
    val = 0.0
    for _ in range(epochs):
        val, g = ppo_exact_objective(policy_class, th, problem, log_pi_old, adv, clip_eps=clip_eps,
                                     kl_estimator=kl_estimator, kl_mode=kl_mode)
        th = ascend(th, lr, g)
        if not np.all(np.isfinite(th)):
            break
    return th, {"loss": -val}


# =========================================================================== REBEL in expectation
def rebel_exact_loss(
    policy_class, theta, problem: RLProblem, log_pi_t, *, eta: float, shaped: bool = True, mu_logp=None
) -> tuple[float, np.ndarray]:
    """REBEL's regression loss over all pairs, in expectation, and its gradient.

    .. math::
        L(\\theta) = E_{s_0} E_{\\xi, \\xi' \\sim \\mu}\\Big[\\Big(\\tfrac1\\eta\\Big(
            \\log\\tfrac{P_\\theta(\\xi)}{P_t(\\xi)} - \\log\\tfrac{P_\\theta(\\xi')}{P_t(\\xi')}\\Big)
            - (R(\\xi) - R(\\xi'))\\Big)^2\\Big] = E_{s_0}\\, 2\\,\\mathrm{Var}_\\mu(Z),
        \\quad Z = \\tfrac1\\eta \\log\\tfrac{P_\\theta}{P_t} - R

    (Gao et al. 2024, arXiv:2404.16767: REBEL regresses relative rewards onto differences of
    log-ratios to the current policy).  ``R = r - beta log(P_t/P_ref)`` if ``shaped`` (the
    KL-regularised problem) else ``r``; ``mu`` defaults to ``P_t``.  ``L = 0`` exactly when
    ``P_theta ∝ P_t exp(eta R)`` on ``supp mu``: the mirror step.
    """
    _check_problem(problem)
    eta = check_float("eta", eta)
    tree = problem.tree
    lt = leaf_logprobs(tree, log_pi_t)
    R, pt = _shaped_leaf_reward(problem, lt) if shaped else (problem.reward, None)
    if mu_logp is None:
        mu = np.exp(lt) if pt is None else pt
    else:
        with np.errstate(under="ignore"):
            mu = np.exp(tree.check_leaf_array("mu_logp", mu_logp, allow_neg_inf=True))
    log_pi = policy_class.conditionals(theta)
    lp = leaf_logprobs(tree, log_pi)
    pos = mu > 0
    if np.any(pos & (np.isneginf(lp) | np.isneginf(lt))):
        raise ValueError("mu puts mass where P_theta or P_t is zero: the REBEL log-ratios are undefined")
    Z = np.zeros_like(lp)
    Z[pos] = (lp[pos] - lt[pos]) / eta - R[pos]
    mean = (mu * Z).sum(axis=1, keepdims=True) / mu.sum(axis=1, keepdims=True)
    dev = np.where(pos, Z - mean, 0.0)
    w = tree.rho0[:, None]
    loss = float(np.sum(w * 2.0 * mu * dev * dev))
    g = w * 4.0 * mu * dev / eta
    return loss, policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi)


def rebel_exact_step(
    policy_class, theta, problem: RLProblem, rng=None, *, eta: float = 1.0, shaped: bool = True,
    solve: str = "closed_form", tol: float = 1e-12, maxiter: int = 5000,
):
    """One exact REBEL step: the minimiser of :func:`rebel_exact_loss` (``mu = P_t``).

    ``solve="closed_form"`` (tabular class): ``P_{t+1} = P_t exp(eta R) / Z``, with
    ``R = r - beta log(P_t/P_ref)`` when ``shaped``; iterating converges to the soft-optimal
    policy when ``0 < eta beta < 2`` (``log P_{t+1} - log P*`` contracts by ``1 - eta beta``) and
    lands on it in one step when ``eta beta = 1``.  ``solve="regression"``: minimise the
    regression loss numerically (L-BFGS from ``theta``, any policy class); for the tabular class
    the two agree, which is REBEL's reduction of the mirror step to regression.  Host boundary:
    ``scipy.optimize`` on NumPy parameters (the online module computes with NumPy).
    """
    _check_problem(problem)
    eta = check_float("eta", eta)
    check_choice("solve", solve, ("closed_form", "regression"))
    tree = problem.tree
    theta = np.asarray(theta, dtype=float)
    log_pi_t = policy_class.conditionals(theta)
    if solve == "closed_form":
        lt = leaf_logprobs(tree, log_pi_t)
        R = _shaped_leaf_reward(problem, lt)[0] if shaped else problem.reward
        return _tabular_theta(policy_class, tilt_policy(tree, log_pi_t, eta * R)), {"loss": 0.0}
    res = optimize.minimize(
        lambda t: rebel_exact_loss(policy_class, t, problem, log_pi_t, eta=eta, shaped=shaped),
        theta, jac=True, method="L-BFGS-B",
        options={"gtol": tol, "ftol": 1e-16, "maxiter": maxiter, "maxcor": 30},
    )
    return res.x, {"loss": float(res.fun)}


# =========================================================================== online DPO in expectation
def online_dpo_exact_loss(policy_class, theta, problem: RLProblem, log_pi_sample) -> tuple[float, np.ndarray]:
    """Expected DPO loss of one on-policy pair, labelled by Bradley–Terry on ``problem.reward``.

    .. math::
        L(\\theta) = -E_{s_0}\\sum_{\\xi \\ne \\xi'} 2\\,\\mu(\\xi)\\mu(\\xi')\\,
            \\sigma(r(\\xi) - r(\\xi'))\\,
            \\log\\sigma\\big(\\beta[h_\\theta(\\xi) - h_\\theta(\\xi')]\\big),
        \\qquad h_\\theta = \\log\\frac{P_\\theta}{P_{ref}}

    with ``mu = P_{sample}`` held fixed (stop-gradient): two completions are drawn from ``mu``,
    the winner is labelled by BT, ties (``xi = xi'``) contribute nothing.  This is the
    expectation of the per-pair loss of :func:`toyrlhf.online.online_dpo_step` (DPO, Rafailov et
    al. 2023, arXiv:2305.18290, eq. 7, with online pairs as in Guo et al. 2024,
    arXiv:2402.04792).  Cost ``O(P N^2)`` (memory checked).
    """
    _check_problem(problem)
    tree = problem.tree
    N = tree.n_leaves
    tree.require_bytes(8 * 4 * tree.P * N * N, "online_dpo_exact_loss (all pairs)")
    with np.errstate(under="ignore"):
        mu = np.exp(leaf_logprobs(tree, log_pi_sample))
    log_pi = policy_class.conditionals(theta)
    lp = leaf_logprobs(tree, log_pi)
    pos = mu > 0
    if np.any(pos & (np.isneginf(problem.leaf_logp_ref) | np.isneginf(lp))):
        raise ValueError("on-policy pairs hit completions with P_ref = 0 or P_theta = 0: DPO's log-ratio is undefined")
    h = np.where(pos, lp - np.where(pos, problem.leaf_logp_ref, 0.0), 0.0)
    r = problem.reward
    beta = problem.beta
    W = 2.0 * tree.rho0[:, None, None] * mu[:, :, None] * mu[:, None, :] * expit(r[:, :, None] - r[:, None, :])
    W[:, np.arange(N), np.arange(N)] = 0.0
    m = beta * (h[:, :, None] - h[:, None, :])  # m[p, c, j]: chosen c over rejected j
    loss = -float(np.sum(W * log_expit(m)))
    s = W * expit(-m)
    g = -beta * s.sum(axis=2) + beta * s.sum(axis=1)
    return loss, policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi)


def online_dpo_exact_step(policy_class, theta, problem: RLProblem, rng=None, *, lr: float = 1.0, epochs: int = 1):
    """``epochs`` descent steps on :func:`online_dpo_exact_loss` with pairs from the current policy.

    Its fixed point with a full-support tabular class is the soft-optimal policy of
    ``(reward, beta)``: there the implicit reward ``beta h`` equals ``r`` up to a constant and
    every pair's BT gradient vanishes.
    """
    lr = check_float("lr", lr)
    epochs = check_int("epochs", epochs, 1)
    theta = np.asarray(theta, dtype=float)
    log_pi_sample = policy_class.conditionals(theta)
    th = theta
    loss = 0.0
    for _ in range(epochs):
        loss, g = online_dpo_exact_loss(policy_class, th, problem, log_pi_sample)
        th = ascend(th, -lr, g)
        if not np.all(np.isfinite(th)):
            break
    return th, {"loss": loss}


# =========================================================================== estimator variance
@dataclass(frozen=True)
class PGVariance:
    """Exact first two moments of a sampled REINFORCE estimator (one group of completions).

    Attributes
    ----------
    mean : (d,) array, the estimator's expectation (``grad J`` for every baseline here)
    variance : float, ``E||g - E g||^2`` (trace of the covariance) of one group's estimate
    baseline : str
    group_size : int
    """

    mean: np.ndarray
    variance: float
    baseline: str
    group_size: int


def pg_estimator_variance(policy_class, theta, problem: RLProblem, *, baseline: str = "none", group_size: int = 1) -> PGVariance:
    """Exact mean and total variance of the sequence-level REINFORCE estimator, by enumeration.

    One group: ``s0 ~ rho0``, ``xi_1..xi_k ~ P_theta(.|s0)`` i.i.d., and

    .. math:: g = \\frac1k \\sum_i (R(\\xi_i) - b_i)\\, \\nabla\\log P_\\theta(\\xi_i),
              \\qquad R = r - \\beta\\log(P_\\theta/P_{ref})

    with ``b_i = 0`` (``"none"``), ``b_i = J(s0)`` (``"value"``, the exact value baseline),
    ``b_i = E[R||s||^2]/E[||s||^2]`` (``"optimal"``, the variance-minimising constant baseline
    per prompt, Greensmith et al. 2004; needs the score norms, so a benchmark rather than a
    practical method) or the leave-one-out mean ``b_i = (1/(k-1)) sum_{j != i} R(xi_j)``
    (``"loo"``, RLOO; Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).  All are
    unbiased.  A baseline does not always lower the variance (``"value"`` can raise it when
    ``R`` is centred near 0); what it buys is invariance to adding a constant to the reward,
    whose effect on ``"none"`` grows quadratically.  With
    ``A = E[R^2||s||^2]``, ``B = E[R||s||^2]``, ``C = E||s||^2``, ``m_j = E[R^j]`` and
    ``mu = E[R s]`` per prompt,

    .. math::
        E\\|g\\|^2 = \\tfrac1k E[(R-b)^2\\|s\\|^2] + (1-\\tfrac1k)\\|\\mu\\|^2 \\quad (b\\ \\text{fixed}),
        \\qquad
        E\\|g\\|^2_{loo} = \\tfrac1k\\Big[A - 2m_1B + C\\,\\tfrac{m_2 + (k-2)m_1^2}{k-1}
            - \\|\\mu\\|^2\\tfrac{k-2}{k-1}\\Big] + \\|\\mu\\|^2

    (expanding the U-statistic; independent samples have ``E[s] = 0``).  The variance is assembled
    from non-negative pieces (law of total variance): ``E_{s0}[Var(g|s0)] + Var_{s0}(mu(s0))``
    with ``k Var(g|s0) = D`` (fixed ``b``) or ``D + (C Var(R) + ||mu||^2)/(k-1)`` (``"loo"``,
    ``b = m_1`` in ``D``), ``D = E[(R-b)^2||s||^2] - ||mu||^2 >= 0``.  ``D`` is the one difference
    of two computed terms: a negative value within its rounding bound is reported as 0, one beyond
    it raises RuntimeError.  Average ``m`` independent groups to divide it by ``m``.
    Needs ``gamma = 0`` (the REINFORCE part only).
    """
    _check_problem(problem)
    check_choice("baseline", baseline, ("none", "value", "optimal", "loo"))
    k = check_int("group_size", group_size, 1)
    if baseline == "loo" and k < 2:
        raise ValueError(f"baseline='loo' needs group_size >= 2 (a leave-one-out mean of the others), got {k}")
    tree = problem.tree
    log_pi = policy_class.conditionals(theta)
    lp = leaf_logprobs(tree, log_pi)
    R, p = _shaped_leaf_reward(problem, lp)
    sq = leaf_score_sqnorms(policy_class, theta)
    sq = np.where(p > 0, sq, 0.0)
    m1 = (p * R).sum(axis=1)
    dR = np.where(p > 0, R - m1[:, None], 0.0)
    C = (p * sq).sum(axis=1)
    mus = []
    for s in range(tree.P):  # one VJP per prompt (loop over prompts, not leaves)
        g = np.zeros_like(p)
        g[s] = p[s] * dR[s]
        mus.append(policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi))
    mus = np.array(mus)
    mu2 = np.einsum("pd,pd->p", mus, mus)
    if baseline == "none":
        b = np.zeros_like(m1)
    elif baseline == "optimal":  # E[R|s|^2] / E|s|^2, centred at m1 for accuracy
        b = m1 + np.divide((p * dR * sq).sum(axis=1), C, out=np.zeros_like(C), where=C > 0)
    else:  # "value" and the centre of "loo"
        b = m1
    dev = np.where(p > 0, R - b[:, None], 0.0)
    E2 = (p * dev * dev * sq).sum(axis=1)  # E[(R - b)^2 |s|^2], a sum of non-negative terms
    # D = E|(R - b) s|^2 - |E[(R - b) s]|^2 >= 0 (Jensen); its two terms cancel, so it may come out
    # below 0 by rounding: bounded by ~ (leaves * H + d) eps (E2 + mu2) (sums of that many terms)
    D = E2 - mu2
    tol = 4.0 * (tree.n_leaves * tree.H + policy_class.n_params) * np.finfo(float).eps * (E2 + mu2)
    if np.any(D < -tol):
        raise RuntimeError(f"pg_estimator_variance: E|x|^2 - |E x|^2 = {D.min():.3e} < 0 beyond rounding "
                           f"({tol[np.argmin(D)]:.1e}): an internal inconsistency")
    D = np.maximum(D, 0.0)  # only rounding-level negatives (checked above) are set to their true bound 0
    if baseline == "loo":
        var_R = (p * dR * dR).sum(axis=1)  # two-pass, non-negative
        within = (D + (C * var_R + mu2) / (k - 1)) / k
    else:
        within = D / k
    mean = tree.rho0 @ mus
    between = tree.rho0 @ np.sum((mus - mean) ** 2, axis=1)  # law of total variance, two-pass
    var = float(np.dot(tree.rho0, within) + between)
    return PGVariance(mean, var, baseline, k)
