r"""Online RLHF (reward model + RL) against offline DPO on the *same* preference data.

Claim (slides 002, "Online vs. offline learning gap in RLHF"; Tang et al. 2024, "Understanding
the performance gap between online and offline alignment algorithms", arXiv:2405.08448,
Sec. 3): start from one preference dataset and learn from it in two ways -- *online RLHF*, a
reward model fitted to the data and then online policy optimisation against it, and *offline
RLHF*, DPO directly on the data -- and evaluate with the gold reward against
``KL(pi || pi_ref)``.  Then (i) both over-optimise at some point: the gold reward peaks and then
falls as the KL grows; (ii) online leads to better performance overall: a higher peak, and a
higher gold reward than offline at matched KL over most of the range.

Setup, all exact except the finite dataset, repeated over ``seeds`` independent problems:

* a forest of ``P`` prompts, ``V``-ary trees of depth ``H``; ``pi_ref`` has Gaussian logits of
  scale ``ref_temperature`` and a *repetition aversion*: the logit of repeating the previous
  token is lowered by ``repeat_aversion`` nats (an SFT model that practically never repeats);
* gold reward (:func:`toyrlhf.experiments.overoptimisation.gold_reward`): per-token quality
  minus a repetition penalty, ``r*(xi) = sum_h u[a_h] - repeat_penalty #{h: a_h = a_(h-1)}``;
  the best completions alternate the two best tokens;
* one dataset: ``n_pairs`` pairs of ``pi_ref`` samples labelled by Bradley--Terry on ``r*``;
* one policy class for both: log-linear with position-token features,
  ``pi_theta(a|s) ∝ pi_ref(a|s) exp(theta[h, a])`` (``H V`` parameters; ``theta = 0`` is
  ``pi_ref``), a small "language model" whose parameters are shared across prefixes;
* offline: DPO (logistic loss, KL coefficient ``beta``) on the dataset by full-batch Adam from
  ``pi_ref`` (:func:`toyrlhf.offline.train_preference_loss`), with the exact gold reward and KL
  at every step;
* online: a reward model, Bradley--Terry MAP (:func:`toyrlhf.projections.reward_mle`, prior
  ``N(0, rm_prior_sd^2)`` per weight) in the linear class ``phi(xi) = (token counts, number of
  repetitions)``, which *contains the gold reward* (``w* = (u, -repeat_penalty)``); then
  (a) along training: exact natural-policy-gradient steps on ``E[r_RM] - beta KL`` at the same
  ``beta`` in the same class (:func:`toyrlhf.online.train`), and (b) across ``beta``: the exact
  KL-regularised optimum in the class for a grid of ``b``, the reverse-KL projection of
  ``pi_ref exp(r_RM / b) / Z`` (:func:`toyrlhf.projections.soft_rl_projection`, followed
  along the grid by :func:`rl_path`).

Curves are compared against ``d = sqrt(KL)``.  Matched-KL values are interpolated where a
trajectory's KL first reaches each grid value (the rule of
:func:`toyrlhf.experiments.offline_overoptimisation.matched_kl_curves`), on a grid uniform in
``d`` that runs to the median over datasets of the smallest largest-KL of the three curves; each
grid point averages the datasets whose runs reach it, paired by dataset.

Why both over-optimise.  The dataset contains no repetition: ``pi_ref`` avoids it, so nothing in
the data says that repeating is bad.  The reward model's repetition feature is 0 on every
compared completion, so its weight gets no likelihood gradient and stays at the prior mean, 0:
"repetition is free".  The reward model then ranks ``0000`` (``4 u[0]``) above the gold-best
``0101`` (``2 u[0] + 2 u[1]``), and once ``beta`` is small enough to pay the KL, RL repeats the best
token and the gold reward collapses (reward hacking, Gao et al. 2022, arXiv:2210.10760).  DPO's
implicit reward ``beta log(pi_theta / pi_ref)`` is additive over positions (up to ``pi_ref``'s
per-prefix normalisers): it learns "token 0 is best at every position" and, pushed far by a small
``beta`` and long training, moves the mass onto completions that repeat token 0, which no
comparison showed it (the out-of-distribution account of DPO's over-optimisation, Rafailov et al.
2024, arXiv:2406.02900).

Why online ends higher.  Two reasons, measured separately below.

1. *RL traces the reward model's frontier of the policy class; DPO does not.*  If ``pi_b``
   maximises ``J_b = E[r] - b KL`` over the class, any policy of the class with
   ``KL <= KL(pi_b)`` has ``E[r] <= E_{pi_b}[r] - b (KL(pi_b) - KL) <= E_{pi_b}[r]``: the
   across-``beta`` path is the largest reward-model reward reachable at each KL (up to the local
   optima of this non-concave objective, see :func:`rl_path`), and online training at a fixed
   ``beta`` follows it closely.  DPO's trajectory is another path through the same class: it
   maximises the likelihood of the labels, a forward-KL projection onto the class, where RLHF is
   a reverse-KL one, and the two differ when the class is restricted.  Where the reward model is
   right -- on non-repeating completions, the only ones the data show, since its class contains
   the gold -- RL's frontier is close to the gold frontier of the class and DPO lies below it.
   This part does not vanish with data: with ``n_pairs=3000`` the peak gap is still
   ``0.17 +- 0.02``.
2. *The discriminative problem is easier than the generative one* (Tang et al.'s hypothesis,
   slides 002 "Challenges and trade-offs").  The reward model has ``V + 1 = 5`` parameters shared
   by all positions; DPO fits the same labels through one parameter per position and token
   (``H V = 16``).  The gap grows as data shrink: peak gap ``0.47 +- 0.09`` at ``n_pairs=50``,
   ``0.29 +- 0.08`` at 200, ``0.17 +- 0.02`` at 3000; with a reward model as large as the policy
   class (``reward_features="position_token"``, 17 parameters) it is ``0.20 +- 0.06`` at 200.

Measured (``Config()``: 16 datasets of 200 comparisons; mean +- standard error over datasets;
gold gains over ``pi_ref``, whose gold reward is 1.55 against 3.20 for the best completions):

* online RLHF, training: peak ``1.50 +- 0.07`` at KL 4.5, final ``-0.15 +- 0.17`` at KL 35.7;
* online RLHF, across ``beta``: peak ``1.50 +- 0.06`` at KL 4.5, final ``-0.41 +- 0.14`` at KL 40;
* offline DPO: peak ``1.22 +- 0.09`` at KL 5.0, final ``0.35 +- 0.21`` at KL 26.7;
* online minus offline peak: ``0.29 +- 0.08`` (online higher on 15 of 16 datasets); at matched KL
  the paired mean difference (online training - DPO) is ``>= 0`` on 95% of the grid up to KL 29
  (0.24 on average); the exceptions are the first online step (``d < 0.3``);
* no dataset holds a repetition, the reward model's repetition weight is exactly 0, and at the
  ends of the across-``beta`` path and of DPO's training 94% of the mass is on repeating
  completions;
* other root seeds: ``seed=1`` peak gap ``0.28 +- 0.06``, ``seed=2`` ``0.23 +- 0.05``;
* ``rl_algorithm="ppo"`` (``rl_lr=2``) or ``"policy_gradient"`` (``rl_lr=10``, 8 datasets):
  online *training* stays on the non-repeating branch within the step budget (drop
  ``0.01 +- 0.01`` and ``0.02 +- 0.02``; their vanilla gradients see the value of repeating only
  through completions that ``pi_ref`` gives about ``e^-12``), while the natural gradient
  crosses over; the exact across-``beta`` optimum over-optimises whatever the optimiser.

The claims are asserted at ``Config.quick()`` (12 datasets, shorter runs) in
``tests/test_online_vs_offline.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..offline import expected_reward, train_preference_loss
from ..online import RLProblem, exact_pg_step, natural_gradient_step, ppo_exact_step, train
from ..plotting import COLORS, new_figure, style
from ..policies import (
    LogLinearPolicy,
    leaf_logprobs,
    policy_from_logits,
    position_token_features,
    sequence_kl,
)
from ..preferences import sample_preferences
from ..progress import progress_bar
from ..projections import reward_mle, soft_rl_projection
from ..rewards import LinearReward, bag_of_tokens, position_token
from ..tree import TokenTree
from .offline_overoptimisation import trajectory_curve
from .overoptimisation import gold_reward

__all__ = ["NAME", "TITLE", "METHODS", "RL_ALGORITHMS", "REWARD_FEATURES", "Config", "Result", "run", "figure",
           "reference_policy", "repetitions", "reward_features", "problem", "rl_path", "plot_gold_vs_kl", "plot_matched_kl",
           "plot_peaks", "plot_repetition"]

NAME = "online_vs_offline"
TITLE = ("Online RLHF (reward model + RL) vs offline DPO on the same data: both over-optimise, "
         "online peaks higher and leads at matched KL")

#: The compared curves, in the order of ``Result.gold_at_kl``'s second axis.
METHODS = ("online RLHF (training)", "online RLHF (across beta)", "offline DPO (training)")

#: Online policy-optimisation steps of :func:`toyrlhf.online.train` and their step-size keyword.
RL_ALGORITHMS = {
    "natural_gradient": (natural_gradient_step, "eta"),
    "policy_gradient": (exact_pg_step, "lr"),
    "ppo": (ppo_exact_step, "lr"),
}

#: Reward-model feature classes (both contain the gold reward).
REWARD_FEATURES = ("token_counts", "position_token")


@dataclass(frozen=True)
class Config:
    """Tree, gold reward, dataset and the two learners' settings."""

    V: int = 4
    """Vocabulary size (at most len(token_values))."""
    H: int = 4
    """Horizon (tokens per completion)."""
    P: int = 2
    """Prompts (uniform rho0), each with its own random pi_ref; they share the policy's parameters."""
    token_values: tuple[float, ...] = (1.0, 0.6, 0.2, -0.2)
    """Gold per-token quality u[a] (reward units)."""
    repeat_penalty: float = 1.0
    """Gold penalty per pair of equal adjacent tokens (reward units)."""
    ref_temperature: float = 1.0
    """Scale of the Gaussian logits of pi_ref."""
    repeat_aversion: float = 12.0
    """Nats subtracted from pi_ref's logit of repeating the previous token (the data then hold no repetition)."""
    n_pairs: int = 200
    """Comparisons of pi_ref samples, labelled by Bradley-Terry on the gold reward (shared by both learners)."""
    reward_features: str = "token_counts"
    """Reward-model class: 'token_counts' (V counts + repetitions) or 'position_token' (H V indicators + repetitions)."""
    rm_prior_sd: float = 1.0
    """Prior standard deviation of each reward-model weight (MAP: l2 = 1 / (n sd^2))."""
    beta: float = 0.01
    """KL coefficient of DPO and of the online RL objective (training curves)."""
    dpo_lr: float = 0.2
    """Adam learning rate of DPO."""
    dpo_steps: int = 800
    """Full-batch Adam steps of DPO."""
    rl_algorithm: str = "natural_gradient"
    """Online optimiser: 'natural_gradient', 'policy_gradient' or 'ppo' (exact expectations)."""
    rl_lr: float = 1.0
    """Step size of the online optimiser (eta of the natural gradient, lr otherwise)."""
    rl_steps: int = 150
    """Online optimisation steps."""
    path_beta_range: tuple[float, float] = (10.0, 0.005)
    """Largest and smallest KL coefficient b of the online across-beta path (log-spaced)."""
    path_points: int = 24
    """Points on the across-beta path."""
    eval_points: int = 151
    """Recorded points along DPO training (evenly spaced steps, first and last included)."""
    kl_points: int = 40
    """Points of the matched-KL grid (uniform in sqrt(KL), up to the largest KL every run reaches)."""
    seeds: int = 16
    """Independent problems (pi_ref, dataset) averaged over."""
    seed: int = 0
    """Root seed; problem k uses numpy.random.SeedSequence(seed).spawn(seeds)[k]."""

    def __post_init__(self):
        ints = {"V": 2, "H": 2, "P": 1, "n_pairs": 1, "dpo_steps": 1, "rl_steps": 1, "path_points": 2,
                "eval_points": 2, "kl_points": 2, "seeds": 2, "seed": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.V > len(self.token_values):
            raise ValueError(f"V={self.V} needs at least V token_values, got {len(self.token_values)}")
        for name in ("ref_temperature", "rm_prior_sd", "beta", "dpo_lr", "rl_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("repeat_penalty", "repeat_aversion"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.reward_features not in REWARD_FEATURES:
            raise ValueError(f"reward_features must be one of {REWARD_FEATURES}, got {self.reward_features!r}")
        if self.rl_algorithm not in RL_ALGORITHMS:
            raise ValueError(f"rl_algorithm must be one of {tuple(RL_ALGORITHMS)}, got {self.rl_algorithm!r}")
        hi, lo = self.path_beta_range
        if not (np.isfinite(hi) and np.isfinite(lo) and hi > lo > 0):
            raise ValueError(f"path_beta_range must be (largest, smallest) with largest > smallest > 0, got {self.path_beta_range!r}")

    @classmethod
    def quick(cls) -> Config:
        """A small run for tests (about 2 s on one core): fewer seeds, shorter and coarser runs.

        DPO is stored at every step (``eval_points = dpo_steps + 1``), so the matched-KL statistics
        can be recomputed from the stored trajectories alone.
        """
        return cls(seeds=12, dpo_steps=150, dpo_lr=1.0, rl_steps=40, rl_lr=3.0, path_points=6, eval_points=151,
                   kl_points=25)


@dataclass(frozen=True)
class Result:
    """Per-seed trajectories and the matched-KL comparison.

    Gold rewards are absolute (subtract ``gold_ref``, or use :meth:`gain`, for the gain over
    ``pi_ref``); KLs are ``E_rho0 KL(P_pi || P_ref)`` in nats.  Peaks, finals and the matched-KL
    curves are computed from every step of the runs (the stored DPO trajectory is subsampled).
    """

    config: Config
    methods: tuple[str, ...]
    """Names of the compared curves (see :data:`METHODS`): the second axis of the (S, M, ...) arrays."""
    gold_ref: np.ndarray
    """(S,) gold reward of pi_ref."""
    gold_best: np.ndarray
    """(S,) gold reward of the best completion of each prompt, averaged over prompts: the ceiling."""
    data_repeats: np.ndarray
    """(S,) chosen or rejected completions of the dataset's distinct triples that contain a repetition."""
    rm_repeat_weight: np.ndarray
    """(S,) the reward model's repetition weight (the gold reward's is -repeat_penalty)."""
    dpo_step: np.ndarray
    """(T,) Adam steps at which the DPO trajectory is stored."""
    dpo_kl: np.ndarray
    """(S, T) KL along DPO training."""
    dpo_gold: np.ndarray
    """(S, T) gold reward along DPO training."""
    dpo_proxy: np.ndarray
    """(S, T) reward-model reward along DPO training."""
    dpo_repeat: np.ndarray
    """(S, T) probability of a completion with a repetition along DPO training."""
    rl_step: np.ndarray
    """(R,) online optimisation steps (0 = pi_ref)."""
    rl_kl: np.ndarray
    """(S, R) KL along online training."""
    rl_gold: np.ndarray
    """(S, R) gold reward along online training."""
    rl_proxy: np.ndarray
    """(S, R) reward-model reward along online training."""
    path_beta: np.ndarray
    """(B,) KL coefficients b of the across-beta path (decreasing)."""
    path_kl: np.ndarray
    """(S, B) KL of the RL optimum in the class at each b."""
    path_gold: np.ndarray
    """(S, B) its gold reward."""
    path_proxy: np.ndarray
    """(S, B) its reward-model reward."""
    path_repeat: np.ndarray
    """(S, B) its probability of a completion with a repetition."""
    kl_grid: np.ndarray
    """(K,) matched-KL grid, uniform in sqrt(KL) up to the median over seeds of the smallest (over curves) largest KL reached."""
    gold_at_kl: np.ndarray
    """(S, M, K) gold reward of each curve at kl_grid (first time its KL reaches the value); see ``reached``."""
    reached: np.ndarray
    """(S, M, K) bool: the curve's KL reaches kl_grid[k] (entries that are False hold the final value, unused)."""
    peak_gold: np.ndarray
    """(S, M) largest gold reward along each curve."""
    peak_kl: np.ndarray
    """(S, M) KL where it is reached."""
    final_gold: np.ndarray
    """(S, M) gold reward at the end of each curve (last step; smallest b)."""
    final_kl: np.ndarray
    """(S, M) KL there."""

    def gain(self, gold: np.ndarray) -> np.ndarray:
        """Gold reward minus pi_ref's, per seed (the first axis)."""
        gold = np.asarray(gold, dtype=float)
        return gold - self.gold_ref.reshape((-1,) + (1,) * (gold.ndim - 1))

    def matched_difference(self, a: int = 0, b: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paired gold difference of curves ``a`` and ``b`` at matched KL, over the seeds where both reach it.

        Returns ``(mean, standard error, number of seeds)``, each ``(K,)``; the standard error is
        0 where fewer than two seeds reach the point.
        """
        ok = self.reached[:, a] & self.reached[:, b]
        d = np.where(ok, self.gold_at_kl[:, a] - self.gold_at_kl[:, b], 0.0)
        n = ok.sum(axis=0)
        mean = d.sum(axis=0) / np.maximum(n, 1)
        dev = np.where(ok, d - mean, 0.0)
        se = np.sqrt((dev**2).sum(axis=0) / np.maximum(n - 1, 1) / np.maximum(n, 1))
        return mean, np.where(n > 1, se, 0.0), n

    def ahead_fraction(self, a: int = 0, b: int = 2) -> float:
        """Fraction of kl_grid where the paired mean gold of curve ``a`` is >= that of curve ``b``.

        The point ``KL = 0`` is left out: there both curves are ``pi_ref`` (their difference is
        rounding).
        """
        return float(np.mean(self.matched_difference(a, b)[0][self.kl_grid > 0] >= 0))

    def mean_curve(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error over the seeds that reach each KL of curve ``m``'s gold gain, ``(K,)`` each."""
        ok = self.reached[:, m]
        g = np.where(ok, self.gain(self.gold_at_kl[:, m]), 0.0)
        n = ok.sum(axis=0)
        mean = g.sum(axis=0) / np.maximum(n, 1)
        dev = np.where(ok, g - mean, 0.0)
        se = np.sqrt((dev**2).sum(axis=0) / np.maximum(n - 1, 1) / np.maximum(n, 1))
        return mean, np.where(n > 1, se, 0.0)


# ------------------------------------------------------------------------------ the problem
def reference_policy(tree: TokenTree, rng: np.random.Generator, temperature: float, repeat_aversion: float) -> tuple:
    """Random Gaussian logits of scale ``temperature``, minus ``repeat_aversion`` on repeating the last token.

    The last token of depth-``h`` node ``n`` is ``n % V`` (children of node ``i`` are ``V i + a``).
    """
    logits = []
    for h in range(tree.H):
        z = temperature * rng.standard_normal((tree.P, tree.V**h, tree.V))
        if h > 0:
            n = np.arange(tree.V**h)
            z[:, n, n % tree.V] -= repeat_aversion
        logits.append(z)
    return policy_from_logits(tree, logits)


def repetitions(tree: TokenTree) -> np.ndarray:
    """Number of equal adjacent token pairs of every completion, shape ``(N,)``."""
    tok = tree.tokens()
    return (tok[:, 1:] == tok[:, :-1]).sum(axis=1).astype(float)


def reward_features(tree: TokenTree, kind: str = "token_counts") -> np.ndarray:
    """Reward-model features ``(N, d)``: token counts (or position-token indicators), then repetitions.

    The last column counts repetitions, so the gold reward ``u . counts - lambda reps`` lies in
    both classes.
    """
    if kind not in REWARD_FEATURES:
        raise ValueError(f"kind must be one of {REWARD_FEATURES}, got {kind!r}")
    base = bag_of_tokens(tree) if kind == "token_counts" else position_token(tree)
    return np.concatenate([base, repetitions(tree)[:, None]], axis=1)


def problem(config: Config, k: int):
    """Problem ``k`` of a configuration: ``(tree, log_pi_ref, gold, data)`` from its own child seed."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < config.seeds:
        raise ValueError(f"k must be an integer in [0, seeds={config.seeds}), got {k!r}")
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(config.seeds)[k])
    tree = TokenTree(V=config.V, H=config.H, P=config.P)
    ref = reference_policy(tree, rng, config.ref_temperature, config.repeat_aversion)
    gold = np.broadcast_to(gold_reward(tree, config.token_values, config.repeat_penalty), (tree.P, tree.n_leaves)).copy()
    data = sample_preferences(tree, gold, config.n_pairs, rng, log_pi_pair=ref)
    return tree, ref, gold, data


def rl_path(policy_class, log_pi_ref, reward, betas, starts=(), tol: float = 1e-8) -> list:
    """The KL-regularised RL optimum in a policy class for every ``b`` in ``betas`` (decreasing).

    ``argmax_theta E_theta[r] - b KL(P_theta || P_ref)`` is the reverse-KL projection of
    ``P_ref exp(r / b) / Z`` onto the class (:func:`toyrlhf.projections.soft_rl_projection`).
    Over a log-linear class this objective is not concave and can have several local maxima (a
    branch that repeats tokens and one that does not), so it is solved on a sweep down the grid
    from ``theta = 0``, then on a sweep back up that starts from the best of the down-sweep's
    last solution and fits started at ``starts`` (parameter vectors, e.g. the end points of other
    runs), each warm-started from its neighbour; at every ``b`` the better solution (smaller KL
    to the Gibbs target, i.e. larger objective) is kept.

    Returns the list of :class:`~toyrlhf.projections.PolicyFit`, in the order of ``betas``.
    """
    betas = [float(b) for b in betas]
    best: list = [None] * len(betas)

    def keep(j, theta0):
        fit = soft_rl_projection(policy_class, log_pi_ref, reward, betas[j], theta0=theta0, tol=tol, warn=False)
        if best[j] is None or fit.loss < best[j].loss:
            best[j] = fit
        return fit.params

    theta = policy_class.init()
    for j in range(len(betas)):
        theta = keep(j, theta)
    for t in starts:
        keep(len(betas) - 1, np.asarray(t, dtype=float))
    theta = best[-1].params
    for j in range(len(betas) - 2, -1, -1):
        theta = keep(j, theta)
    return best


def _mass(tree: TokenTree, leaf_logp, mask) -> float:
    with np.errstate(under="ignore"):
        return tree.average((np.exp(leaf_logp) * mask).sum(axis=1))


def _peak_final(kl: np.ndarray, gold: np.ndarray) -> tuple[float, float, float, float]:
    k = int(np.argmax(gold))
    return float(gold[k]), float(kl[k]), float(gold[-1]), float(kl[-1])


def run(config: Config = Config(), progress: bool = False) -> Result:
    """Fit both learners on each seed's dataset and record their exact gold-vs-KL curves."""
    c = config
    S, T = c.seeds, c.dpo_steps
    rec = np.unique(np.round(np.linspace(0, T, min(c.eval_points, T + 1))).astype(int))
    betas = np.logspace(np.log10(c.path_beta_range[0]), np.log10(c.path_beta_range[1]), c.path_points)
    step_fn, lr_name = RL_ALGORITHMS[c.rl_algorithm]
    out = {k: np.zeros((S, rec.size)) for k in ("dpo_kl", "dpo_gold", "dpo_proxy", "dpo_repeat")}
    out.update({k: np.zeros((S, c.rl_steps + 1)) for k in ("rl_kl", "rl_gold", "rl_proxy")})
    out.update({k: np.zeros((S, betas.size)) for k in ("path_kl", "path_gold", "path_proxy", "path_repeat")})
    gref, gbest, nrep, wrep = (np.zeros(S) for _ in range(4))
    curves = []  # per seed: (kl, gold) of every method at full resolution
    for s in progress_bar(range(S), enabled=progress, desc=NAME):
        tree, ref, gold, data = problem(c, s)
        reps = repetitions(tree)
        has_rep = np.broadcast_to(reps > 0, gold.shape)
        gref[s] = expected_reward(tree, leaf_logprobs(tree, ref), gold)
        gbest[s] = tree.average(gold.max(axis=1))
        nrep[s] = float(np.sum(reps[data.chosen] > 0) + np.sum(reps[data.rejected] > 0))
        fit = reward_mle(data, LinearReward(tree, reward_features(tree, c.reward_features)),
                         l2=1.0 / (data.n * c.rm_prior_sd**2), warn=False)
        proxy = fit.reward
        wrep[s] = fit.params[-1]
        pc = LogLinearPolicy(tree, ref, position_token_features(tree))
        # offline: DPO on the dataset
        tr = train_preference_loss(data, pc, ref, "logistic", optimizer="adam", lr=c.dpo_lr, steps=T, gold_reward=gold,
                                   proxy_reward=proxy, beta=c.beta, record_params=True)
        out["dpo_kl"][s], out["dpo_gold"][s], out["dpo_proxy"][s] = tr.kl[rec], tr.gold[rec], tr.proxy[rec]
        out["dpo_repeat"][s] = [_mass(tree, pc.leaf_logprobs(tr.params_history[t]), has_rep) for t in rec]
        # online: RL against the reward model, along training ...
        prob = RLProblem(tree, ref, proxy, c.beta, gold=gold)
        traj = train(step_fn, pc, pc.init(), prob, c.rl_steps, **{lr_name: c.rl_lr})
        out["rl_kl"][s], out["rl_gold"][s], out["rl_proxy"][s] = traj.kl, traj.gold, traj.reward
        # ... and across beta: the exact optimum in the class, followed from large b to small
        for j, sol in enumerate(rl_path(pc, ref, proxy, betas, starts=(traj.theta, tr.params))):
            out["path_kl"][s, j] = tree.average(sequence_kl(tree, sol.log_pi, ref))
            out["path_gold"][s, j] = expected_reward(tree, sol.leaf_logp, gold)
            out["path_proxy"][s, j] = expected_reward(tree, sol.leaf_logp, proxy)
            out["path_repeat"][s, j] = _mass(tree, sol.leaf_logp, has_rep)
        curves.append([(traj.kl, traj.gold), (out["path_kl"][s], out["path_gold"][s]), (tr.kl, tr.gold)])
    # matched KL: uniform in sqrt(KL) up to the median over seeds of the smallest largest-KL of the curves
    reach = np.array([[np.max(k) for k, _ in cs] for cs in curves])  # (S, M)
    top = max(float(np.median(reach.min(axis=1))), 0.0)
    kl_grid = np.linspace(0.0, np.sqrt(top), c.kl_points) ** 2
    gold_at_kl = np.array([[trajectory_curve(k, g, kl_grid) for k, g in cs] for cs in curves])
    reached = kl_grid[None, None, :] <= reach[:, :, None]
    pf = np.array([[_peak_final(k, g) for k, g in cs] for cs in curves])
    return Result(
        config=c, methods=METHODS, gold_ref=gref, gold_best=gbest, data_repeats=nrep, rm_repeat_weight=wrep,
        dpo_step=rec, rl_step=np.arange(c.rl_steps + 1), path_beta=betas, **out,
        kl_grid=kl_grid, gold_at_kl=gold_at_kl, reached=reached,
        peak_gold=pf[..., 0], peak_kl=pf[..., 1], final_gold=pf[..., 2], final_kl=pf[..., 3],
    )


# ------------------------------------------------------------------------------ plots
_STYLE = {0: dict(color=COLORS[0], ls="-"), 1: dict(color=COLORS[2], ls="--"), 2: dict(color=COLORS[1], ls="-")}
_D_LABEL = r"$d = \sqrt{\mathrm{KL}(\pi\,\|\,\pi_{ref})}$ [$\sqrt{\mathrm{nats}}$]"


def _sqrt(x):
    return np.sqrt(np.maximum(x, 0.0))  # exact KLs can be -1e-17 by rounding


def plot_gold_vs_kl(result: Result, ax) -> None:
    """Seed-mean gold gain against sqrt(KL) for every curve (bands: +- 1 s.e.), peaks marked."""
    d = _sqrt(result.kl_grid)
    for m, name in enumerate(result.methods):
        mean, se = result.mean_curve(m)
        ax.plot(d, mean, label=name, **_STYLE[m])
        ax.fill_between(d, mean - se, mean + se, color=_STYLE[m]["color"], alpha=0.15, lw=0)
        k = int(np.argmax(mean))
        ax.plot(d[k], mean[k], "o", color=_STYLE[m]["color"], ms=6)
    ax.axhline(0.0, color="k", lw=0.8, label=r"$\pi_{ref}$")
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel(r"gold reward $-$ gold of $\pi_{ref}$")
    ax.set_title(f"Gold vs KL, mean ± s.e. over {result.gold_ref.size} datasets")
    ax.legend(fontsize="x-small")


def plot_matched_kl(result: Result, ax) -> None:
    """Paired difference online - offline DPO at matched KL, with a 2 s.e. band."""
    d = _sqrt(result.kl_grid)
    for a, lab in ((0, "online (training) − DPO"), (1, "online (across β) − DPO")):
        mean, se, _ = result.matched_difference(a, 2)
        ax.plot(d, mean, label=lab, **_STYLE[a])
        ax.fill_between(d, mean - 2 * se, mean + 2 * se, color=_STYLE[a]["color"], alpha=0.15, lw=0)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel("gold difference (paired mean ± 2 s.e.)")
    ax.set_title(f"Online − DPO at matched KL: ≥ 0 on {100 * result.ahead_fraction(0, 2):.0f}% of the range")
    ax.legend(fontsize="x-small")


def plot_peaks(result: Result, ax) -> None:
    """Per-dataset peak gold gain: online (training) against offline DPO; above the diagonal = online higher."""
    pg = result.gain(result.peak_gold)
    x, y = pg[:, 2], pg[:, 0]
    ax.plot(x, y, "o", color=COLORS[0], label="one dataset")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    pad = 0.05 * (hi - lo + 1e-9)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls=":", label="equal peaks")
    diff = y - x
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    ax.set_xlabel("peak gold gain, offline DPO")
    ax.set_ylabel("peak gold gain, online RLHF (training)")
    ax.set_title(f"Peak gains: online − DPO = {diff.mean():.2f} ± {se:.2f} (s.e.)")
    ax.legend(fontsize="x-small")


def plot_repetition(result: Result, ax) -> None:
    """Probability of a repetition (never in the data) against sqrt(KL): where both methods end up."""
    grid = result.kl_grid if result.kl_grid[-1] > 0 else np.array([0.0])
    for m, kl, rep in ((1, result.path_kl, result.path_repeat), (2, result.dpo_kl, result.dpo_repeat)):
        top = np.max(kl, axis=1)
        curves = np.array([trajectory_curve(k, r, grid) for k, r in zip(kl, rep)])
        ok = grid[None, :] <= top[:, None]
        mean = np.where(ok, curves, 0.0).sum(axis=0) / np.maximum(ok.sum(axis=0), 1)
        ax.plot(_sqrt(grid), mean, label=result.methods[m], **_STYLE[m])
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel("P(completion repeats a token)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Both end up repeating (never in the data)")
    ax.legend(fontsize="x-small")


def figure(result: Result):
    """Four panels: gold vs KL, matched-KL difference, per-dataset peaks, repetition mass."""
    with style():
        fig, axes = new_figure(1, 4, figsize=(19.0, 4.6))
        plot_gold_vs_kl(result, axes[0])
        plot_matched_kl(result, axes[1])
        plot_peaks(result, axes[2])
        plot_repetition(result, axes[3])
        fig.suptitle("Same preference data (Tang et al. 2024): online RLHF and offline DPO both over-optimise; "
                     "online peaks higher and leads at matched KL")
    return fig
