"""DPO under partial coverage: the slides' counterexample (Swamy, *The Value of RL in Fine-Tuning*, slides 001;
Swamy et al. 2025, "All Roads Lead to Likelihood", arXiv:2503.01067).

Three completions, ``pi_ref = (0.5, 0.5, 0)``, and data that only ever say ``xi1 > xi2``.

* Two-stage RLHF: the reward MLE sends ``r(xi1) - r(xi2) -> inf`` (not attained) and leaves
  ``r(xi3)`` unidentified, but the soft-optimal policy ``pi_ref exp(r/beta)/Z`` keeps
  ``pi(xi3) = 0`` whatever ``r(xi3)`` is: RLHF -> ``(1, 0, 0)``.
* DPO over a class that can put mass where ``pi_ref`` has none: the loss only sees
  ``log pi(xi1) - log pi(xi2)``, so its optima are the whole edge ``{pi(xi2) = 0}`` of the
  simplex, ``(1 - t, 0, t)`` for any ``t``: DPO does not regularise to ``pi_ref``.
* With a feature-sharing (log-linear) policy in which ``xi3`` shares features with ``xi1`` and
  opposes ``xi2`` (``psi(xi3) = psi(xi1) - psi(xi2)``), gradient descent on the DPO loss moves
  along that edge and ends with most of its mass on the never-seen ``xi3``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plotting import new_figure
from ..policies import LogLinearPolicy, TabularPolicy, leaf_logprobs
from ..preferences import preference_pairs
from ..progress import progress_bar
from ..projections import dpo_loss, dpo_tabular, soft_optimal_policy
from ..tree import TokenTree

NAME = "partial_coverage"
TITLE = "DPO under partial coverage: RLHF keeps xi3 at zero, feature-sharing DPO moves its mass there"


@dataclass(frozen=True)
class Config:
    beta: float = 0.1
    """KL coefficient beta of both RLHF and DPO."""
    base_mass_xi3: float = 0.02
    """Probability the (SFT-initialised) log-linear policy starts with on xi3; pi_ref itself gives 0."""
    steps: int = 400
    """Gradient-descent steps of DPO on the log-linear policy."""
    lr: float = 2.0
    """Step size of that gradient descent."""
    edge_points: int = 21
    """Points drawn on the DPO optimal set {pi(xi2) = 0} to check they share the optimal loss."""

    @classmethod
    def quick(cls) -> Config:
        return cls(steps=150, edge_points=5)


@dataclass(frozen=True)
class Result:
    config: Config
    pi_ref: np.ndarray
    """(3,) reference distribution."""
    rlhf: np.ndarray
    """(3,) two-stage RLHF policy (reward MLE, then soft-optimal)."""
    rlhf_attained: bool
    """Whether the reward MLE was attained (it is not: the data are separable)."""
    dpo_ref_support: np.ndarray
    """(3,) DPO over the tabular class with finite log-ratios to pi_ref (closed form)."""
    edge: np.ndarray
    """(k, 3) points on the DPO optimal set of the unrestricted class."""
    edge_loss: np.ndarray
    """(k,) DPO loss at the edge points (all equal, within e^-40 of the infimum 0)."""
    trajectory: np.ndarray
    """(steps + 1, 3) the feature-sharing policy along DPO gradient descent."""
    trajectory_loss: np.ndarray
    """(steps + 1,) DPO loss along the trajectory."""


def _problem():
    tree = TokenTree(V=3, H=1)
    with np.errstate(divide="ignore"):
        ref = (np.log(np.array([[[0.5, 0.5, 0.0]]])),)
    data = preference_pairs([0], [0], [1])  # only xi1 > xi2
    return tree, ref, data


def run(config: Config = Config(), progress: bool = False) -> Result:
    tree, ref, data = _problem()
    ref_lp = leaf_logprobs(tree, ref)
    beta = config.beta
    # two-stage RLHF = reward MLE (tabular) then soft RL; identical to DPO over the ref-support class
    pfit, rfit = dpo_tabular(data, tree, ref, beta, warn=False)
    rlhf = np.exp(leaf_logprobs(tree, soft_optimal_policy(tree, ref, rfit.reward, beta).log_pi))[0]
    # DPO over the unrestricted class: the loss depends only on log pi1 - log pi2
    full = TabularPolicy(tree, (np.zeros((1, 1, 3)),))
    margin = 40.0 / beta  # nats of log pi1 - log pi2: the loss is within e^-40 of its infimum 0
    t = np.linspace(0.02, 0.98, config.edge_points)
    edge_logits = np.stack([np.log1p(-t), np.log1p(-t) - margin, np.log(t)], axis=1)
    edge = np.exp(edge_logits - np.logaddexp.reduce(edge_logits, axis=1, keepdims=True))
    edge_loss = np.array([dpo_loss(full, z, data, ref_lp, beta)[0] for z in edge_logits])
    # feature-sharing log-linear policy: psi(xi1)=(1,0), psi(xi2)=(0,1), psi(xi3)=psi(xi1)-psi(xi2)
    psi = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    eps = config.base_mass_xi3
    base = (np.log(np.array([[[(1 - eps) / 2, (1 - eps) / 2, eps]]])),)
    cls = LogLinearPolicy(tree, base, (psi[None, None],))
    theta = cls.init()
    traj, losses = [], []
    for _ in progress_bar(range(config.steps + 1), enabled=progress, desc=NAME, total=config.steps + 1):
        loss, grad = dpo_loss(cls, theta, data, ref_lp, beta)
        traj.append(np.exp(cls.leaf_logprobs(theta))[0])
        losses.append(loss)
        theta = theta - config.lr * grad
    return Result(
        config=config,
        pi_ref=np.exp(ref_lp[0]),
        rlhf=rlhf,
        rlhf_attained=bool(rfit.attained),
        dpo_ref_support=np.exp(pfit.leaf_logp[0]),
        edge=edge,
        edge_loss=edge_loss,
        trajectory=np.array(traj),
        trajectory_loss=np.array(losses),
    )


LABELS = (r"$\xi_1$ (chosen)", r"$\xi_2$ (rejected)", r"$\xi_3$ (never seen)")


def plot_solutions(result: Result, ax) -> None:
    """Bars: pi_ref, RLHF, DPO over ref-support policies, and the feature-sharing DPO run's end."""
    rows = [
        (r"$\pi_{ref}$", result.pi_ref),
        ("two-stage RLHF", result.rlhf),
        (r"DPO, supp $\subseteq$ supp $\pi_{ref}$", result.dpo_ref_support),
        ("DPO, feature-sharing", result.trajectory[-1]),
    ]
    width = 0.2
    x = np.arange(3)
    for k, (label, p) in enumerate(rows):
        ax.bar(x + (k - 1.5) * width, p, width, label=label)
    ax.set_xticks(x, LABELS)
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1.05)
    ax.set_title("Solutions (data: only $\\xi_1 \\succ \\xi_2$)")
    ax.legend(fontsize="small")


