"""Each experiment's quick config asserts the claim it illustrates (issue 5).

gen_verif_gap, isomorphic, fkl_rkl, likelihood_displacement, overoptimisation.  Tolerances
are derived where the statement is exact (optimiser gradient norms, symmetry, theorems on
monotonicity) and qualitative thresholds are stated as the claim itself ("most mass", "peaks
then declines").
"""

import dataclasses
import io

import numpy as np
import pytest

from toyrlhf import experiments
from toyrlhf._io import load_result, save_result
from toyrlhf.experiments import fkl_rkl as fr
from toyrlhf.experiments import gen_verif_gap as gv
from toyrlhf.experiments import isomorphic as iso
from toyrlhf.experiments import likelihood_displacement as ld
from toyrlhf.experiments import overoptimisation as oo
from toyrlhf.policies import LogLinearPolicy, leaf_logprobs, random_policy
from toyrlhf.tree import TokenTree

NAMES = ("gen_verif_gap", "isomorphic", "fkl_rkl", "likelihood_displacement", "overoptimisation")
_CACHE = {}


def quick(name):
    """The quick result of an experiment, computed once per test session."""
    if name not in _CACHE:
        mod = experiments.get(name)
        _CACHE[name] = mod.run(mod.Config.quick())
    return _CACHE[name]


# ------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("name", NAMES)
def test_protocol_registered_documented_reproducible(name, tmp_path):
    mod = experiments.get(name)  # registered and well-formed
    assert mod.NAME == name
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    assert set(experiments.field_docs(mod.Config)) == fields, "every Config field needs a docstring"
    with pytest.raises(dataclasses.FrozenInstanceError):
        mod.Config().seed = 1  # frozen
    res = quick(name)
    assert res.config == mod.Config.quick()
    # saveable, loadable, and bit-reproducible from the seed
    p1 = save_result(res, tmp_path / "a.npz")
    p2 = save_result(mod.run(mod.Config.quick()), tmp_path / "b.npz")
    assert p1.read_bytes() == p2.read_bytes()
    assert load_result(type(res), p1).config == res.config
    fig = mod.figure(res)
    assert len(fig.axes) >= 3
    for ax in fig.axes:
        if ax.axison:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    fig.savefig(io.BytesIO(), format="png")


# ------------------------------------------------------------------------------ gen_verif_gap
def test_gen_verif_gap_rlhf_beats_tabular_dpo_at_small_data():
    r = quick("gen_verif_gap")
    rlhf, dpo = r.kl[gv.METHODS.index("rlhf_simple"), 0], r.kl[gv.METHODS.index("dpo_tabular"), 0]
    diff = dpo - rlhf  # paired over datasets
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    assert diff.mean() > 2 * se > 0, (rlhf, dpo)
    # both learn: KL to the gold optimum falls with data
    assert np.all(r.kl[:2, -1].mean(axis=-1) < r.kl[:2, 0].mean(axis=-1))


