r"""Best-of-n with outcome vs process verifiers vs majority vote, computed exactly.

Claim (slides 002, "Not just feedback at the end of a generation", the ORM/PRM/majority table
from Lightman et al. 2023, "Let's Verify Step by Step", arXiv:2305.20050, Fig. 3): selecting
the best of ``n`` samples with a *process* reward model beats an *outcome* reward model trained
on the same samples, and both beat majority voting over final answers.

On a token tree where each step is correct or a mistake (a completion is correct iff all steps
are; a wrong completion's final answer is set by its first mistake), with ``pi_ref`` a random
policy:

* exact verifiers (outcome: correct or not; process: min over steps of step correctness) both
  reach the oracle ``pass@n = E[1 - (1 - p)^n]``;
* verifiers learned from the same ``m`` noisy-labelled samples fall below it, the process one
  less so: each step label is shared by every completion through that step, so shallow steps
  are estimated from many labels, while the outcome model sees each completion only when it is
  sampled.  Both are trained on the same labelled samples in each of ``n_label_draws`` label
  sets (each success computed exactly), so the comparison is paired: :func:`paired_difference`
  gives the mean PRM - ORM difference over label sets and its standard error, and the claim is
  made only at the ``n`` where the mean exceeds 2 standard errors;
* majority vote converges to 1 or 0 depending on whether the correct answer is the plurality
  of ``pi_ref``'s final answers; with common mistakes sharing a wrong answer it goes to 0.

Every success probability is exact (order statistics over the completion set, a multinomial
dynamic programme for the vote): only the labels of the learned verifiers are random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policies import leaf_logprobs, random_policy
from ..progress import progress_bar
from ..tree import TokenTree
from ..verifiers import (
    aggregate_steps,
    answer_distribution,
    best_of_n_success,
    learned_outcome_verifier,
    learned_process_verifier,
    majority_vote_success,
    oracle_success,
    outcome_verifier,
    process_verifier,
    random_mistake_task,
)

__all__ = [
    "NAME",
    "TITLE",
    "Config",
    "Result",
    "run",
    "paired_difference",
    "figure",
    "plot_success",
    "plot_difference",
    "plot_answers",
]

NAME = "process_outcome"
TITLE = (
    "Best-of-n: learned PRM beats learned ORM (paired, > 2 SE) beats majority vote; "
    "exact verifiers reach pass@n"
)


@dataclass(frozen=True)
class Config:
    """Reasoning tree, reference policy, label budget and the grid of n."""

    V: int = 3
    """Vocabulary size (each step chooses one of V tokens)."""
    H: int = 5
    """Number of reasoning steps."""
    P: int = 4
    """Number of prompts (problems), uniform rho0."""
    p_mistake: float = 0.2
    """Probability that a step (edge of the tree) is a mistake, independently."""
    wrong_answer: tuple[int, ...] = (1, 1, 2)
    """Wrong final answer reached after a first mistake with each token (length V, values >= 1)."""
    temperature: float = 1.0
    """Scale of the Gaussian logits of the random reference policy."""
    m_labels: int = 128
    """Number of labelled completions (sampled from pi_ref) behind each learned verifier."""
    label_noise: float = 0.1
    """Probability that a label (outcome or step) is flipped."""
    n_label_draws: int = 64
    """Independent label sets (>= 2), each shared by both learned verifiers (paired comparison)."""
    n_max_log2: int = 8
    """Largest n is 2**n_max_log2."""
    seed: int = 0
    """Seed of the task, the reference policy and the label draws."""

    def __post_init__(self) -> None:
        for name in ("V", "H", "P", "m_labels", "n_label_draws", "n_max_log2"):
            v = getattr(self, name)
            low = {"n_max_log2": 0, "n_label_draws": 2}.get(name, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if len(self.wrong_answer) != self.V:
            raise ValueError(
                f"wrong_answer must have V={self.V} entries, got {self.wrong_answer!r}"
            )
        if not 0 <= self.p_mistake <= 1:
            raise ValueError(f"p_mistake must be in [0, 1], got {self.p_mistake!r}")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise!r}")

    @classmethod
    def quick(cls) -> Config:
        """A tiny configuration for tests."""
        return cls(H=4, P=2, n_label_draws=32, n_max_log2=5)


@dataclass(frozen=True)
class Result:
    """Success probabilities against n (all of shape (len(ns),) unless stated)."""

    config: Config
    ns: np.ndarray
    """Numbers of samples n."""
    p_correct: np.ndarray
    """P_ref(correct | prompt), shape (P,)."""
    answer_probs: np.ndarray
    """P_ref(final answer = k | prompt), shape (P, K); answer 0 is the correct one."""
    oracle: np.ndarray
    """pass@n = E[1 - (1 - p)^n]."""
    orm_exact: np.ndarray
    """Best-of-n by the exact outcome verifier."""
    prm_exact: np.ndarray
    """Best-of-n by the exact process verifier (min over steps)."""
    orm_learned: np.ndarray
    """Best-of-n by learned outcome verifiers, shape (n_label_draws, len(ns))."""
    prm_learned: np.ndarray
    """Best-of-n by learned process verifiers (min over steps), shape (n_label_draws, len(ns))."""
    majority: np.ndarray
    """Majority vote over final answers (ties broken uniformly at random)."""


def run(config: Config, progress: bool = False) -> Result:
    """Compute every selection rule's exact success probability on a grid of n.

    Parameters
    ----------
    config : Config
    progress : bool
        Show a progress bar over label draws.
    """
    c = config
    tree = TokenTree(V=c.V, H=c.H, P=c.P)
    rng = np.random.default_rng(c.seed)
    task = random_mistake_task(tree, c.p_mistake, rng, wrong_answer=np.array(c.wrong_answer))
    lp = leaf_logprobs(tree, random_policy(tree, rng, temperature=c.temperature))
    ns = 2 ** np.arange(c.n_max_log2 + 1)
    oracle = oracle_success(tree, lp, task.correct, ns)
    orm = best_of_n_success(tree, lp, outcome_verifier(task), task.correct, ns)
    prm = best_of_n_success(
        tree, lp, aggregate_steps(tree, process_verifier(task)), task.correct, ns
    )
    seeds = np.random.SeedSequence(c.seed).spawn(c.n_label_draws)
    orm_l, prm_l = [], []
    for d in progress_bar(range(c.n_label_draws), enabled=progress, desc=NAME):
        # the same seed gives both verifiers the same m labelled completions
        s_o = learned_outcome_verifier(
            task, lp, c.m_labels, np.random.default_rng(seeds[d]), c.label_noise
        )
        s_p = learned_process_verifier(
            task, lp, c.m_labels, np.random.default_rng(seeds[d]), c.label_noise
        )
        orm_l.append(best_of_n_success(tree, lp, s_o, task.correct, ns))
        prm_l.append(best_of_n_success(tree, lp, aggregate_steps(tree, s_p), task.correct, ns))
    maj = majority_vote_success(tree, lp, task.answers, ns)
    return Result(
        config=c,
        ns=ns,
        p_correct=(np.exp(lp) * task.correct).sum(axis=1),
        answer_probs=answer_distribution(tree, lp, task.answers),
        oracle=oracle,
        orm_exact=orm,
        prm_exact=prm,
        orm_learned=np.array(orm_l),
        prm_learned=np.array(prm_l),
        majority=maj,
    )


def paired_difference(result: Result) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the paired difference learned PRM - learned ORM over label sets.

    .. math:: \\bar d(n) = \\frac1D\\sum_{d=1}^D \\big(s^{PRM}_d(n) - s^{ORM}_d(n)\\big), \\qquad
        \\mathrm{SE}(n) = \\frac{\\mathrm{sd}_d\\big(s^{PRM}_d(n) - s^{ORM}_d(n)\\big)}{\\sqrt D}

    (sample standard deviation, ``ddof = 1``).  Label set ``d`` trains both verifiers on the
    same labelled completions, so the difference removes the label-set-to-label-set variation
    that both share.  Each ``s_d(n)`` is an exact success probability; the only randomness is
    the labels.  Returns two arrays of shape ``(len(ns),)``.
    """
    d = result.prm_learned - result.orm_learned
    return d.mean(axis=0), d.std(axis=0, ddof=1) / np.sqrt(d.shape[0])


