r"""Several rewards: the exact Pareto front of soft-optimal policies under a KL budget.

Claim (slides 002, "More advanced reward models: multiple reward — factuality? relevance?
completeness?"; multi-reward RLHF as in Ramé et al. 2023, "Rewarded soups", arXiv:2306.04488):
with two rewards ``r_1, r_2`` (e.g. helpfulness and harmlessness) there is no single optimum but
a front of trade-offs.  Under a KL budget ``KL(P_pi || P_ref) <= eps`` the set of achievable
``(E r_1, E r_2)`` is convex (KL is convex, expectations are linear), so its whole upper-right
boundary is traced by maximisers of the scalarised rewards ``w r_1 + (1 - w) r_2``,
``w in [0, 1]`` (the standard scalarisation result for convex multi-objective problems, e.g.
Boyd & Vandenberghe 2004, "Convex Optimization", Sec. 4.7), and by Lagrange duality each
maximiser is the soft-optimal policy ``pi_ref exp(r_w / beta) / Z`` (the KL-regularised optimum
used throughout RLHF, e.g. Rafailov et al. 2023, arXiv:2305.18290) at the ``beta`` where the
budget binds.  No policy within the budget lies beyond the front, and a larger budget moves the
whole front outwards.  Rewards are standard Gaussian per completion, so ``E[r]`` is in units of
the rewards' standard deviation across completions ("reward units"); KL is in nats.  Computed exactly on the leaves with :func:`toyrlhf.verifiers.pareto_front`
(Gibbs policies via :func:`toyrlhf.projections.gibbs_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..nash import kl_divergence
from ..policies import leaf_logprobs, random_policy
from ..tree import TokenTree
from ..verifiers import pareto_front, scalarized_policy

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "plot_front", "plot_weights"]

NAME = "pareto"
TITLE = (
    "Two rewards: scalarised soft-optimal policies trace the exact Pareto front under a KL budget"
)


@dataclass(frozen=True)
class Config:
    """Tree, the two rewards, KL budgets and the weight grid."""

    V: int = 3
    """Vocabulary size."""
    H: int = 3
    """Horizon."""
    P: int = 2
    """Number of prompts (uniform rho0); budgets and values are averages over prompts."""
    correlation: float = -0.6
    """Correlation of the two Gaussian rewards across completions (negative = conflicting)."""
    kl_budgets: tuple[float, ...] = (0.05, 0.25, 1.0)
    """KL budgets eps (nats); one front per budget."""
    beta: float = 0.5
    """KL coefficient of the fixed-beta front."""
    n_weights: int = 21
    """Number of weights w in [0, 1]."""
    n_random: int = 400
    """Random soft-optimal policies (random rewards and temperatures) drawn for comparison."""
    temperature: float = 1.0
    """Scale of the random reference policy's logits."""
    seed: int = 0
    """Seed of the reference policy, the rewards and the random policies."""

    def __post_init__(self) -> None:
        for name in ("V", "H", "P", "n_weights", "n_random"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (2 if name == "n_weights" else 1)
            ):
                raise ValueError(f"{name} must be a positive integer (n_weights >= 2), got {v!r}")
        if not -1 < self.correlation < 1:
            raise ValueError(f"correlation must be in (-1, 1), got {self.correlation!r}")
        if not self.kl_budgets or any(not (b > 0) for b in self.kl_budgets):
            raise ValueError(f"kl_budgets must be positive, got {self.kl_budgets!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta!r}")

    @classmethod
    def quick(cls) -> Config:
        """A tiny configuration for tests."""
        return cls(H=2, n_weights=7, n_random=100)


@dataclass(frozen=True)
class Result:
    """Fronts and reference points in the (E r_1, E r_2) plane."""

    config: Config
    weights: np.ndarray
    """Weights w of r_1 (r_2 gets 1 - w), shape (W,)."""
    front_values: np.ndarray
    """(E r_1, E r_2) on each budget's front, shape (B, W, 2)."""
    front_kl: np.ndarray
    """E KL of each front point, shape (B, W)."""
    front_beta: np.ndarray
    """KL coefficient at which each budget binds, shape (B, W) (0 = greedy)."""
    beta_values: np.ndarray
    """(E r_1, E r_2) of the fixed-beta soft-optimal policies, shape (W, 2)."""
    beta_kl: np.ndarray
    """Their E KL, shape (W,)."""
    ref_values: np.ndarray
    """(E r_1, E r_2) under pi_ref, shape (2,)."""
    random_values: np.ndarray
    """(E r_1, E r_2) of random policies, shape (n_random, 2)."""
    random_kl: np.ndarray
    """Their E KL, shape (n_random,)."""