def test_gen_verif_gap_closures_coincide():
    r = quick("gen_verif_gap")
    # the pairs solve the same strictly convex objective: |w_a - w_b|_inf <= |w_a - w_b|_2 <=
    # (|grad_a| + |grad_b|) / l2 (strong convexity), whatever the optimisers did
    assert np.all(r.closure_dw <= r.closure_bound)
    assert r.closure_dp.max() < 1e-6
    k_ds, k_rs = gv.METHODS.index("dpo_simple"), gv.METHODS.index("rlhf_simple")
    k_rt, k_dt = gv.METHODS.index("rlhf_tabular"), gv.METHODS.index("dpo_tabular")
    np.testing.assert_allclose(r.kl[k_ds], r.kl[k_rs], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(r.kl[k_rt], r.kl[k_dt], rtol=1e-5, atol=1e-9)
    # the reward-size sweep's tabular level is the same estimator as rlhf_tabular
    np.testing.assert_array_equal(r.kl_levels[r.level_names.index("tabular")], r.kl[k_rt])


def test_gen_verif_gap_reward_model_too_small_hurts():
    r = quick("gen_verif_gap")
    uni, pos = r.level_names.index("unigram"), r.level_names.index("position")
    # at the largest n the class missing the gold's position structure is worse than the one containing it
    assert r.kl_levels[uni, -1].mean() > 2 * r.kl_levels[pos, -1].mean()
    # and the tabular (unregularised) MLE is not attained at the smallest n: why a prior is needed
    assert not r.attained[1, 0].all()


# ------------------------------------------------------------------------------ isomorphic
def test_isomorphic_rlhf_equals_dpo_at_every_coverage():
    r = quick("isomorphic")
    assert r.coverages[0] == 1.0 and r.coverages.min() < 0.5
    assert np.all(r.canonical < 1e-6), r.canonical
    assert np.all(r.conditional < 1e-6), r.conditional
    assert r.raw[0] < 1e-6  # at full coverage the optimum is a single point
    assert np.all(np.abs(r.loss_gap) < 1e-10)
    # the isomorphic class never leaves supp(pi_ref)
    assert np.all(r.outside_rlhf == 0) and np.all(r.outside_dpo_iso == 0)


def test_isomorphic_unrestricted_class_leaves_the_support():
    r = quick("isomorphic")
    assert np.all(r.outside_dpo_free > 0)
    assert np.all(np.abs(r.loss_gap_free) < 1e-10)  # ... while being just as optimal
    # a whole segment of optima, from RLHF (t = 0) to 99% of the mass outside supp(pi_ref)
    assert r.edge_t[-1] > 0.9
    assert np.ptp(r.edge_loss) < 1e-12


def test_policy_from_leaf_probs_roundtrip():
    tree = TokenTree(V=3, H=3, P=2)
    log_pi = random_policy(tree, np.random.default_rng(1), zero_fraction=0.2)
    with np.errstate(under="ignore"):
        p = np.exp(leaf_logprobs(tree, log_pi))
    with np.errstate(divide="ignore"):
        back = np.exp(leaf_logprobs(tree, iso.policy_from_leaf_probs(tree, p)))
    np.testing.assert_allclose(back, p, atol=1e-14)


# ------------------------------------------------------------------------------ fkl_rkl
def test_fkl_covers_modes_rkl_seeks_one():
    r = quick("fkl_rkl")
    tgt, fkl, rkl = r.mode_mass
    assert abs(tgt[0] - tgt[1]) < 1e-12 and tgt.sum() > 0.9  # bimodal, symmetric target
    # RKL: most mass on one mode, almost none on the other
    assert rkl.max() > 0.5 and rkl.min() < 0.1 * rkl.max()
    # FKL: unique optimum of a symmetric problem is symmetric, and covers both modes
    assert abs(fkl[0] - fkl[1]) < 1e-6 and fkl.min() > 0.25
    assert r.fkl_spread < 1e-6  # convex: same optimum from every start
    assert r.entropy[1] > r.entropy[2]  # FKL entropy > RKL entropy
    # each projection is optimal for its own divergence
    assert r.fkl_objective[0] <= r.fkl_objective[1] and r.rkl_objective[1] <= r.rkl_objective[0]
    # every RKL start ends on one mode
    assert np.all(r.rkl_modes.max(axis=1) > 0.5)


# ------------------------------------------------------------------------------ likelihood displacement
def test_ches_identity_and_prediction():
    r = quick("likelihood_displacement")
    # exact: d log P(y+)/dt = -beta sigma(-beta rho) CHES at every step (sums of ~10 products: 1e-12)
    assert r.identity_err.max() < 1e-12
    assert np.all(np.sign(r.flow_rate0) == np.sign(-r.ches0))
    assert (r.ches0 > 0).any() and (r.ches0 < 0).any()
    # per GD step the sign follows -CHES except O(lr^2) cases near CHES = 0
    assert r.step_sign_agreement > 0.9
    # CHES ranks the total displacement after training
    assert r.spearman < 0 and r.spearman_pvalue < 0.01


def test_feature_sharing_dpo_lowers_chosen_and_moves_mass_elsewhere():
    r = quick("likelihood_displacement")
    i, j = r.pairs[r.example]
    lp = r.example_logp
    assert lp[-1, i] < lp[0, i]  # the chosen completion's likelihood falls ...
    assert lp[-1, i] - lp[-1, j] > lp[0, i] - lp[0, j]  # ... while the DPO margin grows
    g = r.example_gainer
    assert g not in (i, j) and np.exp(lp[-1, g]) > np.exp(lp[0, g]) + (np.exp(lp[0, i]) - np.exp(lp[-1, i])) / 2


def test_tabular_chosen_logprob_always_increases():
    r = quick("likelihood_displacement")
    # theorem for one pair (see the module docstring): every step raises log P(y+)
    assert np.diff(r.tab_chosen, axis=1).min() > 0
    assert np.diff(r.tree_chosen, axis=1).min() > 0


def test_ches_score_matches_centred_embeddings():
    tree = TokenTree(V=6, H=1)
    rng = np.random.default_rng(3)
    ref = random_policy(tree, rng)
    psi = rng.standard_normal((6, 3))
    cls = LogLinearPolicy(tree, ref, (psi[None, None],))
    theta = rng.standard_normal(3)
    p = np.exp(cls.leaf_logprobs(theta)[0])
    g = psi - p @ psi
    assert abs(ld.ches_score(cls, theta, 0, 1, 4) - (g[1] @ g[4] - g[1] @ g[1])) < 1e-12


# ------------------------------------------------------------------------------ overoptimisation
def test_overoptimisation_gold_peaks_proxy_rises():
    r = quick("overoptimisation")
    for d, gold, proxy in ((r.bon_d, r.bon_gold, r.bon_proxy), (r.rl_d, r.rl_gold, r.rl_proxy)):
        # theorems: d and the proxy reward are non-decreasing along both paths
        assert np.diff(d).min() > 0
        assert np.diff(proxy).min() >= -1e-12
        k = int(np.argmax(gold))
        assert 0 < k < gold.size - 1  # interior peak ...
        assert gold[-1] < 0.9 * gold[k] and gold[k] > 0  # ... then a decline
        assert proxy[-1] > proxy[k]


def test_overoptimisation_gao_fits():
    r = quick("overoptimisation")
    assert r.bon_fit[1] > 0 and r.rl_fit[1] > 0  # the fitted forms bend down
    assert r.bon_r2 > 0.8 and r.rl_r2 > 0.8
    assert r.bon_r2 > r.bon_r2_linear and r.rl_r2 > r.rl_r2_linear
    # the fit itself: exact coefficients on data generated from the form
    d = np.linspace(0.1, 3, 20)
    coef, r2, rmse = oo.fit_gao(d, d * (1.5 - 0.4 * np.log(d)), "rl")
    np.testing.assert_allclose(coef, [1.5, 0.4], atol=1e-12)
    assert r2 > 1 - 1e-12 and rmse < 1e-12


def test_overoptimisation_along_training():
    """RL along training (natural policy gradient, small KL coefficient): gold peaks then falls, as across b."""
    r = quick("overoptimisation")
    c = r.config
    d, gold, proxy = r.train_d, r.train_gold, r.train_proxy
    assert np.array_equal(r.train_step, np.arange(c.train_steps + 1))
    assert d[0] == 0 and gold[0] == 0 and proxy[0] == 0  # step 0 is pi_ref
    k = int(np.argmax(gold))
    assert 0 < k < gold.size - 1  # interior peak along training ...
    assert gold[-1] < 0.9 * gold[k] and gold[k] > 0  # ... then a decline
    assert proxy[-1] > proxy[k] and d[-1] > d[k]  # while the proxy and the distance keep growing
    assert r.train_best_d == d[k]
    # training converges to the soft-optimal policy of (proxy, train_beta): by Pinsker and Jensen,
    # |E_pi[g] - E_pi*[g]| <= (max g - min g) / 2 * sqrt(2 KL(pi || pi*)), KL averaged over prompts
    tree = TokenTree(V=c.V, H=c.H, P=c.P)
    g = oo.gold_reward(tree, c.token_values, c.repeat_penalty)
    assert r.train_kl_to_optimal >= -1e-12
    assert abs(gold[-1] - r.train_gold_limit) <= np.ptp(g) / 2 * np.sqrt(2 * max(r.train_kl_to_optimal, 0.0)) + 1e-12
    if c.train_beta == c.rl_beta_range[1]:  # ... which is the end of the across-b path
        assert abs(r.train_gold_limit - r.rl_gold[-1]) < 1e-9
    # Gao et al.'s RL form fitted along training too: it bends down and beats a line (R^2 reported)
    assert r.train_fit[1] > 0
    assert np.isfinite(r.train_r2) and r.train_r2 > r.train_r2_linear


def test_quick_configs_are_quick():
    """Guard the quick configs' size (the time limit itself is measured, not asserted)."""
    assert gv.Config.quick().n_seeds * len(gv.Config.quick().sizes) <= 10
    assert fr.Config.quick().n_inits <= 4
    assert ld.Config.quick().n_pairs * ld.Config.quick().steps <= 2000
