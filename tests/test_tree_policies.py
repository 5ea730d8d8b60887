"""The token tree and policies: layout, likelihoods, KL, gradients and sampling against slow references."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from toyrlhf.policies import (
    LogLinearPolicy,
    TabularPolicy,
    aggregate_to_edges,
    last_tokens_features,
    leaf_logprobs,
    next_token_features,
    position_token_features,
    prefix_count_features,
    random_policy,
    sample_completions,
    sample_leaves,
    sequence_entropy,
    sequence_kl,
    stack_features,
    uniform_policy,
)
from toyrlhf.tree import TokenTree


def slow_leaf_logprob(tree, log_pi, p, tokens):
    """Walk one root-to-leaf path: the obvious definition of log P(xi)."""
    total, node = 0.0, 0
    for h, a in enumerate(tokens):
        total += log_pi[h][p, node, a]
        node = node * tree.V + a
    return total


# ---------------------------------------------------------------------------- tree
def test_tokens_are_lexicographic_and_index_roundtrip():
    tree = TokenTree(V=3, H=4)
    want = np.array(list(itertools.product(range(3), repeat=4)))
    np.testing.assert_array_equal(tree.tokens(), want)
    np.testing.assert_array_equal(tree.leaf_index(want), np.arange(81))
    # depth-h node i has children V*i + a: prefixes of level h+1 extend those of level h
    for h in range(4):
        pre, child = tree.prefixes(h), tree.prefixes(h + 1)
        np.testing.assert_array_equal(child[:, :h], np.repeat(pre, 3, axis=0))


def test_eos_valid_leaves_and_lengths():
    V, H, eos = 3, 4, 1
    tree = TokenTree(V=V, H=H, eos=eos)
    valid, lengths = tree.valid_leaves(), tree.lengths()
    # completions of length k < H end in EOS after k-1 non-EOS tokens; length H: any non-EOS prefix of H-1 then any token
    want_count = sum((V - 1) ** (k - 1) for k in range(1, H)) + (V - 1) ** (H - 1) * V
    assert valid.sum() == want_count
    for tok, ok, n in zip(tree.tokens(), valid, lengths):
        first = next((i for i, a in enumerate(tok) if a == eos), None)
        assert n == (H if first is None else first + 1)
        assert ok == (first is None or all(a == eos for a in tok[first:]))


def test_eos_policy_puts_zero_mass_on_invalid_leaves():
    tree = TokenTree(V=3, H=3, P=2, eos=0)
    lp = leaf_logprobs(tree, random_policy(tree, np.random.default_rng(1)))
    assert np.all(np.isneginf(lp[:, ~tree.valid_leaves()]))
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, atol=1e-12)


def test_oversized_tree_is_refused_with_its_size():
    with pytest.raises(ValueError, match=r"GiB.*memory_budget"):
        TokenTree(V=8, H=12)
    TokenTree(V=8, H=12, memory_budget=1e16)  # a raised budget is honoured (nothing allocated yet)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(V=1, H=2), "V"),
        (dict(V=2, H=0), "H"),
        (dict(V=2.5, H=2), "V"),
        (dict(V=2, H=2, rho0=[0.5, 0.6]), "rho0"),
        (dict(V=2, H=2, rho0=[1.5, -0.5]), "rho0"),
        (dict(V=2, H=2, rho0=[0.5, 0.5], P=3), "P"),
        (dict(V=3, H=2, eos=3), "eos"),
        (dict(V=3, H=2, memory_budget=-1), "memory_budget"),
    ],
)
def test_tree_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TokenTree(**kwargs)


def test_leaf_index_rejects_out_of_range_tokens():
    tree = TokenTree(V=3, H=2)
    with pytest.raises(ValueError, match="tokens"):
        tree.leaf_index(np.array([[0, 3]]))
    with pytest.raises(ValueError, match="tokens"):
        tree.leaf_index(np.array([[0, 1, 2]]))


# ---------------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("eos", [None, 2])
def test_leaf_logprobs_match_path_walk(eos):
    tree = TokenTree(V=3, H=3, P=2, eos=eos)
    log_pi = random_policy(tree, np.random.default_rng(0), zero_fraction=0.3)
    fast = leaf_logprobs(tree, log_pi)
    for p in range(2):
        for i, tok in enumerate(tree.tokens()):
            assert fast[p, i] == pytest.approx(slow_leaf_logprob(tree, log_pi, p, tok)) or (
                np.isneginf(fast[p, i]) and np.isneginf(slow_leaf_logprob(tree, log_pi, p, tok))
            )


def test_aggregate_to_edges_sums_subtrees():
    tree = TokenTree(V=2, H=3, P=2)
    g = np.random.default_rng(2).standard_normal((2, 8))
    G = aggregate_to_edges(tree, g)
    for h in range(3):
        for node in range(2**h):
            for a in range(2):
                child = node * 2 + a
                below = [i for i in range(8) if i // 2 ** (3 - h - 1) == child]
                np.testing.assert_allclose(G[h][:, node, a], g[:, below].sum(axis=1))


def test_sequence_kl_chain_rule_and_direct_sum():
    """KL of sequences = expected sum of per-token KLs along the path (chain rule)."""
    tree = TokenTree(V=3, H=3, P=2, eos=1)
    rng = np.random.default_rng(3)
    ref = random_policy(tree, rng)
    pi = random_policy(tree, rng, zero_fraction=0.3)
    kl = sequence_kl(tree, pi, ref)
    lp, lq = leaf_logprobs(tree, pi), leaf_logprobs(tree, ref)
    p = np.exp(lp)
    direct = np.array([sum(p[s, i] * (lp[s, i] - lq[s, i]) for i in range(27) if p[s, i] > 0) for s in range(2)])
    np.testing.assert_allclose(kl, direct, rtol=1e-12)
    # chain rule: sum over depths of E_{s_h ~ P_pi}[KL(pi(.|s_h) || ref(.|s_h))]
    chain = np.zeros(2)
    reach = np.ones((2, 1))
    for h in range(3):
        with np.errstate(invalid="ignore"):
            tok_kl = np.where(pi[h] > -np.inf, np.exp(pi[h]) * (pi[h] - ref[h]), 0.0).sum(-1)
        chain += (reach * tok_kl).sum(1)
        reach = (reach[:, :, None] * np.exp(pi[h])).reshape(2, -1)
    np.testing.assert_allclose(kl, chain, rtol=1e-10)
    assert np.all(kl >= 0)


def test_kl_infinite_outside_reference_support_and_entropy_of_uniform():
    tree = TokenTree(V=2, H=3)
    ref = random_policy(tree, np.random.default_rng(4), zero_fraction=0.4)
    assert np.isinf(sequence_kl(tree, uniform_policy(tree), ref)).all()
    assert sequence_kl(tree, ref, uniform_policy(tree))[0] < np.inf
    np.testing.assert_allclose(sequence_entropy(tree, uniform_policy(tree)), 3 * math.log(2))


# ---------------------------------------------------------------------------- classes
def _fd_check(cls, theta, g, eps=1e-6):
    grad = cls.leaf_logprobs_vjp(theta, g)
    def f(t):
        lp = cls.leaf_logprobs(t)
        return np.sum(g[g != 0] * lp[g != 0])
    fd = np.array([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eos", [None, 0])
def test_tabular_gradient_finite_differences(eos):
    tree = TokenTree(V=3, H=2, P=2, eos=eos)
    rng = np.random.default_rng(5)
    ref = random_policy(tree, rng, zero_fraction=0.3)
    cls = TabularPolicy(tree, ref)
    theta = rng.standard_normal(cls.n_params)
    g = rng.standard_normal((2, 9)) * np.isfinite(cls.leaf_logprobs(theta))
    _fd_check(cls, theta, g)
    # theta = 0 is the base policy; zero-probability tokens stay at zero
    np.testing.assert_allclose(cls.leaf_logprobs(cls.init()), leaf_logprobs(tree, ref))
    assert np.all(np.isneginf(cls.leaf_logprobs(theta)) == np.isneginf(leaf_logprobs(tree, ref)))


def test_loglinear_gradient_finite_differences():
    tree = TokenTree(V=3, H=3, P=2)
    rng = np.random.default_rng(6)
    feats = stack_features(next_token_features(tree), position_token_features(tree),
                           last_tokens_features(tree, 1), prefix_count_features(tree))
    cls = LogLinearPolicy(tree, random_policy(tree, rng), feats)
    theta = 0.5 * rng.standard_normal(cls.n_params)
    _fd_check(cls, theta, rng.standard_normal((2, 27)))


def test_full_context_features_span_the_tabular_class():
    """Features of (all previous tokens, next token) give the tabular class: any policy is reachable."""
    tree = TokenTree(V=2, H=3)
    rng = np.random.default_rng(7)
    target = random_policy(tree, rng)
    cls = LogLinearPolicy(tree, uniform_policy(tree), last_tokens_features(tree, k=2))
    # fit by least squares on logits: log pi(a|s) - log pi(0|s) is linear in theta here
    from toyrlhf.projections import fkl_projection

    fit = fkl_projection(cls, np.exp(leaf_logprobs(tree, target)))
    np.testing.assert_allclose(fit.leaf_logp, leaf_logprobs(tree, target), atol=1e-6)


# ---------------------------------------------------------------------------- sampling
def test_ancestral_sampling_matches_exact_leaf_distribution():
    tree = TokenTree(V=2, H=3, P=2, rho0=[0.3, 0.7])
    log_pi = random_policy(tree, np.random.default_rng(8), zero_fraction=0.2)
    n = 40_000
    prompts, tokens = sample_completions(tree, log_pi, n, np.random.default_rng(9))
    counts = np.zeros((2, 8))
    np.add.at(counts, (prompts, tree.leaf_index(tokens)), 1)
    expected = n * tree.rho0[:, None] * np.exp(leaf_logprobs(tree, log_pi))
    assert counts[expected == 0].sum() == 0  # zero-probability completions are never drawn
    pos = expected > 0
    chi2 = ((counts[pos] - expected[pos]) ** 2 / expected[pos]).sum()
    # chi-square goodness of fit at the 1e-4 level (deterministic given the seed)
    assert chi2 < stats.chi2.ppf(1 - 1e-4, pos.sum() - 1)


def test_leaf_sampler_matches_distribution():
    tree = TokenTree(V=3, H=2, P=3)
    lp = leaf_logprobs(tree, random_policy(tree, np.random.default_rng(10), zero_fraction=0.3))
    n = 30_000
    prompts, leaves = sample_leaves(tree, lp, n, np.random.default_rng(11))
    counts = np.zeros((3, 9))
    np.add.at(counts, (prompts, leaves), 1)
    expected = n * tree.rho0[:, None] * np.exp(lp)
    assert counts[expected == 0].sum() == 0
    pos = expected > 0
    assert ((counts[pos] - expected[pos]) ** 2 / expected[pos]).sum() < stats.chi2.ppf(1 - 1e-4, pos.sum() - 1)


def test_sampling_bad_input():
    tree = TokenTree(V=2, H=2)
    with pytest.raises(TypeError, match="rng"):
        sample_completions(tree, uniform_policy(tree), 3, rng=0)
    with pytest.raises(ValueError, match="n"):
        sample_completions(tree, uniform_policy(tree), -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="prompts"):
        sample_completions(tree, uniform_policy(tree), 2, np.random.default_rng(0), prompts=np.array([0, 1]))


def test_policy_bad_input():
    tree = TokenTree(V=2, H=2)
    with pytest.raises(TypeError, match="log_pi_base"):
        TabularPolicy(tree, uniform_policy(tree)[:1])
    with pytest.raises(ValueError, match=r"log_pi_base\[1\]"):
        TabularPolicy(tree, (uniform_policy(tree)[0], np.zeros((1, 3, 2))))
    bad = list(uniform_policy(tree))
    bad[0] = np.full((1, 1, 2), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        TabularPolicy(tree, tuple(bad))
    cls = TabularPolicy(tree, uniform_policy(tree))
    with pytest.raises(ValueError, match="theta"):
        cls.conditionals(np.zeros(3))
    with pytest.raises(ValueError, match="theta"):
        cls.conditionals(np.full(cls.n_params, np.nan))


# ---------------------------------------------------------------------------- normalisation
def _two_token_ref(p0, p1, dtype=np.float64):
    with np.errstate(divide="ignore"):
        return (np.log(np.array([[[p0, p1]]], dtype=dtype)),)


def test_unnormalised_conditionals_are_rejected_by_name():
    """A reference of (0.3, 0.3) used to give sequence_kl = 0.51 silently; now it names the argument."""
    tree = TokenTree(V=2, H=1)
    bad = _two_token_ref(0.3, 0.3)
    from toyrlhf.projections import kl_regularized_objective, soft_optimal_policy

    with pytest.raises(ValueError, match=r"log_pi_ref\[0\] must hold normalised conditionals"):
        sequence_kl(tree, uniform_policy(tree), bad)
    with pytest.raises(ValueError, match=r"log_pi\[0\] must hold normalised"):
        sequence_kl(tree, bad, uniform_policy(tree))
    with pytest.raises(ValueError, match=r"log_pi\[0\] must hold normalised"):
        sequence_entropy(tree, bad)
    with pytest.raises(ValueError, match=r"log_pi_ref\[0\] must hold normalised"):
        soft_optimal_policy(tree, bad, np.zeros((1, 2)), 1.0)
    with pytest.raises(ValueError, match=r"log_pi_ref\[0\] must hold normalised"):
        kl_regularized_objective(tree, uniform_policy(tree), bad, np.zeros((1, 2)), 1.0)
    # a node whose tokens all have probability zero, NaN and +inf are named too
    with pytest.raises(ValueError, match=r"log_pi\[0\] must hold normalised"):
        sequence_entropy(tree, _two_token_ref(0.0, 0.0))
    with pytest.raises(ValueError, match=r"log_pi\[0\].*NaN"):
        sequence_entropy(tree, (np.array([[[np.nan, 0.0]]]),))
    with pytest.raises(ValueError, match=r"log_pi\[0\].*\+inf"):
        sequence_entropy(tree, (np.array([[[np.inf, 0.0]]]),))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normalisation_tolerance_is_the_documented_one(dtype):
    """Rows off by half the tolerance pass, rows off by twice the tolerance fail (both dtypes)."""
    from toyrlhf.tree import normalisation_tol

    tree = TokenTree(V=2, H=1)
    tol = normalisation_tol(np, dtype, 2)
    eps32 = float(np.finfo(np.float32).eps)
    assert tol == (max(1e-9, eps32 * np.log(2)) if dtype == np.float64 else max(1e-4, 8 * eps32))
    tree.check_levels("log_pi", _two_token_ref(0.25, 0.75 + 0.5 * tol, dtype))
    with pytest.raises(ValueError, match="normalised"):
        tree.check_levels("log_pi", _two_token_ref(0.25, 0.75 + 2 * tol, dtype))
    with pytest.raises(ValueError, match="normalised"):
        tree.check_levels("log_pi", _two_token_ref(0.25, 0.75 - 2 * tol, dtype))


def test_float32_rounded_policies_pass_the_float64_check():
    """The float64 tolerance admits float32 log-probs promoted to float64 (row sums move by <= eps32 log(V) / 2)."""
    from toyrlhf.tree import normalisation_tol

    for V in (2, 5, 40):
        tree = TokenTree(V=V, H=2, P=3)
        log_pi = random_policy(tree, np.random.default_rng(V), temperature=3.0, zero_fraction=0.2)
        rounded = tuple(lp.astype(np.float32).astype(np.float64) for lp in log_pi)
        worst = max(np.abs(np.exp(lp).sum(-1) - 1).max() for lp in rounded)
        bound = float(np.finfo(np.float32).eps) * np.log(V) / 2 + 16 * V * np.finfo(float).eps
        assert worst <= bound <= normalisation_tol(np, np.float64, V)
        tree.check_levels("log_pi", rounded)


def test_policy_class_base_may_be_logits():
    """pi_theta ∝ pi_base e^theta does not depend on a per-node constant: logits are normalised at construction."""
    tree = TokenTree(V=3, H=2)
    logits = tuple(np.random.default_rng(0).standard_normal((1, 3**h, 3)) + 5.0 for h in range(2))
    cls = TabularPolicy(tree, logits)
    want = tuple(lp - np.log(np.exp(lp).sum(-1, keepdims=True)) for lp in logits)
    for got, w in zip(cls.log_pi_base, want):
        np.testing.assert_allclose(got, w, rtol=0, atol=8 * np.finfo(float).eps * 8)
    theta = np.random.default_rng(1).standard_normal(cls.n_params)
    a = cls.conditionals(theta)
    b = TabularPolicy(tree, want).conditionals(theta)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=64 * np.finfo(float).eps)
    with pytest.raises(ValueError, match=r"log_pi_base\[0\] has a node whose tokens all have probability zero"):
        TabularPolicy(tree, (np.full((1, 1, 3), -np.inf), logits[1]))


# ---------------------------------------------------------------------------- sampling edge cases
class _FixedUniforms(np.random.Generator):
    """A Generator whose ``random`` returns a fixed value: adversarial uniforms for the samplers."""

    def __init__(self, u):
        super().__init__(np.random.PCG64(0))
        self.u = u

    def random(self, size=None, dtype=np.float64, out=None):
        return np.full(size, self.u)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_categorical_never_returns_a_zero_probability_token(dtype):
    """u = 1 - 1e-9 rounds to 1.0 in float32; the old index clipping returned token 2 of probs [.5, .5, 0]."""
    from toyrlhf.policies import _categorical, _inverse_cdf

    probs = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [1e-30, 0.0, 0.0]], dtype=dtype)
    for u in (0.0, 0.5, 1 - 1e-9, 1 - 2**-53, np.nextafter(1.0, 0.0)):
        idx = _categorical(_FixedUniforms(u), probs)
        assert np.all(probs[np.arange(4), idx] > 0), (u, idx)
    # the inverse CDF itself, with uniforms exactly 1.0 in the probs' dtype (the worst rounding)
    idx = _inverse_cdf(np, probs, np.ones(4, dtype=dtype))
    np.testing.assert_array_equal(idx, [1, 1, 2, 0])  # the last token of positive probability
    # and the trees: ancestral sampling from a float32 policy with trailing zero tokens
    tree = TokenTree(V=3, H=2)
    with np.errstate(divide="ignore"):
        log_pi = tuple(np.log(np.broadcast_to(np.array([0.5, 0.5, 0.0]), (1, 3**h, 3))).astype(dtype) for h in range(2))
    for u in (1 - 1e-9, 0.0):
        _, tok = sample_completions(tree, log_pi, 5, _FixedUniforms(u))
        assert np.all(tok < 2)


def test_sample_leaves_adversarial_uniforms_stay_in_the_row_and_the_support():
    """prompt + u rounds to prompt + 1 for u within an ulp of 1: the draw must stay in that prompt's row."""
    tree = TokenTree(V=2, H=2, P=9)
    p = np.zeros((9, 4))
    p[:, 1] = 0.5
    p[:, 2] = 0.5  # leaves 0 and 3 have probability zero (leading and trailing zeros)
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    prompts = np.arange(9)
    for u in (0.0, 0.5, 1 - 1e-12, np.nextafter(1.0, 0.0)):
        pr, leaves = sample_leaves(tree, lp, 9, _FixedUniforms(u), prompts=prompts)
        np.testing.assert_array_equal(pr, prompts)
        assert np.all((leaves == 1) | (leaves == 2)), (u, leaves)
    assert 8 + np.nextafter(1.0, 0.0) == 9.0  # the rounding that used to move the draw to the next row


