"""The offline-to-online spectrum of preference optimisation on one problem, at matched data
(slides 002 "Online vs. offline RLHF", "A continuous spectrum"; Tang et al. 2024,
arXiv:2405.08448; Xiong et al. 2023, arXiv:2312.11456).

Every method gets the same budget of ``n_pairs`` labelled comparisons (labels drawn from
Bradley–Terry on the gold reward, the stand-in for human labellers) and the same number of
gradient steps on a tabular policy around ``pi_ref``:

* offline DPO: all pairs sampled from ``pi_ref`` up front (iterative DPO with one round);
* iterative DPO with ``K`` rounds: ``n_pairs / K`` fresh pairs from the current policy per round,
  added to the pool, ``steps / K`` DPO steps per round;
* online DPO: ``n_pairs / steps`` fresh on-policy pairs per step, one step on each batch;
* two-stage RLHF: a linear (bigram) reward model fitted to the offline pairs, then exact
  KL-regularised mirror descent against it.

The reference policy is peaked, so the offline pairs cover few completions, and the policy class
is tabular, so DPO learns nothing about completions it never sees; sampling from the improving
policy finds them.  Trajectories are exact (gold reward and KL of the policy, by enumeration),
averaged over ``seeds`` independent problems and data sets.

Measured (``Config()``, 48 problems; final gold gain as a fraction of the soft-optimal policy's
gain over ``pi_ref``; differences paired by problem, mean +- standard error):

* offline DPO 0.63; minus offline DPO: iterative DPO K=4 ``+0.115 +- 0.025``, K=16
  ``+0.111 +- 0.031``, K=64 ``+0.037 +- 0.035``, online DPO ``+0.087 +- 0.032``, two-stage RLHF
  ``+0.154 +- 0.024``; the four on-policy variants together ``+0.088 +- 0.022``;
* the effect is modest against the spread over problems (standard deviation of the online -
  offline difference about 0.2), so a dozen problems do not resolve it (at 12 problems online
  DPO's advantage was ``+0.12 +- 0.09``); that is why ``Config()`` averages 48;
* offline DPO ends at the smallest KL (1.3 nats against 1.75-1.9 for the on-policy methods):
  at matched KL along training it is not behind, it stops early because its fixed pairs stop
  informing it.

``tests/test_online.py`` asserts online DPO > offline DPO at the quick budget (128 pairs and
steps) over 64 problems by more than two standard errors (measured ``0.079 +- 0.023``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from ..online import (
    RLProblem,
    iterative_dpo,
    mirror_descent_step,
    online_dpo_step,
    sample_rollouts,
    train,
)
from ..plotting import new_figure, style
from ..policies import TabularPolicy, random_policy
from ..preferences import preference_pairs
from ..progress import progress_bar
from ..projections import reward_mle
from ..rewards import LinearReward, feature_family, random_linear_reward
from ..tree import TokenTree

NAME = "offline_online"
TITLE = "Offline DPO -> iterative DPO -> online DPO, and two-stage RLHF, at matched data: gold reward vs KL"


@dataclass(frozen=True)
class Config:
    V: int = 4
    """Vocabulary size."""
    H: int = 3
    """Horizon."""
    P: int = 2
    """Prompts."""
    temperature: float = 3.5
    """Logit scale of the random reference policy (larger = more peaked = poorer offline coverage)."""
    gold_noise: float = 0.3
    """Completion-specific noise added to the gold reward (linear in bigram features otherwise)."""
    beta: float = 0.3
    """KL coefficient of DPO and of the RL stage."""
    n_pairs: int = 256
    """Labelled pairs per method (the matched data budget)."""
    steps: int = 256
    """Gradient steps per method (DPO methods)."""
    lr: float = 5.0
    """DPO step size."""
    rounds: tuple[int, ...] = (1, 4, 16, 64)
    """Rounds K of iterative DPO (K = 1 is offline DPO); each divides n_pairs and steps."""
    rm_l2: float = 0.01
    """L2 penalty of the two-stage reward model."""
    rlhf_steps: int = 40
    """Mirror-descent steps of the two-stage RL stage."""
    rlhf_eta: float = 0.2
    """Mirror-descent step size of the RL stage."""
    eval_points: int = 32
    """Exact evaluations per trajectory."""
    seeds: int = 48
    """Independent problems/data sets averaged (the effects are ~0.1 against a spread of ~0.2 per problem)."""

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=128, steps=128, rounds=(1, 8), seeds=6, rlhf_steps=10, eval_points=8)


@dataclass(frozen=True)
class Result:
    config: Config
    methods: tuple
    """Method names: 'offline DPO', 'iterative DPO (K=...)', ..., 'online DPO', 'two-stage RLHF'."""
    rounds: np.ndarray
    """(R,) rounds of the iterative-DPO methods (the first R methods; K=1 is offline DPO)."""
    gold: np.ndarray
    """(S, M, E) exact gold reward along each method's trajectory, per seed."""
    kl: np.ndarray
    """(S, M, E) exact KL to pi_ref along the trajectories."""
    labels: np.ndarray
    """(S, M) labels (non-tied pairs) each method queried."""
    gold_ref: np.ndarray
    """(S,) gold reward of pi_ref."""
    gold_opt: np.ndarray
    """(S,) gold reward of the soft-optimal policy of (gold, beta), the target."""
    kl_opt: np.ndarray
    """(S,) its KL to pi_ref."""

    def final_gold(self) -> np.ndarray:
        """(S, M) gold reward at the end of every run."""
        return self.gold[:, :, -1]

    def normalised(self, gold: np.ndarray) -> np.ndarray:
        """Gold reward as the fraction of the soft-optimal policy's improvement over ``pi_ref``.

        ``(g - g_ref) / (g_opt - g_ref)`` per seed (0 at ``pi_ref``, 1 at the target), which
        removes the scale that differs between the random problems.
        """
        shape = (-1,) + (1,) * (gold.ndim - 1)
        return (gold - self.gold_ref.reshape(shape)) / (self.gold_opt - self.gold_ref).reshape(shape)


