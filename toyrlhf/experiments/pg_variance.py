"""Policy-gradient variance with and without baselines, exactly (slides 002 "Improving policy
gradient with a baseline"; RLOO, Ahmadian et al. 2024, arXiv:2402.14740).

The sequence-level REINFORCE estimator ``(1/k) sum_i (R(xi_i) - b_i) grad log P(xi_i)`` of
``grad J`` is unbiased for every baseline below; its variance (trace of the covariance) is
computed exactly by enumerating the tree (:func:`toyrlhf.online.pg_estimator_variance`) and
checked against Monte-Carlo estimates of the sampled estimator:

* the variance without a baseline grows quadratically with a constant added to the reward,
  while the value, optimal and leave-one-out baselines are invariant to it;
* at a fixed budget of ``n`` completions split into ``n/k`` groups of ``k`` (variance of one
  group times ``k``), the leave-one-out baseline approaches the value baseline as ``k`` grows
  (its price is the ``1/(k-1)`` noise of estimating the baseline from the other samples), while
  every curve rises for large ``k`` because fewer prompts are drawn;
* the variances change as training sharpens the policy (natural-gradient path to ``pi*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..online import (
    RLProblem,
    natural_gradient_step,
    pg_estimator_variance,
    policy_gradient_estimate,
)
from ..plotting import new_figure
from ..policies import TabularPolicy, random_policy
from ..progress import progress_bar
from ..tree import TokenTree

NAME = "pg_variance"
TITLE = "Policy-gradient variance with and without baselines (none, value, optimal, leave-one-out), exact"

BASELINES = ("none", "value", "optimal", "loo")
LABELS = {"none": "no baseline", "value": "value baseline $J(s_0)$", "optimal": "optimal constant baseline",
          "loo": "leave-one-out (RLOO)"}


@dataclass(frozen=True)
class Config:
    V: int = 3
    """Vocabulary size of the tree."""
    H: int = 3
    """Horizon (tokens per completion)."""
    P: int = 2
    """Number of prompts."""
    beta: float = 0.1
    """KL coefficient of the objective (the KL enters the shaped reward R = r - beta log(P/P_ref))."""
    offset: float = 1.0
    """Constant added to the reward in the group-size and training panels (reward models are not centred)."""
    offsets: tuple[float, ...] = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
    """Reward offsets of the offset panel."""
    group_sizes: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16, 24, 32)
    """Completions per prompt k of the group-size panel."""
    k: int = 4
    """Group size of the offset and training panels."""
    train_steps: int = 12
    """Natural-gradient steps from pi_ref towards pi* along which variances are tracked."""
    eta: float = 0.5
    """Natural-gradient step size."""
    mc_groups: int = 2000
    """Monte-Carlo groups per check of the exact variance (0 disables the checks)."""
    mc_group_sizes: tuple[int, ...] = (2, 8)
    """Group sizes at which the exact variance is checked by sampling."""
    seed: int = 0
    """Seed of the problem and the Monte-Carlo checks."""

    @classmethod
    def quick(cls) -> Config:
        return cls(H=2, offsets=(-2.0, 0.0, 2.0), group_sizes=(2, 4, 8), train_steps=3, mc_groups=200,
                   mc_group_sizes=(4,))


@dataclass(frozen=True)
class Result:
    config: Config
    baselines: tuple
    group_sizes: np.ndarray
    """(G,) group sizes k."""
    var_by_k: np.ndarray
    """(B, G) exact variance of one group's estimate, per baseline and group size."""
    offsets: np.ndarray
    """(O,) reward offsets."""
    var_by_offset: np.ndarray
    """(B, O) exact variance at group size k per offset."""
    steps: np.ndarray
    """(T + 1,) natural-gradient steps."""
    kl_along: np.ndarray
    """(T + 1,) KL(P_theta || P_ref) along the path."""
    var_along: np.ndarray
    """(B, T + 1) exact variance at group size k along the path."""
    mc_group_sizes: np.ndarray
    """(M,) group sizes of the Monte-Carlo checks."""
    mc_var: np.ndarray
    """(2, M) sampled variance (rows: 'none', 'loo') at offset ``config.offset``."""
    mc_exact: np.ndarray
    """(2, M) the exact variances they estimate."""
    mc_se: np.ndarray
    """(2, M) standard errors of the sampled variances (delta method on the sample of ||g - grad J||^2)."""


def _problem(config: Config):
    rng = np.random.default_rng(config.seed)
    tree = TokenTree(V=config.V, H=config.H, P=config.P)
    ref = random_policy(tree, rng)
    r = rng.standard_normal((tree.P, tree.n_leaves))
    r -= r.mean()
    return tree, ref, r, rng


