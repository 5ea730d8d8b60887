"""Sampled online algorithms: REINFORCE, RLOO, GRPO, PPO(-ptx), REBEL and online DPO.

Each is a pure step ``step(policy_class, theta, problem, rng, **options) -> (theta_next, info)``:
it draws a batch of completions from the current policy by vectorised ancestral sampling
(:func:`toyrlhf.online.sample_rollouts`; a loop over depth, never over samples), computes
per-token log-probabilities and pulls per-token weights back to ``theta`` along the sampled paths
(:func:`toyrlhf.online.path_policy`).  ``info`` holds floats: ``loss``, ``sample_reward`` (mean
reward of the batch), ``samples`` (completions drawn), ``labels`` (preference labels queried)
and algorithm-specific statistics.

Advantages (:func:`compute_advantages`), per token ``t`` of completion ``i``, from the token
rewards ``c_t = -beta k(pi_old, pi_ref)`` (``kl_mode="reward"``; 0 with ``kl_mode="loss"``) plus
the terminal reward ``r(xi)`` on the last token:

* ``"none"``: the return ``R_it`` (``reward_to_go``: ``sum_{t' >= t}``; else the whole
  sequence's return on every token, the textbook REINFORCE of slides 002/004);
* ``"loo"``: ``R_it`` minus the mean of the other ``k - 1`` returns of its group (RLOO,
  Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019); unbiased;
* ``"group"``: ``(R_it - mean_group) / (std_group + eps)`` (GRPO, Shao et al. 2024,
  arXiv:2402.03300, outcome supervision; biased by the division);
* ``"critic"``: GAE(lambda) with the *exact* value function of ``pi_old`` (a perfect critic;
  Schulman et al. 2016, arXiv:1506.02438).  Transitions are deterministic, so the TD error
  ``c_t + V(s_{t+1}) - V(s_t)`` *is* the advantage ``A(s_t, a_t)`` and ``lambda = 0`` gives the
  exact advantages with no sampling noise beyond the choice of tokens.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

from ..kl_estimators import check_estimator, kl_estimate, kl_estimate_grad
from ..policies import sample_leaves
from ._paths import Rollouts, path_policy, sample_rollouts
from .exact import _check_problem, ascend, clipped_surrogate, soft_values, token_kl_costs
from .problem import RLProblem, check_choice, check_float, check_int, check_rng

__all__ = [
    "ADVANTAGES",
    "token_rewards",
    "compute_advantages",
    "policy_gradient_estimate",
    "reinforce_step",
    "rloo_step",
    "ppo_step",
    "ppo_surrogate",
    "grpo_step",
    "rebel_step",
    "online_dpo_step",
]

#: Advantage estimators understood by :func:`compute_advantages`.
ADVANTAGES: tuple[str, ...] = ("none", "loo", "group", "critic")


def token_rewards(batch: Rollouts, reward: np.ndarray, beta: float, kl_estimator: str = "k1",
                  kl_mode: str = "reward") -> np.ndarray:
    """Per-token rewards ``(n, H)``: ``-beta k_t`` (in the reward) plus ``r(xi)`` on the last token.

    With ``k1`` the per-token penalties sum to ``-beta log(P_old(xi)/P_ref(xi))`` (Ziegler et al.
    2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155).
    """
    check_estimator(kl_estimator)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    c = np.zeros(batch.logp.shape)
    if kl_mode == "reward":
        k = kl_estimate(batch.logp, batch.logp_ref, kl_estimator)
        if np.any(np.isinf(k)):
            raise ValueError("a sampled token has pi_ref = 0: the per-token KL penalty is infinite")
        c -= beta * k
    c[:, -1] += reward[batch.prompts, batch.leaves]
    return c


def compute_advantages(
    batch: Rollouts,
    rewards: np.ndarray,
    *,
    advantage: str = "none",
    reward_to_go: bool = False,
    values=None,
    gae_lambda: float = 0.0,
    group_eps: float = 1e-4,
) -> np.ndarray:
    """Per-token advantages ``(n, H)`` for the sampled batch (see the module docstring).

    Parameters
    ----------
    rewards : (n, H) token rewards from :func:`token_rewards`.
    advantage : {"none", "loo", "group", "critic"}
    reward_to_go : bool
        Causal returns ``sum_{t' >= t} c_t'`` instead of the whole return on every token
        (ignored by ``"critic"``).
    values : :class:`~toyrlhf.online.SoftValues`, needed by ``"critic"``.
    gae_lambda : float in [0, 1], for ``"critic"``.
    group_eps : float > 0, added to the group standard deviation by ``"group"``.
    """
    check_choice("advantage", advantage, ADVANTAGES)
    k = batch.group_size
    if advantage in ("loo", "group") and k < 2:
        raise ValueError(f"advantage={advantage!r} needs group_size >= 2 completions per prompt, got {k}")
    if advantage == "critic":
        if values is None:
            raise ValueError("advantage='critic' needs the exact values of pi_old (values=soft_values(...))")
        lam = float(gae_lambda)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"gae_lambda must lie in [0, 1], got {gae_lambda!r}")
        n, H = rewards.shape
        Vs = np.empty((n, H + 1))
        for h in range(H):
            Vs[:, h] = values.v[h][batch.prompts, batch.nodes[:, h]]
        Vs[:, H] = 0.0  # the terminal reward is already in the last token's reward
        delta = rewards + Vs[:, 1:] - Vs[:, :-1]
        A = np.empty_like(delta)
        acc = np.zeros(n)
        for h in range(H - 1, -1, -1):
            acc = delta[:, h] + lam * acc
            A[:, h] = acc
        return A
    R = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
    if not reward_to_go:
        R = np.broadcast_to(R[:, :1], R.shape).copy()
    if advantage == "none":
        return R
    Rg = R.reshape(-1, k, R.shape[1])
    if advantage == "loo":
        return (Rg - (Rg.sum(axis=1, keepdims=True) - Rg) / (k - 1)).reshape(R.shape)
    mean = Rg.mean(axis=1, keepdims=True)
    std = Rg.std(axis=1, ddof=1, keepdims=True)
    return ((Rg - mean) / (std + group_eps)).reshape(R.shape)


def _pretrain_paths(problem: RLProblem, n: int, rng):
    """Paths of ``n`` completions drawn from the pretraining distribution (prompts from ``rho0``)."""
    tree = problem.tree
    prompts, leaves = sample_leaves(tree, problem.pretrain_logp, n, rng)
    tokens = np.asarray(tree.tokens())[leaves]
    nodes = np.zeros_like(tokens)
    for h in range(1, tree.H):
        nodes[:, h] = nodes[:, h - 1] * tree.V + tokens[:, h - 1]
    return prompts.astype(np.int64), nodes, tokens


def _common_checks(problem, rng, n_groups, group_size):
    _check_problem(problem)
    check_rng(rng)
    return check_int("n_groups", n_groups, 1), check_int("group_size", group_size, 1)


def _values_if_needed(advantage, problem, log_pi_old, kl_estimator, kl_mode):
    if advantage != "critic":
        return None
    costs = (token_kl_costs(problem.tree, log_pi_old, problem.log_pi_ref, problem.beta, kl_estimator)
             if kl_mode == "reward" else None)
    return soft_values(problem.tree, log_pi_old, problem.reward, costs)


# =========================================================================== REINFORCE family
def _rollouts_and_advantages(problem, log_pi, n_groups, group_size, rng, kl_estimator, kl_mode,
                             advantage, reward_to_go, gae_lambda, group_eps):
    """Sample a batch from ``log_pi``; return it, its per-token rewards and advantages (shared by PG and PPO)."""
    batch = sample_rollouts(problem.tree, log_pi, problem.log_pi_ref, n_groups, group_size, rng)
    c = token_rewards(batch, problem.reward, problem.beta, kl_estimator, kl_mode)
    values = _values_if_needed(advantage, problem, log_pi, kl_estimator, kl_mode)
    A = compute_advantages(batch, c, advantage=advantage, reward_to_go=reward_to_go, values=values,
                           gae_lambda=gae_lambda, group_eps=group_eps)
    return batch, c, A


def policy_gradient_estimate(
    policy_class,
    theta,
    problem: RLProblem,
    rng: np.random.Generator,
    *,
    n_groups: int = 16,
    group_size: int = 4,
    advantage: str = "none",
    reward_to_go: bool = False,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
    gae_lambda: float = 0.0,
    group_eps: float = 1e-4,
    n_pretrain: int | None = None,
    mode: str = "auto",
) -> tuple[np.ndarray, dict]:
    """A sampled policy-gradient estimate of ``grad J_gamma`` (REINFORCE and its baselines).

    .. math:: \\hat g = \\frac1n \\sum_{i,t} \\big(A_{it}\\,[-\\ \\beta\\,\\partial_{\\log\\pi} k_{it}]\\big)
              \\nabla\\log\\pi_\\theta(a_{it}|s_{it})
              + \\frac{\\gamma}{n'} \\sum_j \\nabla \\log P_\\theta(\\xi^{pre}_j)

    (Williams 1992; slides 002 "Improving policy gradient with a baseline"), the bracket only
    with ``kl_mode="loss"``.  With ``kl_estimator="k1"``, ``kl_mode="reward"`` and
    ``advantage`` in ``{"none", "loo", "critic"}`` it is unbiased for
    :func:`~toyrlhf.online.exact_policy_gradient`.  ``n_pretrain`` pretraining completions
    (default ``n``) are drawn when ``problem.gamma > 0``.

    Returns ``(grad, info)``.
    """
    n_groups, group_size = _common_checks(problem, rng, n_groups, group_size)
    check_estimator(kl_estimator)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    check_choice("advantage", advantage, ADVANTAGES)
    theta = np.asarray(theta, dtype=float)
    log_pi = policy_class.conditionals(theta)
    batch, c, A = _rollouts_and_advantages(problem, log_pi, n_groups, group_size, rng, kl_estimator, kl_mode,
                                           advantage, reward_to_go, gae_lambda, group_eps)
    n = batch.n
    W = A / n
    if kl_mode == "loss":
        W = W - problem.beta / n * kl_estimate_grad(batch.logp, batch.logp_ref, kl_estimator)
    prompts, nodes, tokens = batch.prompts, batch.nodes, batch.tokens
    if problem.gamma > 0:
        m = n if n_pretrain is None else check_int("n_pretrain", n_pretrain, 1)
        pp, pn, pt = _pretrain_paths(problem, m, rng)
        prompts = np.concatenate([prompts, pp])
        nodes = np.concatenate([nodes, pn])
        tokens = np.concatenate([tokens, pt])
        W = np.concatenate([W, np.full(pt.shape, problem.gamma / m)])
    ev = path_policy(policy_class, theta, prompts, nodes, tokens, mode=mode, log_pi=log_pi)
    grad = ev.vjp(W)
    total = c.sum(axis=1)
    info = {
        "loss": -float(total.mean()),
        "sample_reward": float(problem.reward[batch.prompts, batch.leaves].mean()),
        "samples": float(n),
        "labels": 0.0,
        "grad_norm": float(np.linalg.norm(grad)),
    }
    return grad, info


def reinforce_step(
    policy_class, theta, problem: RLProblem, rng: np.random.Generator, *, lr: float = 1.0,
    n_groups: int = 16, group_size: int = 1, advantage: str = "none", reward_to_go: bool = False,
    kl_estimator: str = "k1", kl_mode: str = "reward", gae_lambda: float = 0.0, mode: str = "auto",
):
    """REINFORCE: ``theta + lr * g_hat`` with :func:`policy_gradient_estimate` (default: no baseline)."""
    lr = check_float("lr", lr)
    g, info = policy_gradient_estimate(
        policy_class, theta, problem, rng, n_groups=n_groups, group_size=group_size, advantage=advantage,
        reward_to_go=reward_to_go, kl_estimator=kl_estimator, kl_mode=kl_mode, gae_lambda=gae_lambda, mode=mode,
    )
    return ascend(np.asarray(theta, dtype=float), lr, g), info


def rloo_step(policy_class, theta, problem: RLProblem, rng: np.random.Generator, *, lr: float = 1.0,
              n_groups: int = 16, group_size: int = 4, kl_estimator: str = "k1", mode: str = "auto"):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): REINFORCE with the leave-one-out baseline.

    ``k = group_size >= 2`` completions per prompt; each one's baseline is the mean shaped
    return of the other ``k - 1`` (sequence level, KL in the reward).
    """
    return reinforce_step(policy_class, theta, problem, rng, lr=lr, n_groups=n_groups, group_size=group_size,
                          advantage="loo", kl_estimator=kl_estimator, mode=mode)


# =========================================================================== PPO
def ppo_step(
    policy_class,
    theta,
    problem: RLProblem,
    rng: np.random.Generator,
    *,
    lr: float = 1.0,
    epochs: int = 4,
    clip_eps: float = 0.2,
    n_groups: int = 16,
    group_size: int = 4,
    advantage: str = "critic",
    reward_to_go: bool = True,
    gae_lambda: float = 0.0,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
    group_eps: float = 1e-4,
    n_pretrain: int | None = None,
    mode: str = "auto",
):
    """One PPO iteration: sample a batch from ``pi_old``, then ``epochs`` ascent steps on the clipped surrogate.

    .. math::
        L(\\theta) = \\frac1n\\sum_{i,t} \\min\\big(\\rho_{it} A_{it},\\
            \\mathrm{clip}(\\rho_{it}, 1-\\epsilon, 1+\\epsilon) A_{it}\\big)
            \\;[-\\ \\frac{\\beta}{n}\\sum_{i,t} k(\\pi_\\theta, \\pi_{ref})_{it}]
            \\;+\\; \\frac{\\gamma}{n'}\\sum_j \\log P_\\theta(\\xi^{pre}_j),
        \\qquad \\rho_{it} = \\frac{\\pi_\\theta(a_{it}|s_{it})}{\\pi_{old}(a_{it}|s_{it})}

    (Schulman et al. 2017, arXiv:1707.06347, eq. 7; per-token KL penalty in the reward with
    estimator ``k1/k2/k3``, Schulman 2020; PPO-ptx, Ouyang et al. 2022, arXiv:2203.02155, eq. 2;
    the bracketed KL loss with ``kl_mode="loss"``, as GRPO does).  Full-batch epochs with step
    size ``lr``.  With ``advantage="critic"`` and ``gae_lambda=0`` the surrogate is an unbiased
    estimate of :func:`~toyrlhf.online.ppo_exact_objective` at every ``theta``.

    Raises
    ------
    ValueError
        ``clip_eps <= 0``, unknown ``kl_estimator``/``advantage``, ``group_size < 2`` with a
        group baseline.

    Examples
    --------
    >>> from toyrlhf.tree import TokenTree
    >>> from toyrlhf.policies import TabularPolicy, random_policy
    >>> from toyrlhf.online import RLProblem, train
    >>> tree = TokenTree(V=2, H=3)
    >>> rng = np.random.default_rng(0)
    >>> ref = random_policy(tree, rng)
    >>> problem = RLProblem(tree, ref, rng.standard_normal((1, 8)), beta=1.0)
    >>> pc = TabularPolicy(tree, ref)
    >>> traj = train(ppo_step, pc, pc.init(), problem, 30, rng, eval_every=30, n_groups=16, group_size=4)
    >>> bool(traj.kl_to_optimal[-1] < 0.2 * traj.kl_to_optimal[0])
    True
    """
    n_groups, group_size = _common_checks(problem, rng, n_groups, group_size)
    lr = check_float("lr", lr)
    epochs = check_int("epochs", epochs, 1)
    clip_eps = check_float("clip_eps", clip_eps)
    check_estimator(kl_estimator)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    check_choice("advantage", advantage, ADVANTAGES)
    theta_old = np.asarray(theta, dtype=float)
    log_pi_old = policy_class.conditionals(theta_old)
    batch, c, A = _rollouts_and_advantages(problem, log_pi_old, n_groups, group_size, rng, kl_estimator,
                                           kl_mode, advantage, reward_to_go, gae_lambda, group_eps)
    n = batch.n
    pre = None
    if problem.gamma > 0:
        pre = _pretrain_paths(problem, n if n_pretrain is None else check_int("n_pretrain", n_pretrain, 1), rng)
    th = theta_old
    stats = {}
    for epoch in range(epochs):
        surrogate, g, stats = ppo_surrogate(policy_class, th, problem, batch, A, clip_eps=clip_eps,
                                            kl_estimator=kl_estimator, kl_mode=kl_mode, pretrain_paths=pre,
                                            mode=mode, log_pi=log_pi_old if epoch == 0 else None)
        th = ascend(th, lr, g)
        if not np.all(np.isfinite(th)):
            break
    info = {
        "loss": -stats["surrogate"],
        "sample_reward": float(problem.reward[batch.prompts, batch.leaves].mean()),
        "samples": float(n),
        "labels": 0.0,
        "clip_frac": stats["clip_frac"],
        "sample_kl": float(kl_estimate(batch.logp, batch.logp_ref, "k1").sum() / n),
    }
    return th, info


def ppo_surrogate(
    policy_class,
    theta,
    problem: RLProblem,
    batch: Rollouts,
    advantages: np.ndarray,
    *,
    clip_eps: float = 0.2,
    kl_estimator: str = "k1",
    kl_mode: str = "reward",
    pretrain_paths=None,
    mode: str = "auto",
    log_pi=None,
) -> tuple[float, np.ndarray, dict]:
    r"""PPO's sampled clipped surrogate at ``theta`` on a fixed batch from ``pi_old``, and its gradient.

    .. math::
        \hat L(\theta) = \frac1n\sum_{i,t} \min(\rho_{it} A_{it},
            \mathrm{clip}(\rho_{it}, 1\pm\epsilon) A_{it})
            \;[-\ \frac{\beta}{n}\sum_{i,t} k(\pi_\theta, \pi_{ref})_{it}]
            + \frac{\gamma}{n'}\sum_j \log P_\theta(\xi^{pre}_j)

    (Schulman et al. 2017, arXiv:1707.06347, eq. 7; the bracket with ``kl_mode="loss"``).  The
    gradient flows through ``rho A`` where the unclipped term is the minimum (``d/d log pi``
    ``= rho A``) and is zero where the clipped one is (:func:`~toyrlhf.online.clipped_surrogate`: exact at
    any ratio; raises FloatingPointError only where ``rho A`` itself leaves the float range).  ``pretrain_paths`` is
    ``(prompts, nodes, tokens)`` of pretraining completions (PPO-ptx).  Returns
    ``(value, grad, stats)`` with ``stats = {"surrogate", "clip_frac"}``.
    """
    clip_eps = check_float("clip_eps", clip_eps)
    check_estimator(kl_estimator)
    check_choice("kl_mode", kl_mode, ("reward", "loss"))
    tree = problem.tree
    n = batch.n
    prompts, nodes, tokens = batch.prompts, batch.nodes, batch.tokens
    m = 0
    if pretrain_paths is not None:
        pp, pn, pt = pretrain_paths
        m = pp.size
        prompts, nodes, tokens = np.concatenate([prompts, pp]), np.concatenate([nodes, pn]), np.concatenate([tokens, pt])
    ev = path_policy(policy_class, theta, prompts, nodes, tokens, mode=mode, log_pi=log_pi)
    lp_all = ev.logprobs()
    lp = lp_all[:n]
    surr, dsurr, active = clipped_surrogate(lp - batch.logp, advantages, clip_eps)  # sampled: logp finite
    value = float(surr.sum() / n)
    clipped_out = ~active & (np.asarray(advantages) != 0)
    clip_frac = float(np.mean(clipped_out[batch.mask])) if batch.mask.any() else 0.0
    W = dsurr / n
    if kl_mode == "loss":
        value -= problem.beta * float(kl_estimate(lp, batch.logp_ref, kl_estimator).sum() / n)
        W = W - problem.beta / n * kl_estimate_grad(lp, batch.logp_ref, kl_estimator)
    if m:
        value += problem.gamma * float(lp_all[n:].sum() / m)
        W = np.concatenate([W, np.full((m, tree.H), problem.gamma / m)])
    return value, ev.vjp(W), {"surrogate": value, "clip_frac": clip_frac}


def grpo_step(policy_class, theta, problem: RLProblem, rng: np.random.Generator, *, lr: float = 1.0,
              epochs: int = 1, clip_eps: float = 0.2, n_groups: int = 16, group_size: int = 4,
              kl_estimator: str = "k3", group_eps: float = 1e-4, mode: str = "auto"):
    """GRPO (Shao et al. 2024, arXiv:2402.03300): PPO's clipped surrogate with group-normalised advantages.

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` on every token, no critic, and the KL
    as a loss term ``beta k(pi_theta, pi_ref)`` (``k3`` by default, as in the paper).  Note that
    differentiating ``k3`` gives the gradient of the forward token KL, not of the reverse KL
    (Tang & Munos 2025, arXiv:2506.09477; see :mod:`toyrlhf.kl_estimators`).
    """
    return ppo_step(policy_class, theta, problem, rng, lr=lr, epochs=epochs, clip_eps=clip_eps, n_groups=n_groups,
                    group_size=group_size, advantage="group", reward_to_go=False, kl_estimator=kl_estimator,
                    kl_mode="loss", group_eps=group_eps, mode=mode)


# =========================================================================== REBEL
def rebel_step(
    policy_class,
    theta,
    problem: RLProblem,
    rng: np.random.Generator,
    *,
    eta: float = 1.0,
    lr: float = 1.0,
    epochs: int = 1,
    n_groups: int = 32,
    shaped: bool = True,
    mode: str = "auto",
):
    """One REBEL iteration (Gao et al. 2024, arXiv:2404.16767) by gradient descent on the regression.

    Draw ``n_groups`` pairs ``(xi, xi')`` from ``pi_t`` (two completions per prompt), then take
    ``epochs`` steps of size ``lr`` on

    .. math:: \\frac1m\\sum_i \\Big(\\frac1\\eta\\Big(\\log\\frac{P_\\theta(\\xi_i)}{P_t(\\xi_i)}
              - \\log\\frac{P_\\theta(\\xi'_i)}{P_t(\\xi'_i)}\\Big) - (R(\\xi_i) - R(\\xi'_i))\\Big)^2

    with ``R = r - beta log(P_t/P_ref)`` when ``shaped``.  Its expectation is
    :func:`~toyrlhf.online.rebel_exact_loss`, whose minimiser is ``P_t exp(eta R)/Z``.
    """
    n_groups, _ = _common_checks(problem, rng, n_groups, 2)
    eta = check_float("eta", eta)
    lr = check_float("lr", lr)
    epochs = check_int("epochs", epochs, 1)
    tree = problem.tree
    theta_t = np.asarray(theta, dtype=float)
    log_pi_t = policy_class.conditionals(theta_t)
    batch = sample_rollouts(tree, log_pi_t, problem.log_pi_ref, n_groups, 2, rng)
    lt = batch.logp.sum(axis=1)
    R = problem.reward[batch.prompts, batch.leaves].copy()
    if shaped:
        lq = batch.logp_ref.sum(axis=1)
        if np.any(np.isneginf(lq)):
            raise ValueError("a sampled completion has P_ref = 0: the KL-shaped reward is -inf")
        R = R - problem.beta * (lt - lq)
    dR = R[0::2] - R[1::2]
    th = theta_t
    loss = 0.0
    for epoch in range(epochs):
        ev = path_policy(policy_class, th, batch.prompts, batch.nodes, batch.tokens, mode=mode,
                         log_pi=log_pi_t if epoch == 0 else None)
        delta = ev.logprobs().sum(axis=1) - lt
        res = (delta[0::2] - delta[1::2]) / eta - dR
        loss = float(np.mean(res * res))
        w = np.empty(batch.n)
        w[0::2] = 2.0 * res / (eta * n_groups)
        w[1::2] = -w[0::2]
        th = ascend(th, -lr, ev.vjp(np.broadcast_to(w[:, None], batch.tokens.shape)))
        if not np.all(np.isfinite(th)):
            break
    info = {
        "loss": loss,
        "sample_reward": float(problem.reward[batch.prompts, batch.leaves].mean()),
        "samples": float(batch.n),
        "labels": 0.0,
    }
    return th, info


# =========================================================================== online DPO
def online_dpo_step(
    policy_class,
    theta,
    problem: RLProblem,
    rng: np.random.Generator,
    *,
    lr: float = 1.0,
    n_pairs: int = 32,
    epochs: int = 1,
    deterministic: bool = False,
    mode: str = "auto",
):
    """Online DPO: DPO gradient steps on fresh pairs from the current policy, labelled by a reward.

    Two completions per prompt are drawn from ``pi_theta``; the winner is drawn from
    Bradley–Terry on ``problem.reward`` (the gold reward as a stand-in for a human labeller, or a
    learned reward model as an AI labeller; ``deterministic=True`` makes the higher reward win,
    ties broken by a coin), and ``epochs`` steps of size ``lr`` are taken on

    .. math:: -\\frac1m \\sum_i \\log\\sigma\\Big(\\beta\\Big[\\log\\frac{P_\\theta(\\xi^+_i)}{P_{ref}(\\xi^+_i)}
              - \\log\\frac{P_\\theta(\\xi^-_i)}{P_{ref}(\\xi^-_i)}\\Big]\\Big)

    (Rafailov et al. 2023, arXiv:2305.18290, eq. 7; online pairs as in Guo et al. 2024,
    arXiv:2402.04792).  Tied pairs (the same completion twice) are not labelled and contribute
    nothing.  Its expectation is :func:`~toyrlhf.online.online_dpo_exact_loss`.
    """
    n_pairs, _ = _common_checks(problem, rng, n_pairs, 2)
    lr = check_float("lr", lr)
    epochs = check_int("epochs", epochs, 1)
    tree = problem.tree
    theta0 = np.asarray(theta, dtype=float)
    log_pi = policy_class.conditionals(theta0)
    batch = sample_rollouts(tree, log_pi, problem.log_pi_ref, n_pairs, 2, rng)
    r = problem.reward[batch.prompts, batch.leaves]
    ra, rb = r[0::2], r[1::2]
    u = rng.random(n_pairs)
    a_wins = ((ra > rb) | ((ra == rb) & (u < 0.5))) if deterministic else (u < expit(ra - rb))
    labelled = batch.leaves[0::2] != batch.leaves[1::2]
    sign = np.where(a_wins, 1.0, -1.0) * labelled  # +1: first of the pair is chosen
    lq = batch.logp_ref.sum(axis=1)
    if np.any(np.isneginf(lq)):
        raise ValueError("a sampled completion has P_ref = 0: DPO's log-ratio is undefined")
    beta = problem.beta
    th = theta0
    loss = 0.0
    for epoch in range(epochs):
        ev = path_policy(policy_class, th, batch.prompts, batch.nodes, batch.tokens, mode=mode,
                         log_pi=log_pi if epoch == 0 else None)
        h = ev.logprobs().sum(axis=1) - lq
        margin = beta * sign * (h[0::2] - h[1::2])
        loss = float(-np.sum(np.where(labelled, log_expit(margin), 0.0)) / n_pairs)
        coef = -beta * sign * expit(-margin) / n_pairs  # d loss / d h_first
        w = np.empty(batch.n)
        w[0::2] = coef
        w[1::2] = -coef
        th = ascend(th, -lr, ev.vjp(np.broadcast_to(w[:, None], batch.tokens.shape)))
        if not np.all(np.isfinite(th)):
            break
    info = {
        "loss": loss,
        "sample_reward": float(r.mean()),
        "samples": float(batch.n),
        "labels": float(labelled.sum()),
    }
    return th, info
