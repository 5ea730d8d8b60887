r"""Isomorphic classes: two-stage RLHF = DPO exactly, whatever the coverage (slides 001).

Claim (Swamy et al. 2025, arXiv:2503.01067; slides 001, "When are two-stage RLHF and DPO
equivalent?  If (1) Pi <-> R and (2) all projections exact"): with tabular rewards and the
tabular policy class of finite log-ratios to ``pi_ref`` (``TabularPolicy(tree, pi_ref)``), the
map ``r -> pi_ref exp(r/beta)/Z`` is a bijection between the classes (up to per-prompt
constants), DPO's loss is the Bradley–Terry loss of the implicit reward, so two-stage RLHF
(reward MLE, then the soft-optimal policy) and DPO have *the same set of optima* — at every
coverage of the pair distribution, not only at full coverage.

Setup: a forest of ``P`` prompts, ``pi_ref`` random with a fraction ``zero_fraction`` of its
(node, token) probabilities exactly 0 (partial support), a tabular gold reward, and for each
coverage ``c`` a pair distribution ``mu`` = ``pi_ref`` restricted to a random subset ``S`` of
``c`` times its support, renormalised.  The data are the population (infinite-data) preferences
on ``mu`` (:func:`~toyrlhf.preferences.population_preferences`), so every MLE is attained and
the comparison graph on ``S`` is complete.

What is identified, and what is compared
----------------------------------------
Under partial coverage both optima are *sets*: the margins ``r(xi) - r(xi')`` on ``S`` are
pinned down, the rewards of completions outside ``S`` (and the mass on ``S``) are not.  The
two solvers (Newton-CG on the BT loss for RLHF, L-BFGS on DPO's loss over policy logits)
return different *points* of the same set, so the raw ``max |P_rlhf - P_dpo|`` is ~0 only at
full coverage.  The table therefore reports, per coverage:

* ``margin``: ``max |beta rho_dpo - (r_mle(xi+) - r_mle(xi-))|`` over the data — the
  optima's identified coordinates;
* ``canonical``: ``max |P_rlhf - P_dpo|`` after mapping both to the same representative of
  the set (implicit reward centred on ``S`` per prompt, 0 outside ``S``) — ~1e-7;
* ``conditional``: ``max |P_rlhf(.|S) - P_dpo(.|S)|``, no representative needed;
* ``raw``: ``max |P_rlhf - P_dpo|`` of the returned points (0 at full coverage only);
* ``loss_gap``: ``L_dpo - L_rlhf`` (equal optimal values).

Contrast: the unrestricted class
--------------------------------
DPO over ``TabularPolicy(tree, base)`` with a full-support base (``pi_ref`` smoothed by
``base_eps``) can put mass where ``pi_ref`` has none: the loss only sees log-ratios on ``S``.
RLHF keeps exactly zero there.  The DPO run from that base ends with mass outside
``supp(pi_ref)``, and the whole segment ``(1 - t) P_rlhf + t U_out`` (``U_out`` uniform outside
the support) has the *same* DPO loss for every ``t < 1`` (the slides' ``(0.5, 0.5, 0) ->
(0.1, 0, 0.9)`` example, here on a tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plotting import COLORS, new_figure, style
from ..policies import TabularPolicy, leaf_logprobs, policy_from_logits, random_policy
from ..preferences import population_preferences
from ..progress import progress_bar
from ..projections import bt_loss, dpo, dpo_loss, reward_mle, soft_optimal_policy
from ..rewards import TabularReward, random_tabular_reward
from ..tree import TokenTree

__all__ = ["NAME", "TITLE", "Config", "Result", "run", "figure", "plot_table", "plot_discrepancy",
           "plot_distributions", "plot_unrestricted_edge", "canonical_policy", "policy_from_leaf_probs"]

NAME = "isomorphic"
TITLE = "Isomorphic classes: tabular RLHF = tabular DPO to 1e-7 at every coverage; an unrestricted class leaves supp(pi_ref)"


@dataclass(frozen=True)
class Config:
    """Tree, reference support, coverage levels and solver tolerance."""

    V: int = 3
    """Vocabulary size."""
    H: int = 3
    """Horizon (tokens per completion)."""
    P: int = 2
    """Number of prompts (uniform rho0)."""
    beta: float = 0.5
    """KL coefficient beta of RLHF and DPO."""
    ref_temperature: float = 1.0
    """Scale of the Gaussian logits of the random reference policy."""
    zero_fraction: float = 0.25
    """Fraction of (node, token) pairs where pi_ref is exactly 0 (partial support)."""
    coverages: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.1)
    """Fractions of supp(pi_ref) that the pair distribution covers (at least 2 completions per prompt)."""
    base_eps: float = 0.05
    """Per-node uniform mixing of the full-support base of the unrestricted class: (1-eps) pi_ref + eps/V."""
    edge_points: int = 11
    """Points t in [0, 0.99] on the segment (1-t) P_rlhf + t U_outside drawn for the unrestricted class."""
    example: int = 2
    """Index into coverages of the level whose leaf distributions are drawn."""
    tol: float = 1e-12
    """Gradient tolerance of the reward MLE and of DPO's L-BFGS."""
    seed: int = 0
    """Seed of pi_ref, the gold reward and the covered subsets."""

    @classmethod
    def quick(cls) -> Config:
        return cls(coverages=(1.0, 0.5, 0.25), edge_points=5, example=1)


