r"""Over-optimisation of offline preference losses (DPO, IPO, SLiC) trained on a finite dataset.

Claim (slides 002, "Over-optimization in DPO" and "Over-optimization in general offline
losses"; Tang et al. 2024, "Generalized Preference Optimization", arXiv:2402.05749, Sec. 6;
Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct Alignment
Algorithms", arXiv:2406.02900): like RLHF against a learned reward model (Gao et al. 2022,
arXiv:2210.10760), offline methods trained on a finite preference dataset over-optimise -- the
gold reward first rises, then falls as ``KL(pi || pi_ref)`` grows, while the reward they have
learned keeps rising -- and the GPO members behave alike once calibrated for the KL.

Setup (everything exact except the finite sample):

* a token tree; a reference policy ``pi_ref`` with random logits in which a "good" token 0 is
  rare (``good_token_logit`` lower);
* a gold reward that likes token 0 *in moderation*, concave in its count ``n0`` plus i.i.d. noise,
  ``r(xi) = a n0 - c n0^2 + sigma z(xi)`` (peak at ``n0 = a / 2c``), like length or politeness;
* ``n_pairs`` comparisons ``(xi1, xi2) ~ pi_ref`` labelled by Bradley--Terry on the gold reward;
* a feature-sharing policy class (log-linear in position-token features, as a real model
  generalises across completions), trained from ``pi_ref`` by Adam on each GPO loss
  ``E[f(beta rho)]`` (logistic = DPO, squared = IPO, hinge = SLiC) for several ``beta``, recording
  exactly at every step the gold reward, ``KL(P_pi || P_ref)`` and a proxy reward: the
  Bradley--Terry reward model with the same position-token features fitted on the same data;
* references: the gold-optimal frontier ``pi_ref exp(r_gold/b)/Z``, two-stage RLHF on the proxy
  reward model ``pi_ref exp(r_proxy/b)/Z``, and DPO over the *tabular* class on the same data.

Why it over-optimises: on ``pi_ref``'s typical completions (``n0`` of 0 or 1) more of token 0 is
better, and the implicit reward the class can express -- additive over positions -- is fitted where
``pi_ref`` puts its comparisons and extrapolates where the data are thin, so training keeps pushing
``n0`` past the gold optimum (the out-of-distribution explanation of Rafailov et al. 2024,
arXiv:2406.02900).  Measured contrasts (not asserted):

* more data does not cure it: at ``n_pairs = 1000`` DPO (``beta = 0.05``, 400 steps) ends 1.85
  below ``pi_ref``'s gold reward, against 0.47 below at ``n_pairs = 100`` -- the extrapolation is
  learned more confidently;
* DPO over the *tabular* class on the same data (``tabular_*``), whose implicit reward is the
  tabular Bradley--Terry fit and does not extrapolate, over-optimises little: after its peak it
  lost 0% of its gain at the default seed and at most 7% in 9 of 10 seeds (31% in one);
* with i.i.d. Gaussian tabular gold rewards and the tabular class, finite-sample noise alone gave
  weak, dataset-dependent over-optimisation (16-leaf trees, 16 prompts, 100 pairs: no drop after
  the peak in half of 10 datasets, up to 75% of the gain in others; with 64 prompts, 0-16%).

Measured claims, asserted in ``tests/test_offline.py`` over 12 independent datasets (seeds 0-11,
smallest ``beta`` only, ``Config.quick()`` trained twice as far: 150 Adam steps at ``lr = 0.08``),
as means +- standard errors with two-s.e. margins:

* every loss over-optimises: its gold reward rises (peak gain 0.73 +- 0.05, 0.71 +- 0.05,
  0.79 +- 0.07 for DPO, IPO, SLiC) and then loses 2.7 +- 0.7, 2.4 +- 0.6 and 2.6 +- 0.6 times that
  gain (asserted: more than half of it), while the proxy reward rises past the gold peak;
* they behave alike once calibrated for KL: up to the first peak their gold rewards at matched KL
  differ by ``rising_gap`` = 0.22 +- 0.04 of the gain, and their peak gains by 0.17 +- 0.03 of
  their mean (asserted: less than half);
* the KL at which over-optimisation sets in follows the offline-regulariser coefficient
  ``f''(0) / (2 |f'(0)|)`` (Tang et al. 2024, Sec. 4): the log peak KL of DPO (1/4) exceeds
  IPO's (1/2) by 0.17 +- 0.05, and SLiC's (0) exceeds DPO's by 0.17 +- 0.05;
* tabular DPO loses a smaller fraction of its gain than feature-sharing DPO (difference
  2.7 +- 0.7).

At ``Config()`` (seed 0, 800 steps) the spread is 24% of the gain; across seeds 0-9 at that size
8 of 10 datasets over-optimised within 800 steps (in the other two the gold reward was still
rising at the end, KL about 5.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..offline import expected_reward, train_preference_loss, trajectory_taylor_terms
from ..plotting import new_figure, style
from ..policies import (
    LogLinearPolicy,
    TabularPolicy,
    leaf_logprobs,
    next_token_features,
    policy_from_logits,
    position_token_features,
    sequence_kl,
)
from ..preferences import sample_preferences
from ..progress import progress_bar
from ..projections import reward_mle, soft_optimal_policy
from ..rewards import LinearReward, bag_of_tokens, position_token
from ..tree import TokenTree

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "problem", "matched_kl_curves", "plot_gold_vs_kl",
           "plot_proxy_vs_kl", "plot_gold_vs_step", "plot_matched_kl"]

NAME = "offline_overoptimisation"
TITLE = "Offline losses (DPO, IPO, SLiC) over-optimise a finite dataset and agree once calibrated for KL"

#: Method names of the GPO members (Tang et al. 2024, Sec. 2).
METHODS = {"logistic": "DPO", "squared": "IPO", "hinge": "SLiC", "exponential": "exponential",
           "truncated_quadratic": "truncated quadratic", "savage": "Savage"}


#: Policy feature maps and the matching linear reward-model features (the proxy).
_FEATURES = {"next_token": (next_token_features, bag_of_tokens), "position_token": (position_token_features, position_token)}


@dataclass(frozen=True)
class Config:
    """Tree, gold reward, data and training settings of the over-optimisation experiment."""

    V: int = 4
    """Vocabulary size of the token tree (token 0 is the 'good in moderation' token)."""
    H: int = 4
    """Horizon (tokens per completion)."""
    P: int = 4
    """Number of prompts (uniform rho0); they share the policy's features."""
    ref_temperature: float = 0.5
    """Scale of the reference policy's Gaussian logits."""
    good_token_logit: float = -1.0
    """Offset added to token 0's reference logits (negative: rare under pi_ref)."""
    gold_linear: float = 2.0
    """a in the gold reward a n0 - c n0^2 + sigma z."""
    gold_quadratic: float = 0.6
    """c in the gold reward (its peak is at n0 = a / 2c)."""
    gold_noise: float = 0.5
    """sigma: scale of the i.i.d. Gaussian part of the gold reward."""
    features: str = "position_token"
    """Policy features: 'next_token' (one weight per token) or 'position_token' (per position and token)."""
    n_pairs: int = 100
    """Comparisons sampled from pi_ref and labelled by Bradley-Terry on the gold reward."""
    losses: tuple[str, ...] = ("logistic", "squared", "hinge")
    """GPO members trained (logistic = DPO, squared = IPO, hinge = SLiC)."""
    betas: tuple[float, ...] = (0.05, 0.1, 0.3, 1.0)
    """KL coefficients beta of the losses f(beta rho); the smallest is used for the claims."""
    steps: int = 800
    """Adam steps per (loss, beta)."""
    lr: float = 0.01
    """Adam learning rate."""
    batch_size: int = 0
    """Triples per minibatch, drawn by weight; 0 means the whole dataset (exact gradients)."""
    proxy_l2: float = 1e-3
    """L2 coefficient of the proxy reward model (linear BT MLE, position-token features)."""
    frontier_points: int = 40
    """Points on the soft-optimal reference curves, over b in [1e-2, 1e2]."""
    kl_grid_points: int = 25
    """KL values at which the losses' gold-vs-KL curves are compared."""
    seed: int = 0
    """Seed of the numpy Generator for the reference, gold reward, data and minibatches."""

    def __post_init__(self):
        for name in ("V", "H", "P", "n_pairs", "steps", "frontier_points", "kl_grid_points"):
            v = getattr(self, name)
            low = 2 if name in ("V", "frontier_points", "kl_grid_points") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise ValueError(f"batch_size must be an integer >= 0 (0: full batch), got {self.batch_size!r}")
        for name in ("ref_temperature", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("good_token_logit", "gold_linear", "gold_quadratic", "gold_noise", "proxy_l2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.gold_noise < 0 or self.proxy_l2 < 0:
            raise ValueError("gold_noise and proxy_l2 must be >= 0")
        if self.features not in _FEATURES:
            raise ValueError(f"features must be one of {sorted(_FEATURES)}, got {self.features!r}")
        unknown = [f for f in self.losses if f not in METHODS]
        if not self.losses or unknown:
            raise ValueError(f"losses must name GPO members among {sorted(METHODS)}, got {self.losses!r}")
        if not self.betas or any(isinstance(b, bool) or not (isinstance(b, (int, float)) and np.isfinite(b) and b > 0)
                                 for b in self.betas):
            raise ValueError(f"betas must be positive finite numbers, got {self.betas!r}")

    @classmethod
    def quick(cls) -> Config:
        """A small run for tests (about a second)."""
        return cls(betas=(0.05, 0.3), steps=300, lr=0.02)


@dataclass(frozen=True)
class Result:
    """Trajectories of every (loss, beta) and the reference curves.

    Arrays indexed ``[loss, beta, step]`` follow ``losses`` and ``betas``.
    """

    config: Config
    losses: tuple[str, ...]
    methods: tuple[str, ...]
    betas: tuple[float, ...]
    gold_ref: float
    """E[r_gold] under pi_ref."""
    proxy_ref: float
    """E[r_proxy] under pi_ref."""
    kl: np.ndarray
    """(L, B, T+1) exact KL(P_pi || P_ref) along training."""
    gold: np.ndarray
    """(L, B, T+1) exact gold reward along training."""
    proxy: np.ndarray
    """(L, B, T+1) proxy (reward-model) reward along training."""
    loss: np.ndarray
    """(L, B, T+1) full-data loss along training."""
    preference_term: np.ndarray
    """(L, B, T+1) Taylor preference term f'(0) beta E[rho] (Tang et al. 2024, Sec. 4)."""
    regularisation_term: np.ndarray
    """(L, B, T+1) Taylor offline-regularisation term f''(0)/2 beta^2 E[rho^2]."""
    tabular_kl: np.ndarray
    """(T+1,) KL along DPO training (smallest beta) over the tabular class, same data."""
    tabular_gold: np.ndarray
    """(T+1,) its gold reward."""
    frontier_kl: np.ndarray
    """(F,) KL of the gold-optimal policies pi_ref exp(r_gold/b)/Z."""
    frontier_gold: np.ndarray
    """(F,) their gold reward."""
    rlhf_kl: np.ndarray
    """(F,) KL of two-stage RLHF on the proxy reward model, pi_ref exp(r_proxy/b)/Z."""
    rlhf_gold: np.ndarray
    """(F,) their gold reward."""
    kl_grid: np.ndarray
    """(K,) KL values on the losses' common KL range (smallest beta)."""
    gold_at_kl: np.ndarray
    """(L, K) gold reward of each loss's smallest-beta trajectory at kl_grid."""
    peak_step: np.ndarray
    """(L,) step of the largest gold reward along each loss's smallest-beta trajectory."""
    peak_gold: np.ndarray
    """(L,) that largest gold reward."""
    peak_kl: np.ndarray
    """(L,) the KL at which it is reached."""
    final_gold: np.ndarray
    """(L,) the gold reward at the end of training (smallest beta)."""
    rising_gap: float
    """max over KL in [0, min peak_kl] of the spread of the losses' gold at matched KL, over the largest gain."""
    n_comparisons: int
    """Comparisons kept in the dataset (pairs with xi1 == xi2 are dropped)."""


def problem(config: Config):
    """The tree, reference conditionals, gold reward and dataset of a configuration.

    Returns ``(tree, log_pi_ref, gold, data, rng)``, ``rng`` the Generator after drawing them.
    """
    rng = np.random.default_rng(config.seed)
    tree = TokenTree(V=config.V, H=config.H, P=config.P)
    logits = []
    for h in range(tree.H):
        z = config.ref_temperature * rng.standard_normal((tree.P, tree.V**h, tree.V))
        z[..., 0] += config.good_token_logit
        logits.append(z)
    ref = policy_from_logits(tree, logits)
    n0 = bag_of_tokens(tree)[:, 0]
    gold = (config.gold_linear * n0 - config.gold_quadratic * n0**2)[None, :] \
        + config.gold_noise * rng.standard_normal((tree.P, tree.n_leaves))
    data = sample_preferences(tree, gold, config.n_pairs, rng, log_pi_pair=ref)
    return tree, ref, gold, data, rng


def trajectory_curve(kl: np.ndarray, gold: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gold reward as a function of KL along a trajectory, at ``grid`` (within its KL range).

    The KL along training need not be monotone; points are taken where it reaches a new running
    maximum (the first time the run gets that far), then linearly interpolated.
    """
    run_max = np.maximum.accumulate(kl)
    first = np.concatenate([[True], run_max[1:] > run_max[:-1]])
    return np.interp(grid, kl[first], gold[first])


def matched_kl_curves(kl: np.ndarray, gold: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Compare several trajectories at matched KL.

    Parameters
    ----------
    kl, gold : (L, T+1) arrays, one row per loss.
    n : number of grid points on ``[0, min_l max_t kl[l, t]]``.

    Returns
    -------
    grid : (n,), curves : (L, n)
    """
    top = float(np.min(np.max(kl, axis=1)))
    grid = np.linspace(0.0, max(top, 0.0), n)
    return grid, np.stack([trajectory_curve(k, g, grid) for k, g in zip(kl, gold)])


def run(config: Config = Config(), progress: bool = False) -> Result:
    """Train every (loss, beta) from pi_ref on one finite dataset and record the exact curves."""
    tree, ref, gold, data, rng = problem(config)
    policy_features, reward_features = _FEATURES[config.features]
    feats = policy_features(tree)
    proxy = reward_mle(data, LinearReward(tree, reward_features(tree)), l2=config.proxy_l2, warn=False).reward
    ref_lp = leaf_logprobs(tree, ref)
    pc = LogLinearPolicy(tree, ref, feats)
    L, B, T = len(config.losses), len(config.betas), config.steps
    out = {k: np.empty((L, B, T + 1)) for k in ("kl", "gold", "proxy", "loss", "pref", "reg")}
    jobs = [(i, j) for i in range(L) for j in range(B)]
    seeds = rng.spawn(len(jobs) + 1)
    for (i, j), sub in progress_bar(zip(jobs, seeds), enabled=progress, desc=NAME, total=len(jobs)):
        f, beta = config.losses[i], float(config.betas[j])
        tr = train_preference_loss(
            data, pc, ref, f, optimizer="adam", lr=config.lr, steps=T,
            batch_size=config.batch_size or None, rng=sub, gold_reward=gold, proxy_reward=proxy, beta=beta,
        )
        pref, reg = trajectory_taylor_terms(tr, f, beta)
        for key, val in (("kl", tr.kl), ("gold", tr.gold), ("proxy", tr.proxy), ("loss", tr.loss), ("pref", pref), ("reg", reg)):
            out[key][i, j] = val
    j0 = int(np.argmin(config.betas))
    tab = train_preference_loss(data, TabularPolicy(tree, ref), ref, "logistic", optimizer="adam", lr=config.lr, steps=T,
                                batch_size=config.batch_size or None, rng=seeds[-1], gold_reward=gold,
                                beta=float(config.betas[j0]))
    # soft-optimal references: gold-optimal frontier and two-stage RLHF on the proxy reward model
    bs = np.logspace(-2, 2, config.frontier_points)
    fk, fg, rk, rg = (np.empty(bs.size) for _ in range(4))
    for k, b in enumerate(bs):
        for reward, kl_out, gold_out in ((gold, fk, fg), (proxy, rk, rg)):
            lpi = soft_optimal_policy(tree, ref, reward, float(b)).log_pi
            kl_out[k] = tree.average(sequence_kl(tree, lpi, ref))
            gold_out[k] = expected_reward(tree, leaf_logprobs(tree, lpi), gold)
    gold_ref = expected_reward(tree, ref_lp, gold)
    kl0, gold0 = out["kl"][:, j0], out["gold"][:, j0]
    grid, curves = matched_kl_curves(kl0, gold0, config.kl_grid_points)
    peak_step = np.argmax(gold0, axis=1)
    peak_gold = gold0[np.arange(L), peak_step]
    peak_kl = kl0[np.arange(L), peak_step]
    rise = np.linspace(0.0, float(peak_kl.min()), config.kl_grid_points)
    rising = np.stack([trajectory_curve(k, g, rise) for k, g in zip(kl0, gold0)])
    gain = float(peak_gold.max() - gold_ref)
    rising_gap = float(np.ptp(rising, axis=0).max() / gain) if gain > 0 else float("inf")
    return Result(
        config=config, losses=tuple(config.losses), methods=tuple(METHODS[f] for f in config.losses),
        betas=tuple(float(b) for b in config.betas), gold_ref=gold_ref, proxy_ref=expected_reward(tree, ref_lp, proxy),
        kl=out["kl"], gold=out["gold"], proxy=out["proxy"], loss=out["loss"], preference_term=out["pref"],
        regularisation_term=out["reg"], tabular_kl=tab.kl, tabular_gold=tab.gold,
        frontier_kl=fk, frontier_gold=fg, rlhf_kl=rk, rlhf_gold=rg,
        kl_grid=grid, gold_at_kl=curves, peak_step=peak_step, peak_gold=peak_gold, peak_kl=peak_kl,
        final_gold=gold0[:, -1].copy(), rising_gap=rising_gap, n_comparisons=int(data.n),
    )


# ----------------------------------------------------------------------------- plots
_STYLES = ("-", "--", "-.", ":")


def _sqrt(x):
    return np.sqrt(np.maximum(x, 0.0))  # exact KLs can be -1e-17 by rounding


def _alpha(result: Result, j: int) -> float:
    return 1.0 - 0.6 * j / max(1, len(result.betas) - 1)


_D_LABEL = r"$\sqrt{\mathrm{KL}(\pi\,\|\,\pi_{ref})}$ [$\sqrt{\mathrm{nats}}$]"


def _beta_legend(result: Result, ax, loc: str):
    """A second legend: line style (and fading) = beta, in neutral grey."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.2", alpha=_alpha(result, j), lw=1.4, ls=_STYLES[j % len(_STYLES)])
               for j in range(len(result.betas))]
    leg = ax.legend(handles, [rf"$\beta$={b:g}" for b in result.betas], loc=loc, fontsize="x-small",
                    title="line style", title_fontsize="x-small")
    ax.add_artist(leg)


def plot_gold_vs_kl(result: Result, ax) -> None:
    """Gold reward against sqrt(KL) along training, every loss and beta, with the references.

    Colour = loss, line style = beta (two compact legends); grey = references.
    """
    from matplotlib.lines import Line2D

    ref_lines = [
        ax.plot(_sqrt(result.frontier_kl), result.frontier_gold, color="0.3", lw=1.2, ls=":")[0],
        ax.plot(_sqrt(result.rlhf_kl), result.rlhf_gold, color="0.5", lw=1.2, ls="--")[0],
        ax.plot(_sqrt(result.tabular_kl), result.tabular_gold, color="0.6", lw=1.2)[0],
    ]
    ref_labels = ["gold-optimal frontier", "RLHF on proxy RM", rf"DPO, tabular class, $\beta$={min(result.betas):g}"]
    for i in range(len(result.methods)):
        for j in range(len(result.betas)):
            ax.plot(_sqrt(result.kl[i, j]), result.gold[i, j], color=f"C{i}", alpha=_alpha(result, j), lw=1.4,
                    ls=_STYLES[j % len(_STYLES)])
    ax.axhline(result.gold_ref, color="k", lw=0.8)
    _beta_legend(result, ax, "lower center")
    loss_handles = [Line2D([], [], color=f"C{i}", lw=1.4) for i in range(len(result.methods))]
    ax.legend(loss_handles + ref_lines, list(result.methods) + ref_labels, loc="lower left", fontsize="x-small",
              title="colour", title_fontsize="x-small")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.6 * (hi - lo), hi)  # room for the legends below the curves
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel("gold reward [reward units]")
    ax.set_title("Gold reward rises, then falls (every loss, every β)")


def plot_proxy_vs_kl(result: Result, ax) -> None:
    """Proxy (reward-model) reward against sqrt(KL) along training (colour = loss, line style = beta)."""
    for i, m in enumerate(result.methods):
        for j in range(len(result.betas)):
            ax.plot(_sqrt(result.kl[i, j]), result.proxy[i, j], color=f"C{i}", alpha=_alpha(result, j), lw=1.4,
                    ls=_STYLES[j % len(_STYLES)], label=m if j == 0 else None)
    ax.axhline(result.proxy_ref, color="k", lw=0.8)
    _beta_legend(result, ax, "upper center")
    ax.legend(loc="upper left", fontsize="x-small", title="colour", title_fontsize="x-small")
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel("proxy reward (BT reward model, same data)\n[reward units]")
    ax.set_title("The learned reward keeps rising")


def plot_gold_vs_step(result: Result, ax) -> None:
    """Gold reward against the training step at the smallest beta, each run's peak marked."""
    j = int(np.argmin(result.betas))
    steps = np.arange(result.gold.shape[-1])
    for i, m in enumerate(result.methods):
        g = result.gold[i, j]
        k = int(np.argmax(g))
        ax.plot(steps, g, color=f"C{i}", label=m)
        ax.plot(k, g[k], "o", color=f"C{i}", ms=5)
    ax.plot(steps, result.tabular_gold, color="0.6", label="DPO, tabular")
    ax.axhline(result.gold_ref, color="k", lw=0.8, label=r"$\pi_{ref}$")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, steps[-1])
    ax.set_xlabel("Adam step")
    ax.set_ylabel("gold reward [reward units]")
    ax.set_title(rf"Training longer over-optimises ($\beta$={result.betas[j]:g})")
    ax.legend(fontsize="x-small", loc="lower left")


def plot_matched_kl(result: Result, ax) -> None:
    """The losses' gold reward at matched KL (smallest beta), their peaks marked."""
    for i, m in enumerate(result.methods):
        ax.plot(_sqrt(result.kl_grid), result.gold_at_kl[i], color=f"C{i}", label=m)
        ax.plot(_sqrt(result.peak_kl[i]), result.peak_gold[i], "o", color=f"C{i}", ms=5)
    ax.axvline(_sqrt(result.peak_kl.min()), color="0.5", lw=0.8, ls=":", label="first peak")
    ax.set_xlabel(_D_LABEL)
    ax.set_ylabel("gold reward [reward units]")
    ax.set_title("Alike at matched KL up to the first peak")
    ax.legend(fontsize="x-small", loc="lower left", title_fontsize="x-small",
              title=f"spread before the 1st peak:\n{100 * result.rising_gap:.0f}% of the gain")


def figure(result: Result):
    """Four panels: gold vs KL, proxy vs KL, gold vs step, and the matched-KL comparison."""
    with style():
        fig, axes = new_figure(1, 4, figsize=(19.0, 4.6))
        plot_gold_vs_kl(result, axes[0])
        plot_proxy_vs_kl(result, axes[1])
        plot_gold_vs_step(result, axes[2])
        plot_matched_kl(result, axes[3])
        fig.suptitle("Offline losses over-optimise a finite preference dataset and behave alike once calibrated "
                     "for KL (slides 002)")
    return fig
