r"""Likelihood displacement: DPO can lower the chosen response's likelihood (Razin et al. 2024).

Claim (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct
Preference Optimization", arXiv:2410.08847): when completions share parameters, gradient
descent on the DPO loss of a single pair ``y+ > y-`` can *decrease* ``log pi(y+)`` while it
increases the margin, moving the mass to other completions — possibly unrelated ones; the sign
is governed by the similarity of the two responses' embeddings (the CHES score).  A tabular
policy cannot do this for a single pair.

Model: log-linear policies ``pi_theta(a|s) ∝ pi_ref(a|s) exp(theta . psi(s, a))``
(:class:`~toyrlhf.policies.LogLinearPolicy`) on a one-step tree (``H = 1``) with ``V``
completions, each with a fixed embedding ``psi(y) ∈ R^d`` (``d < V``: parameters are shared).
Embeddings are clustered (``n_clusters`` centres plus noise): completions in one cluster are
"similar in meaning", as *No* and *Never* in the paper.  Half the pairs compare two completions
of one cluster, half two of different clusters.

CHES for this model (exact)
---------------------------
With ``g(y) = grad_theta log P_theta(y) = sum_h [psi(s_h, a_h) - E_{pi(.|s_h)} psi(s_h, .)]``
— the completion's *centred* embedding (its features minus their policy mean, summed over its
tokens) — gradient flow on the DPO loss ``-log sigmoid(beta rho)`` gives

.. math:: \frac{d}{dt}\log P_\theta(y^+) = -\beta\,\sigma(-\beta\rho)\;\mathrm{CHES},
          \qquad \mathrm{CHES} = \langle g(y^+), g(y^-)\rangle - \|g(y^+)\|^2,

the centred hidden-embedding similarity of Razin et al. (their Thm. 4 and eq. (4):
``<sum_k h+_k, sum_k h-_k> - ||sum_k h+_k||^2``, with hidden embeddings ``h``; here the trainable
and fixed roles of ``theta`` and ``psi`` are swapped, and the exact statement needs the centring).
So the chosen likelihood falls exactly while CHES > 0.  The experiment checks this identity at
every step, reports how well CHES at initialisation *ranks* the total displacement after
training (Spearman), and compares with the paper's uncentred score ``<psi+, psi-> - ||psi+||^2``.

Negative control: for the tabular class (free logits per node), a single pair cannot displace:
at the node where ``y+`` and ``y-`` diverge the chosen token's logit rises and the rejected one's
falls, every other node on ``y+``'s path only raises ``y+``, so ``log P(y+)`` increases at every
step (even for finite steps).  Checked on the same pairs (``H = 1``) and on random pairs of a
``tree_V``-ary tree of depth ``tree_H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import spearmanr

from ..plotting import COLORS, new_figure, style
from ..policies import LogLinearPolicy, TabularPolicy, leaf_logprobs, random_policy
from ..preferences import preference_pairs
from ..progress import progress_bar
from ..projections import dpo_loss
from ..tree import TokenTree

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "ches_score", "plot_example",
           "plot_ches_scatter", "plot_tabular_control"]

NAME = "likelihood_displacement"
TITLE = "Likelihood displacement: feature-sharing DPO lowers the chosen log-prob; CHES predicts it, tabular cannot"


@dataclass(frozen=True)
class Config:
    """Embeddings, pairs and DPO gradient-descent schedule."""

    V: int = 40
    """Number of completions (one-step tree, H = 1)."""
    d: int = 6
    """Embedding dimension (d < V: parameters are shared across completions)."""
    n_clusters: int = 8
    """Clusters of similar completions (completion y belongs to cluster y mod n_clusters)."""
    cluster_noise: float = 0.3
    """Spread of the embeddings around their cluster centre (relative to the centres' scale)."""
    within_fraction: float = 0.5
    """Fraction of pairs that compare two completions of the same cluster."""
    n_pairs: int = 150
    """Number of (chosen, rejected) pairs, each trained on alone from pi_ref."""
    beta: float = 0.1
    """DPO's beta."""
    lr: float = 5.0
    """Gradient-descent step size on the DPO loss (small enough to follow gradient flow)."""
    steps: int = 200
    """Gradient-descent steps per pair."""
    ref_temperature: float = 1.0
    """Scale of the Gaussian logits of pi_ref (the log-linear and tabular classes are centred on it)."""
    tree_V: int = 3
    """Vocabulary of the tree used for the multi-step tabular control."""
    tree_H: int = 3
    """Depth of that tree."""
    n_tree_pairs: int = 20
    """Random pairs of the tabular tree control."""
    seed: int = 0
    """Seed of pi_ref, the embeddings and the pairs."""

    @classmethod
    def quick(cls) -> Config:
        return cls(n_pairs=30, steps=60, n_tree_pairs=5)


@dataclass(frozen=True)
class Result:
    config: Config
    pairs: np.ndarray
    """(M, 2) chosen and rejected completion of each pair."""
    within: np.ndarray
    """(M,) whether the pair lies within one cluster."""
    ches0: np.ndarray
    """(M,) centred CHES at initialisation."""
    ches0_uncentred: np.ndarray
    """(M,) the paper's uncentred score <psi+, psi-> - |psi+|^2 at initialisation."""
    flow_rate0: np.ndarray
    """(M,) exact gradient-flow rate d log P(y+)/dt at initialisation, -grad log P(y+) . grad L."""
    chosen: np.ndarray
    """(M, T+1) log P(y+) along DPO gradient descent (log-linear class)."""
    rejected: np.ndarray
    """(M, T+1) log P(y-) along DPO gradient descent (log-linear class)."""
    ches_t: np.ndarray
    """(M, T) centred CHES at each step (at the parameters before the step)."""
    identity_err: np.ndarray
    """(M,) max over steps of |d log P(y+)/dt + beta sigma(-beta rho) CHES| (exact identity; ~1e-16)."""
    tab_chosen: np.ndarray
    """(M, T+1) log P(y+) along DPO gradient descent, tabular class, same pairs."""
    tree_chosen: np.ndarray
    """(M', T+1) log P(y+) along DPO gradient descent, tabular class on a tree."""
    example: int
    """Index of the example pair (largest initial CHES)."""
    example_logp: np.ndarray
    """(T+1, V) all completions' log-probs along training of the example pair."""
    example_gainer: int
    """Completion (not y+ or y-) that gained the most probability mass in the example."""
    example_cosine: np.ndarray
    """(2,) cosine of psi(gainer) with psi(y+) and with psi(y-)."""
    spearman: float
    """Spearman correlation of initial centred CHES with the total change of log P(y+)."""
    spearman_pvalue: float
    """Its p-value (no-correlation null)."""
    spearman_uncentred: float
    """The same for the uncentred score."""
    step_sign_agreement: float
    """Fraction of (pair, step) where the step's change of log P(y+) has the sign of -CHES_t."""


def _grad_logp(policy_class, theta, prompt: int, leaf: int, log_pi) -> np.ndarray:
    """``grad_theta log P_theta(leaf | prompt)`` via the class's vector-Jacobian product."""
    tree = policy_class.tree
    g = np.zeros((tree.P, tree.n_leaves))
    g[prompt, leaf] = 1.0
    return policy_class.leaf_logprobs_vjp(theta, g, log_pi=log_pi)


def ches_score(policy_class, theta, prompt: int, chosen: int, rejected: int) -> float:
    """Centred hidden-embedding similarity ``<g+, g-> - |g+|^2`` of a pair at ``theta``.

    ``g = grad_theta log P_theta(y)`` is the sum over the completion's tokens of its features
    minus their mean under the current policy (Razin et al. 2024, arXiv:2410.08847, eq. (4),
    with centred embeddings).  Under DPO gradient flow on this pair alone,
    ``d log P(y+)/dt = -beta sigmoid(-beta rho) * CHES``: positive CHES means displacement.
    """
    log_pi = policy_class.conditionals(theta)
    gp = _grad_logp(policy_class, theta, prompt, chosen, log_pi)
    gm = _grad_logp(policy_class, theta, prompt, rejected, log_pi)
    return float(gp @ gm - gp @ gp)


def _dpo_descent(policy_class, data, ref_lp, beta, lr, steps, prompt, chosen, rejected, track_ches=False,
                 keep_all=False):
    """Plain gradient descent on the single-pair DPO loss from ``theta = 0``."""
    theta = policy_class.init()
    lps, ches, ident = [], [], 0.0
    for _ in range(steps + 1):
        log_pi = policy_class.conditionals(theta)
        lp = leaf_logprobs(policy_class.tree, log_pi)[prompt]
        lps.append(lp.copy() if keep_all else lp[[chosen, rejected]])
        if len(lps) == steps + 1:
            break
        _, grad = dpo_loss(policy_class, theta, data, ref_lp, beta)
        if track_ches:
            gp = _grad_logp(policy_class, theta, prompt, chosen, log_pi)
            gm = _grad_logp(policy_class, theta, prompt, rejected, log_pi)
            c = gp @ gm - gp @ gp
            rho = (lp[chosen] - ref_lp[prompt, chosen]) - (lp[rejected] - ref_lp[prompt, rejected])
            rate = -(gp @ grad)
            ident = max(ident, abs(rate + beta * expit(-beta * rho) * c))
            ches.append((c, rate))
        theta = theta - lr * grad
    return np.array(lps), np.array(ches), ident


def run(config: Config = Config(), progress: bool = False) -> Result:
    c = config
    rng = np.random.default_rng(c.seed)
    tree = TokenTree(V=c.V, H=1)
    ref = random_policy(tree, rng, temperature=c.ref_temperature)
    ref_lp = leaf_logprobs(tree, ref)
    cluster = np.arange(c.V) % c.n_clusters
    centres = rng.standard_normal((c.n_clusters, c.d))
    psi = (centres[cluster] + c.cluster_noise * rng.standard_normal((c.V, c.d))) / np.sqrt(c.d)
    loglin = LogLinearPolicy(tree, ref, (psi[None, None],))
    tab = TabularPolicy(tree, ref)
    idx = np.arange(c.V)
    pairs, within = [], []
    for _ in range(c.n_pairs):
        i = int(rng.integers(c.V))
        w = bool(rng.random() < c.within_fraction)
        cand = idx[(cluster == cluster[i]) & (idx != i)] if w else idx[cluster != cluster[i]]
        pairs.append((i, int(rng.choice(cand))))
        within.append(w)
    pairs = np.array(pairs)
    M, T = c.n_pairs, c.steps
    chosen = np.zeros((M, T + 1))
    rejected = np.zeros((M, T + 1))
    tab_chosen = np.zeros((M, T + 1))
    ches_t = np.zeros((M, T))
    rate0 = np.zeros(M)
    ident = np.zeros(M)
    p0 = np.exp(ref_lp[0])
    centred = psi - p0 @ psi
    ches0 = np.einsum("md,md->m", centred[pairs[:, 0]], centred[pairs[:, 1]]) - (centred[pairs[:, 0]] ** 2).sum(1)
    ches0_u = np.einsum("md,md->m", psi[pairs[:, 0]], psi[pairs[:, 1]]) - (psi[pairs[:, 0]] ** 2).sum(1)
    example = int(np.argmax(ches0))
    example_logp = None
    for m in progress_bar(range(M), enabled=progress, desc=NAME):
        i, j = pairs[m]
        data = preference_pairs([0], [i], [j])
        lps, ch, ident[m] = _dpo_descent(loglin, data, ref_lp, c.beta, c.lr, T, 0, i, j, track_ches=True,
                                         keep_all=(m == example))
        if m == example:
            example_logp = lps
            lps = lps[:, [i, j]]
        chosen[m], rejected[m] = lps[:, 0], lps[:, 1]
        ches_t[m], rate0[m] = ch[:, 0], ch[0, 1]
        tab_chosen[m] = _dpo_descent(tab, data, ref_lp, c.beta, c.lr, T, 0, i, j)[0][:, 0]
    # multi-step tabular control on a tree
    ttree = TokenTree(V=c.tree_V, H=c.tree_H)
    tref = random_policy(ttree, rng, temperature=c.ref_temperature)
    tref_lp = leaf_logprobs(ttree, tref)
    ttab = TabularPolicy(ttree, tref)
    tree_chosen = np.zeros((c.n_tree_pairs, T + 1))
    for m in range(c.n_tree_pairs):
        i, j = rng.choice(ttree.n_leaves, size=2, replace=False)
        data = preference_pairs([0], [i], [j])
        tree_chosen[m] = _dpo_descent(ttab, data, tref_lp, c.beta, c.lr, T, 0, int(i), int(j))[0][:, 0]
    # the completion (other than y+, y-) that gained the most probability mass in the example
    gain = np.exp(example_logp[-1]) - np.exp(example_logp[0])
    gain[pairs[example]] = -np.inf
    gainer = int(np.argmax(gain))
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    total = chosen[:, -1] - chosen[:, 0]
    rs = spearmanr(ches0, total)
    steps_change = np.diff(chosen, axis=1)
    return Result(
        config=c,
        pairs=pairs,
        within=np.array(within),
        ches0=ches0,
        ches0_uncentred=ches0_u,
        flow_rate0=rate0,
        chosen=chosen,
        rejected=rejected,
        ches_t=ches_t,
        identity_err=ident,
        tab_chosen=tab_chosen,
        tree_chosen=tree_chosen,
        example=example,
        example_logp=example_logp,
        example_gainer=gainer,
        example_cosine=np.array([cos(psi[gainer], psi[pairs[example, 0]]), cos(psi[gainer], psi[pairs[example, 1]])]),
        spearman=float(rs.statistic),
        spearman_pvalue=float(rs.pvalue),
        spearman_uncentred=float(spearmanr(ches0_u, total).statistic),
        step_sign_agreement=float(np.mean(np.sign(steps_change) == np.sign(-ches_t))),
    )


# ---------------------------------------------------------------------------- plotting
def plot_example(result: Result, ax) -> None:
    """log-probs of chosen, rejected, the biggest gainer and all others along training (example pair)."""
    lp = result.example_logp
    i, j = result.pairs[result.example]
    g = result.example_gainer
    steps = np.arange(lp.shape[0])
    others = np.ones(lp.shape[1], dtype=bool)
    others[[i, j, g]] = False
    for k in np.flatnonzero(others):
        ax.plot(steps, lp[:, k], color="0.8", lw=0.6, zorder=1)
    ax.plot([], [], color="0.8", lw=0.6, label="other completions")
    ax.plot(steps, lp[:, i], color=COLORS[0], lw=2.2, label=f"chosen $y^+$ = {i}")
    ax.plot(steps, lp[:, j], color=COLORS[1], lw=2.2, label=f"rejected $y^-$ = {j}")
    cs = result.example_cosine
    ax.plot(steps, lp[:, g], color=COLORS[2], lw=2.2, ls="--",
            label=f"biggest gainer {g} (cos to $y^+$ {cs[0]:+.2f})")
    ax.set_ylim(max(lp.min(), lp[:, [i, j, g]].min() - 2), 0.5)
    ax.set_xlabel("DPO gradient step")
    ax.set_ylabel(r"$\log P_\theta(y)$ [nats]")
    ax.set_title(f"Example pair (CHES = {result.ches0[result.example]:+.3f}): $y^+$ falls")
    ax.legend(fontsize="x-small", loc="lower left")


def plot_ches_scatter(result: Result, ax) -> None:
    """Initial centred CHES against the total change of log P(y+) after training, per pair."""
    total = result.chosen[:, -1] - result.chosen[:, 0]
    w = result.within
    ax.scatter(result.ches0[w], total[w], s=14, color=COLORS[3], label="same-cluster pairs")
    ax.scatter(result.ches0[~w], total[~w], s=14, color=COLORS[5], label="cross-cluster pairs")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel(r"CHES at init $\langle g^+, g^-\rangle - \|g^+\|^2$")
    ax.set_ylabel(r"$\Delta \log P(y^+)$ after training [nats]")
    ax.set_title(f"CHES ranks displacement (Spearman {result.spearman:+.2f};\n"
                 f"uncentred {result.spearman_uncentred:+.2f}; per-step sign "
                 f"{result.step_sign_agreement:.1%})", fontsize=10)
    ax.legend(fontsize="x-small")


def plot_tabular_control(result: Result, ax) -> None:
    """Tabular negative control: log P(y+) - log P_ref(y+) rises for every pair, at every step."""
    steps = np.arange(result.tab_chosen.shape[1])
    for k, row in enumerate(result.tab_chosen):
        ax.plot(steps, row - row[0], color=COLORS[0], lw=0.5, alpha=0.5, label="tabular, H = 1 (same pairs)" if k == 0 else None)
    for k, row in enumerate(result.tree_chosen):
        ax.plot(steps, row - row[0], color=COLORS[2], lw=0.8, alpha=0.8,
                label=f"tabular tree V={result.config.tree_V}, H={result.config.tree_H}" if k == 0 else None)
    lo, hi = np.percentile(result.chosen[:, -1] - result.chosen[:, 0], [10, 90])
    for k, row in enumerate(result.chosen[: min(30, len(result.chosen))]):
        ax.plot(steps, row - row[0], color=COLORS[1], lw=0.5, alpha=0.5, label="log-linear (shared features)" if k == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(min(lo, -1.0), None)
    ax.set_xlabel("DPO gradient step")
    ax.set_ylabel(r"$\log P(y^+) - \log P_{ref}(y^+)$ [nats]")
    ax.set_title("Negative control: tabular chosen log-prob only rises")
    ax.legend(fontsize="x-small", loc="lower left")


def figure(result: Result):
    with style():
        fig, axes = new_figure(1, 3, figsize=(15, 4.6))
        plot_example(result, axes[0])
        plot_ches_scatter(result, axes[1])
        plot_tabular_control(result, axes[2])
        fig.suptitle("Likelihood displacement (Razin et al. 2024): with shared features DPO lowers the chosen "
                     "likelihood\nwhile CHES > 0 and moves the mass elsewhere; a tabular policy cannot")
    return fig
