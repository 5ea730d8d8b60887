"""Batches of sampled completions, and log-probabilities and gradients along their paths.

A sampled algorithm only ever needs, for a batch of completions, the per-token log-probabilities
``log pi_theta(a_t | s_t)`` and the pull-back of per-token weights ``W[i, t]`` to the parameters,

.. math:: \\sum_{i,t} W_{it} \\nabla_\\theta \\log \\pi_\\theta(a_{it} | s_{it}).

Two implementations:

* **path-local** (:class:`TabularPolicy`, :class:`LogLinearPolicy`): the conditionals are
  computed only at the visited nodes, ``O(n H V)`` (times the feature dimension for
  log-linear policies), independent of the tree size;
* **dense** (any policy class with ``conditionals`` and ``leaf_logprobs_vjp``): the per-token
  weights are scattered onto the edges and turned into *leaf* weights with
  :func:`edge_weights_to_leaf_weights`, then pulled back by the class's own
  ``leaf_logprobs_vjp``; ``O(leaves)``.

The two agree to rounding (tested); ``mode="dense"`` forces the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policies import LogLinearPolicy, TabularPolicy, sample_completions
from ..tree import TokenTree

__all__ = [
    "Rollouts",
    "sample_rollouts",
    "rollouts_from_leaves",
    "gather_token_logprobs",
    "edge_weights_to_leaf_weights",
    "node_reach",
    "path_policy",
]


def _nodes_from_tokens(tree: TokenTree, tokens: np.ndarray) -> np.ndarray:
    """Node index ``s_h`` (before emitting token ``h``) along each path, shape ``(n, H)``."""
    n = tokens.shape[0]
    nodes = np.zeros((n, tree.H), dtype=np.int64)
    for h in range(1, tree.H):
        nodes[:, h] = nodes[:, h - 1] * tree.V + tokens[:, h - 1]
    return nodes


def gather_token_logprobs(tree: TokenTree, log_pi, prompts, nodes, tokens) -> np.ndarray:
    """``log pi(a_t | s_t)`` along sampled paths, shape ``(n, H)`` (one gather per depth)."""
    out = np.empty(tokens.shape, dtype=float)
    for h in range(tree.H):
        out[:, h] = log_pi[h][prompts, nodes[:, h], tokens[:, h]]
    return out


@dataclass(frozen=True, eq=False)
class Rollouts:
    """A batch of sampled completions with their behaviour and reference log-probabilities.

    Completions come in ``n / group_size`` consecutive groups that share a prompt (the groups of
    RLOO and GRPO).

    Attributes
    ----------
    prompts : (n,) int
    tokens : (n, H) int
    nodes : (n, H) int, the depth-``h`` node ``s_h`` before token ``h``
    leaves : (n,) int, leaf index of each completion
    group_size : int
    logp : (n, H) float, ``log pi_old(a_t|s_t)`` of the sampling (behaviour) policy
    logp_ref : (n, H) float, ``log pi_ref(a_t|s_t)``
    mask : (n, H) bool, tokens inside the completion (up to and including its first EOS)
    """

    prompts: np.ndarray
    tokens: np.ndarray
    nodes: np.ndarray
    leaves: np.ndarray
    group_size: int
    logp: np.ndarray
    logp_ref: np.ndarray
    mask: np.ndarray

    @property
    def n(self) -> int:
        return int(self.prompts.size)

    @property
    def n_groups(self) -> int:
        return self.n // self.group_size


def _build(tree, prompts, tokens, log_pi, log_pi_ref, group_size) -> Rollouts:
    nodes = _nodes_from_tokens(tree, tokens)
    leaves = tree.leaf_index(tokens)
    mask = np.arange(tree.H)[None, :] < tree.lengths()[leaves][:, None]
    return Rollouts(
        prompts=prompts,
        tokens=tokens,
        nodes=nodes,
        leaves=leaves,
        group_size=int(group_size),
        logp=gather_token_logprobs(tree, log_pi, prompts, nodes, tokens),
        logp_ref=gather_token_logprobs(tree, log_pi_ref, prompts, nodes, tokens),
        mask=mask,
    )


def sample_rollouts(
    tree: TokenTree, log_pi, log_pi_ref, n_groups: int, group_size: int, rng: np.random.Generator
) -> Rollouts:
    """Sample ``n_groups`` prompts from ``rho0`` and ``group_size`` completions of each.

    Ancestral sampling with :func:`toyrlhf.policies.sample_completions` (vectorised over the
    batch, a loop over depth only).
    """
    prompts = np.repeat(rng.choice(tree.P, size=n_groups, p=tree.rho0), group_size).astype(np.int64)
    prompts, tokens = sample_completions(tree, log_pi, n_groups * group_size, rng, prompts=prompts)
    return _build(tree, prompts, tokens, log_pi, log_pi_ref, group_size)


def rollouts_from_leaves(tree: TokenTree, prompts, leaves, log_pi, log_pi_ref, group_size: int = 1) -> Rollouts:
    """Build a :class:`Rollouts` from given (prompt, leaf) pairs (e.g. sampled with ``sample_leaves``)."""
    prompts = np.asarray(prompts, dtype=np.int64)
    tokens = np.asarray(tree.tokens())[np.asarray(leaves, dtype=np.int64)]
    return _build(tree, prompts, tokens, log_pi, log_pi_ref, group_size)


# =========================================================================== tree utilities
def node_reach(tree: TokenTree, log_pi) -> tuple[np.ndarray, ...]:
    """Probability ``d_h(s)`` of passing through every depth-``h`` node, ``(P, V**h)`` per level."""
    out = []
    r = np.ones((tree.P, 1))
    for h in range(tree.H):
        out.append(r)
        with np.errstate(under="ignore"):
            r = (r[..., None] * np.exp(log_pi[h])).reshape(tree.P, -1)
    return tuple(out)


def edge_weights_to_leaf_weights(tree: TokenTree, log_pi, G) -> np.ndarray:
    """Leaf weights ``g`` whose gradient ``sum_xi g log P_theta(xi)`` equals the edge sum.

    For any edge weights ``G_h[p, s, a]``, returns ``g`` of shape ``(P, V**H)`` with

    .. math:: \\sum_\\xi g(\\xi) \\nabla \\log P_\\theta(\\xi)
              = \\sum_h \\sum_{s, a} G_h[s, a] \\nabla \\log \\pi_\\theta(a | s).

    ``aggregate_to_edges(g)`` must equal ``G`` up to terms ``c(s) pi(.|s)`` at each node, which
    contribute nothing because ``sum_a pi(a|s) grad log pi(a|s) = grad 1 = 0`` for every policy
    class.  Top-down: ``G'_0 = G_0`` and
    ``G'_h[s, .] = G_h[s, .] + pi(.|s) (G'_{h-1}[parent edge of s] - sum_a G_h[s, a])``,
    so that each row of ``G'_h`` sums to its parent edge's entry; ``g = G'_{H-1}``.  Cost
    ``O(edges)``.  This lets per-token weights (PPO's clipped ratios, per-token KL terms) use a
    policy class's leaf-level ``leaf_logprobs_vjp``.
    """
    P, V = tree.P, tree.V
    cur = np.asarray(G[0], dtype=float)
    for h in range(1, tree.H):
        Gh = np.asarray(G[h], dtype=float)
        parent = cur.reshape(P, V**h)
        with np.errstate(under="ignore"):
            pi = np.exp(log_pi[h])
        cur = Gh + pi * (parent - Gh.sum(axis=-1))[..., None]
    return cur.reshape(P, tree.n_leaves)


def _scatter_edges(tree: TokenTree, prompts, nodes, tokens, W) -> list[np.ndarray]:
    G = []
    for h in range(tree.H):
        size = tree.P * tree.V**h * tree.V
        idx = (prompts * tree.V**h + nodes[:, h]) * tree.V + tokens[:, h]
        G.append(np.bincount(idx, weights=W[:, h], minlength=size).reshape(tree.P, tree.V**h, tree.V))
    return G


# =========================================================================== path evaluators
def _theta(policy_class, theta) -> np.ndarray:
    t = np.asarray(theta, dtype=float)
    if t.shape != (policy_class.n_params,):
        raise ValueError(f"theta must have shape ({policy_class.n_params},), got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("theta must be finite")
    return t


def _absorbed_along(tree: TokenTree, tokens: np.ndarray) -> np.ndarray:
    """``(n, H)``: whether node ``s_h`` of each path already contains EOS."""
    if tree.eos is None:
        return np.zeros(tokens.shape, dtype=bool)
    seen = np.cumsum(tokens == tree.eos, axis=1) > 0
    out = np.zeros(tokens.shape, dtype=bool)
    out[:, 1:] = seen[:, :-1]
    return out


class _DensePaths:
    """Generic evaluator: full conditionals, edge scatter, the class's leaf-level VJP."""

    def __init__(self, policy_class, theta, prompts, nodes, tokens, log_pi=None):
        self.pc = policy_class
        self.tree = policy_class.tree
        self.theta = _theta(policy_class, theta)
        self.log_pi = policy_class.conditionals(self.theta) if log_pi is None else log_pi
        self.prompts, self.nodes, self.tokens = prompts, nodes, tokens

    def logprobs(self) -> np.ndarray:
        return gather_token_logprobs(self.tree, self.log_pi, self.prompts, self.nodes, self.tokens)

    def vjp(self, W) -> np.ndarray:
        G = _scatter_edges(self.tree, self.prompts, self.nodes, self.tokens, np.asarray(W, dtype=float))
        g = edge_weights_to_leaf_weights(self.tree, self.log_pi, G)
        return self.pc.leaf_logprobs_vjp(self.theta, g, log_pi=self.log_pi)


def _log_softmax_rows(z: np.ndarray) -> np.ndarray:
    """``log_softmax`` over a short last axis, column by column (every row needs one finite entry).

    Same values as :func:`toyrlhf.policies.log_softmax`; reductions over a short last axis are
    slow in NumPy, so the ``V`` columns are combined with elementwise operations instead.
    """
    V = z.shape[-1]
    m = z[..., 0].copy()
    for a in range(1, V):
        np.maximum(m, z[..., a], out=m)
    s = np.zeros_like(m)
    with np.errstate(under="ignore"):
        for a in range(V):
            s += np.exp(z[..., a] - m)
    return z - (m + np.log(s))[..., None]


class _LocalPaths:
    """Path-local evaluator for softmax classes: conditionals only at the visited nodes."""

    def __init__(self, policy_class, theta, prompts, nodes, tokens):
        tree = policy_class.tree
        self.pc, self.tree = policy_class, tree
        self.theta = _theta(policy_class, theta)
        self.prompts, self.nodes, self.tokens = prompts, nodes, tokens
        n, H, V = tokens.shape[0], tree.H, tree.V
        self.absorbed = _absorbed_along(tree, tokens)
        self.tabular = isinstance(policy_class, TabularPolicy)
        z = np.empty((n, H, V))
        self.index = np.empty((n, H), dtype=np.int64)
        self.features = []
        off = 0
        for h in range(H):
            flat = prompts * V**h + nodes[:, h]
            base = policy_class.log_pi_base[h].reshape(-1, V)[flat]
            if self.tabular:
                size = tree.P * V**h * V
                z[:, h] = base + self.theta[off : off + size].reshape(-1, V)[flat]
                self.index[:, h] = off + flat * V
                off += size
            else:
                f = policy_class.features[h]
                F = f[prompts if f.shape[0] > 1 else 0, nodes[:, h]]  # (n, V, d)
                self.features.append(F)
                z[:, h] = base + F @ self.theta
        rows = _log_softmax_rows(z)
        if tree.eos is not None and self.absorbed.any():
            forced = np.full(V, -np.inf)
            forced[tree.eos] = 0.0
            rows[self.absorbed] = forced
        self.rows = rows

    def logprobs(self) -> np.ndarray:
        return np.take_along_axis(self.rows, self.tokens[..., None], axis=-1)[..., 0]

    def vjp(self, W) -> np.ndarray:
        W = np.asarray(W, dtype=float)
        with np.errstate(under="ignore"):
            pi = np.exp(self.rows)
        onehot = self.tokens[..., None] == np.arange(self.tree.V)
        d = W[..., None] * (onehot - pi)
        d[self.absorbed] = 0.0
        if self.tabular:
            idx = self.index[..., None] + np.arange(self.tree.V)
            return np.bincount(idx.ravel(), weights=d.ravel(), minlength=self.pc.n_params)
        grad = np.zeros(self.pc.n_params)
        for h, F in enumerate(self.features):
            grad += np.einsum("nv,nvd->d", d[:, h], F)
        return grad


def path_policy(policy_class, theta, prompts, nodes, tokens, mode: str = "auto", log_pi=None):
    """An evaluator of ``policy_class`` at ``theta`` along given paths.

    Returns an object with ``logprobs() -> (n, H)`` (``log pi_theta(a_t|s_t)``) and
    ``vjp(W) -> (n_params,)`` (``sum_{i,t} W[i,t] grad log pi_theta(a_it|s_it)``).

    Parameters
    ----------
    mode : {"auto", "dense", "local"}
        ``"auto"`` uses the path-local evaluator for :class:`~toyrlhf.policies.TabularPolicy`
        and :class:`~toyrlhf.policies.LogLinearPolicy` and the dense one otherwise.
    log_pi : conditionals at ``theta``, optional
        Reused by the dense evaluator instead of recomputing them.
    """
    if mode not in ("auto", "dense", "local"):
        raise ValueError(f"mode must be 'auto', 'dense' or 'local', got {mode!r}")
    local_ok = type(policy_class) in (TabularPolicy, LogLinearPolicy)
    if mode == "local" and not local_ok:
        raise TypeError(f"mode='local' needs a TabularPolicy or LogLinearPolicy, got {type(policy_class).__name__}")
    if mode == "dense" or (mode == "auto" and not local_ok):
        return _DensePaths(policy_class, theta, prompts, nodes, tokens, log_pi=log_pi)
    return _LocalPaths(policy_class, theta, prompts, nodes, tokens)
