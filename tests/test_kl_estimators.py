"""Exact bias and variance of the KL estimators k1, k2, k3 (Schulman 2020), by enumeration."""

from __future__ import annotations

import numpy as np
import pytest

from toyrlhf.kl_estimators import (
    ESTIMATORS,
    expected_kl_gradient,
    kl_estimate,
    kl_estimate_grad,
    kl_gradient,
    sequence_kl_moments,
    token_kl_moments,
)
from toyrlhf.online import (
    RLProblem,
    compute_advantages,
    ppo_surrogate,
    sample_rollouts,
    token_rewards,
)
from toyrlhf.policies import (
    TabularPolicy,
    leaf_logprobs,
    random_policy,
    sequence_kl,
    uniform_policy,
)
from toyrlhf.tree import TokenTree


def make(V=3, H=3, P=2, seed=0, zero_fraction=0.3, eos=None):
    rng = np.random.default_rng(seed)
    tree = TokenTree(V=V, H=H, P=P, eos=eos)
    ref = random_policy(tree, rng)  # full support
    pi = random_policy(tree, rng, temperature=1.5, zero_fraction=zero_fraction)  # zeros allowed
    return tree, pi, ref, rng


def test_estimator_values_and_edge_cases():
    lp, lq = np.log(0.5), np.log(0.2)
    lr = lq - lp
    assert kl_estimate(lp, lq, "k1") == pytest.approx(-lr)
    assert kl_estimate(lp, lq, "k2") == pytest.approx(lr**2 / 2)
    assert kl_estimate(lp, lq, "k3") == pytest.approx(np.exp(lr) - 1 - lr)
    # p = 0: the sample cannot occur -> 0; p_ref = 0 < p: infinite KL -> +inf; never NaN, no warnings
    vals = np.stack([kl_estimate([-np.inf, 0.0, np.log(0.3)], [0.0, -np.inf, -np.inf], e) for e in ESTIMATORS])
    np.testing.assert_array_equal(vals[:, 0], 0.0)
    assert np.all(vals[:, 1:] == np.inf)
    g = np.stack([kl_estimate_grad(lp, lq, e) for e in ESTIMATORS])
    np.testing.assert_allclose(g, [1.0, -lr, 1 - np.exp(lr)])
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(lp, lq, "k4")
    with pytest.raises(ValueError, match="logp"):
        kl_estimate(0.5, lq, "k1")


@pytest.mark.parametrize("eos", [None, 0])
def test_k1_k3_unbiased_k3_nonnegative_k2_biased_per_token(eos):
    tree, pi, ref, _ = make(eos=eos, zero_fraction=0.0)
    m = token_kl_moments(tree, pi, ref)
    for h in range(tree.H):
        np.testing.assert_allclose(m.mean[h][0], m.true_kl[h], atol=1e-14)  # k1
        np.testing.assert_allclose(m.mean[h][2], m.true_kl[h], atol=1e-14)  # k3: E[r] = 1
        assert np.all(m.var[h] >= 0)
        assert np.all(kl_estimate(pi[h], ref[h], "k3") >= 0)  # log r <= r - 1
    bias, std = m.by_depth(tree.rho0)
    assert np.all(np.abs(bias[[0, 2]]) < 1e-14) and np.all(np.abs(bias[1]) > 1e-4)
    assert np.all(std > 0)


def test_k3_is_low_by_the_reference_mass_the_policy_never_samples():
    """E_pi[r] = 1 - pi_ref(pi = 0): where the policy has zeros that pi_ref has not, k3 is biased
    (k1 is not), by exactly that mass; still non-negative."""
    tree, pi, ref, _ = make(zero_fraction=0.3)
    m = token_kl_moments(tree, pi, ref)
    largest = 0.0
    for h in range(tree.H):
        missing = np.where(np.isneginf(pi[h]), np.exp(ref[h]), 0.0).sum(axis=-1)
        largest = max(largest, missing.max())
        np.testing.assert_allclose(m.mean[h][0], m.true_kl[h], atol=1e-14)
        np.testing.assert_allclose(m.mean[h][2] - m.true_kl[h], -missing, atol=1e-14)
        assert np.all(kl_estimate(pi[h], ref[h], "k3") >= 0)
    assert largest > 0.05


