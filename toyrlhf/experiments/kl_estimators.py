"""KL estimators k1, k2, k3 as the policy moves away from pi_ref, exactly (Schulman 2020,
"Approximating KL divergence"; Tang & Munos 2025, arXiv:2506.09477).

Policies along the path ``P_alpha ∝ P_ref exp(alpha r)`` (the soft-optimal policies for
``beta = 1/alpha``) move from ``pi_ref`` (``alpha = 0``) to sharper and sharper policies.  At
each, by enumeration of the tree (:mod:`toyrlhf.kl_estimators`):

* bias of one-sample estimates of ``KL(P || P_ref)``: ``k1`` and ``k3`` are unbiased, ``k2`` is
  not (exact zeros, not noise);
* standard deviation, for the estimator of the sequence ratio and for per-token estimators summed
  along the completion (the per-token KL penalty of RLHF): ``k3`` has far lower variance than
  ``k1`` near ``pi_ref`` and loses that advantage far from it;
* the expected *gradient* of the KL penalty, relative to the true ``grad KL``: ``k1`` as a
  detached reward is exact; ``k1`` differentiated as a loss has zero expected gradient; ``k2``
  as a per-token loss misses the effect of a token on later states; ``k3`` as a loss follows the
  forward KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kl_estimators import ESTIMATORS, expected_kl_gradient, kl_gradient, sequence_kl_moments
from ..plotting import new_figure, style
from ..policies import TabularPolicy, random_policy
from ..progress import progress_bar
from ..projections import soft_optimal_policy
from ..tree import TokenTree

NAME = "kl_estimators"
TITLE = "KL estimators k1, k2, k3: exact bias, spread and gradient bias as the policy leaves pi_ref"

GRADIENT_VARIANTS = (("k1", "reward"), ("k3", "reward"), ("k1", "loss"), ("k2", "loss"), ("k3", "loss"))


@dataclass(frozen=True)
class Config:
    V: int = 4
    """Vocabulary size."""
    H: int = 4
    """Horizon."""
    alpha_max: float = 4.0
    """Largest inverse temperature alpha of the path P_ref exp(alpha r) / Z."""
    points: int = 25
    """Points along the path."""
    reward_scale: float = 1.0
    """Scale of the random tabular reward defining the path."""
    seed: int = 0
    """Seed of pi_ref and the reward."""

    @classmethod
    def quick(cls) -> Config:
        return cls(V=3, H=2, points=5)


@dataclass(frozen=True)
class Result:
    config: Config
    estimators: tuple
    alpha: np.ndarray
    """(A,) points of the path."""
    true_kl: np.ndarray
    """(A,) KL(P_alpha || P_ref)."""
    seq_bias: np.ndarray
    """(3, A) bias of k1, k2, k3 of the sequence ratio."""
    seq_std: np.ndarray
    """(3, A) standard deviation of one sample, sequence ratio."""
    tok_bias: np.ndarray
    """(3, A) bias of the per-token estimators summed along the completion."""
    tok_std: np.ndarray
    """(3, A) standard deviation of those sums."""
    grad_variants: tuple
    """(estimator, mode) pairs of the gradient panel."""
    grad_error: np.ndarray
    """(G, A) ||E[g_hat] - grad KL|| / ||grad KL|| for each variant.

    Column 0 (``alpha = 0``, ``pi_ref`` itself) holds the *absolute* error ``||E[g_hat] - grad KL||``
    instead: there every variant's expected gradient and ``grad KL`` vanish exactly, so a relative
    error would be a ratio of rounding noise; the absolute one is rounding-sized (~1e-16)."""
    grad_cosine: np.ndarray
    """(G, A) cosine between E[g_hat] and grad KL (0 where E[g_hat] is the zero vector).

    Column 0 (``alpha = 0``) is 1 by convention: both vectors vanish there, and agree."""


def run(config: Config = Config(), progress: bool = False) -> Result:
    rng = np.random.default_rng(config.seed)
    tree = TokenTree(V=config.V, H=config.H)
    ref = random_policy(tree, rng)
    r = config.reward_scale * rng.standard_normal((tree.P, tree.n_leaves))
    pc = TabularPolicy(tree, ref)
    alphas = np.linspace(0.0, config.alpha_max, config.points)
    n = alphas.size
    true = np.zeros(n)
    sb, ss, tb, ts = (np.zeros((3, n)) for _ in range(4))
    gerr = np.zeros((len(GRADIENT_VARIANTS), n))
    gcos = np.zeros((len(GRADIENT_VARIANTS), n))
    for i, a in enumerate(progress_bar(alphas, enabled=progress, desc=NAME)):
        log_pi = ref if a == 0 else soft_optimal_policy(tree, ref, r, 1.0 / a).log_pi
        seq = sequence_kl_moments(tree, log_pi, ref, per="sequence")
        tok = sequence_kl_moments(tree, log_pi, ref, per="token_sum")
        true[i] = tree.average(seq.true_kl)
        sb[:, i] = seq.bias @ tree.rho0
        ss[:, i] = np.sqrt(seq.marginal(tree.rho0)[2])
        tb[:, i] = tok.bias @ tree.rho0
        ts[:, i] = np.sqrt(tok.marginal(tree.rho0)[2])
        theta = pc.theta_from_policy(log_pi)
        g = kl_gradient(pc, theta, ref)
        gn = np.linalg.norm(g)
        for j, (est, mode) in enumerate(GRADIENT_VARIANTS):
            e = expected_kl_gradient(pc, theta, ref, est, mode)
            en = np.linalg.norm(e)
            if a == 0:  # pi_ref: every gradient vanishes exactly; keep the (rounding-sized) absolute error
                gerr[j, i] = np.linalg.norm(e - g)
                gcos[j, i] = 1.0
            else:
                gerr[j, i] = np.linalg.norm(e - g) / gn
                gcos[j, i] = float(e @ g / (en * gn)) if en > 0 else 0.0
    return Result(config, ESTIMATORS, alphas, true, sb, ss, tb, ts, GRADIENT_VARIANTS, gerr, gcos)


def plot_bias(result: Result, ax) -> None:
    """Exact bias of one sample of each estimator against the true KL."""
    for i, e in enumerate(result.estimators):
        ax.plot(result.true_kl, result.seq_bias[i], "-", label=f"{e}, sequence ratio")
        ax.plot(result.true_kl, result.tok_bias[i], "--", color=f"C{i}", label=f"{e}, sum of per-token")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(r"KL$(P \,\|\, P_{ref})$ [nats]")
    ax.set_ylabel(r"bias $E[k] - $KL [nats]")
    ax.set_title("k1 and k3 are exactly unbiased; k2 is not")
    ax.legend(fontsize="x-small")


def plot_std(result: Result, ax) -> None:
    """Standard deviation of one sample of each estimator against the true KL."""
    x = result.true_kl[1:]  # the first point is pi_ref itself (KL = 0, every estimator is 0)
    for i, e in enumerate(result.estimators):
        ax.plot(x, result.seq_std[i, 1:], "-", label=f"{e}, sequence ratio")
        ax.plot(x, result.tok_std[i, 1:], "--", color=f"C{i}", label=f"{e}, sum of per-token")
    ax.plot(x, x, ":", color="0.5", label="KL itself")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"KL$(P \,\|\, P_{ref})$ [nats]")
    ax.set_ylabel("standard deviation of one sample [nats]")
    ax.set_title("k3 has the smallest spread near $P_{ref}$ only")
    ax.legend(fontsize="x-small")


def plot_gradient(result: Result, ax) -> None:
    """Relative error of the expected gradient of each KL-penalty implementation."""
    for j, (e, mode) in enumerate(result.grad_variants):
        x, y = result.true_kl[1:], result.grad_error[j, 1:]
        ax.plot(x, np.maximum(y, 1e-17), "o-", ms=3, label=f"{e} as {'detached reward' if mode == 'reward' else 'loss'}")
    ax.set_yscale("log")
    ax.set_xlabel(r"KL$(P \,\|\, P_{ref})$ [nats]")
    ax.set_ylabel(r"$\|E\hat g - \nabla \mathrm{KL}\| / \|\nabla \mathrm{KL}\|$ (relative)")
    ax.set_title("Only k1 as a reward has the exact gradient")
    ax.legend(fontsize="x-small")


def figure(result: Result):
    with style():
        fig, axes = new_figure(1, 3, figsize=(15, 4.4))
        plot_bias(result, axes[0])
        plot_std(result, axes[1])
        plot_gradient(result, axes[2])
        fig.suptitle("KL estimators by enumeration along $P_{ref}\\,e^{\\alpha r}/Z$ (Schulman 2020): k1, k3 unbiased, "
                     "k3 tight near $P_{ref}$, only k1 as a reward gives the exact gradient")
    return fig