@dataclass(frozen=True)
class Result:
    config: Config
    coverages: np.ndarray
    """(C,) requested coverage fractions."""
    n_covered: np.ndarray
    """(C, P) completions covered per prompt."""
    n_support: np.ndarray
    """(P,) completions in supp(pi_ref) per prompt."""
    margin: np.ndarray
    """(C,) max |DPO margin - RLHF reward margin| over the data (identified coordinates).

    Limited by DPO's L-BFGS, which stops when the loss no longer changes in float64: pairs of
    weight ~1e-4 keep margin errors up to ~1e-6 (weighted by their weight the error is ~1e-9)."""
    canonical: np.ndarray
    """(C,) max |P_rlhf - P_dpo| after mapping both to the canonical representative."""
    conditional: np.ndarray
    """(C,) max |P_rlhf(.|S) - P_dpo(.|S)| on the covered set S."""
    raw: np.ndarray
    """(C,) max |P_rlhf - P_dpo| of the solvers' returned points."""
    loss_gap: np.ndarray
    """(C,) DPO optimal loss minus the BT loss of the reward MLE."""
    mass_on_S: np.ndarray
    """(C, 2) mass on the covered set (averaged over prompts): RLHF, DPO."""
    outside_rlhf: np.ndarray
    """(C,) RLHF mass outside supp(pi_ref) (exactly 0)."""
    outside_dpo_iso: np.ndarray
    """(C,) mass outside supp(pi_ref) of DPO over the isomorphic class (exactly 0)."""
    outside_dpo_free: np.ndarray
    """(C,) mass outside supp(pi_ref) of DPO over the unrestricted class, run from the base."""
    outside_base: float
    """Mass outside supp(pi_ref) of the unrestricted class's starting (base) policy."""
    margin_free: np.ndarray
    """(C,) max |margin| error of the unrestricted DPO run against the reward MLE."""
    loss_gap_free: np.ndarray
    """(C,) unrestricted DPO loss minus the BT loss of the reward MLE."""
    edge_t: np.ndarray
    """(E,) outside mass t along the segment (1-t) P_rlhf + t U_out (example coverage)."""
    edge_loss: np.ndarray
    """(E,) DPO loss along that segment (constant: all are DPO optima of the unrestricted class)."""
    example_ref: np.ndarray
    """(N,) P_ref of prompt 0 (example coverage)."""
    example_rlhf: np.ndarray
    """(N,) P_rlhf of prompt 0."""
    example_dpo: np.ndarray
    """(N,) P_dpo (isomorphic class) of prompt 0."""
    example_free: np.ndarray
    """(N,) P_dpo (unrestricted class) of prompt 0."""
    example_covered: np.ndarray
    """(N,) bool, covered set S of prompt 0."""