@pytest.mark.parametrize("per", ["sequence", "token_sum"])
def test_sequence_moments_match_a_leaf_by_leaf_reference(per):
    tree, pi, ref, _ = make(V=2, H=3, P=2, seed=1)
    full = sequence_kl_moments(tree, make(V=2, H=3, P=2, seed=1, zero_fraction=0.0)[1], ref, per=per)
    np.testing.assert_allclose(full.bias[[0, 2]], 0.0, atol=1e-13)  # k1, k3 unbiased with full support
    m = sequence_kl_moments(tree, pi, ref, per=per)
    lp, lq = leaf_logprobs(tree, pi), leaf_logprobs(tree, ref)
    tok = tree.tokens()
    for s in range(tree.P):  # slow, obvious reference: loop over prompts and leaves
        for j, e in enumerate(ESTIMATORS):
            vals, probs = [], []
            for x in range(tree.n_leaves):
                p = np.exp(lp[s, x])
                if p == 0:
                    continue
                if per == "sequence":
                    v = kl_estimate(lp[s, x], lq[s, x], e)
                else:
                    node, v = 0, 0.0
                    for h in range(tree.H):
                        a = tok[x, h]
                        v += kl_estimate(pi[h][s, node, a], ref[h][s, node, a], e)
                        node = node * tree.V + a
                vals.append(v)
                probs.append(p)
            vals, probs = np.array(vals), np.array(probs)
            mean = probs @ vals
            assert m.mean[j, s] == pytest.approx(mean, abs=1e-12)
            assert m.var[j, s] == pytest.approx(probs @ (vals - mean) ** 2, abs=1e-12)
    np.testing.assert_allclose(m.true_kl, sequence_kl(tree, pi, ref), atol=1e-14)
    np.testing.assert_allclose(m.bias[0], 0.0, atol=1e-13)  # k1 unbiased for the sequence KL
    assert np.all(np.abs(m.bias[1]) > 1e-4)  # k2 is not


def leaf_values(tree, pi, ref, estimator, per):
    """(P, N) estimator values of every completion, by walking each path (slow, obvious)."""
    lp, lq = leaf_logprobs(tree, pi), leaf_logprobs(tree, ref)
    tok = tree.tokens()
    out = np.zeros((tree.P, tree.n_leaves))
    for s in range(tree.P):
        for x in range(tree.n_leaves):
            if not np.isfinite(lp[s, x]):
                continue  # cannot be sampled; weight 0
            if per == "sequence":
                out[s, x] = kl_estimate(lp[s, x], lq[s, x], estimator)
            else:
                node = 0
                for h in range(tree.H):
                    a = tok[x, h]
                    out[s, x] += kl_estimate(pi[h][s, node, a], ref[h][s, node, a], estimator)
                    node = node * tree.V + a
    return out, np.exp(lp)


def test_sampled_estimators_agree_with_exact_moments():
    """Sample mean within 4 SE of the exact mean; sample variance within 4 exact standard errors
    of the sample variance, ``Var(s^2) = mu4/n - sigma^4 (n-3)/(n(n-1))`` with the central moments
    ``mu4``, ``sigma^2`` enumerated over the leaves."""
    tree, pi, ref, rng = make(V=3, H=2, P=1, seed=2)
    n = 20000
    b = sample_rollouts(tree, pi, ref, n, 1, rng)
    m = sequence_kl_moments(tree, pi, ref, per="token_sum")
    for j, e in enumerate(ESTIMATORS):
        vals, p = leaf_values(tree, pi, ref, e, "token_sum")
        mean = p[0] @ vals[0]
        var = p[0] @ (vals[0] - mean) ** 2
        mu4 = p[0] @ (vals[0] - mean) ** 4
        assert m.var[j, 0] == pytest.approx(var, rel=1e-12)
        k = kl_estimate(b.logp, b.logp_ref, e).sum(axis=1)
        assert abs(k.mean() - m.mean[j, 0]) <= 4 * np.sqrt(var / n)
        se_var = np.sqrt(mu4 / n - var**2 * (n - 3) / (n * (n - 1)))
        assert abs(k.var(ddof=1) - m.var[j, 0]) <= 4 * se_var, (e, (k.var(ddof=1) - m.var[j, 0]) / se_var)


