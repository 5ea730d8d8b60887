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

from ._backend import (
    array_namespace,
    as_arrays,
    as_float,
    asarray,
    exp_floor,
    kernel_profile,
    to_numpy,
)
from .tree import TokenTree, _max_row_deviation, normalisation_tol

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

    The relative entropy of Kullback & Leibler (1951, Ann. Math. Statist. 22(1):79–86) between the
    two sequence laws; by the chain rule for relative entropy (Cover & Thomas 2006, *Elements of
    Information Theory*, 2nd ed., Sec. 2.5) it equals the expected sum of per-token KLs along
    the path.  ``+inf`` when ``pi`` puts mass where ``pi_ref`` has none; terms with
    ``P_pi = 0`` are 0.  Both policies are validated by
    :meth:`~toyrlhf.tree.TokenTree.check_levels` (normalised nodes).  Namespace-generic.
    """
    log_pi = tree.check_levels("log_pi", log_pi)
    lp = leaf_logprobs(tree, log_pi)
    xp = array_namespace(lp)
    lq = leaf_logprobs(tree, tree.check_levels("log_pi_ref", log_pi_ref, like=lp))
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    return xp.sum(_xlogy_diff(p, lp, lq), axis=1)


def sequence_entropy(tree: TokenTree, log_pi):
    """Exact sequence entropy ``H(P_pi(.|s0)) = -sum P log P`` per prompt, shape ``(P,)``.

    Shannon's entropy (Shannon 1948, Bell Syst. Tech. J. 27:379–423) of the sequence law; by the
    chain rule for entropy (Cover & Thomas 2006, Sec. 2.5) the expected sum of per-token
    entropies.  ``log_pi`` is validated by :meth:`~toyrlhf.tree.TokenTree.check_levels`.
    Namespace-generic.
    """
    lp = leaf_logprobs(tree, tree.check_levels("log_pi", log_pi))
    xp = array_namespace(lp)
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    return -xp.sum(_xlogy_diff(p, lp, xp.zeros_like(lp)), axis=1)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _check_n_samples(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be a non-negative integer, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n}")
    return int(n)


def _check_prompts(tree: TokenTree, prompts, n: int) -> np.ndarray:
    """Given prompts: an integer host array of shape ``(n,)`` with values in ``[0, P)``."""
    pr = np.asarray(to_numpy(prompts))
    if pr.shape != (n,):
        raise ValueError(f"prompts must have shape (n,)=({n},), got {pr.shape}")
    if n and not np.issubdtype(pr.dtype, np.integer):
        raise TypeError(f"prompts must be integer prompt indices, got dtype {pr.dtype}")
    if n and (pr.min() < 0 or pr.max() >= tree.P):
        raise ValueError(f"prompts must lie in [0, P={tree.P}), got range [{pr.min()}, {pr.max()}]")
    return pr.astype(np.int64, copy=False)


def _inverse_cdf(xp, probs, u):
    """One index per row of ``probs`` by inverse CDF, given uniforms ``u`` of shape ``probs.shape[:-1]``.

    Rows need not be normalised but must have a positive total ``T`` (checked by the callers).
    With ``c = cumsum(probs)`` the index is ``#{a : c_a <= t}`` for the target
    ``t = min(u T, nextafter(T, 0))``: the largest float below ``T`` bounds ``t`` because ``u T``
    rounds up to ``T`` when ``u`` is within an ulp of 1 (float32 uniforms round to 1.0 with
    probability 2**-25).  Then ``c_{i-1} <= t < c_i`` for the returned ``i``, so
    ``c_i > c_{i-1}``: a token of probability zero (whose ``c`` equals its predecessor's) is
    never returned, trailing zeros included.  Namespace-generic.
    """
    cdf = xp.cumulative_sum(probs, axis=-1)
    total = cdf[..., -1]
    target = xp.minimum(u * total, xp.nextafter(total, xp.zeros_like(total)))
    return xp.sum(xp.astype(cdf <= target[..., None], xp.int64), axis=-1)


def _categorical(rng: np.random.Generator, probs):
    """Sample one index per row of ``probs`` (non-negative, positive row totals) by inverse CDF.

    The uniforms come from the host ``rng`` and are moved next to ``probs`` in its dtype; see
    :func:`_inverse_cdf` for why a zero-probability index is never returned.
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
    prompts are drawn from ``rho0`` unless given (integers in ``[0, P)``, shape ``(n,)``).  The
    leaf index is ``tree.leaf_index(tokens)``.  A token of probability zero is never drawn
    (:func:`_inverse_cdf`).  The rows of ``log_pi`` that are visited must be normalised
    (within :func:`toyrlhf.tree.normalisation_tol`; ``ValueError`` naming ``log_pi`` else):
    only those rows are checked, so sampling a few completions from a large tree stays cheap.

    Namespace-generic with a host boundary: the random numbers come from the NumPy
    ``Generator`` ``rng`` on the host (one ``rng.random(n)`` per depth, after the prompts), are
    moved to the policy's device, and the inverse-CDF draw runs there; the sampled tokens come
    back to the host, where the data structures they feed live.  For a given ``rng`` state the
    samples are the same on every backend up to the rounding of the CDF (float32 included).
    """
    _check_rng(rng)
    n = _check_n_samples(n)
    if not isinstance(log_pi, (tuple, list)) or len(log_pi) != tree.H:
        raise TypeError(f"log_pi must be a tuple of H={tree.H} per-level arrays (P, V**h, V)")
    if prompts is None:
        prompts = _categorical(rng, np.broadcast_to(tree.rho0, (n, tree.P)))
    else:
        prompts = _check_prompts(tree, prompts, n)
    xp, levels = as_arrays(*log_pi)
    for h, lp in enumerate(levels):
        if lp.shape != (tree.P, tree.V**h, tree.V):
            raise ValueError(f"log_pi[{h}] must have shape {(tree.P, tree.V**h, tree.V)}, got {lp.shape}")
    pr = asarray(np.asarray(prompts, dtype=np.int64), levels[0], xp=xp)
    node = xp.zeros_like(pr)
    tokens = []
    for h in range(tree.H):
        rows = xp.take(xp.reshape(as_float(levels[h], xp), (-1, tree.V)), pr * tree.V**h + node, axis=0)
        with np.errstate(under="ignore", invalid="ignore", over="ignore"):
            probs = xp.exp(rows)
        if n:
            tol = normalisation_tol(xp, probs.dtype, tree.V)
            dev = xp.abs(xp.sum(probs, axis=-1) - 1.0)
            if not bool(xp.all(dev <= tol)):  # NaN fails too
                raise ValueError(
                    f"log_pi[{h}] must hold normalised conditionals (no NaN): a visited node's "
                    f"probabilities sum to 1 +- {float(xp.max(dev)):.3g} (tolerance {tol:.1g})"
                )
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

    ``leaf_logp`` holds log-probabilities (``-inf`` allowed) of shape ``(P, V**H)`` or
    ``(V**H,)``; each row is sampled in proportion to ``exp(leaf_logp)`` and must have positive
    mass wherever a prompt is drawn from it (prompts with ``rho0 > 0``, or the given
    ``prompts``: integers in ``[0, P)`` of shape ``(n,)``).  Bad input raises ``ValueError`` or
    ``TypeError`` naming ``n``, ``prompts`` or ``leaf_logp``.

    Vectorised over prompts with one global ``searchsorted`` (side ``right``) on the per-prompt
    CDFs ``c`` (normalised, in float64, the last entry set to exactly 1) offset by the prompt
    index: ``flat[p N + i] = p + c[p, i]``.  A prompt ``p`` with uniform ``u`` targets
    ``t = min(p + u, nextafter(p + 1, 0))`` (``p + u`` rounds to ``p + 1`` when ``u`` is within
    half an ulp of ``p + 1`` of 1).  Since ``flat[pN - 1] = p <= t < p + 1 = flat[(p+1)N - 1]``,
    the returned position lies in row ``p``; and since ``flat[i-1] <= t < flat[i]``, the leaf has
    ``c_i > c_{i-1}``, i.e. positive probability.  Namespace-generic with the same host
    boundary as :func:`sample_completions`: uniforms from the host ``rng``, samples returned
    on the host.
    """
    _check_rng(rng)
    n = _check_n_samples(n)
    lp = tree.check_leaf_array("leaf_logp", leaf_logp, allow_neg_inf=True)
    if prompts is None:
        prompts = _categorical(rng, np.broadcast_to(tree.rho0, (n, tree.P)))
        drawn = tree.rho0 > 0
    else:
        prompts = _check_prompts(tree, prompts, n)
        drawn = np.bincount(prompts, minlength=tree.P) > 0
    prompts = np.asarray(to_numpy(prompts), dtype=np.int64)
    xp = array_namespace(lp)
    lp = xp.astype(lp, xp.float64, copy=False)  # the CDF is searched in float64
    with np.errstate(under="ignore"):
        p = xp.exp(lp)
    cdf = xp.cumulative_sum(p, axis=1)
    total = to_numpy(cdf[:, -1])
    empty_rows = np.flatnonzero(drawn & ~(total > 0))
    if empty_rows.size:
        raise ValueError(
            f"leaf_logp has no completion of positive probability (all -inf) for prompt(s) "
            f"{empty_rows[:5].tolist()}, from which samples are drawn"
        )
    safe = asarray(np.where(total > 0, total, 1.0), cdf, xp=xp, dtype=cdf.dtype)
    cdf = cdf / safe[:, None]
    cdf = xp.concat([cdf[:, :-1], xp.ones_like(cdf[:, -1:])], axis=1)
    offsets = asarray(np.arange(tree.P, dtype=np.float64), cdf, xp=xp, dtype=cdf.dtype)
    flat = xp.reshape(cdf + offsets[:, None], (-1,))
    u = rng.random(n)
    target = np.minimum(prompts + u, np.nextafter(prompts + 1.0, 0.0))
    pos = to_numpy(xp.searchsorted(flat, asarray(target, cdf, xp=xp, dtype=cdf.dtype), side="right"))
    leaves = np.asarray(pos, dtype=np.int64) - prompts * tree.n_leaves
    return prompts, leaves


# --------------------------------------------------------------------------- classes
def _check_theta(theta, n_params: int) -> np.ndarray:
    t = np.asarray(theta, dtype=float)
    if t.shape != (n_params,):
        raise ValueError(f"theta must have shape ({n_params},), got {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("theta must be finite")
    return t


def _base_levels(tree: TokenTree, name: str, base) -> tuple:
    """Validate a policy class's base and normalise its nodes (a base is defined up to ``∝``).

    ``base`` is a tuple of ``H`` host arrays ``(P, V**h, V)`` of log-probabilities or logits
    (``-inf`` allowed, at least one finite entry per node, no NaN or ``+inf``).  A class
    ``pi_theta(a|s) ∝ pi_base(a|s) e^{theta_{s,a}}`` only depends on the base up to a constant per
    node, so a level that is not normalised (beyond :func:`toyrlhf.tree.normalisation_tol`) is
    replaced by its :func:`log_softmax`, and the stored ``log_pi_base`` is always normalised:
    ``theta = 0`` gives that normalised base.  Levels that are normalised are kept as given.
    Errors name ``name`` and the level.
    """
    if not isinstance(base, (tuple, list)) or len(base) != tree.H:
        raise TypeError(f"{name} must be a tuple of H={tree.H} per-level arrays (P, V**h, V)")
    levels = [np.asarray(to_numpy(b)) for b in base]
    if any(b.dtype.kind not in "fiub" for b in levels):
        raise TypeError(f"{name} must hold real numbers")
    levels = [np.asarray(b, dtype=np.float64) for b in levels]
    tol = normalisation_tol(np, np.float64, tree.V)
    prof = kernel_profile(np)
    out = []
    for h, b in enumerate(levels):
        want = (tree.P, tree.V**h, tree.V)
        if b.shape != want:
            raise ValueError(f"{name}[{h}] must have shape {want}, got {b.shape}")
        if np.isnan(b).any():
            raise ValueError(f"{name}[{h}] contains NaN")
        if np.isposinf(b).any():
            raise ValueError(f"{name}[{h}] contains +inf")
        if np.all(np.isneginf(b), axis=-1).any():
            raise ValueError(f"{name}[{h}] has a node whose tokens all have probability zero")
        if not abs(_max_row_deviation(np, b, exp_floor(np, np.float64), prof)) <= tol:
            b = log_softmax(b)
        out.append(b)
    return tree.check_levels(name, out)


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
    unrestricted class Pi that can put mass where ``pi_ref`` has none.  ``log_pi_base`` may be
    logits (e.g. zeros for the uniform base): unnormalised nodes are normalised at construction
    (see :func:`_base_levels`), which does not change the class.
    """

    tree: TokenTree
    log_pi_base: tuple
    _offsets: tuple = field(init=False, repr=False)

    def __post_init__(self):
        base = _base_levels(self.tree, "log_pi_base", self.log_pi_base)
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
    2024, arXiv:2410.08847).  ``log_pi_base`` may be logits: unnormalised nodes are normalised
    at construction (see :func:`_base_levels`), which does not change the class.
    """

    tree: TokenTree
    log_pi_base: tuple
    features: tuple

    def __post_init__(self):
        base = _base_levels(self.tree, "log_pi_base", self.log_pi_base)
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