def _problem(config: Config, seed: int):
    rng = np.random.default_rng(seed)
    tree = TokenTree(V=config.V, H=config.H, P=config.P)
    ref = random_policy(tree, rng, temperature=config.temperature)
    phi = feature_family(tree, "bigram")
    gold, _ = random_linear_reward(tree, phi, rng, scale=1.0 / np.sqrt(config.H))
    gold = gold + config.gold_noise * rng.standard_normal(gold.shape)
    return tree, ref, gold, phi


def _resample(traj, points):
    """Evaluations at ``points`` evenly spaced indices (the trajectories have equal lengths)."""
    idx = np.linspace(0, traj.steps.size - 1, points).round().astype(int)
    return traj.gold[idx], traj.kl[idx], traj.labels[-1]


def _offline_pairs(tree, ref, gold, n, rng):
    b = sample_rollouts(tree, ref, ref, n, 2, rng)
    a, c = b.leaves[0::2], b.leaves[1::2]
    pr = b.prompts[0::2]
    a_wins = rng.random(n) < expit(gold[pr, a] - gold[pr, c])
    keep = a != c
    return preference_pairs(pr[keep], np.where(a_wins, a, c)[keep], np.where(a_wins, c, a)[keep]), float(keep.sum())


def run(config: Config = Config(), progress: bool = False) -> Result:
    for K in config.rounds:
        if config.n_pairs % K or config.steps % K:
            raise ValueError(f"every rounds entry must divide n_pairs={config.n_pairs} and steps={config.steps}, got {K}")
    if config.n_pairs % config.steps:
        raise ValueError("online DPO needs n_pairs to be a multiple of steps (fresh pairs every step)")
    methods = tuple(["offline DPO" if K == 1 else f"iterative DPO (K={K})" for K in config.rounds]
                    + ["online DPO", "two-stage RLHF"])
    E = config.eval_points
    S, M = config.seeds, len(methods)
    gold, kl, labels = np.zeros((S, M, E)), np.zeros((S, M, E)), np.zeros((S, M))
    gref, gopt, klopt = np.zeros(S), np.zeros(S), np.zeros(S)
    every = max(1, config.steps // (E - 1))
    for s in progress_bar(range(S), enabled=progress, desc=NAME):
        tree, ref, g, phi = _problem(config, s)
        prob = RLProblem(tree, ref, g, config.beta)
        pc = TabularPolicy(tree, ref)
        gref[s] = prob.evaluate(log_pi=ref).gold
        opt = prob.evaluate(log_pi=prob.optimal().log_pi)
        gopt[s], klopt[s] = opt.gold, opt.kl
        runs = []
        for K in config.rounds:
            runs.append(iterative_dpo(pc, pc.init(), prob, np.random.default_rng(1000 + s), rounds=K,
                                      pairs_per_round=config.n_pairs // K, steps_per_round=config.steps // K,
                                      lr=config.lr, eval_every=every))
        runs.append(train(online_dpo_step, pc, pc.init(), prob, config.steps, np.random.default_rng(1000 + s),
                          eval_every=every, lr=config.lr, n_pairs=config.n_pairs // config.steps))
        data, n_lab = _offline_pairs(tree, ref, g, config.n_pairs, np.random.default_rng(1000 + s))
        rfit = reward_mle(data, LinearReward(tree, phi), l2=config.rm_l2, warn=False)
        rlhf = RLProblem(tree, ref, rfit.reward, config.beta, gold=g)
        tr = train(mirror_descent_step, pc, pc.init(), rlhf, config.rlhf_steps, eta=config.rlhf_eta)
        for m, traj in enumerate(runs + [tr]):
            gold[s, m], kl[s, m], labels[s, m] = _resample(traj, E)
        labels[s, -1] = n_lab
    return Result(config, methods, np.array(config.rounds), gold, kl, labels, gref, gopt, klopt)


def _paired(result: Result):
    """Final normalised gold gain minus offline DPO's, paired by problem: ``(mean, se)``, each ``(M,)``."""
    fg = result.normalised(result.final_gold())
    d = fg - fg[:, :1]
    S = d.shape[0]
    se = d.std(axis=0, ddof=1) / np.sqrt(S) if S > 1 else np.zeros(d.shape[1])
    return d.mean(axis=0), se


def plot_frontier(result: Result, ax) -> None:
    """Mean normalised gold reward against mean KL to pi_ref along each method's training."""
    ng = result.normalised(result.gold)
    for m, name in enumerate(result.methods):
        g, k = ng[:, m].mean(axis=0), result.kl[:, m].mean(axis=0)
        style = "--" if name == "two-stage RLHF" else "-"
        ax.plot(k, g, style, marker="o", ms=2.5, label=name, color=f"C{m}")
        ax.plot(k[-1], g[-1], "o", ms=7, color=f"C{m}")
    ax.plot(result.kl_opt.mean(), 1.0, "*", ms=14, color="k", label=r"soft-optimal for gold at $\beta$")
    ax.set_xlabel(r"KL$(P_\pi \,\|\, P_{ref})$ [nats] (mean over problems)")
    ax.set_ylabel(r"gold gain $(g - g_{ref}) / (g^* - g_{ref})$ [fraction]")
    ax.set_title("Offline DPO stops at the smallest KL (large dots: end of training)")
    ax.legend(fontsize="x-small", loc="lower right")


def plot_final(result: Result, ax) -> None:
    """Final normalised gold gain minus the first method's (offline DPO, paired by problem) against the rounds K."""
    mean, se = _paired(result)
    S = result.gold.shape[0]
    R = result.rounds.size
    labels = result.labels.mean(axis=0)
    ax.axhline(0.0, color="C0", lw=1.2, label=f"{result.methods[0]} (K={result.rounds[0]}), the baseline")
    ax.errorbar(result.rounds, mean[:R], yerr=se[:R], fmt="o-", color="0.25", capsize=3,
                label="iterative DPO, K rounds")
    for m in (R, R + 1):
        ax.axhline(mean[m], color=f"C{m}", ls="--" if m == R + 1 else "-",
                   label=f"{result.methods[m]} ({labels[m]:.0f} labels)")
        ax.axhspan(mean[m] - se[m], mean[m] + se[m], color=f"C{m}", alpha=0.15, lw=0)
    for x, y, n in zip(result.rounds, mean[:R], labels[:R]):
        ax.annotate(f"{n:.0f}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize="x-small")
    hi = float(np.max(mean + se))
    ax.set_ylim(-0.9 * hi, 1.15 * hi)  # room below 0 for the legend
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rounds K of fresh on-policy pairs (same total)")
    ax.set_ylabel("final gold gain − offline DPO's [fraction]\n(paired by problem, mean ± SE)")
    on = result.methods.index("online DPO")
    ax.set_title(f"On-policy pairs win: online DPO {mean[on]:+.2f} ± {se[on]:.2f} ({S} problems)")
    ax.legend(fontsize="x-small", loc="lower right", title="numbers: labels used (ties unlabelled)",
              title_fontsize="x-small")


def figure(result: Result):
    with style():
        fig, axes = new_figure(1, 2, figsize=(13, 4.6))
        plot_frontier(result, axes[0])
        plot_final(result, axes[1])
        fig.suptitle(f"Equal data ({result.config.n_pairs} sampled pairs): on-policy pairs beat pairs from "
                     "$\\pi_{ref}$; a generalising reward model does best (slides 002)")
    return fig