def test_marginal_moments_over_prompts_match_a_joint_enumeration():
    """``KLMoments.marginal``: mean and variance over the joint draw (s0 ~ rho0, xi ~ P(.|s0)),
    enumerated pair by pair (the law of total variance includes the variance of the means)."""
    rng = np.random.default_rng(7)
    tree = TokenTree(V=2, H=3, rho0=[0.25, 0.75])
    ref = random_policy(tree, rng)
    pi = random_policy(tree, rng, temperature=1.5, zero_fraction=0.3)
    for per in ("sequence", "token_sum"):
        m = sequence_kl_moments(tree, pi, ref, per=per)
        true, mean, var = m.marginal(tree.rho0)
        assert true == pytest.approx(float(tree.rho0 @ sequence_kl(tree, pi, ref)), rel=1e-13)
        for j, e in enumerate(ESTIMATORS):
            vals, p = leaf_values(tree, pi, ref, e, per)
            w = (tree.rho0[:, None] * p).ravel()  # joint weights of (s0, xi)
            v = vals.ravel()
            mu = w @ v
            assert mean[j] == pytest.approx(mu, rel=1e-12, abs=1e-15)
            assert var[j] == pytest.approx(w @ (v - mu) ** 2, rel=1e-12)
        # the prompts' means differ, so the between-prompt term is not negligible here
        assert np.all(np.abs(m.mean[:, 0] - m.mean[:, 1]) > 1e-2)


