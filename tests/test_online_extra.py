"""More online checks: PPO's clipped surrogate at extreme ratios, the natural gradient of a
full-context log-linear class, GRPO's KL-as-loss gradient, iterative DPO's rounds and the optimal
constant baseline.

Exact checks use rounding-level tolerances; statistical checks use 4 standard errors estimated
from the same samples (never tuned).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.test_online import assert_within_4se, make_problem
from toyrlhf.kl_estimators import expected_kl_gradient
from toyrlhf.online import (
    RLProblem,
    TrainingDiverged,
    grpo_step,
    iterative_dpo,
    leaf_scores,
    natural_gradient_step,
    pg_estimator_variance,
    ppo_exact_objective,
    sample_rollouts,
    train,
)
from toyrlhf.online.exact import clipped_surrogate
from toyrlhf.policies import LogLinearPolicy, TabularPolicy, last_tokens_features, random_policy
from toyrlhf.preferences import preference_pairs
from toyrlhf.projections import dpo
from toyrlhf.tree import TokenTree


# =========================================================================== PPO's clipped surrogate
def test_clipped_surrogate_matches_the_textbook_min_and_its_derivative():
    eps = 0.2
    lr = np.linspace(-1.0, 1.0, 41)[:, None]
    A = np.array([[-1.5, -0.3, 0.0, 0.4, 2.0]])
    val, grad, _ = clipped_surrogate(lr, A, eps)
    r = np.exp(lr)
    want = np.minimum(r * A, np.clip(r, 1 - eps, 1 + eps) * A)
    np.testing.assert_allclose(val, want, rtol=1e-14, atol=1e-15)
    h = 1e-6  # central differences away from the kinks (|log r - log(1 -+ eps)| > h)
    far = (np.abs(lr - np.log1p(eps)) > 1e-3) & (np.abs(lr - np.log1p(-eps)) > 1e-3)
    fd = (clipped_surrogate(lr + h, A, eps)[0] - clipped_surrogate(lr - h, A, eps)[0]) / (2 * h)
    np.testing.assert_allclose(np.where(far, grad, 0.0), np.where(far, fd, 0.0), atol=1e-8)


def test_clipped_surrogate_at_ratios_beyond_the_float_range():
    eps = 0.2
    # A > 0: the value is A (1 + eps) and the gradient 0 for any large ratio, +inf included
    val, grad, active = clipped_surrogate([705.0, 800.0, np.inf], 0.5, eps)
    np.testing.assert_allclose(val, 0.5 * (1 + eps), rtol=1e-15)
    assert np.all(grad == 0.0) and not active.any()
    # A < 0 and the new policy drops the token: value A (1 - eps), gradient 0
    val, grad, active = clipped_surrogate([-800.0, -np.inf], -0.5, eps)
    np.testing.assert_allclose(val, -0.5 * (1 - eps), rtol=1e-15)
    assert np.all(grad == 0.0) and not active.any()
    # A = 0 contributes nothing whatever the ratio (no 0 * inf)
    val, grad, _ = clipped_surrogate([np.inf, -np.inf, 800.0], 0.0, eps)
    assert np.all(val == 0.0) and np.all(grad == 0.0)
    # A < 0 with a ratio above e^700 but rho A in range: exact, not capped at e^700
    val, grad, _ = clipped_surrogate(705.0, -1e-300, eps)
    assert val == pytest.approx(-1e-300 * np.exp(705.0), rel=1e-13) and grad == val
    # A < 0 with rho A beyond the float range: a clear error, never a wrong finite number or NaN
    with pytest.raises(FloatingPointError, match="ratio"):
        clipped_surrogate(800.0, -0.5, eps)
    with pytest.raises(ValueError, match="log_ratio"):
        clipped_surrogate(np.nan, 1.0, eps)


def _extreme_setup(log_small):
    """H = 1, V = 2: pi_old puts e^{log_small} on token 1, theta puts 1/2 on each token."""
    tree = TokenTree(V=2, H=1)
    ref = (np.log(np.full((1, 1, 2), 0.5)),)
    pc = TabularPolicy(tree, ref)
    prob = RLProblem(tree, ref, np.zeros((1, 2)), beta=1.0)
    log_pi_old = pc.conditionals(np.array([0.0, log_small]))
    return pc, prob, log_pi_old


def test_ppo_exact_objective_with_a_ratio_above_e700_is_exact():
    """pi_old(1) ~ e^-705, pi_theta(1) = 1/2: rho ~ e^704.  The surrogate is sum_a pi(a) A_a where
    both tokens are active, and its gradient is pi_a (A_a - sum_b pi_b A_b) (a cap at e^700 gives
    ~ e^-4 of the token-1 term instead)."""
    pc, prob, log_pi_old = _extreme_setup(-705.0)
    A = (np.array([[[0.3, -2.0]]]),)
    val, g = ppo_exact_objective(pc, np.zeros(2), prob, log_pi_old, A, clip_eps=0.2)
    pi_old = np.exp(log_pi_old[0][0, 0])
    r = 0.5 / pi_old  # finite in float: 0.5 / 1e-306
    want = pi_old[0] * min(r[0] * 0.3, np.clip(r[0], 0.8, 1.2) * 0.3) + pi_old[1] * r[1] * -2.0
    assert val == pytest.approx(want, rel=1e-12) and val == pytest.approx(0.15 - 1.0, rel=1e-12)
    np.testing.assert_allclose(g, 0.5 * (np.array([0.3, -2.0]) + 0.85), rtol=1e-12)


def test_ppo_ratio_beyond_the_float_range_stops_training_naming_the_step():
    pc, prob, log_pi_old = _extreme_setup(-720.0)  # rho = e^719 * 1/2 on a negative advantage
    A = (np.array([[[0.3, -2.0]]]),)
    with pytest.raises(FloatingPointError, match="ratio"):
        ppo_exact_objective(pc, np.zeros(2), prob, log_pi_old, A)

    def step(policy_class, theta, problem, rng):
        val, g = ppo_exact_objective(policy_class, theta, problem, log_pi_old, A)
        return theta + g, {"loss": -val}

    with pytest.raises(TrainingDiverged, match="step 1.*ratio"):
        train(step, pc, pc.init(), prob, 3)


# =========================================================================== natural gradient
def test_natural_gradient_of_a_full_context_log_linear_class_is_the_tabular_closed_form():
    """Features of the whole prefix (k = H - 1) make the log-linear class tabular, so the dense
    ``F^+ grad J`` step must give the leaf log-probs of ``pi exp(eta A) / Z`` per node."""
    tree, ref, prob, rng = make_problem(V=2, H=3, P=1, beta=0.5, seed=21)
    pi_t = random_policy(tree, rng)  # the current policy, away from pi_ref
    tab = TabularPolicy(tree, ref)
    th_tab = tab.theta_from_policy(pi_t)
    ll = LogLinearPolicy(tree, pi_t, last_tokens_features(tree, k=tree.H - 1))
    np.testing.assert_allclose(ll.leaf_logprobs(ll.init()), tab.leaf_logprobs(th_tab), atol=1e-13)
    for eta in (0.3, 1.0):
        new_tab, _ = natural_gradient_step(tab, th_tab, prob, eta=eta)  # closed form
        new_ll, _ = natural_gradient_step(ll, ll.init(), prob, eta=eta)  # dense Fisher solve
        moved = np.max(np.abs(tab.leaf_logprobs(new_tab) - tab.leaf_logprobs(th_tab)))
        assert moved > 0.05  # the step is not trivial
        np.testing.assert_allclose(ll.leaf_logprobs(new_ll), tab.leaf_logprobs(new_tab), atol=1e-9)


# =========================================================================== GRPO
def test_grpo_with_zero_reward_follows_minus_beta_times_the_k3_loss_gradient():
    """Reward 0: the group-normalised advantages vanish, so one GRPO epoch at theta_old is the
    gradient of ``-beta k3`` used as a loss, whose expectation is
    ``-beta expected_kl_gradient(k3, "loss")`` (4 SE of 800 independent steps)."""
    tree, ref, _, rng = make_problem(V=2, H=3, P=2, beta=0.5, seed=22)
    prob = RLProblem(tree, ref, np.zeros((tree.P, tree.n_leaves)), beta=0.7)
    pc = TabularPolicy(tree, ref)
    th = 0.8 * rng.standard_normal(pc.n_params)
    want = -prob.beta * expected_kl_gradient(pc, th, ref, "k3", "loss")
    gs = np.array([grpo_step(pc, th, prob, rng, lr=1.0, epochs=1, n_groups=4, group_size=2)[0] - th
                   for _ in range(800)])
    assert_within_4se(gs, want)
    assert np.linalg.norm(want) > 0.05


# =========================================================================== iterative DPO
def _round_pairs(pc, theta, prob, rng, n):
    """The pairs a round of iterative DPO draws and labels (Bradley–Terry), in its rng order."""
    batch = sample_rollouts(prob.tree, pc.conditionals(theta), prob.log_pi_ref, n, 2, rng)
    a, b = batch.leaves[0::2], batch.leaves[1::2]
    prompts = batch.prompts[0::2]
    u = rng.random(n)
    a_wins = u < 1.0 / (1.0 + np.exp(-(prob.reward[prompts, a] - prob.reward[prompts, b])))
    keep = a != b
    return prompts[keep], np.where(a_wins, a, b)[keep], np.where(a_wins, b, a)[keep]


def test_iterative_dpo_exact_rounds_are_dpo_fits_on_the_right_pool():
    tree, ref, prob, _ = make_problem(V=2, H=2, P=2, beta=0.5, seed=23)
    pc = TabularPolicy(tree, ref)
    n = 300  # enough for both orders of every pair: the DPO optimum is attained (finite)
    # one round: the exact DPO fit on the round-1 pairs, from the initial parameters
    traj = iterative_dpo(pc, pc.init(), prob, np.random.default_rng(5), rounds=1, pairs_per_round=n, solve="exact")
    rng = np.random.default_rng(5)
    d1 = _round_pairs(pc, pc.init(), prob, rng, n)
    fit1 = dpo(preference_pairs(*d1), pc, ref, prob.beta, theta0=pc.init(), warn=False)
    assert fit1.attained
    np.testing.assert_allclose(traj.theta, fit1.params, rtol=1e-12, atol=1e-12)
    # accumulate=False: round 2 is the fit on round-2 pairs only, warm-started at round 1's solution
    traj2 = iterative_dpo(pc, pc.init(), prob, np.random.default_rng(5), rounds=2, pairs_per_round=n,
                          solve="exact", accumulate=False)
    d2 = _round_pairs(pc, fit1.params, prob, rng, n)
    fit2 = dpo(preference_pairs(*d2), pc, ref, prob.beta, theta0=fit1.params, warn=False)
    np.testing.assert_allclose(traj2.theta, fit2.params, rtol=1e-12, atol=1e-12)
    pooled = dpo(preference_pairs(*(np.concatenate(x) for x in zip(d1, d2))), pc, ref, prob.beta,
                 theta0=fit1.params, warn=False)
    assert np.max(np.abs(pc.leaf_logprobs(pooled.params) - pc.leaf_logprobs(fit2.params))) > 1e-3


# =========================================================================== optimal baseline
def test_optimal_baseline_variance_matches_enumeration_and_is_the_minimum_over_constant_baselines():
    """``baseline="optimal"`` (b* = E[R|s|^2]/E|s|^2 per prompt) against enumerating every pair of
    completions; for any constant baselines b the variance exceeds it by exactly
    ``E_s0 C (b - b*)^2 / k`` (C = E|s|^2), so it is the minimum over a grid."""
    tree, ref, prob, rng = make_problem(V=2, H=2, rho0=[0.3, 0.7], beta=0.4, seed=24)
    pc = TabularPolicy(tree, ref)
    th = 0.5 * rng.standard_normal(pc.n_params)
    k = 2
    p = np.exp(pc.leaf_logprobs(th))
    R = prob.reward - prob.beta * (pc.leaf_logprobs(th) - prob.leaf_logp_ref)
    S = leaf_scores(pc, th)
    sq = np.einsum("pnd,pnd->pn", S, S)
    C = (p * sq).sum(axis=1)
    b_star = (p * R * sq).sum(axis=1) / C

    def enumerate_variance(b):  # b: per-prompt constant baselines
        mean, second = 0.0, 0.0
        for s in range(tree.P):
            for tup in itertools.product(range(tree.n_leaves), repeat=k):
                tup = np.array(tup)
                w = tree.rho0[s] * np.prod(p[s, tup])
                g = ((R[s, tup] - b[s])[:, None] * S[s, tup]).mean(axis=0)
                mean = mean + w * g
                second = second + w * g @ g
        return second - mean @ mean

    v = pg_estimator_variance(pc, th, prob, baseline="optimal", group_size=k)
    v_enum = enumerate_variance(b_star)
    assert v.variance == pytest.approx(v_enum, rel=1e-10)
    grid = np.linspace(-3.0, 3.0, 13)
    excess = []
    for b0, b1 in itertools.product(grid, grid):
        b = np.array([b0, b1])
        vb = enumerate_variance(b)
        want = tree.rho0 @ (C * (b - b_star) ** 2) / k
        assert vb - v.variance == pytest.approx(want, rel=1e-9, abs=1e-12 * v_enum)
        excess.append(vb - v.variance)
    assert min(excess) > 0  # b* is not on the grid: every grid point is strictly worse
    # the other baselines are constants too, and cost more here
    for base in ("none", "value"):
        assert pg_estimator_variance(pc, th, prob, baseline=base, group_size=k).variance > v.variance * (1 + 1e-6)
