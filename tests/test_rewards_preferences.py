"""Feature maps, nested reward families, and preference datasets (sampled vs population)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from toyrlhf.policies import leaf_logprobs, random_policy, uniform_policy
from toyrlhf.preferences import (
    bradley_terry,
    log_bradley_terry,
    population_preferences,
    preference_pairs,
    sample_preferences,
)
from toyrlhf.rewards import (
    FAMILY_LEVELS,
    LinearReward,
    TabularReward,
    bag_of_tokens,
    feature_family,
    last_token,
    length_features,
    ngram_counts,
    per_prompt,
    position_token,
    random_linear_reward,
)
from toyrlhf.tree import TokenTree


def test_feature_maps_against_direct_counts_with_eos():
    tree = TokenTree(V=3, H=4, eos=2)
    bag, pos, last, n2 = bag_of_tokens(tree), position_token(tree), last_token(tree), ngram_counts(tree, 2)
    for i, tok in enumerate(tree.tokens()):
        k = next((j + 1 for j, a in enumerate(tok) if a == 2), 4)  # tokens up to and including the first EOS
        seq = list(tok[:k])
        assert bag[i].tolist() == [seq.count(v) for v in range(3)]
        assert pos[i].reshape(4, 3).sum() == k and all(pos[i].reshape(4, 3)[h, seq[h]] == 1 for h in range(k))
        assert np.argmax(last[i]) == seq[-1]
        grams = [seq[j] * 3 + seq[j + 1] for j in range(k - 1)]
        assert n2[i].tolist() == [grams.count(g) for g in range(9)]
        assert np.argmax(length_features(tree)[i]) == k - 1


def test_feature_family_is_nested():
    """Each level's column space contains the previous one's: rank grows, projections are exact."""
    tree = TokenTree(V=2, H=3, eos=1)
    ranks = []
    prev = None
    for level in FAMILY_LEVELS:
        phi = feature_family(tree, level)[tree.valid_leaves()]
        ranks.append(np.linalg.matrix_rank(phi))
        if prev is not None:
            coef, *_ = np.linalg.lstsq(phi, prev, rcond=None)
            np.testing.assert_allclose(phi @ coef, prev, atol=1e-9)
        prev = phi
    assert ranks == sorted(ranks) and ranks[-1] == tree.valid_leaves().sum()


def test_per_prompt_features_and_linear_reward():
    tree = TokenTree(V=2, H=2, P=3)
    phi = per_prompt(tree, bag_of_tokens(tree))
    r, w = random_linear_reward(tree, phi, np.random.default_rng(0))
    for p in range(3):
        np.testing.assert_allclose(r[p], bag_of_tokens(tree) @ w[2 * p: 2 * p + 2])
    with pytest.raises(ValueError, match="features"):
        LinearReward(tree, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="w"):
        TabularReward(tree).reward(np.zeros(3))


def test_bradley_terry_stable_and_complementary():
    x = np.array([-1e4, -3.0, 0.0, 2.0, 1e4])
    np.testing.assert_allclose(bradley_terry(x, 0) + bradley_terry(0, x), 1.0)
    assert np.all(np.isfinite(log_bradley_terry(x, 0)))
    assert log_bradley_terry(-1e4, 0) == pytest.approx(-1e4)


def test_sampled_dataset_frequencies_match_population_weights():
    """Empirical triple frequencies against exact population weights: chi-square at the 1e-4 level."""
    tree = TokenTree(V=2, H=2, P=2, rho0=[0.4, 0.6])
    rng = np.random.default_rng(1)
    ref = random_policy(tree, rng)
    gold = rng.standard_normal((2, 4))
    pop = population_preferences(tree, gold, log_pi_pair=ref)
    np.testing.assert_allclose(pop.weight.sum(), 1.0)
    data = sample_preferences(tree, gold, 50_000, rng, log_pi_pair=ref)
    def key(d):
        return {(p, c, r): w for p, c, r, w in zip(d.prompt, d.chosen, d.rejected, d.weight)}
    emp, exact = key(data), key(pop)
    assert set(emp) <= set(exact)
    obs = np.array([emp.get(k, 0.0) * data.n for k in exact])
    exp = np.array(list(exact.values())) * data.n
    assert ((obs - exp) ** 2 / exp).sum() < stats.chi2.ppf(1 - 1e-4, len(exp) - 1)


def test_population_weights_closed_form():
    tree = TokenTree(V=3, H=1)
    gold = np.array([[0.0, 1.0, -1.0]])
    mu = np.array([0.2, 0.3, 0.5])
    pop = population_preferences(tree, gold, leaf_logp_pair=np.log(mu)[None])
    # each unordered pair {i, j} carries mu_i mu_j in total, split by BT between its two orders
    Z = sum(mu[i] * mu[j] for i, j in itertools.combinations(range(3), 2))
    for _p, c, r, w in zip(pop.prompt, pop.chosen, pop.rejected, pop.weight):
        assert w == pytest.approx(mu[c] * mu[r] * bradley_terry(gold[0, c], gold[0, r]) / Z)


def test_population_from_general_preference_and_bad_input():
    tree = TokenTree(V=3, H=1)
    rps = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])
    pop = population_preferences(tree, preference=rps, log_pi_pair=uniform_policy(tree))
    assert len(pop) == 3 and np.allclose(pop.weight, 1 / 3)
    with pytest.raises(ValueError, match="complementary"):
        population_preferences(tree, preference=np.full((3, 3), 0.6), log_pi_pair=uniform_policy(tree))
    with pytest.raises(ValueError, match="exactly one"):
        population_preferences(tree, log_pi_pair=uniform_policy(tree))
    with pytest.raises(ValueError, match="differ"):
        preference_pairs([0], [1], [1])
    with pytest.raises(TypeError, match="rng"):
        sample_preferences(tree, np.zeros(3), 5, rng=1, log_pi_pair=uniform_policy(tree))
    with pytest.raises(ValueError, match="reward"):
        sample_preferences(tree, np.full(3, np.nan), 5, np.random.default_rng(0), log_pi_pair=uniform_policy(tree))
    with pytest.raises(ValueError, match="n must"):
        sample_preferences(tree, np.zeros(3), 0, np.random.default_rng(0), log_pi_pair=uniform_policy(tree))


def test_pairs_outside_the_pair_support_never_appear():
    tree = TokenTree(V=3, H=2)
    rng = np.random.default_rng(2)
    pair = random_policy(tree, rng, zero_fraction=0.4)
    data = sample_preferences(tree, rng.standard_normal(9), 5000, rng, log_pi_pair=pair)
    support = np.isfinite(leaf_logprobs(tree, pair))
    assert data.coverage(tree)[~support].sum() == 0


def test_self_comparisons_are_rejected_by_check_tree():
    """A PreferenceData built directly may hold chosen == rejected; check_tree (run by every fit) refuses it."""
    from toyrlhf.preferences import PreferenceData
    from toyrlhf.projections import reward_mle

    tree = TokenTree(V=3, H=1)
    data = PreferenceData(np.array([0, 0]), np.array([0, 2]), np.array([1, 2]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"data.chosen and data.rejected must differ .*\[1\]"):
        data.check_tree(tree)
    with pytest.raises(ValueError, match="chosen and data.rejected"):
        reward_mle(data, TabularReward(tree))
    PreferenceData(np.array([0]), np.array([0]), np.array([1]), np.array([1.0])).check_tree(tree)


def test_deterministic_labels_prefer_the_higher_reward():
    """deterministic=True: r[chosen] > r[rejected] for every triple with distinct rewards; ties go either way."""
    tree = TokenTree(V=3, H=2, P=2)
    rng = np.random.default_rng(3)
    gold = np.round(rng.standard_normal((2, 9)))  # rounded: many ties between distinct completions
    data = sample_preferences(tree, gold, 4000, rng, log_pi_pair=uniform_policy(tree), deterministic=True)
    rc, rr = gold[data.prompt, data.chosen], gold[data.prompt, data.rejected]
    assert np.all(rc >= rr)
    tie = rc == rr
    assert np.all(rc[~tie] > rr[~tie]) and (~tie).sum() > 0
    # ties are broken by a fair coin: both orders of a tied pair appear
    keys = {(p, c, r) for p, c, r in zip(data.prompt[tie], data.chosen[tie], data.rejected[tie])}
    assert tie.any() and any((p, r, c) in keys for p, c, r in keys)
    # and the stochastic labels do put the lower reward first sometimes (the check above could fail)
    noisy = sample_preferences(tree, gold, 4000, rng, log_pi_pair=uniform_policy(tree))
    assert np.any(gold[noisy.prompt, noisy.chosen] < gold[noisy.prompt, noisy.rejected])
