"""Online RLHF on the tree: exact policy gradients and mirror steps, sampled REINFORCE/RLOO/GRPO,
PPO(-ptx), REBEL, online and iterative DPO, and the InstructGPT pipeline.

The problem (:class:`RLProblem`) is ``max_pi E_pi[r] - beta KL(P_pi || P_ref)
(+ gamma E_pretrain[log P_pi])``.  Every algorithm is a pure step function

    ``step(policy_class, theta, problem, rng, **options) -> (theta_next, info)``

run by :func:`train`, which records exact per-step evaluations in a :class:`Trajectory`.

Exact (deterministic, ``O(leaves)``): :func:`exact_policy_gradient`, :func:`exact_pg_step`,
:func:`mirror_descent_step`, :func:`natural_gradient_step`, :func:`ppo_exact_step`,
:func:`rebel_exact_step`, :func:`online_dpo_exact_step`; plus :func:`soft_values` (a perfect
critic) and :func:`pg_estimator_variance` (exact variance of REINFORCE estimators).

Sampled (vectorised batch ancestral sampling, no loop over samples): :func:`reinforce_step`,
:func:`rloo_step`, :func:`grpo_step`, :func:`ppo_step`, :func:`rebel_step`,
:func:`online_dpo_step`; :func:`iterative_dpo` spans offline to online DPO with one parameter.

Pipeline: :func:`instructgpt_pipeline` (pretrain -> SFT -> reward model from K-wise rankings ->
PPO-ptx, evaluated on the gold reward).

Examples
--------
>>> import numpy as np
>>> from toyrlhf.tree import TokenTree
>>> from toyrlhf.policies import TabularPolicy, random_policy
>>> from toyrlhf.online import RLProblem, train, mirror_descent_step
>>> tree = TokenTree(V=2, H=3)
>>> rng = np.random.default_rng(0)
>>> ref = random_policy(tree, rng)
>>> problem = RLProblem(tree, ref, rng.standard_normal((1, 8)), beta=0.5)
>>> traj = train(mirror_descent_step, TabularPolicy(tree, ref), np.zeros(14), problem, 30, eta=2.0)
>>> bool(traj.kl_to_optimal[-1] < 1e-12)
True
"""

from ._paths import (
    Rollouts,
    edge_weights_to_leaf_weights,
    gather_token_logprobs,
    node_reach,
    path_policy,
    rollouts_from_leaves,
    sample_rollouts,
)
from .exact import (
    PGVariance,
    SoftValues,
    clipped_surrogate,
    exact_objective,
    exact_pg_step,
    exact_policy_gradient,
    leaf_score_sqnorms,
    leaf_scores,
    mirror_descent_step,
    natural_gradient_step,
    online_dpo_exact_loss,
    online_dpo_exact_step,
    pg_estimator_variance,
    ppo_exact_objective,
    ppo_exact_step,
    rebel_exact_loss,
    rebel_exact_step,
    soft_values,
    tilt_policy,
    token_kl_costs,
)
from .pipeline import (
    InstructGPTResult,
    InstructGPTToy,
    instructgpt_pipeline,
    instructgpt_toy,
    plackett_luce_pairs,
)
from .problem import Evaluation, RLProblem
from .sampled import (
    ADVANTAGES,
    compute_advantages,
    grpo_step,
    online_dpo_step,
    policy_gradient_estimate,
    ppo_step,
    ppo_surrogate,
    rebel_step,
    reinforce_step,
    rloo_step,
    token_rewards,
)
from .training import TrainingDiverged, Trajectory, iterative_dpo, train

__all__ = [
    # problem and driver
    "RLProblem",
    "Evaluation",
    "Trajectory",
    "TrainingDiverged",
    "train",
    # exact
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
    # sampled
    "Rollouts",
    "sample_rollouts",
    "rollouts_from_leaves",
    "gather_token_logprobs",
    "path_policy",
    "node_reach",
    "edge_weights_to_leaf_weights",
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
    "iterative_dpo",
    # pipeline
    "InstructGPTToy",
    "instructgpt_toy",
    "plackett_luce_pairs",
    "InstructGPTResult",
    "instructgpt_pipeline",
]