def _significant(result: Result) -> np.ndarray:
    """``n >= 2`` where the mean PRM - ORM difference exceeds 2 standard errors."""
    mean, se = paired_difference(result)
    return (result.ns >= 2) & (mean > 2 * se)


def _ns_text(ns: np.ndarray, mask: np.ndarray) -> str:
    """``"n = 2-256"`` for a contiguous run, else the list of n."""
    sel = ns[mask]
    if sel.size == 0:
        return "no n"
    idx = np.flatnonzero(mask)
    if np.all(np.diff(idx) == 1) and sel.size > 2:
        return f"n = {sel[0]}-{sel[-1]}"
    return "n = " + ", ".join(str(v) for v in sel)


def plot_success(result: Result, ax) -> None:
    """Success probability against n (log x) for every selection rule (learned: mean over label sets)."""
    ns = result.ns
    D = result.orm_learned.shape[0]
    ax.plot(ns, result.oracle, color="k", lw=2.5, label="oracle pass@n = exact ORM = exact PRM")
    ax.plot(ns, result.orm_exact, ls="none", marker="o", mfc="none", color="C0", label="exact ORM")
    ax.plot(
        ns, result.prm_exact, ls="none", marker="x", color="C1", label="exact PRM (min over steps)"
    )
    for arr, col, name in (
        (result.prm_learned, "C1", "learned PRM"),
        (result.orm_learned, "C0", "learned ORM"),
    ):
        ax.plot(ns, arr.mean(axis=0), color=col, label=f"{name} (mean over {D} label sets)")
    ax.plot(ns, result.majority, color="C2", marker=".", label="majority vote")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("n (samples from $\\pi_{ref}$)")
    ax.set_ylabel("P(selected answer is correct) [probability]")
    c = result.config
    ax.set_title(f"Best-of-n, m={c.m_labels} labels, noise={c.label_noise}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)


def plot_difference(result: Result, ax) -> None:
    """Paired difference learned PRM - learned ORM with ``± 2 SE`` error bars; filled markers
    where the mean exceeds 2 SE."""
    ns = result.ns
    mean, se = paired_difference(result)
    sig = _significant(result)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.errorbar(ns, mean, yerr=2 * se, color="C1", lw=1.2, capsize=3, label="mean $\\pm$ 2 SE")
    ax.plot(ns[sig], mean[sig], ls="none", marker="o", color="C1", label="mean > 2 SE")
    ax.plot(
        ns[~sig],
        mean[~sig],
        ls="none",
        marker="o",
        mfc="white",
        color="C1",
        label="not significant",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (samples from $\\pi_{ref}$)")
    ax.set_ylabel("success(PRM) - success(ORM) [probability]")
    D = result.prm_learned.shape[0]
    ax.set_title(
        f"Learned PRM - ORM, paired over {D} label sets:\n> 2 SE at {_ns_text(ns, sig)}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper right")


def plot_answers(result: Result, ax) -> None:
    """Stacked bars of ``pi_ref``'s final-answer distribution per prompt (answer 0 is correct).

    Majority vote tends to 1 on prompts whose correct answer is the strict plurality and to 0
    on the others; best-of-n with a perfect verifier only needs ``P(correct) > 0``.
    """
    q = result.answer_probs
    x = np.arange(q.shape[0])
    bottom = np.zeros(q.shape[0])
    for k in range(q.shape[1]):
        ax.bar(
            x,
            q[:, k],
            bottom=bottom,
            color="C2" if k == 0 else f"C{(k + 3) % 8}",
            label="correct answer" if k == 0 else f"wrong answer {k}",
        )
        bottom += q[:, k]
    plural = q.argmax(axis=1) == 0
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"prompt {i}\n{'MV -> 1' if ok else 'MV -> 0'}" for i, ok in enumerate(plural)], fontsize=8
    )
    ax.set_ylabel("$P_{ref}$(final answer)")
    ax.set_ylim(0, 1.25)
    ax.set_title("Final answers of $\\pi_{ref}$ (why majority vote fails)")
    ax.legend(fontsize=8, ncol=3, loc="upper center")


def figure(result: Result):
    """Three panels: success against n, the paired PRM - ORM difference, and pi_ref's answers."""
    from ..plotting import new_figure, style

    sig = _ns_text(result.ns, _significant(result))
    with style():
        fig, axes = new_figure(1, 3, figsize=(17.0, 5.6))
        plot_success(result, axes[0])
        plot_difference(result, axes[1])
        plot_answers(result, axes[2])
        fig.suptitle(
            f"At equal labels a learned process verifier beats a learned outcome verifier "
            f"(by > 2 SE at {sig}); both beat majority voting"
        )
    return fig