def test_by_depth_bias_and_std_match_a_node_by_node_enumeration():
    rng = np.random.default_rng(8)
    tree = TokenTree(V=3, H=3, rho0=[0.4, 0.6])
    ref = random_policy(tree, rng)
    pi = random_policy(tree, rng, temperature=1.5, zero_fraction=0.3)
    bias, std = token_kl_moments(tree, pi, ref).by_depth(tree.rho0)
    want_b = np.zeros((3, tree.H))
    want_v = np.zeros((3, tree.H))
    for s in range(tree.P):  # walk every node with its reach probability
        frontier = [(0, tree.rho0[s])]
        for h in range(tree.H):
            nxt = []
            for node, d in frontier:
                lp, lq = pi[h][s, node], ref[h][s, node]
                p = np.exp(lp)
                kl_true = sum(p[a] * (lp[a] - lq[a]) for a in range(tree.V) if p[a] > 0)
                for j, e in enumerate(ESTIMATORS):
                    k = kl_estimate(lp, lq, e)
                    mean = p @ k
                    want_b[j, h] += d * (mean - kl_true)
                    want_v[j, h] += d * (p @ (k - mean) ** 2)
                nxt += [(node * tree.V + a, d * p[a]) for a in range(tree.V) if p[a] > 0]
            frontier = nxt
    np.testing.assert_allclose(bias, want_b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(std, np.sqrt(want_v), rtol=1e-12)
    assert np.all(want_v > 1e-3) and np.all(np.abs(want_v - 1.0) > 1e-2)  # sqrt is not the identity here


def test_k3_has_lower_variance_than_k1_near_pi_ref():
    rng = np.random.default_rng(3)
    tree = TokenTree(V=3, H=3)
    ref = random_policy(tree, rng)
    logits = [lr + 0.05 * rng.standard_normal(lr.shape) for lr in ref]
    pi = tuple(z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in logits)
    m = sequence_kl_moments(tree, pi, ref)
    assert m.var[2, 0] < 0.1 * m.var[0, 0]


def test_kl_gradient_and_the_expected_gradients_of_kl_penalties():
    tree, _, ref, rng = make(V=3, H=1, P=2, seed=4)
    pc = TabularPolicy(tree, ref)
    th = rng.standard_normal(pc.n_params)
    g = kl_gradient(pc, th, ref)
    e = 1e-6
    f = lambda t: tree.average(sequence_kl(tree, pc.conditionals(t), ref))  # noqa: E731
    eye = np.eye(pc.n_params)
    np.testing.assert_allclose(g, [(f(th + e * eye[i]) - f(th - e * eye[i])) / (2 * e) for i in range(pc.n_params)], atol=1e-8)
    np.testing.assert_allclose(expected_kl_gradient(pc, th, ref, "k1", "reward"), g, atol=1e-14)
    np.testing.assert_allclose(expected_kl_gradient(pc, th, ref, "k1", "loss"), 0.0, atol=1e-14)
    np.testing.assert_allclose(expected_kl_gradient(pc, th, ref, "k2", "loss"), g, atol=1e-14)  # H = 1 only
    fwd = pc.leaf_logprobs_vjp(th, -tree.rho0[:, None] * np.exp(leaf_logprobs(tree, ref)))  # grad KL(ref || pi)
    np.testing.assert_allclose(expected_kl_gradient(pc, th, ref, "k3", "loss"), fwd, atol=1e-14)
    # with several tokens the per-token k2 loss misses the effect of a token on later states
    tree3, _, ref3, _ = make(V=3, H=3, P=1, seed=5)
    pc3 = TabularPolicy(tree3, ref3)
    th3 = rng.standard_normal(pc3.n_params)
    g3 = kl_gradient(pc3, th3, ref3)
    np.testing.assert_allclose(expected_kl_gradient(pc3, th3, ref3, "k1", "reward"), g3, atol=1e-13)
    assert np.linalg.norm(expected_kl_gradient(pc3, th3, ref3, "k2", "loss") - g3) > 1e-3 * np.linalg.norm(g3)
    with pytest.raises(ValueError, match="mode"):
        expected_kl_gradient(pc3, th3, ref3, "k1", "penalty")


def test_sampled_kl_loss_gradient_matches_its_exact_expectation():
    """PPO's KL-as-loss term (GRPO style, k3) on samples vs expected_kl_gradient."""
    tree, _, ref, rng = make(V=2, H=3, P=1, seed=6)
    pc = TabularPolicy(tree, ref)
    th = 0.7 * rng.standard_normal(pc.n_params)
    log_pi = pc.conditionals(th)
    prob = RLProblem(tree, ref, np.zeros((1, tree.n_leaves)), beta=1.0)
    want = -expected_kl_gradient(pc, th, ref, "k3", "loss")
    gs = []
    for _ in range(2000):
        b = sample_rollouts(tree, log_pi, ref, 1, 2, rng)
        A = np.zeros(b.tokens.shape)
        gs.append(ppo_surrogate(pc, th, prob, b, A, kl_estimator="k3", kl_mode="loss", log_pi=log_pi)[1])
    gs = np.array(gs)
    se = gs.std(axis=0, ddof=1) / np.sqrt(gs.shape[0])
    assert np.all(np.abs(gs.mean(axis=0) - want) <= 4 * se + 1e-12)
    assert token_rewards(b, prob.reward, 1.0, "k3", "loss").sum() == 0.0  # no KL in the reward
    assert compute_advantages(b, A, advantage="none").shape == A.shape


def test_estimators_at_pi_ref_are_exactly_zero():
    tree = TokenTree(V=2, H=2)
    ref = uniform_policy(tree)
    m = sequence_kl_moments(tree, ref, ref)
    np.testing.assert_array_equal(m.mean, 0.0)
    np.testing.assert_array_equal(m.var, 0.0)


def test_experiment_kl_estimators_claims():
    from toyrlhf.experiments import kl_estimators as ex

    res = ex.run(ex.Config.quick())
    assert np.all(np.diff(res.true_kl) > 0)  # the path moves away from pi_ref
    np.testing.assert_allclose(res.seq_bias[[0, 2]], 0.0, atol=1e-12)
    np.testing.assert_allclose(res.tok_bias[[0, 2]], 0.0, atol=1e-12)
    assert np.all(res.seq_bias[1, 1:] > 0)  # k2 of the sequence ratio overestimates here
    v = {pair: i for i, pair in enumerate(res.grad_variants)}
    assert np.all(res.grad_error[v["k1", "reward"]] < 1e-12)  # the principled penalty
    np.testing.assert_allclose(res.grad_error[v["k1", "loss"], 1:], 1.0, atol=1e-12)  # zero expected gradient
    assert np.all(res.grad_error[v["k3", "loss"], 1:] > 1e-3)
