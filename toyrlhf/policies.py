"""Policies on a token tree: conditionals, exact sequence likelihoods, KL, entropy, sampling.

A policy is represented by its conditional log-probabilities ``log_pi``: a tuple of ``H``
arrays, level ``h`` of shape ``(P, V**h, V)`` holding ``log pi(a | s)`` for every depth-``h``
node ``s`` and token ``a``.  Sequence likelihoods are sums along root-to-leaf paths,

.. math:: \\log P_\\pi(\\xi \\mid s_0) = \\sum_{h=0}^{H-1} \\log \\pi(a_h \\mid s_h),

computed level by level with one broadcast-add per depth (slides 000, "Language Modeling as
an MDP").  Policy *classes* map a flat parameter vector ``theta`` to ``log_pi`` and pull
leaf-level gradients back to ``theta`` in ``O(leaves)``
(:func:`aggregate_to_edges` + the log-softmax Jacobian).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._backend import array_namespace, as_arrays, as_float, asarray, kernel_profile, to_numpy
from .tree import TokenTree

__all__ = [
    "log_softmax",
    "uniform_policy",
    "random_policy",
    "policy_from_logits",
    "leaf_logprobs",
    "leaf_probs",
    "aggregate_to_edges",
    "sequence_kl",
    "sequence_entropy",
    "sample_completions",
    "sample_leaves",
    "TabularPolicy",
    "LogLinearPolicy",
    "next_token_features",
    "position_token_features",
    "last_tokens_features",
    "prefix_count_features",
    "stack_features",
]


# --------------------------------------------------------------------------- kernels
# The kernels below are namespace-generic (see toyrlhf._backend): they take ``xp`` from their
# inputs and use array-API operations only, so the same code runs on NumPy, CuPy and
# array_api_strict arrays; float32 stays float32.  Samplers draw from a host NumPy Generator.
def _max_last(xp, z, columns: bool):
    """``max`` over the last (token) axis: column by column, or ``xp.max(axis=-1)``."""
    V = z.shape[-1]
    if not columns or V == 1:
        return xp.max(z, axis=-1)
    m = xp.maximum(z[..., 0], z[..., 1])
    for a in range(2, V):
        m = xp.maximum(m, z[..., a])
    return m


def _sum_last(xp, z, columns: bool):
    """``sum`` over the last (token) axis: column by column (left to right), or ``xp.sum``."""
    V = z.shape[-1]
    if not columns or V == 1:
        return xp.sum(z, axis=-1)
    s = z[..., 0] + z[..., 1]
    for a in range(2, V):
        s += z[..., a]
    return s


def log_softmax(x, axis: int = -1):
    """``x - logsumexp(x)`` along ``axis``; ``-inf`` entries stay ``-inf`` (need one finite).

    Namespace-generic.  Over the last axis (the ``V`` tokens of a node) the max and the sum run
    column by column on the CPU: NumPy reductions over a short last axis are several times
    slower than elementwise passes (:func:`toyrlhf._backend.kernel_profile`).

    Examples
    --------
    >>> np.exp(log_softmax(np.log([[1.0, 3.0]]))).tolist()
    [[0.25, 0.75]]
    """
    xp = array_namespace(x)
    x = as_float(x, xp)
    if axis not in (-1, x.ndim - 1):
        m = xp.max(x, axis=axis, keepdims=True)
        z = x - m
        with np.errstate(under="ignore"):
            return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))
    columns = kernel_profile(xp).column_reductions
    m = _max_last(xp, x, columns)
    z = x - m[..., None]
    with np.errstate(under="ignore"):
        e = xp.exp(z)
    s = _sum_last(xp, e, columns)
    z -= xp.log(s)[..., None]
    return z


def policy_from_logits(tree: TokenTree, logits) -> tuple:
    """Normalise per-level logits ``(P, V**h, V)`` into conditional log-probabilities.

    Absorbed (post-EOS) nodes are forced to EOS.  ``-inf`` logits give zero probability.
    Namespace-generic: the levels stay in the logits' namespace, device and float dtype.
    """
    xp, logits = as_arrays(*logits)
    levels = []
    for h, z in enumerate(logits):
        z = as_float(z, xp)
        if z.shape != (tree.P, tree.V**h, tree.V):
            raise ValueError(f"logits[{h}] must have shape {(tree.P, tree.V**h, tree.V)}, got {z.shape}")
        if not bool(xp.all(z < xp.inf)):
            raise ValueError(f"logits[{h}] contains NaN or +inf")
        if bool(xp.any(xp.all(z == -xp.inf, axis=-1))):
            raise ValueError(f"logits[{h}] has a node whose logits are all -inf (no token possible)")
        levels.append(log_softmax(z))
    return tree.apply_eos(levels)


def uniform_policy(tree: TokenTree) -> tuple[np.ndarray, ...]:
    """The uniform policy ``pi(a|s) = 1/V`` (with EOS absorption), as host NumPy arrays."""
    return policy_from_logits(tree, [np.zeros((tree.P, tree.V**h, tree.V)) for h in range(tree.H)])


def random_policy(
    tree: TokenTree,
    rng: np.random.Generator,
    temperature: float = 1.0,
    zero_fraction: float = 0.0,
) -> tuple[np.ndarray, ...]:
    """A random policy with Gaussian logits of scale ``temperature`` (host NumPy arrays).

    ``zero_fraction`` of the (node, token) pairs get probability exactly zero (``-inf``
    log-prob), keeping at least one token per node: a reference policy with partial support.
    Move it to a device with :func:`toyrlhf._backend.asarray` per level.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
    logits = []
    for h in range(tree.H):
        z = temperature * rng.standard_normal((tree.P, tree.V**h, tree.V))
        if zero_fraction > 0:
            drop = rng.random(z.shape) < zero_fraction
            keep = rng.integers(tree.V, size=z.shape[:-1])
            drop[np.arange(z.shape[0])[:, None], np.arange(z.shape[1])[None, :], keep] = False
            z[drop] = -np.inf
        logits.append(z)
    return policy_from_logits(tree, logits)


