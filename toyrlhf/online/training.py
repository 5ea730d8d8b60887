"""Drivers that run a step function and record exact trajectories; iterative DPO.

:func:`train` runs any step ``step(policy_class, theta, problem, rng, **options)`` for
``n_steps`` and records, at every ``eval_every``-th step, the *exact* objective, KL to
``pi_ref``, proxy and gold reward, KL to the soft-optimal policy and pretraining
log-likelihood of the current policy (:meth:`RLProblem.evaluate`), plus the step's own sample
statistics.  A step that produces non-finite parameters or statistics stops training with
:class:`TrainingDiverged`, which names the step and carries the trajectory up to the last good
step: NaN is never written into a result.

:func:`iterative_dpo` is the offline-to-online spectrum in one parameter: ``rounds`` rounds of
(sample pairs from the current policy, label them, fit DPO on the pool); ``rounds=1`` is offline
DPO on data from the initial policy, many small rounds approach online DPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from ..preferences import preference_pairs
from ..progress import progress_bar
from ..projections import dpo, dpo_loss
from ._paths import sample_rollouts
from .exact import ascend
from .problem import RLProblem, check_choice, check_float, check_int, check_rng

__all__ = ["Trajectory", "TrainingDiverged", "train", "iterative_dpo"]


@dataclass(frozen=True)
class Trajectory:
    """A training run: exact evaluations and per-step statistics.

    Attributes
    ----------
    name : str
    steps : (E,) int, the step after which each evaluation was taken (0 = initial policy)
    objective, kl, reward, gold, kl_to_optimal, pretrain_loglik : (E,) float
        Exact values (see :class:`~toyrlhf.online.Evaluation`).
    loss : (T,) float, the step's own loss (sample estimate, or exact for exact steps)
    samples : (T + 1,) float, completions sampled so far (0 at the start)
    labels : (T + 1,) float, preference labels queried so far
    stats : dict of (T,) float arrays, further per-step statistics (``clip_frac``, ...)
    theta : (d,) float, the final parameters
    """

    name: str
    steps: np.ndarray
    objective: np.ndarray
    kl: np.ndarray
    reward: np.ndarray
    gold: np.ndarray
    kl_to_optimal: np.ndarray
    pretrain_loglik: np.ndarray
    loss: np.ndarray
    samples: np.ndarray
    labels: np.ndarray
    stats: dict = field(default_factory=dict)
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))


class TrainingDiverged(FloatingPointError):
    """Training produced non-finite parameters or statistics at ``step``.

    ``trajectory`` holds the run up to the last good step (no NaN in it).
    """

    def __init__(self, message: str, step: int, trajectory: Trajectory):
        super().__init__(message)
        self.step = step
        self.trajectory = trajectory


_EVAL_FIELDS = ("objective", "kl", "reward", "gold", "kl_to_optimal", "pretrain_loglik")


class _Recorder:
    def __init__(self, name, policy_class, problem):
        self.name, self.pc, self.problem = name, policy_class, problem
        self.steps, self.evals = [], {k: [] for k in _EVAL_FIELDS}
        self.loss, self.samples, self.labels = [], [0.0], [0.0]
        self.stats: dict[str, list] = {}
        self.theta = None

    def trajectory(self) -> Trajectory:
        T = len(self.loss)
        stats = {k: np.array(v, dtype=float) for k, v in self.stats.items() if len(v) == T}
        pre = np.array(self.evals["pretrain_loglik"], dtype=float) if self.problem.pretrain_logp is not None else np.zeros(0)
        return Trajectory(
            name=self.name,
            steps=np.array(self.steps, dtype=np.int64),
            objective=np.array(self.evals["objective"], dtype=float),
            kl=np.array(self.evals["kl"], dtype=float),
            reward=np.array(self.evals["reward"], dtype=float),
            gold=np.array(self.evals["gold"], dtype=float),
            kl_to_optimal=np.array(self.evals["kl_to_optimal"], dtype=float),
            pretrain_loglik=pre,
            loss=np.array(self.loss, dtype=float),
            samples=np.array(self.samples, dtype=float),
            labels=np.array(self.labels, dtype=float),
            stats=stats,
            theta=np.zeros(0) if self.theta is None else np.array(self.theta, dtype=float),
        )

    def diverged(self, step: int, what: str):
        raise TrainingDiverged(
            f"{self.name}: training diverged at step {step}: {what}; the trajectory up to step "
            f"{step - 1} is in the exception's .trajectory (try a smaller step size)",
            step,
            self.trajectory(),
        )

    def evaluate(self, step: int, theta) -> None:
        ev = self.problem.evaluate(log_pi=self.pc.conditionals(theta))
        vals = {k: getattr(ev, k) for k in _EVAL_FIELDS}
        bad = [k for k, v in vals.items() if np.isnan(v)]
        if bad:
            self.diverged(step, f"exact evaluation gave NaN for {bad}")
        self.steps.append(step)
        for k, v in vals.items():
            self.evals[k].append(float(v))
        self.theta = np.array(theta, dtype=float)

    def record(self, step: int, theta, info: dict) -> None:
        if not np.all(np.isfinite(theta)):
            self.diverged(step, "the parameters became non-finite (inf/NaN)")
        bad = [k for k, v in info.items() if np.isnan(v)]
        if bad:
            self.diverged(step, f"the step's statistics {bad} are NaN")
        self.loss.append(float(info.get("loss", 0.0)))
        self.samples.append(self.samples[-1] + float(info.get("samples", 0.0)))
        self.labels.append(self.labels[-1] + float(info.get("labels", 0.0)))
        for k, v in info.items():
            if k not in ("loss", "samples", "labels"):
                self.stats.setdefault(k, [np.nan] * (len(self.loss) - 1)).append(float(v))
        self.theta = np.array(theta, dtype=float)


def train(
    step,
    policy_class,
    theta0,
    problem: RLProblem,
    n_steps: int,
    rng: np.random.Generator | None = None,
    *,
    eval_every: int = 1,
    progress: bool = False,
    name: str | None = None,
    **options,
) -> Trajectory:
    """Run ``n_steps`` of ``step`` from ``theta0`` and record an exact :class:`Trajectory`.

    Parameters
    ----------
    step : callable
        ``step(policy_class, theta, problem, rng, **options) -> (theta, info)``, e.g.
        :func:`~toyrlhf.online.ppo_step` or :func:`~toyrlhf.online.mirror_descent_step`.
    rng : numpy.random.Generator, optional
        Required by sampled steps; exact steps ignore it.
    eval_every : int
        Evaluate exactly after every ``eval_every`` steps (and always at 0 and ``n_steps``).
    progress : bool
        Show a progress bar (on a terminal only).

    Raises
    ------
    TrainingDiverged
        When a step yields non-finite parameters or NaN statistics, or raises
        :class:`FloatingPointError` (a quantity beyond the float range); names the step.
    """
    if not callable(step):
        raise TypeError(f"step must be a callable step function, got {step!r}")
    n_steps = check_int("n_steps", n_steps, 0)
    eval_every = check_int("eval_every", eval_every, 1)
    if rng is not None:
        check_rng(rng)
    name = name or getattr(step, "__name__", "train")
    rec = _Recorder(name, policy_class, problem)
    theta = np.array(theta0, dtype=float)
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta0 must be finite")
    rec.evaluate(0, theta)
    for t in progress_bar(range(1, n_steps + 1), enabled=progress, desc=name, total=n_steps):
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                theta_new, info = step(policy_class, theta, problem, rng, **options)
        except TrainingDiverged:
            raise
        except FloatingPointError as exc:  # e.g. a PPO ratio beyond the float range
            rec.diverged(t, str(exc))
        rec.record(t, theta_new, info)
        theta = np.asarray(theta_new, dtype=float)
        if t % eval_every == 0 or t == n_steps:
            rec.evaluate(t, theta)
    return rec.trajectory()


def iterative_dpo(
    policy_class,
    theta0,
    problem: RLProblem,
    rng: np.random.Generator,
    *,
    rounds: int,
    pairs_per_round: int,
    steps_per_round: int = 50,
    lr: float = 1.0,
    accumulate: bool = True,
    solve: str = "gradient",
    deterministic: bool = False,
    eval_every: int = 1,
    progress: bool = False,
    name: str | None = None,
) -> Trajectory:
    """Iterative DPO: ``rounds`` of sampling pairs from the current policy, labelling, fitting DPO.

    Round ``k``: draw ``pairs_per_round`` pairs (two completions of a prompt ``s0 ~ rho0``) from
    the current policy, label them by Bradley–Terry on ``problem.reward`` (or the higher reward
    wins with ``deterministic=True``), add them to the pool (``accumulate``; else the pool is
    this round's pairs only), and fit DPO with reference ``problem.log_pi_ref`` on the pool:
    ``steps_per_round`` gradient steps of size ``lr`` on
    :func:`toyrlhf.projections.dpo_loss` from the current parameters (``solve="gradient"``), or
    the exact DPO solution :func:`toyrlhf.projections.dpo` warm-started there
    (``solve="exact"``, one recorded step per round).  ``rounds=1`` is offline DPO on data from
    the initial policy (usually ``pi_ref``); as rounds shrink to single gradient steps it
    becomes online DPO (Xiong et al. 2023, arXiv:2312.11456; slides 002 "A continuous
    spectrum").  Tied pairs are dropped and not counted as labels.
    """
    check_rng(rng)
    rounds = check_int("rounds", rounds, 1)
    pairs_per_round = check_int("pairs_per_round", pairs_per_round, 1)
    steps_per_round = check_int("steps_per_round", steps_per_round, 1)
    lr = check_float("lr", lr)
    check_choice("solve", solve, ("gradient", "exact"))
    eval_every = check_int("eval_every", eval_every, 1)
    tree = problem.tree
    rec = _Recorder(name or f"iterative_dpo(rounds={rounds})", policy_class, problem)
    theta = np.array(theta0, dtype=float)
    rec.evaluate(0, theta)
    pool = ([], [], [])
    t = 0
    for _ in progress_bar(range(rounds), enabled=progress, desc=rec.name, total=rounds):
        log_pi = policy_class.conditionals(theta)
        batch = sample_rollouts(tree, log_pi, problem.log_pi_ref, pairs_per_round, 2, rng)
        a, b = batch.leaves[0::2], batch.leaves[1::2]
        prompts = batch.prompts[0::2]
        ra, rb = problem.reward[prompts, a], problem.reward[prompts, b]
        u = rng.random(pairs_per_round)
        a_wins = ((ra > rb) | ((ra == rb) & (u < 0.5))) if deterministic else (u < expit(ra - rb))
        keep = a != b
        new = (prompts[keep], np.where(a_wins, a, b)[keep], np.where(a_wins, b, a)[keep])
        if accumulate:
            for lst, arr in zip(pool, new):
                lst.append(arr)
        else:
            pool = tuple([arr] for arr in new)
        n_labels = float(keep.sum())
        samples = float(batch.n)
        n_updates = 1 if solve == "exact" else steps_per_round
        if sum(x.size for x in pool[0]) == 0:  # every pair tied: nothing to fit this round
            for _ in range(n_updates):
                t += 1
                rec.record(t, theta, {"loss": 0.0, "samples": samples, "labels": n_labels})
                samples = n_labels = 0.0
                if t % eval_every == 0:
                    rec.evaluate(t, theta)
            continue
        data = preference_pairs(*(np.concatenate(x) for x in pool))
        for _ in range(n_updates):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if solve == "exact":
                    fit = dpo(data, policy_class, problem.log_pi_ref, problem.beta, theta0=theta, warn=False)
                    loss, theta_new = fit.loss, fit.params
                else:
                    loss, g = dpo_loss(policy_class, theta, data, problem.leaf_logp_ref, problem.beta)
                    theta_new = ascend(theta, -lr, g)
            t += 1
            rec.record(t, theta_new, {"loss": loss, "samples": samples, "labels": n_labels})
            samples = n_labels = 0.0
            theta = np.asarray(theta_new, dtype=float)
            if t % eval_every == 0:
                rec.evaluate(t, theta)
    if rec.steps[-1] != t:
        rec.evaluate(t, theta)
    return rec.trajectory()