def run(config: Config, progress: bool = False) -> Result:
    """Trace the fronts for every budget and at fixed beta; draw random policies to compare.

    Parameters
    ----------
    config : Config
    progress : bool
        Ignored (the computation takes a fraction of a second).
    """
    c = config
    tree = TokenTree(V=c.V, H=c.H, P=c.P)
    rng = np.random.default_rng(c.seed)
    lp = leaf_logprobs(tree, random_policy(tree, rng, temperature=c.temperature))
    z = rng.standard_normal((2, tree.P, tree.n_leaves))
    R = np.stack([z[0], c.correlation * z[0] + np.sqrt(1 - c.correlation**2) * z[1]])
    w = np.linspace(0.0, 1.0, c.n_weights)
    fronts = [pareto_front(tree, lp, R, w, kl_budget=eps) for eps in c.kl_budgets]
    fb = pareto_front(tree, lp, R, w, beta=c.beta)
    with np.errstate(under="ignore"):
        ref = (np.exp(lp)[None] * R).sum(-1) @ tree.rho0
    vals, kls = [], []
    for _ in range(c.n_random):
        g = rng.standard_normal(lp.shape)
        zz = scalarized_policy(lp, g[None], [1.0], float(np.exp(rng.uniform(-1.0, 2.0))))
        with np.errstate(under="ignore"):
            vals.append((np.exp(zz)[None] * R).sum(-1) @ tree.rho0)
        kls.append(kl_divergence(zz, lp) @ tree.rho0)
    return Result(
        config=c,
        weights=w,
        front_values=np.stack([f.values for f in fronts]),
        front_kl=np.stack([f.kl for f in fronts]),
        front_beta=np.stack([f.beta for f in fronts]),
        beta_values=fb.values,
        beta_kl=fb.kl,
        ref_values=ref,
        random_values=np.array(vals),
        random_kl=np.array(kls),
    )


def plot_front(result: Result, ax) -> None:
    """The fronts in the (E r_1, E r_2) plane, random policies coloured by KL, and pi_ref."""
    budgets = result.config.kl_budgets
    hi = max(budgets)
    inside = result.random_kl <= hi
    sc = ax.scatter(
        result.random_values[inside, 0],
        result.random_values[inside, 1],
        c=result.random_kl[inside],
        s=8,
        cmap="viridis",
        vmin=0,
        vmax=hi,
        alpha=0.6,
        label=f"random policies, KL $\\leq$ {hi:g} nats",
    )
    ax.figure.colorbar(sc, ax=ax, label="KL$(P_\\pi \\| P_{ref})$ [nats]")
    for i, eps in enumerate(budgets):
        v = result.front_values[i]
        ax.plot(
            v[:, 0], v[:, 1], color=f"C{i + 1}", marker=".", label=f"front, KL $\\leq$ {eps:g} nats"
        )
    ax.plot(
        result.beta_values[:, 0],
        result.beta_values[:, 1],
        color="k",
        ls=":",
        label=f"fixed $\\beta$ = {result.config.beta:g}",
    )
    ax.plot(*result.ref_values, marker="*", ms=12, color="k", ls="none", label="$\\pi_{ref}$")
    ax.set_xlabel("$E[r_1]$ [reward units]")
    ax.set_ylabel("$E[r_2]$ [reward units]")
    ax.set_title(
        "No policy within a KL budget lies beyond its front\n"
        f"(reward correlation {result.config.correlation:g})",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)


def plot_weights(result: Result, ax) -> None:
    """Each reward's expectation along the fronts against the weight w of r_1."""
    for i, eps in enumerate(result.config.kl_budgets):
        ax.plot(
            result.weights,
            result.front_values[i, :, 0],
            color=f"C{i + 1}",
            label=f"$E r_1$, KL $\\leq$ {eps:g} nats",
        )
        ax.plot(
            result.weights,
            result.front_values[i, :, 1],
            color=f"C{i + 1}",
            ls="--",
            label=f"$E r_2$, KL $\\leq$ {eps:g} nats",
        )
    ax.set_xlabel("weight $w$ of $r_1$ in $w r_1 + (1-w) r_2$")
    ax.set_ylabel("expected reward [reward units]")
    ax.set_title("Along a front, raising $E[r_1]$ lowers $E[r_2]$", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)


def figure(result: Result):
    """Two panels: the fronts in the reward plane, and the rewards against the weight."""
    from ..plotting import new_figure, style

    with style():
        fig, axes = new_figure(1, 2, figsize=(13.0, 6.0))
        plot_front(result, axes[0])
        plot_weights(result, axes[1])
        fig.suptitle(
            "Several rewards: the soft-optimal policies of $w r_1 + (1-w) r_2$ are exactly "
            "the Pareto front under a KL budget"
        )
    return fig