def leaf_logprobs(tree: TokenTree, log_pi):
    """Exact sequence log-likelihoods of all leaves, ``log P_pi(xi | s0)``, shape ``(P, V**H)``.

    .. math:: \\log P_\\pi(\\xi|s_0) = \\sum_h \\log\\pi(a_h|s_h)

    One broadcast-add per depth; ``-inf`` propagates (zero-probability completions).
    Namespace-generic: the result is in the levels' namespace, device and dtype.

    Examples
    --------
    >>> tree = TokenTree(V=2, H=3)
    >>> round(float(np.exp(leaf_logprobs(tree, uniform_policy(tree))).sum()), 12)
    1.0
    """
    xp, levels = as_arrays(*log_pi)
    P = tree.P
    acc = xp.reshape(levels[0], (P, tree.V))
    for h in range(1, tree.H):
        acc = xp.reshape(acc[:, :, None] + levels[h], (P, -1))
    return acc


def leaf_probs(tree: TokenTree, log_pi):
    """``P_pi(xi | s0)`` for all leaves, shape ``(P, V**H)`` (namespace-generic)."""
    lp = leaf_logprobs(tree, log_pi)
    with np.errstate(under="ignore"):
        return array_namespace(lp).exp(lp)


def aggregate_to_edges(tree: TokenTree, g_leaf) -> tuple:
    """Sum a leaf array over each edge's subtree: ``G_h[p, s, a] = sum_{xi below s.a} g(xi)``.

    This is the chain rule for sequence log-likelihoods: since ``log P(xi)`` is a sum of the
    conditionals on its path, ``d/d log pi(a|s) sum_xi g(xi) log P(xi) = G_h[s, a]``.
    Cost ``O(leaves)``: one reshape and one sum over the ``V`` children per depth (column by
    column on the CPU).  Namespace-generic; ``G_{H-1}`` is a view of ``g_leaf`` where the
    namespace has views.
    """
    xp = array_namespace(g_leaf)
    g = xp.reshape(as_float(g_leaf, xp), (tree.P, tree.n_leaves))
    columns = kernel_profile(xp).column_reductions
    out = [None] * tree.H
    cur = g
    for h in range(tree.H - 1, -1, -1):
        level = xp.reshape(cur, (tree.P, tree.V**h, tree.V))
        out[h] = level
        cur = _sum_last(xp, level, columns)
    return tuple(out)


