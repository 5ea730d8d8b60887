"""The KL-regularised RL problem on a tree, and its exact evaluation.

.. math::
    J_\\gamma(\\pi) = E_{s_0\\sim\\rho_0}\\Big[ E_{\\xi\\sim P_\\pi(\\cdot|s_0)}[r(\\xi)]
        - \\beta\\, \\mathrm{KL}(P_\\pi(\\cdot|s_0) \\,\\|\\, P_{ref}(\\cdot|s_0)) \\Big]
        + \\gamma\\, E_{(s_0,\\xi)\\sim D_{pretrain}}[\\log P_\\pi(\\xi|s_0)]

(Ouyang et al. 2022, arXiv:2203.02155, eq. 2; ``gamma = 0`` is the usual RLHF objective, whose
maximiser is the soft-optimal policy ``P_ref exp(r/beta)/Z``).  ``r`` is the reward being
optimised (a learned reward model, the "proxy"); ``gold`` is the true reward used only to
evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from ..policies import leaf_logprobs
from ..projections import soft_optimal_policy
from ..tree import TokenTree

__all__ = ["RLProblem", "Evaluation"]


# --------------------------------------------------------------------------- argument checks
def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


# --------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class Evaluation:
    """Exact quantities of one policy (averaged over ``s0 ~ rho0``).

    ``objective`` is ``J_gamma``; ``kl`` is ``KL(P_pi || P_ref)``; ``reward`` and ``gold`` are
    ``E_pi[r]`` and ``E_pi[gold]``; ``kl_to_optimal`` is ``KL(P_pi || P*)`` with ``P*`` the
    soft-optimal policy of ``(r, beta)``; ``pretrain_loglik`` is ``E_pretrain[log P_pi]`` (0
    without a pretraining distribution).  ``+inf``/``-inf`` are legal, NaN never is.
    """

    objective: float
    kl: float
    reward: float
    gold: float
    kl_to_optimal: float
    pretrain_loglik: float


def _xlogy_rows(p, lp, lq):
    out = np.zeros_like(p)
    pos = p > 0
    with np.errstate(invalid="ignore"):
        out[pos] = p[pos] * (lp[pos] - lq[pos])
    return out.sum(axis=1)


@dataclass(frozen=True, eq=False)
class RLProblem:
    """A KL-regularised RL problem on a token tree (optionally with the PPO-ptx term).

    Parameters
    ----------
    tree : TokenTree
    log_pi_ref : tuple of (P, V**h, V)
        Reference policy (e.g. the SFT model) of the KL penalty.
    reward : (P, V**H) or (V**H,)
        The reward being optimised (gold, or a learned reward model).
    beta : float > 0
        KL coefficient.
    gold : (P, V**H), optional
        The true reward, for evaluation only; defaults to ``reward``.
    pretrain_logp : (P, V**H), optional
        Log-probabilities of the pretraining distribution ``D(xi | s0)`` (each row sums to 1;
        prompts are weighted by ``rho0``).
    gamma : float >= 0
        PPO-ptx coefficient of ``E_pretrain[log P_pi]`` (Ouyang et al. 2022, arXiv:2203.02155,
        eq. 2); needs ``pretrain_logp`` when positive.
    """

    tree: TokenTree
    log_pi_ref: tuple
    reward: np.ndarray
    beta: float
    gold: np.ndarray | None = None
    pretrain_logp: np.ndarray | None = None
    gamma: float = 0.0
    leaf_logp_ref: np.ndarray = field(init=False, repr=False)
    _cache: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        tree = self.tree
        if not isinstance(tree, TokenTree):
            raise TypeError(f"tree must be a TokenTree, got {type(tree).__name__}")
        object.__setattr__(self, "log_pi_ref", tree.check_levels("log_pi_ref", self.log_pi_ref))
        object.__setattr__(self, "reward", np.array(tree.check_leaf_array("reward", self.reward)))
        object.__setattr__(self, "beta", check_float("beta", self.beta))
        if self.gold is not None:
            object.__setattr__(self, "gold", np.array(tree.check_leaf_array("gold", self.gold)))
        object.__setattr__(self, "gamma", check_float("gamma", self.gamma, positive=False))
        if self.pretrain_logp is not None:
            d = np.array(tree.check_leaf_array("pretrain_logp", self.pretrain_logp, allow_neg_inf=True))
            if np.any(d > 1e-9) or np.any(np.abs(logsumexp(d, axis=1)) > 1e-8):
                raise ValueError("pretrain_logp must hold log-probabilities whose rows each sum to 1")
            object.__setattr__(self, "pretrain_logp", d)
        elif self.gamma > 0:
            raise ValueError("gamma > 0 (PPO-ptx) needs a pretraining distribution: pass pretrain_logp")
        object.__setattr__(self, "leaf_logp_ref", leaf_logprobs(tree, self.log_pi_ref))

    @property
    def gold_reward(self) -> np.ndarray:
        """The evaluation reward: ``gold`` if given, else ``reward``."""
        return self.reward if self.gold is None else self.gold

    def optimal(self):
        """The soft-optimal policy of ``(reward, beta)`` (a :class:`~toyrlhf.projections.SoftOptimal`)."""
        if "optimal" not in self._cache:
            sol = soft_optimal_policy(self.tree, self.log_pi_ref, self.reward, self.beta)
            self._cache["optimal"] = sol
            self._cache["optimal_leaf"] = leaf_logprobs(self.tree, sol.log_pi)
        return self._cache["optimal"]

    def optimal_leaf_logp(self) -> np.ndarray:
        """``log P*(xi|s0)`` of the soft-optimal policy, shape ``(P, V**H)``."""
        self.optimal()
        return self._cache["optimal_leaf"]

    def pretrain_probs(self) -> np.ndarray | None:
        if self.pretrain_logp is None:
            return None
        with np.errstate(under="ignore"):
            return np.exp(self.pretrain_logp)

    def evaluate(self, log_pi=None, leaf_logp=None) -> Evaluation:
        """Exact :class:`Evaluation` of a policy given as conditionals or leaf log-probs, ``O(leaves)``."""
        if (log_pi is None) == (leaf_logp is None):
            raise ValueError("pass exactly one of log_pi or leaf_logp")
        tree = self.tree
        lp = leaf_logprobs(tree, log_pi) if leaf_logp is None else np.asarray(leaf_logp, dtype=float)
        with np.errstate(under="ignore"):
            p = np.exp(lp)
        w = tree.rho0
        kl = _xlogy_rows(p, lp, self.leaf_logp_ref)
        kl_opt = _xlogy_rows(p, lp, self.optimal_leaf_logp())
        reward = (p * self.reward).sum(axis=1)
        gold = (p * self.gold_reward).sum(axis=1)
        avg = lambda x: float(np.sum(np.where(w > 0, w * x, 0.0)))  # noqa: E731
        kl_avg = avg(kl)
        objective = avg(reward) - self.beta * kl_avg
        pre = 0.0
        if self.pretrain_logp is not None:
            d = self.pretrain_probs()
            pos = d > 0
            if np.any(pos & np.isneginf(lp)):
                pre = -np.inf
            else:
                pre = float(np.sum(w[:, None] * np.where(pos, d * np.where(pos, lp, 0.0), 0.0)))
            if self.gamma > 0:
                objective = objective + self.gamma * pre
        return Evaluation(objective, kl_avg, avg(reward), avg(gold), avg(kl_opt), pre)
