"""The InstructGPT pipeline on one toy tree: pretrain -> SFT -> reward model -> PPO(-ptx).

Ouyang et al. 2022 (arXiv:2203.02155), slides 002/004 "Recipes for ChatGPT":

1. *Pretraining*: a policy ``pi_pre`` whose completion distribution is the pretraining data.
2. *SFT*: labellers write demonstrations (here drawn from ``P_pre exp(gold/demo_beta)/Z``, good
   but not optimal answers); fit a policy class by maximum likelihood
   (:func:`toyrlhf.projections.sft`).
3. *Reward model*: for prompts ``s0 ~ rho0``, ``K`` completions from the SFT policy are ranked by
   a labeller (Plackett–Luce on the gold reward, sampled with Gumbel noise; its pairwise
   marginals are Bradley–Terry), every ranking gives its ``C(K, 2)`` pairs, each with weight
   ``1/C(K, 2)`` (InstructGPT eq. 1), and a linear reward model is fitted by BT maximum likelihood
   (:func:`toyrlhf.projections.reward_mle`).
4. *PPO(-ptx)*: sampled PPO from the SFT policy against the learned reward with the KL to the
   SFT policy, plus ``gamma E_pretrain[log pi]`` (InstructGPT eq. 2), evaluated with the gold
   reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from ..policies import (
    LogLinearPolicy,
    leaf_logprobs,
    random_policy,
    sample_completions,
    sample_leaves,
)
from ..preferences import PreferenceData, preference_pairs
from ..projections import PolicyFit, RewardFit, gibbs_policy, reward_mle, sft
from ..rewards import LinearReward, feature_family, random_linear_reward
from ..tree import TokenTree
from .problem import RLProblem, check_float, check_int, check_rng
from .sampled import ppo_step
from .training import Trajectory, train

__all__ = ["InstructGPTToy", "instructgpt_toy", "InstructGPTResult", "instructgpt_pipeline", "plackett_luce_pairs"]


@dataclass(frozen=True, eq=False)
class InstructGPTToy:
    """The ingredients of the pipeline: a tree, a gold reward, a pretrained policy and feature maps.

    ``policy_features``: per-level features ``(P or 1, V**h, V, d)`` of the log-linear policy class
    (around ``log_pi_pretrain``) used for SFT and PPO; ``reward_features``: ``(N, d)`` or
    ``(P, N, d)`` features of the linear reward model.
    """

    tree: TokenTree
    gold: np.ndarray
    log_pi_pretrain: tuple
    policy_features: tuple
    reward_features: np.ndarray


def instructgpt_toy(rng: np.random.Generator, V: int = 3, H: int = 4, P: int = 2, temperature: float = 1.5,
                    gold_scale: float = 1.0) -> InstructGPTToy:
    """A default toy: a random pretrained policy, a gold reward linear in bigram features plus noise.

    The policy class has one free logit per (prompt, node, token) at the first two depths and
    per (prompt, depth, previous token, token) deeper (a bigram language model); the reward model
    is linear in the ``"bigram"`` features of :func:`toyrlhf.rewards.feature_family`, while the
    gold reward adds small completion-specific noise the reward model cannot represent.
    """
    from ..policies import last_tokens_features, position_token_features, stack_features

    check_rng(rng)
    tree = TokenTree(V=V, H=H, P=P)
    log_pi_pre = random_policy(tree, rng, temperature=temperature)
    phi = feature_family(tree, "bigram")
    gold, _ = random_linear_reward(tree, phi, rng, scale=gold_scale / np.sqrt(H))
    gold = gold + 0.3 * gold_scale * rng.standard_normal(gold.shape)
    feats = stack_features(position_token_features(tree), last_tokens_features(tree, k=1))
    return InstructGPTToy(tree, gold, log_pi_pre, feats, phi)


def plackett_luce_pairs(tree: TokenTree, prompts, leaves, gold, K: int, rng: np.random.Generator) -> PreferenceData:
    """Rank each consecutive group of ``K`` completions by Plackett–Luce on ``gold``; all ``C(K,2)`` pairs.

    A ranking is drawn by sorting ``gold + Gumbel noise`` (the Gumbel-max construction of
    Plackett–Luce); ``P(i ranked above j) = sigma(gold_i - gold_j)`` (Luce's choice axiom), so
    the pairs are BT-consistent.  Each ranking's pairs get weight ``1/C(K, 2)`` (InstructGPT's
    per-prompt batching, arXiv:2203.02155, eq. 1); pairs of identical completions are dropped.
    """
    prompts = np.asarray(prompts).reshape(-1, K)
    leaves = np.asarray(leaves).reshape(-1, K)
    keys = gold[prompts, leaves] + rng.gumbel(size=leaves.shape)
    i, j = np.triu_indices(K, k=1)
    above = keys[:, i] > keys[:, j]
    chosen = np.where(above, leaves[:, i], leaves[:, j]).ravel()
    rejected = np.where(above, leaves[:, j], leaves[:, i]).ravel()
    pr = np.repeat(prompts[:, 0], i.size)
    keep = chosen != rejected
    if not keep.any():
        raise ValueError("every ranked pair compares a completion with itself: sample more diverse completions")
    w = np.full(keep.sum(), 1.0 / i.size)
    return preference_pairs(pr[keep], chosen[keep], rejected[keep], w)


@dataclass(frozen=True, eq=False)
class InstructGPTResult:
    """Everything the pipeline produced.

    Attributes
    ----------
    toy : InstructGPTToy
    sft : PolicyFit, the SFT policy (log-linear class around ``pi_pre``)
    reward_data : PreferenceData, the pairs from the K-wise rankings
    reward_fit : RewardFit, the reward model
    ppo : Trajectory, PPO(-ptx) against the reward model (gold and KL to SFT recorded)
    log_pi_ppo : conditionals of the final policy
    stages : tuple of str, ``("pretrained", "sft", "ppo")``
    gold : (3,) exact gold reward of each stage
    proxy : (3,) exact reward-model reward of each stage
    kl_to_sft : (3,) KL of each stage to the SFT policy
    pretrain_loglik : (3,) ``E_pretrain[log P]`` of each stage (the "alignment tax" that ptx reduces)
    """

    toy: InstructGPTToy
    sft: PolicyFit
    reward_data: PreferenceData
    reward_fit: RewardFit
    ppo: Trajectory
    log_pi_ppo: tuple
    stages: tuple
    gold: np.ndarray
    proxy: np.ndarray
    kl_to_sft: np.ndarray
    pretrain_loglik: np.ndarray


def instructgpt_pipeline(
    toy: InstructGPTToy,
    rng: np.random.Generator,
    *,
    n_demos: int = 200,
    demo_beta: float = 0.5,
    n_rank_prompts: int = 100,
    K: int = 4,
    rm_l2: float = 1e-3,
    beta: float = 0.05,
    gamma: float = 0.0,
    ppo_steps: int = 100,
    progress: bool = False,
    **ppo_options,
) -> InstructGPTResult:
    """Run pretrain -> SFT -> reward model -> PPO(-ptx) on ``toy`` and evaluate every stage on gold.

    Parameters
    ----------
    n_demos : int
        Demonstrations for SFT, drawn from ``P_pre exp(gold / demo_beta) / Z``.
    n_rank_prompts, K : int
        Prompts ranked by the labeller and completions per prompt (``K >= 2``).
    rm_l2 : float
        L2 penalty of the reward-model fit.
    beta, gamma : float
        KL coefficient (to the SFT policy) and PPO-ptx coefficient of the RL stage.
    ppo_steps : int
        PPO iterations; ``ppo_options`` go to :func:`~toyrlhf.online.ppo_step` (defaults here:
        ``lr=0.5, epochs=4, n_groups=32, group_size=4, advantage="loo"``).
    """
    check_rng(rng)
    n_demos = check_int("n_demos", n_demos, 1)
    n_rank_prompts = check_int("n_rank_prompts", n_rank_prompts, 1)
    K = check_int("K", K, 2)
    demo_beta = check_float("demo_beta", demo_beta)
    tree = toy.tree
    pre_leaf = leaf_logprobs(tree, toy.log_pi_pretrain)
    pc = LogLinearPolicy(tree, toy.log_pi_pretrain, toy.policy_features)
    # 1-2: demonstrations and SFT
    demo_logp, _ = gibbs_policy(pre_leaf, toy.gold, demo_beta)
    d_prompts, d_leaves = sample_leaves(tree, demo_logp, n_demos, rng)
    sft_fit = sft(tree, d_prompts, d_leaves, pc, warn=False)  # demonstrations cover few completions: the MLE is at the boundary
    log_pi_sft = sft_fit.log_pi
    # 3: K-wise rankings of SFT samples -> C(K,2) pairs -> reward model
    rank_prompts = np.repeat(rng.choice(tree.P, size=n_rank_prompts, p=tree.rho0), K)
    _, tokens = sample_completions(tree, log_pi_sft, rank_prompts.size, rng, prompts=rank_prompts)
    data = plackett_luce_pairs(tree, rank_prompts, tree.leaf_index(tokens), toy.gold, K, rng)
    rfit = reward_mle(data, LinearReward(tree, toy.reward_features), l2=rm_l2, warn=False)
    # 4: PPO(-ptx) against the reward model, KL to SFT, pretraining term on pi_pre's distribution
    problem = RLProblem(tree, log_pi_sft, rfit.reward, beta, gold=toy.gold,
                        pretrain_logp=pre_leaf - logsumexp(pre_leaf, axis=1, keepdims=True), gamma=gamma)
    opts = dict(lr=0.5, epochs=4, n_groups=32, group_size=4, advantage="loo")
    opts.update(ppo_options)
    traj = train(ppo_step, pc, sft_fit.params, problem, ppo_steps, rng, progress=progress,
                 name="ppo-ptx" if gamma > 0 else "ppo", eval_every=max(1, ppo_steps // 50), **opts)
    log_pi_ppo = pc.conditionals(traj.theta)
    evals = [problem.evaluate(log_pi=lp) for lp in (toy.log_pi_pretrain, log_pi_sft, log_pi_ppo)]
    return InstructGPTResult(
        toy=toy,
        sft=sft_fit,
        reward_data=data,
        reward_fit=rfit,
        ppo=traj,
        log_pi_ppo=log_pi_ppo,
        stages=("pretrained", "sft", "ppo"),
        gold=np.array([e.gold for e in evals]),
        proxy=np.array([e.reward for e in evals]),
        kl_to_sft=np.array([e.kl for e in evals]),
        pretrain_loglik=np.array([e.pretrain_loglik for e in evals]),
    )