def _xlogy_diff(p, logp, logq):
    """``p * (logp - logq)`` with the convention ``0 * anything = 0`` (namespace-generic)."""
    xp = array_namespace(p, logp, logq)
    with np.errstate(invalid="ignore"):
        d = p * (logp - logq)
    return xp.where(p > 0, d, xp.zeros_like(d))


def sequence_kl(tree: TokenTree, log_pi, log_pi_ref):
    """Exact ``KL(P_pi(.|s0) || P_ref(.|s0))`` per prompt, shape ``(P,)``.

    .. math:: \\mathrm{KL} = \\sum_\\xi P_\\pi(\\xi)\\,[\\log P_\\pi(\\xi) - \\log P_{ref}(\\xi)]

    ``+inf`` when ``pi`` puts mass where ``pi_ref`` has none; terms with ``P_pi = 0`` are 0.
    Namespace-generic.
    """
    lp = leaf_logprobs(tree, log_pi)
    xp = array_namespace(lp)
    lq = leaf_logprobs(tree, tuple(asarray(x, lp) for x in log_pi_ref))
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    return xp.sum(_xlogy_diff(p, lp, lq), axis=1)


def sequence_entropy(tree: TokenTree, log_pi):
    """Exact sequence entropy ``H(P_pi(.|s0)) = -sum P log P`` per prompt, shape ``(P,)``."""
    lp = leaf_logprobs(tree, log_pi)
    xp = array_namespace(lp)
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    return -xp.sum(_xlogy_diff(p, lp, xp.zeros_like(lp)), axis=1)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _inverse_cdf(xp, probs, u):
    """One index per row of ``probs`` by inverse CDF, given uniforms ``u`` of shape ``probs.shape[:-1]``.

    Rows need not be normalised (``u`` is scaled by the row total).  Namespace-generic.
    """
    cdf = xp.cumulative_sum(probs, axis=-1)
    target = u * cdf[..., -1]
    idx = xp.sum(xp.astype(cdf <= target[..., None], xp.int64), axis=-1)
    return xp.minimum(idx, probs.shape[-1] - 1)


def _categorical(rng: np.random.Generator, probs):
    """Sample one index per row of ``probs`` (rows sum to 1) by inverse CDF.

    The uniforms come from the host ``rng`` and are moved next to ``probs``.
    """
    xp = array_namespace(probs)
    u = asarray(rng.random(probs.shape[:-1]), probs, xp=xp, dtype=probs.dtype)
    return _inverse_cdf(xp, probs, u)