def run(config: Config = Config(), progress: bool = False) -> Result:
    tree, ref, r0, rng = _problem(config)
    pc = TabularPolicy(tree, ref)
    theta = pc.init()
    prob = RLProblem(tree, ref, r0 + config.offset, config.beta)
    ks = np.array(config.group_sizes, dtype=int)
    B = len(BASELINES)

    def var(problem, th, b, k):
        if b == "loo" and k < 2:
            return np.nan
        return pg_estimator_variance(pc, th, problem, baseline=b, group_size=int(k)).variance

    var_by_k = np.array([[var(prob, theta, b, k) for k in ks] for b in BASELINES])
    offs = np.array(config.offsets, dtype=float)
    var_by_offset = np.zeros((B, offs.size))
    for j, c in enumerate(progress_bar(offs, enabled=progress, desc=f"{NAME} offsets")):
        p_c = RLProblem(tree, ref, r0 + c, config.beta)
        var_by_offset[:, j] = [var(p_c, theta, b, config.k) for b in BASELINES]
    th = theta
    kl_along, var_along = [], []
    for _ in range(config.train_steps + 1):
        kl_along.append(prob.evaluate(log_pi=pc.conditionals(th)).kl)
        var_along.append([var(prob, th, b, config.k) for b in BASELINES])
        th, _ = natural_gradient_step(pc, th, prob, eta=config.eta)
    # Monte-Carlo checks of the exact variance of the sampled estimator
    mks = np.array(config.mc_group_sizes if config.mc_groups > 0 else (), dtype=int)
    mc_var = np.zeros((2, mks.size))
    mc_se = np.zeros((2, mks.size))
    mc_exact = np.zeros((2, mks.size))
    for j, k in enumerate(mks):
        for i, (b, adv) in enumerate((("none", "none"), ("loo", "loo"))):
            ex = pg_estimator_variance(pc, theta, prob, baseline=b, group_size=int(k))
            gs = np.array([policy_gradient_estimate(pc, theta, prob, rng, n_groups=1, group_size=int(k), advantage=adv)[0]
                           for _ in range(config.mc_groups)])
            d2 = np.sum((gs - ex.mean) ** 2, axis=1)  # unbiased for the variance (mean is exact)
            mc_var[i, j] = d2.mean()
            mc_se[i, j] = d2.std(ddof=1) / np.sqrt(d2.size)
            mc_exact[i, j] = ex.variance
    return Result(
        config=config,
        baselines=BASELINES,
        group_sizes=ks,
        var_by_k=var_by_k,
        offsets=offs,
        var_by_offset=var_by_offset,
        steps=np.arange(config.train_steps + 1),
        kl_along=np.array(kl_along),
        var_along=np.array(var_along).T,
        mc_group_sizes=mks,
        mc_var=mc_var,
        mc_exact=mc_exact,
        mc_se=mc_se,
    )


def plot_group_size(result: Result, ax) -> None:
    """Variance at a fixed budget of completions (one group's variance times k) against the group size k."""
    k = result.group_sizes
    for i, b in enumerate(result.baselines):
        ax.plot(k, result.var_by_k[i] * k, "o-", ms=3, label=LABELS[b])
    for i, color in enumerate(("C0", "C3")):  # rows of mc_var: 'none', 'loo'
        mk = result.mc_group_sizes
        if mk.size:
            ax.errorbar(mk, result.mc_var[i] * mk, yerr=2 * result.mc_se[i] * mk, fmt="x", color=color, ms=7,
                        label="sampled (±2 SE)" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("completions per prompt $k$")
    ax.set_ylabel(r"$k \cdot \mathrm{tr\,Cov}(\hat g)$")
    ax.set_title(f"Fixed budget of completions (offset {result.config.offset:g})")
    ax.legend(fontsize="small")


def plot_offset(result: Result, ax) -> None:
    """Exact variance at group size k against a constant added to the reward."""
    for i, b in enumerate(result.baselines):
        ax.plot(result.offsets, result.var_by_offset[i], "o-", ms=3, label=LABELS[b])
    ax.set_yscale("log")
    ax.set_xlabel("constant added to the reward")
    ax.set_ylabel(r"$\mathrm{tr\,Cov}(\hat g)$")
    ax.set_title(f"Baselines remove the offset ($k={result.config.k}$)")
    ax.legend(fontsize="small")


def plot_training(result: Result, ax) -> None:
    """Exact variance at group size k along the natural-gradient path, against KL to pi_ref."""
    for i, b in enumerate(result.baselines):
        ax.plot(result.kl_along, result.var_along[i], "o-", ms=3, label=LABELS[b])
    ax.set_yscale("log")
    ax.set_xlabel(r"KL$(P_\theta \,\|\, P_{ref})$ along training")
    ax.set_ylabel(r"$\mathrm{tr\,Cov}(\hat g)$")
    ax.set_title("Variance as the policy sharpens")
    ax.legend(fontsize="small")


def figure(result: Result):
    fig, axes = new_figure(1, 3, figsize=(14, 4.2))
    plot_group_size(result, axes[0])
    plot_offset(result, axes[1])
    plot_training(result, axes[2])
    fig.suptitle("REINFORCE variance by enumeration: baselines leave the mean unchanged and remove the reward offset")
    return fig