def test_sample_leaves_bad_input_names_the_argument():
    tree = TokenTree(V=2, H=2, P=3)
    lp = leaf_logprobs(tree, uniform_policy(tree))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="prompts must lie in"):
        sample_leaves(tree, lp, 3, rng, prompts=[0, 5, -1])
    with pytest.raises(ValueError, match="prompts must have shape"):
        sample_leaves(tree, lp, 3, rng, prompts=[0, 1])
    with pytest.raises(TypeError, match="prompts must be integer"):
        sample_leaves(tree, lp, 2, rng, prompts=[0.0, 1.0])
    with pytest.raises(ValueError, match="n must"):
        sample_leaves(tree, lp, -1, rng)
    with pytest.raises(TypeError, match="n must"):
        sample_leaves(tree, lp, 2.5, rng)
    with pytest.raises(ValueError, match="leaf_logp must have shape"):
        sample_leaves(tree, lp[:, :3], 2, rng)
    empty = lp.copy()
    empty[1] = -np.inf
    with pytest.raises(ValueError, match=r"leaf_logp has no completion of positive probability .*\[1\]"):
        sample_leaves(tree, empty, 50, rng)
    # a prompt with no mass is fine if it is never drawn
    skewed = TokenTree(V=2, H=2, P=3, rho0=[0.5, 0.0, 0.5])
    pr, leaves = sample_leaves(skewed, empty, 50, rng)
    assert not np.any(pr == 1) and np.all((0 <= leaves) & (leaves < 4))
    with pytest.raises(ValueError, match="leaf_logp has no completion"):
        sample_leaves(skewed, empty, 2, rng, prompts=[0, 1])
    with pytest.raises(ValueError, match="prompts must lie in"):
        sample_completions(tree, uniform_policy(tree), 3, rng, prompts=np.array([0, 5, -1]))
    with pytest.raises(ValueError, match=r"log_pi\[1\] must hold normalised"):
        sample_completions(tree, (uniform_policy(tree)[0], np.zeros((3, 2, 2))), 3, rng)


