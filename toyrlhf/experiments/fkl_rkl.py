r"""Forward vs reverse KL: mode covering vs mode seeking (slides 000–001, "Recap: Forward and Reverse KL").

Claim: projecting a multi-modal target ``Q`` onto a class that cannot represent all its modes,

* the forward-KL (maximum-likelihood, SFT/DPO-style) projection ``argmin_theta KL(Q || P_theta)``
  is *mode covering*: it must put mass wherever ``Q`` has any, so it spreads over both modes
  (and the valley between them) and has high entropy;
* the reverse-KL (soft-RL-style) projection ``argmin_theta KL(P_theta || Q)`` is *mode seeking*:
  it pays ``log(P/Q)`` wherever it puts mass, so it picks one mode and concentrates there.

Setup: one prompt, ``V`` tokens, ``H`` steps, ``pi_ref`` uniform.  The target is the
soft-optimal policy of the bimodal reward ``r(xi) = reward_scale * |n_0(xi) - n_1(xi)|``
(``n_v`` = count of token ``v``): ``Q(xi) ∝ P_ref(xi) exp(r(xi)/beta)`` puts half its mass on
completions dominated by token 0 (mode A, peak ``00..0``) and half on those dominated by token
1 (mode B, peak ``11..1``).  The class is :class:`~toyrlhf.policies.LogLinearPolicy` on
``pi_ref`` with ``next_token`` (one logit per token, shared by every node: i.i.d. tokens) or
``position`` (one per (depth, token)) features: product distributions over positions, which
cannot put mass on ``00..0`` and ``11..1`` without putting it on their mixtures too.

The FKL objective is convex in ``theta`` for log-linear conditionals (``log P_theta`` is a sum
of affine minus log-sum-exp terms), so its optimum is unique (checked: the fits from all
``n_inits`` starting points agree).  The RKL objective is not: by the ``0 <-> 1`` symmetry it
has (at least) two optima with equal loss, one per mode; the fits from random starting points
(seeded) each land on one of them, and the result keeps the best.

References: the mode-covering / mode-seeking behaviour of the two projections is classical
(Bishop 2006, *Pattern Recognition and Machine Learning*, Sec. 10.1.2, Fig. 10.3; Minka 2005,
"Divergence measures and message passing", MSR-TR-2005-173); for preference fine-tuning see
Tajwar et al. 2024, arXiv:2404.14367.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plotting import COLORS, new_figure, style
from ..policies import (
    LogLinearPolicy,
    leaf_logprobs,
    next_token_features,
    position_token_features,
    uniform_policy,
)
from ..progress import progress_bar
from ..projections import fkl_projection, gibbs_policy, rkl_projection
from ..rewards import bag_of_tokens
from ..tree import TokenTree

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "plot_leaves", "plot_modes", "plot_summary",
           "bimodal_reward"]

NAME = "fkl_rkl"
TITLE = "Forward KL covers both modes of a bimodal target; reverse KL picks one"

_FEATURES = {"next_token": next_token_features, "position": position_token_features}


@dataclass(frozen=True)
class Config:
    """Tree, bimodal target and restricted policy class of the FKL/RKL comparison."""

    V: int = 3
    """Vocabulary size (tokens 0 and 1 define the two modes; the others are neutral)."""
    H: int = 4
    """Horizon (tokens per completion)."""
    reward_scale: float = 1.0
    """Reward per unit of |n_0 - n_1| (reward units)."""
    beta: float = 0.5
    """KL coefficient of the target Q = soft-optimal policy of the bimodal reward."""
    features: str = "next_token"
    """Policy-class features: 'next_token' (shared per-token logits) or 'position' (per depth and token)."""
    n_inits: int = 8
    """Random starting points of both projections (RKL is non-convex: one optimum per mode)."""
    init_scale: float = 0.5
    """Standard deviation of the random starting parameters."""
    seed: int = 0
    """Seed of the starting points."""

    def __post_init__(self):
        if self.features not in _FEATURES:
            raise ValueError(f"features must be one of {sorted(_FEATURES)}, got {self.features!r}")
        if self.V < 2:
            raise ValueError(f"V must be >= 2 (tokens 0 and 1 define the modes), got {self.V}")

    @classmethod
    def quick(cls) -> Config:
        return cls(H=3, n_inits=3)


@dataclass(frozen=True)
class Result:
    config: Config
    diff: np.ndarray
    """(N,) n_0 - n_1 of every completion (mode A: > 0, mode B: < 0)."""
    target: np.ndarray
    """(N,) target leaf distribution Q."""
    fkl: np.ndarray
    """(N,) forward-KL projection argmin KL(Q || P_theta)."""
    rkl: np.ndarray
    """(N,) best reverse-KL projection argmin KL(P_theta || Q) over the starting points."""
    entropy: np.ndarray
    """(3,) sequence entropies [nats] of target, FKL, RKL."""
    mode_mass: np.ndarray
    """(3, 2) mass on mode A (n_0 > n_1) and mode B (n_1 > n_0) of target, FKL, RKL."""
    fkl_objective: np.ndarray
    """(2,) KL(Q || P) [nats] of the FKL and RKL solutions (FKL minimises it)."""
    rkl_objective: np.ndarray
    """(2,) KL(P || Q) [nats] of the FKL and RKL solutions (RKL minimises it)."""
    rkl_losses: np.ndarray
    """(n_inits,) KL(P || Q) reached from each starting point."""
    rkl_modes: np.ndarray
    """(n_inits, 2) mode masses reached from each starting point."""
    fkl_spread: float
    """max |P_fkl - P_fkl'| across starting points (convex: ~0)."""