def plot_trajectory(result: Result, ax) -> None:
    """Probabilities of the three completions along DPO gradient descent (feature-sharing class)."""
    steps = np.arange(result.trajectory.shape[0])
    for k in range(3):
        ax.plot(steps, result.trajectory[:, k], label=LABELS[k])
    ax.axhline(result.rlhf[2], color="k", ls=":", lw=1, label=r"RLHF $\pi(\xi_3)$")
    ax.set_xlabel("DPO gradient step")
    ax.set_ylabel("probability")
    ax.set_title(r"Feature-sharing DPO drifts to $\xi_3$")
    ax.legend(fontsize="small")


def plot_simplex(result: Result, ax) -> None:
    """The simplex: DPO's optimal edge {pi(xi2)=0}, RLHF's vertex, and the DPO trajectory."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    def to_xy(p):
        return np.asarray(p) @ corners
    ax.plot(*to_xy(np.vstack([np.eye(3), np.eye(3)[:1]])).T, color="0.6", lw=1)
    e = to_xy(result.edge)
    ax.plot(e[:, 0], e[:, 1], color="C3", lw=4, alpha=0.4, label="DPO optimal set (unrestricted)")
    tr = to_xy(result.trajectory)
    ax.plot(tr[:, 0], tr[:, 1], color="C3", lw=1.5, label="feature-sharing DPO run")
    ax.plot(*to_xy(result.pi_ref), "o", color="C0", label=r"$\pi_{ref}$")
    ax.plot(*to_xy(result.rlhf), "s", color="C1", ms=8, label="RLHF")
    for k, name in enumerate((r"$\xi_1$", r"$\xi_2$", r"$\xi_3$")):
        ax.annotate(name, corners[k], textcoords="offset points", xytext=(-14 if k == 0 else 6, -12 if k < 2 else 4))
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title("Probability simplex")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def figure(result: Result):
    fig, axes = new_figure(1, 3, figsize=(14, 4.2))
    plot_solutions(result, axes[0])
    plot_trajectory(result, axes[1])
    plot_simplex(result, axes[2])
    fig.suptitle("Under partial coverage RLHF stays on $\\pi_{ref}$'s support; DPO need not (slides 001)")
    return fig