def test_soft_optimal_policy_checks_its_reference_inside_the_sweep():
    """soft_optimal_policy checks normalisation fused into its sweep (blocked on the CPU): same errors."""
    from toyrlhf._backend import KernelProfile
    from toyrlhf.projections import _soft_value_iteration, soft_optimal_policy

    tree = TokenTree(V=3, H=3, P=2)
    ref = random_policy(tree, np.random.default_rng(0), zero_fraction=0.3)
    r = np.zeros((2, 27))
    for h in range(3):
        for value, match in ((np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "normalised"), (np.log(0.9), "normalised")):
            bad = [x.copy() for x in ref]
            bad[h][1, -1, :] = value  # the last node of the last prompt: the last block of a split level
            with pytest.raises(ValueError, match=rf"log_pi_ref\[{h}\].*{match}"):
                soft_optimal_policy(tree, tuple(bad), r, 1.0)
            with pytest.raises(ValueError, match=rf"log_pi_ref\[{h}\].*{match}"):
                _soft_value_iteration(np, tuple(bad), r, 1.0, True, KernelProfile(6, True), check_tol=1e-9)
    # float32 references are checked at the float32 tolerance even when the reward promotes to float64
    off = [x.copy() for x in ref]
    off[0][:, 0, :] = np.log([0.2, 0.3, 0.5 + 1e-5])  # 1e-5 off: within float32's 1e-4, not float64's 1e-7
    ref32 = tuple(x.astype(np.float32) for x in off)
    assert soft_optimal_policy(tree, ref32, r, 1.0).log_Z.dtype == np.float64
    with pytest.raises(ValueError, match=r"log_pi_ref\[0\] must hold normalised"):
        soft_optimal_policy(tree, tuple(off), r, 1.0)