def sample_completions(
    tree: TokenTree,
    log_pi,
    n: int,
    rng: np.random.Generator,
    prompts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ancestral sampling of ``n`` completions, vectorised over samples (loop over depth).

    Returns ``(prompts, tokens)`` of shapes ``(n,)`` and ``(n, H)`` as host NumPy arrays;
    prompts are drawn from ``rho0`` unless given.  The leaf index is ``tree.leaf_index(tokens)``.

    Namespace-generic with a host boundary: the random numbers come from the NumPy
    ``Generator`` ``rng`` on the host (one ``rng.random(n)`` per depth, after the prompts), are
    moved to the policy's device, and the inverse-CDF draw runs there; the sampled tokens come
    back to the host, where the data structures they feed live.  For a given ``rng`` state the
    samples are the same on every backend up to the rounding of the CDF (float32 included).
    """
    _check_rng(rng)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if prompts is None:
        prompts = _categorical(rng, np.broadcast_to(tree.rho0, (n, tree.P)))
    else:
        prompts = to_numpy(prompts)
        if prompts.shape != (n,) or not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError(f"prompts must be an integer array of shape ({n},)")
        if n and (prompts.min() < 0 or prompts.max() >= tree.P):
            raise ValueError(f"prompts must lie in [0, P={tree.P})")
    xp, levels = as_arrays(*log_pi)
    pr = asarray(np.asarray(prompts, dtype=np.int64), levels[0], xp=xp)
    node = xp.zeros_like(pr)
    tokens = []
    for h in range(tree.H):
        rows = xp.take(xp.reshape(levels[h], (-1, tree.V)), pr * tree.V**h + node, axis=0)
        with np.errstate(under="ignore"):
            probs = xp.exp(rows)
        a = _categorical(rng, probs)
        tokens.append(a)
        node = node * tree.V + a
    if tree.H and n:
        tok = to_numpy(xp.stack(tokens, axis=1)).astype(np.int64, copy=False)
    else:
        tok = np.empty((n, tree.H), dtype=np.int64)
    return np.asarray(prompts), tok


def sample_leaves(
    tree: TokenTree, leaf_logp, n: int, rng: np.random.Generator, prompts=None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n`` (prompt, leaf) pairs from a leaf distribution ``(P, V**H)`` by inverse CDF.

    Vectorised over prompts with one global ``searchsorted`` on the per-prompt CDFs offset by
    the prompt index.  Namespace-generic with the same host boundary as
    :func:`sample_completions`: uniforms from the host ``rng``, samples returned on the host.
    """
    _check_rng(rng)
    if prompts is None:
        prompts = _categorical(rng, np.broadcast_to(tree.rho0, (n, tree.P)))
    prompts = to_numpy(prompts)
    xp = array_namespace(leaf_logp)
    lp = xp.astype(as_float(leaf_logp, xp), xp.float64, copy=False)  # the CDF is searched in float64
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    cdf = xp.cumulative_sum(p, axis=1)
    cdf = cdf / cdf[:, -1:]
    cdf = xp.concat([cdf[:, :-1], xp.ones_like(cdf[:, -1:])], axis=1)
    offsets = asarray(np.arange(tree.P, dtype=np.float64), cdf, xp=xp, dtype=cdf.dtype)
    flat = xp.reshape(cdf + offsets[:, None], (-1,))
    u = rng.random(n)
    target = asarray(prompts + u, cdf, xp=xp, dtype=cdf.dtype)
    pos = to_numpy(xp.searchsorted(flat, target, side="right"))
    leaves = np.minimum(pos - prompts * tree.n_leaves, tree.n_leaves - 1)
    return prompts, leaves


# --------------------------------------------------------------------------- classes
def _check_theta(theta, n_params: int) -> np.ndarray:
    t = np.asarray(theta, dtype=float)
    if t.shape != (n_params,):
        raise ValueError(f"theta must have shape ({n_params},), got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("theta must be finite")
    return t


def _softmax_vjp(log_pi_level: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Pull ``dL/dlog pi`` back through ``log_softmax``: ``G - pi * sum_a G``."""
    with np.errstate(under="ignore"):
        pi = np.exp(log_pi_level)
    return G - pi * G.sum(axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class TabularPolicy:
    """The tabular class: free logits at every node around a base policy.

    .. math:: \\pi_\\theta(a|s) \\propto \\pi_{base}(a|s)\\, e^{\\theta_{s,a}}

    ``theta = 0`` is the base.  Tokens with ``pi_base(a|s) = 0`` stay at zero, so with
    ``base = pi_ref`` this is the class of policies with finite log-ratios to ``pi_ref``
    (isomorphic to tabular rewards); pass a full-support base (e.g. uniform) for the
    unrestricted class Pi that can put mass where ``pi_ref`` has none.
    """

    tree: TokenTree
    log_pi_base: tuple
    _offsets: tuple = field(init=False, repr=False)

    def __post_init__(self):
        base = self.tree.check_levels("log_pi_base", self.log_pi_base)
        object.__setattr__(self, "log_pi_base", base)
        sizes = [b.size for b in base]
        object.__setattr__(self, "_offsets", tuple(np.concatenate([[0], np.cumsum(sizes)]).tolist()))

    @property
    def n_params(self) -> int:
        return self._offsets[-1]

    def init(self) -> np.ndarray:
        """Parameters of the base policy (zeros)."""
        return np.zeros(self.n_params)

    def _split(self, theta):
        t = _check_theta(theta, self.n_params)
        o = self._offsets
        return [t[o[h] : o[h + 1]].reshape(self.log_pi_base[h].shape) for h in range(self.tree.H)]

    def conditionals(self, theta) -> tuple[np.ndarray, ...]:
        return policy_from_logits(self.tree, [b + t for b, t in zip(self.log_pi_base, self._split(theta))])

    def leaf_logprobs(self, theta) -> np.ndarray:
        return leaf_logprobs(self.tree, self.conditionals(theta))

    def leaf_logprobs_vjp(self, theta, g_leaf, log_pi=None) -> np.ndarray:
        """Gradient of ``sum_xi g(xi) log P_theta(xi)`` with respect to ``theta``."""
        log_pi = self.conditionals(theta) if log_pi is None else log_pi
        G = aggregate_to_edges(self.tree, g_leaf)
        parts = []
        for h in range(self.tree.H):
            d = _softmax_vjp(log_pi[h], G[h])
            d = np.where(np.isneginf(log_pi[h]), 0.0, d)
            if self.tree.eos is not None:
                d[:, self.tree.absorbed(h), :] = 0.0
            parts.append(d.ravel())
        return np.concatenate(parts)

    def theta_from_policy(self, log_pi) -> np.ndarray:
        """Parameters of a policy in the class (``log pi - log pi_base``, 0 where both are 0)."""
        log_pi = self.tree.check_levels("log_pi", log_pi)
        parts = []
        for lp, b in zip(log_pi, self.log_pi_base):
            if np.any(np.isneginf(b) & ~np.isneginf(lp)):
                raise ValueError("log_pi puts mass where log_pi_base has none: not in this class")
            with np.errstate(invalid="ignore"):
                d = np.where(np.isneginf(b), 0.0, lp - b)
            if not np.all(np.isfinite(d)):
                raise ValueError("log_pi has zeros where log_pi_base does not: not attained by finite theta")
            parts.append(d.ravel())
        return np.concatenate(parts)


@dataclass(frozen=True, eq=False)
class LogLinearPolicy:
    """Log-linear policies around a base: features of the prefix and the next token.

    .. math:: \\pi_\\theta(a|s) \\propto \\pi_{base}(a|s)\\, \\exp(\\theta^\\top \\psi(s, a))

    ``features`` is a tuple of ``H`` arrays of shape ``(P or 1, V**h, V, d)`` (see the
    ``*_features`` builders).  ``theta = 0`` is the base policy.  Shared features couple the
    conditionals of different nodes: the source of likelihood displacement (Razin et al.
    2024, arXiv:2410.08847).
    """

    tree: TokenTree
    log_pi_base: tuple
    features: tuple

    def __post_init__(self):
        base = self.tree.check_levels("log_pi_base", self.log_pi_base)
        object.__setattr__(self, "log_pi_base", base)
        feats = tuple(np.asarray(f, dtype=float) for f in self.features)
        if len(feats) != self.tree.H:
            raise ValueError(f"features must have H={self.tree.H} levels, got {len(feats)}")
        d = feats[0].shape[-1]
        for h, f in enumerate(feats):
            if f.ndim != 4 or f.shape[1:3] != (self.tree.V**h, self.tree.V) or f.shape[0] not in (1, self.tree.P) or f.shape[-1] != d:
                raise ValueError(
                    f"features[{h}] must have shape (P or 1, V**h, V, d)=({self.tree.P}, {self.tree.V**h}, "
                    f"{self.tree.V}, {d}), got {f.shape}"
                )
            if not np.all(np.isfinite(f)):
                raise ValueError(f"features[{h}] must be finite")
        object.__setattr__(self, "features", feats)

    @property
    def n_params(self) -> int:
        return self.features[0].shape[-1]

    def init(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def conditionals(self, theta) -> tuple[np.ndarray, ...]:
        t = _check_theta(theta, self.n_params)
        return policy_from_logits(self.tree, [b + f @ t for b, f in zip(self.log_pi_base, self.features)])

    def leaf_logprobs(self, theta) -> np.ndarray:
        return leaf_logprobs(self.tree, self.conditionals(theta))

    def leaf_logprobs_vjp(self, theta, g_leaf, log_pi=None) -> np.ndarray:
        log_pi = self.conditionals(theta) if log_pi is None else log_pi
        G = aggregate_to_edges(self.tree, g_leaf)
        grad = np.zeros(self.n_params)
        for h in range(self.tree.H):
            d = _softmax_vjp(log_pi[h], G[h])
            d = np.where(np.isneginf(log_pi[h]), 0.0, d)
            if self.tree.eos is not None:
                d[:, self.tree.absorbed(h), :] = 0.0
            f = np.broadcast_to(self.features[h], d.shape + (self.n_params,))
            grad += np.einsum("pna,pnad->d", d, f)
        return grad


# --------------------------------------------------------------------------- policy features
def _prefix_tokens_padded(tree: TokenTree, h: int, k: int) -> np.ndarray:
    """Last ``k`` prefix tokens of depth-``h`` nodes, ``V`` (a start symbol) where absent."""
    pre = tree.prefixes(h)
    pad = np.full((pre.shape[0], k), tree.V)
    take = min(k, h)
    if take:
        pad[:, k - take :] = pre[:, h - take :]
    return pad


def next_token_features(tree: TokenTree) -> tuple[np.ndarray, ...]:
    """``psi(s, a) = e_a``: one weight per token, shared by every node (``d = V``)."""
    eye = np.eye(tree.V)
    return tuple(np.broadcast_to(eye, (1, tree.V**h, tree.V, tree.V)).copy() for h in range(tree.H))


def position_token_features(tree: TokenTree) -> tuple[np.ndarray, ...]:
    """``psi(s, a) = e_{(h, a)}``: one weight per (depth, token) (``d = H V``)."""
    d = tree.H * tree.V
    out = []
    for h in range(tree.H):
        f = np.zeros((1, tree.V**h, tree.V, d))
        f[0, :, np.arange(tree.V), h * tree.V + np.arange(tree.V)] = 1.0
        out.append(f)
    return tuple(out)


def last_tokens_features(tree: TokenTree, k: int = 1) -> tuple[np.ndarray, ...]:
    """``psi(s, a) = e_{(last k prefix tokens, a)}``: a ``(k+1)``-gram model (``d = (V+1)**k V``).

    Missing prefix positions use a start symbol, so ``k >= H - 1`` is the tabular class.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    base = tree.V + 1
    d = base**k * tree.V
    tree.require_bytes(8 * d * tree.n_edges, f"last_tokens_features(k={k})")
    out = []
    for h in range(tree.H):
        ctx = _prefix_tokens_padded(tree, h, k) @ (base ** np.arange(k - 1, -1, -1)) if k else np.zeros(tree.V**h, dtype=int)
        f = np.zeros((1, tree.V**h, tree.V, d))
        idx = ctx[:, None] * tree.V + np.arange(tree.V)[None, :]
        f[0, np.arange(tree.V**h)[:, None], np.arange(tree.V)[None, :], idx] = 1.0
        out.append(f)
    return tuple(out)


def prefix_count_features(tree: TokenTree) -> tuple[np.ndarray, ...]:
    """``psi(s, a)_b = [a = b] * count of b in the prefix``: a repetition feature (``d = V``)."""
    out = []
    for h in range(tree.H):
        pre = tree.prefixes(h)
        counts = np.stack([(pre == b).sum(axis=1) for b in range(tree.V)], axis=1).astype(float)
        f = np.zeros((1, tree.V**h, tree.V, tree.V))
        f[0, :, np.arange(tree.V), np.arange(tree.V)] = counts.T
        out.append(f)
    return tuple(out)


def stack_features(*feature_sets) -> tuple[np.ndarray, ...]:
    """Concatenate several per-level feature sets along the feature axis."""
    H = len(feature_sets[0])
    out = []
    for h in range(H):
        parts = [fs[h] for fs in feature_sets]
        P = max(p.shape[0] for p in parts)
        out.append(np.concatenate([np.broadcast_to(p, (P,) + p.shape[1:]) for p in parts], axis=-1))
    return tuple(out)