def bimodal_reward(tree: TokenTree, scale: float = 1.0) -> np.ndarray:
    """``r(xi) = scale * |n_0(xi) - n_1(xi)|``, shape ``(N,)``: two modes, ``00..0`` and ``11..1``."""
    cnt = bag_of_tokens(tree)
    return scale * np.abs(cnt[:, 0] - cnt[:, 1])


def _kl(p, q):
    pos = p > 0
    return float(np.sum(p[pos] * (np.log(p[pos]) - np.log(q[pos]))))


def run(config: Config = Config(), progress: bool = False) -> Result:
    c = config
    tree = TokenTree(V=c.V, H=c.H)
    ref = uniform_policy(tree)
    ref_lp = leaf_logprobs(tree, ref)
    cnt = bag_of_tokens(tree)
    diff = cnt[:, 0] - cnt[:, 1]
    modes = np.stack([diff > 0, diff < 0])
    log_q, _ = gibbs_policy(ref_lp, bimodal_reward(tree, c.reward_scale)[None], c.beta)
    q = np.exp(log_q)
    cls = LogLinearPolicy(tree, ref, _FEATURES[c.features](tree))
    rng = np.random.default_rng(c.seed)
    inits = c.init_scale * rng.standard_normal((c.n_inits, cls.n_params))
    fkl_p, rkl_fits = [], []
    for th0 in progress_bar(inits, enabled=progress, desc=NAME):
        fkl_p.append(np.exp(fkl_projection(cls, q, theta0=th0, warn=False).leaf_logp[0]))
        rkl_fits.append(rkl_projection(cls, log_q, theta0=th0, warn=False))
    fkl = fkl_p[0]
    rkl_losses = np.array([f.loss for f in rkl_fits])
    rkl = np.exp(rkl_fits[int(np.argmin(rkl_losses))].leaf_logp[0])
    rkl_modes = np.array([[np.exp(f.leaf_logp[0])[m].sum() for m in modes] for f in rkl_fits])

    def ent(p):
        pos = p > 0
        return float(-(p[pos] * np.log(p[pos])).sum())

    dists = (q[0], fkl, rkl)
    return Result(
        config=c,
        diff=diff,
        target=q[0],
        fkl=fkl,
        rkl=rkl,
        entropy=np.array([ent(p) for p in dists]),
        mode_mass=np.array([[p[m].sum() for m in modes] for p in dists]),
        fkl_objective=np.array([_kl(q[0], fkl), _kl(q[0], rkl)]),
        rkl_objective=np.array([_kl(fkl, q[0]), _kl(rkl, q[0])]),
        rkl_losses=rkl_losses,
        rkl_modes=rkl_modes,
        fkl_spread=float(max(np.abs(p - fkl).max() for p in fkl_p)),
    )


# ---------------------------------------------------------------------------- plotting
_LABELS = (r"target $Q \propto P_{ref}\,e^{r/\beta}$", r"FKL: argmin KL$(Q\|P_\theta)$", r"RKL: argmin KL$(P_\theta\|Q)$")
_COLORS = ("0.35", COLORS[0], COLORS[1])


def plot_leaves(result: Result, ax) -> None:
    """The three leaf distributions, completions sorted by n_0 - n_1 (mode B left, mode A right)."""
    order = np.argsort(-result.diff, kind="stable")[::-1]
    x = np.arange(order.size)
    for p, lab, col, ls in zip((result.target, result.fkl, result.rkl), _LABELS, _COLORS, ("-", "-", "--")):
        ax.step(x, p[order], where="mid", color=col, ls=ls, label=lab)
    d = result.diff[order]
    for v in np.unique(d)[1:]:
        ax.axvline(np.searchsorted(d, v) - 0.5, color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlabel(r"completion, sorted by $n_0 - n_1$ (mode B $\leftarrow$ | $\rightarrow$ mode A)")
    ax.set_ylabel("probability (log scale)")
    ax.set_title("Leaf distributions")
    ax.legend(fontsize="x-small")


def plot_modes(result: Result, ax) -> None:
    """Mass on each value of n_0 - n_1: the target is bimodal, FKL spreads, RKL picks a side."""
    vals = np.unique(result.diff)
    w = 0.27
    for k, (p, lab, col) in enumerate(zip((result.target, result.fkl, result.rkl), _LABELS, _COLORS)):
        m = np.array([p[result.diff == v].sum() for v in vals])
        ax.bar(vals + (k - 1) * w, m, w, color=col, label=lab)
    ax.set_xticks(vals)
    ax.set_xlabel(r"$n_0 - n_1$ (count of token 0 minus count of token 1)")
    ax.set_ylabel("probability mass")
    ax.set_title("Where the mass goes")
    ax.legend(fontsize="x-small")


def plot_summary(result: Result, ax) -> None:
    """Entropy and mode masses of target, FKL and RKL."""
    names = ("target", "FKL", "RKL")
    x = np.arange(3)
    ax.bar(x, result.entropy, 0.6, color=_COLORS)
    for i in range(3):
        a, b = result.mode_mass[i]
        ax.annotate(f"H = {result.entropy[i]:.2f}\nA {a:.2f} | B {b:.2f}", (x[i], result.entropy[i]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8.5)
    ax.set_xticks(x, names)
    ax.set_xlabel("distribution")
    ax.set_ylabel("sequence entropy [nats]")
    ax.set_ylim(0, result.entropy.max() * 1.3)
    ax.set_title("Entropy and mass on modes A | B")


def figure(result: Result):
    with style():
        fig, axes = new_figure(1, 3, figsize=(15, 4.4))
        plot_leaves(result, axes[0])
        plot_modes(result, axes[1])
        plot_summary(result, axes[2])
        fig.suptitle(f"Projecting a bimodal target onto a {result.config.features}-feature log-linear class: "
                     "forward KL is mode covering, reverse KL mode seeking (slides 001)")
    return fig