def policy_from_leaf_probs(tree: TokenTree, probs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Conditionals of the autoregressive policy with leaf distribution ``probs`` ``(P, N)``.

    ``pi(a|s) = M(s.a) / M(s)`` with node marginals ``M`` summed up the tree (loop over depth);
    nodes of mass 0 get the uniform conditional.
    """
    q = np.asarray(probs, dtype=float)
    out = [None] * tree.H
    cur = q
    for h in range(tree.H - 1, -1, -1):
        child = cur.reshape(tree.P, tree.V**h, tree.V)
        parent = child.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.where(parent > 0, child / np.where(parent > 0, parent, 1.0), 1.0 / tree.V)
            out[h] = np.log(cond)
        cur = parent[..., 0]
    return tuple(out)


def canonical_policy(tree: TokenTree, log_pi_ref, leaf_logp, covered, beta: float) -> np.ndarray:
    """The canonical representative of a policy's class of DPO/RLHF optima, as leaf probs ``(P, N)``.

    Implicit reward ``r = beta log(P/P_ref)`` on the covered set ``S``, centred per prompt on
    ``S``, and 0 on the rest of ``supp(pi_ref)``; then its soft-optimal policy.  Two policies
    with the same margins on ``S`` (the identified coordinates, for a connected comparison graph
    on ``S``) map to the same representative.
    """
    ref_lp = leaf_logprobs(tree, log_pi_ref)
    lp = np.asarray(leaf_logp, dtype=float)
    r = np.zeros_like(lp)
    with np.errstate(invalid="ignore"):
        d = beta * (lp - ref_lp)
    r[covered] = d[covered]
    r -= np.where(covered, r, 0).sum(axis=1, keepdims=True) / covered.sum(axis=1, keepdims=True)
    r[~covered] = 0.0
    log_pi = soft_optimal_policy(tree, log_pi_ref, r, beta).log_pi
    with np.errstate(under="ignore"):
        return np.exp(leaf_logprobs(tree, log_pi))


def _covered_sets(tree, supp, coverage, u):
    """Random subset of each prompt's support with ``round(coverage * |supp|)`` (>= 2) completions."""
    S = np.zeros_like(supp)
    for p in range(tree.P):  # loop over prompts only
        idx = np.flatnonzero(supp[p])
        k = min(idx.size, max(2, int(round(coverage * idx.size))))
        S[p, idx[np.argsort(u[p, idx])[:k]]] = True
    return S


def _margins(leaf_logp, ref_lp, cidx, ridx, beta):
    """DPO margins ``beta [log P/P_ref (xi+) - log P/P_ref (xi-)]`` of the data (flat indices)."""
    d, q = leaf_logp.ravel(), ref_lp.ravel()
    return beta * ((d[cidx] - q[cidx]) - (d[ridx] - q[ridx]))


def _conditional(P, S):
    """``P(.|S)`` per prompt."""
    PS = np.where(S, P, 0.0)
    return PS / PS.sum(axis=1, keepdims=True)


def run(config: Config = Config(), progress: bool = False) -> Result:
    c = config
    rng = np.random.default_rng(c.seed)
    tree = TokenTree(V=c.V, H=c.H, P=c.P)
    ref = random_policy(tree, rng, temperature=c.ref_temperature, zero_fraction=c.zero_fraction)
    ref_lp = leaf_logprobs(tree, ref)
    gold = random_tabular_reward(tree, rng)
    u = rng.random(ref_lp.shape)
    supp = np.isfinite(ref_lp)
    with np.errstate(divide="ignore"):
        base = policy_from_logits(tree, [np.log((1 - c.base_eps) * np.exp(r) + c.base_eps / c.V) for r in ref])
    iso_cls = TabularPolicy(tree, ref)
    free_cls = TabularPolicy(tree, base)
    with np.errstate(under="ignore"):
        outside_base = tree.average((np.exp(leaf_logprobs(tree, base)) * ~supp).sum(axis=1))
    C = len(c.coverages)
    keys = ("margin", "canonical", "conditional", "raw", "loss_gap", "outside_rlhf", "outside_dpo_iso",
            "outside_dpo_free", "margin_free", "loss_gap_free")
    out = {k: np.zeros(C) for k in keys}
    mass_S = np.zeros((C, 2))
    n_cov = np.zeros((C, tree.P), dtype=int)
    example = {}
    for i, cov in enumerate(progress_bar(c.coverages, enabled=progress, desc=NAME)):
        S = _covered_sets(tree, supp, cov, u)
        n_cov[i] = S.sum(axis=1)
        with np.errstate(divide="ignore"):
            mu = np.where(S, ref_lp, -np.inf)
        mu = mu - np.logaddexp.reduce(mu, axis=1, keepdims=True)
        data = population_preferences(tree, reward=gold, leaf_logp_pair=mu)
        # two-stage RLHF: tabular reward MLE, then the exact soft-optimal policy
        rfit = reward_mle(data, TabularReward(tree), tol=c.tol, warn=False)
        lp_r = leaf_logprobs(tree, soft_optimal_policy(tree, ref, rfit.reward, c.beta).log_pi)
        # DPO over the isomorphic class, and over the unrestricted one
        dfit = dpo(data, iso_cls, ref, c.beta, tol=c.tol, warn=False)
        ffit = dpo(data, free_cls, ref, c.beta, tol=c.tol, warn=False)
        with np.errstate(under="ignore"):
            P_r, P_d, P_f = np.exp(lp_r), np.exp(dfit.leaf_logp), np.exp(ffit.leaf_logp)
        cidx, ridx = data.flat_indices(tree)
        m_mle = rfit.reward.ravel()[cidx] - rfit.reward.ravel()[ridx]
        bt = bt_loss(data, TabularReward(tree), rfit.params)[0]
        out["margin"][i] = np.abs(_margins(dfit.leaf_logp, ref_lp, cidx, ridx, c.beta) - m_mle).max()
        out["canonical"][i] = np.abs(canonical_policy(tree, ref, lp_r, S, c.beta)
                                     - canonical_policy(tree, ref, dfit.leaf_logp, S, c.beta)).max()
        out["conditional"][i] = np.abs(_conditional(P_r, S) - _conditional(P_d, S)).max()
        out["raw"][i] = np.abs(P_r - P_d).max()
        out["loss_gap"][i] = dfit.loss - bt
        out["outside_rlhf"][i] = tree.average((P_r * ~supp).sum(axis=1))
        out["outside_dpo_iso"][i] = tree.average((P_d * ~supp).sum(axis=1))
        out["outside_dpo_free"][i] = tree.average((P_f * ~supp).sum(axis=1))
        out["margin_free"][i] = np.abs(_margins(ffit.leaf_logp, ref_lp, cidx, ridx, c.beta) - m_mle).max()
        out["loss_gap_free"][i] = ffit.loss - bt
        mass_S[i] = tree.average((P_r * S).sum(axis=1)), tree.average((P_d * S).sum(axis=1))
        if i == c.example:
            # the unrestricted class's optimal set contains (1 - t) P_rlhf + t U_out for all t < 1
            U = np.where(supp, 0.0, 1.0)
            U = U / np.maximum(U.sum(axis=1, keepdims=True), 1)
            ts = np.linspace(0.0, 0.99, c.edge_points)
            uniform_base = policy_from_logits(tree, [np.zeros((tree.P, tree.V**h, tree.V)) for h in range(tree.H)])
            full = TabularPolicy(tree, uniform_base)
            edge = []
            for t in ts:
                if t == 0:  # P_rlhf itself has zeros: evaluate it in the isomorphic class
                    log_pi_r = soft_optimal_policy(tree, ref, rfit.reward, c.beta).log_pi
                    edge.append(dpo_loss(iso_cls, iso_cls.theta_from_policy(log_pi_r), data, ref_lp, c.beta)[0])
                    continue
                q = (1 - t) * P_r + t * U
                theta = np.concatenate([(lp + np.log(tree.V)).ravel() for lp in policy_from_leaf_probs(tree, q)])
                edge.append(dpo_loss(full, theta, data, ref_lp, c.beta)[0])
            example = dict(edge_t=ts, edge_loss=np.array(edge), example_ref=np.exp(ref_lp[0]), example_rlhf=P_r[0],
                           example_dpo=P_d[0], example_free=P_f[0], example_covered=S[0].copy())
    return Result(config=c, coverages=np.asarray(c.coverages, dtype=float), n_covered=n_cov,
                  n_support=supp.sum(axis=1), mass_on_S=mass_S, outside_base=float(outside_base),
                  **out, **example)


# ---------------------------------------------------------------------------- plotting
_ROWS = (
    ("margin", "max |margin diff|"),
    ("canonical", "max |dP| canonical"),
    ("conditional", "max |dP(.|S)|"),
    ("raw", "max |dP| raw points"),
    ("loss_gap", "L_dpo - L_rlhf"),
    ("outside_dpo_free", "unrestricted: P(outside)"),
)


def plot_table(result: Result, ax) -> None:
    """The numerical table: discrepancies between RLHF and DPO at each coverage."""
    ax.set_axis_off()
    cols = [f"{c:.0%}" for c in result.coverages]
    cells = [[f"{v:.1e}" for v in getattr(result, key)] for key, _ in _ROWS]
    cells.insert(0, [f"{n}" for n in result.n_covered.sum(axis=1)])
    labels = ["covered completions"] + [lab for _, lab in _ROWS]
    tab = ax.table(cellText=cells, rowLabels=labels, colLabels=cols, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8.5)
    tab.scale(1.0, 1.35)
    ax.set_title(f"RLHF vs DPO by coverage of supp($\\pi_{{ref}}$) ({int(result.n_support.sum())} completions)", fontsize=11)


def plot_discrepancy(result: Result, ax) -> None:
    """RLHF vs DPO discrepancies against coverage (log scale), with the 1e-6 line."""
    x = result.coverages
    floor = 1e-17
    for key, label, mk in (("margin", "margins on the data", "o"), ("canonical", "P, canonical representative", "s"),
                           ("conditional", r"$P(\cdot\,|\,S)$", "^"), ("raw", "P, raw returned points", "x")):
        ax.plot(x, np.maximum(getattr(result, key), floor), marker=mk, label=label)
    ax.axhline(1e-6, color="k", ls=":", lw=1, label="1e-6")
    ax.set_yscale("log")
    ax.set_xlabel(r"coverage: fraction of supp($\pi_{ref}$) in the pair distribution")
    ax.set_ylabel("max absolute difference")
    ax.set_title("Isomorphic classes: same optima at every coverage")
    ax.legend(fontsize="x-small")


def plot_distributions(result: Result, ax) -> None:
    """Leaf distributions (prompt 0) at the example coverage: ref, RLHF, DPO, unrestricted DPO."""
    N = result.example_ref.size
    x = np.arange(N)
    w = 0.22
    for k, (lab, p) in enumerate(((r"$\pi_{ref}$", result.example_ref), ("RLHF", result.example_rlhf),
                                  ("DPO, isomorphic class", result.example_dpo),
                                  ("DPO, unrestricted class", result.example_free))):
        ax.bar(x + (k - 1.5) * w, p, w, label=lab)
    zero = result.example_ref == 0
    for j in np.flatnonzero(zero):
        ax.axvspan(j - 0.5, j + 0.5, color="0.85", lw=0, zorder=0)
    for j in np.flatnonzero(result.example_covered):
        ax.plot(j, -0.01, marker="^", color="k", ms=4, clip_on=False)
    cov = result.coverages[result.config.example]
    ax.set_xlabel(r"completion (leaf index; grey: $\pi_{ref}=0$, $\blacktriangle$: covered)")
    ax.set_ylabel("probability")
    ax.set_title(f"Prompt 0 at coverage {cov:.0%}")
    ax.legend(fontsize="x-small")


def plot_unrestricted_edge(result: Result, ax) -> None:
    """DPO loss of (1-t) P_rlhf + t U_outside: flat, so DPO's optima leave supp(pi_ref)."""
    ax.plot(result.edge_t, result.edge_loss, marker="o", color=COLORS[3], label="DPO loss on the segment")
    ax.plot(result.edge_t[0], result.edge_loss[0], "s", color=COLORS[1], ms=9, label="RLHF (t = 0)")
    spread = np.ptp(result.edge_loss)
    ax.set_ylim(result.edge_loss[0] - 0.05, result.edge_loss[0] + 0.05)
    ax.set_xlabel(r"mass outside supp($\pi_{ref}$), $t$")
    ax.set_ylabel("DPO loss [nats]")
    ax.set_title(f"Unrestricted class: optimum is flat in $t$ (spread {spread:.0e})")
    ax.legend(fontsize="x-small")


def figure(result: Result):
    with style():
        fig, axes = new_figure(2, 2, figsize=(12, 8.5))
        plot_table(result, axes[0, 0])
        plot_discrepancy(result, axes[0, 1])
        plot_distributions(result, axes[1, 0])
        plot_unrestricted_edge(result, axes[1, 1])
        fig.suptitle("Tabular rewards <-> tabular policies with finite log-ratios: RLHF and DPO share their optima "
                     "at any coverage (slides 001)")
    return fig
