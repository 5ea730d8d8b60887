"""The language model as a deterministic token-tree MDP.

A prompt ``s0`` is drawn from ``rho0``; the policy emits ``H`` tokens from a vocabulary of ``V``;
the state is the prompt plus the prefix and the dynamics are deterministic, ``s' = s . a``
(Swamy, *The Information Geometry of RLHF*, slides 000: "Language Modeling as an MDP").

Index layout (everything is a reshape)
--------------------------------------
* A depth-``h`` node is the integer ``i`` whose base-``V`` digits (most significant first) are
  its ``h`` prefix tokens; its children are ``V * i + a``.
* Per-level arrays (conditional log-probabilities, per-action gradients) have shape
  ``(P, V**h, V)``: entry ``[p, i, a]`` belongs to the edge from node ``i`` to ``V * i + a``.
* Leaf arrays have shape ``(P, V**H)`` in lexicographic order of the completion tokens.
* Python loops run over depth only, never over nodes or leaves.

EOS
---
With ``eos`` set, a node whose prefix already contains EOS is *absorbed*: its only child with
positive probability is EOS again, with probability 1 (not a choice of the policy).  A leaf whose
tokens after the first EOS are all EOS is a *valid* completion of length ``k`` (the position of
the first EOS, plus one); every other leaf has probability zero under every policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._backend import (
    array_namespace,
    as_float,
    asarray,
    exp_floor,
    float_dtype,
    kernel_profile,
    to_numpy,
)

__all__ = ["TokenTree", "GiB"]

GiB = 2**30

#: Number of float64 leaf-sized arrays a typical exact computation keeps alive at once
#: (rewards, reference and policy log-probabilities per level, values, gradients).
_WORKING_ARRAYS = 8


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def normalisation_tol(xp, dtype, V: int) -> float:
    """Tolerance on the row sums of a node's conditionals, ``|sum_a pi(a|s) - 1| <= tol``.

    * float64: ``max(1e-9, eps32 * log V)`` (``8.3e-8`` for ``V = 2``, ``1.7e-7`` for ``V = 4``).
      Rows made in float64 (``log_softmax``, ``np.log`` of probabilities given to ten digits)
      sum to 1 within ``1e-9``; the ``eps32 log V`` term admits float32 log-probabilities
      promoted to float64 (a float32 computation checked against float64 on the same
      inputs): rounding ``log pi`` to float32 moves it by ``|log pi| eps32/2``, so the row sum
      by at most ``sum_a pi |log pi| eps32/2 = H(pi(.|s)) eps32/2 <= log(V) eps32/2``.
    * float32: ``max(1e-4, 4 V eps32)``.  Besides that rounding, float32 ``exp`` and the ``V``
      summands round at ``eps32/2`` each, and ``log_softmax`` of logits of magnitude ``L``
      carries errors of about ``L eps32``: ``1e-4`` admits logits up to several hundred.

    Errors of interest (an unnormalised node) are of order one, far above either tolerance.
    """
    eps32 = float(np.finfo(np.float32).eps)
    if xp.finfo(dtype).eps < eps32:
        return max(1e-9, eps32 * math.log(V))
    return max(1e-4, 4 * V * eps32)


def _row_sum_deviation(xp, block, floor: float, columns: bool) -> tuple[float, float]:
    """``(max, min)`` over the rows of ``block`` (``(..., V)`` log-probabilities) of ``sum_a exp - 1``.

    ``exp`` arguments are clamped at ``floor`` (:func:`toyrlhf._backend.exp_floor`: keeps NumPy's
    ``exp`` off its slow path for ``-inf``; a clamped term is at most ``1e-304`` in float64 and
    ``5e-35`` in float32, far below any tolerance); NaN propagates through ``maximum`` and the
    sums, ``+inf`` gives ``inf``.  Column-by-column sums with ``columns`` (the CPU profile).
    Namespace-generic; used by :meth:`TokenTree.check_levels` and fused into the soft value
    iteration of :func:`toyrlhf.projections.soft_optimal_policy`.
    """
    V = block.shape[-1]
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        t = xp.exp(xp.maximum(block, floor))
        if columns and V > 1:
            s = t[..., 0] + t[..., 1]
            for a in range(2, V):
                s += t[..., a]
        else:
            s = xp.sum(t, axis=-1)
        return float(xp.max(s)) - 1.0, float(xp.min(s)) - 1.0


def _worse(dev: float, hi: float, lo: float) -> float:
    """The deviation of largest magnitude among ``dev``, ``hi``, ``lo`` (NaN wins)."""
    for d in (hi, lo):
        if d != d or abs(d) > abs(dev):
            dev = d
        if dev != dev:
            return dev
    return dev


def _max_row_deviation(xp, lp, floor: float, profile) -> float:
    """``sum_a exp(lp[..., a]) - 1`` of largest magnitude over the rows of ``lp`` (NaN if any is NaN).

    Namespace-generic; in blocks of ``profile.block_edges`` edges on the CPU (so the passes of
    :func:`_row_sum_deviation` stay in cache), one block per level on a GPU.
    """
    V = lp.shape[-1]
    rows = xp.reshape(lp, (-1, V))
    R = rows.shape[0]
    C = R if profile.block_edges is None else max(1, profile.block_edges // V)
    worst = 0.0
    for i0 in range(0, R, C):
        worst = _worse(worst, *_row_sum_deviation(xp, rows[i0 : min(R, i0 + C), :], floor, profile.column_reductions))
        if worst != worst:
            break
    return worst


def _raise_unnormalised(xp, name: str, h: int, lp, dev: float, tol: float) -> None:
    """Raise the ``ValueError`` of :meth:`TokenTree.check_levels` for level ``h`` with deviation ``dev``."""
    if bool(xp.any(xp.isnan(lp))):
        raise ValueError(f"{name}[{h}] must be log-probabilities (contains NaN)")
    if not bool(xp.all(lp <= tol)):
        raise ValueError(f"{name}[{h}] must be log-probabilities (<= 0, no +inf)")
    raise ValueError(
        f"{name}[{h}] must hold normalised conditionals: some node's probabilities sum to "
        f"1 {'+' if dev > 0 else '-'} {abs(dev):.3g} (tolerance {tol:.1g} for {lp.dtype}); "
        "normalise each node over its V tokens, e.g. with policies.log_softmax"
    )


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A forest of ``P`` complete ``V``-ary token trees of depth ``H``.

    Parameters
    ----------
    V : int
        Vocabulary size (>= 2).
    H : int
        Horizon: number of generated tokens (>= 1).
    rho0 : array_like of shape (P,), optional
        Prompt distribution.  Defaults to uniform over ``P`` prompts.
    P : int, optional
        Number of prompts when ``rho0`` is not given (default 1).
    eos : int, optional
        Token index of the end-of-sequence token, giving variable-length completions.
    memory_budget : float
        Bytes a computation on this tree may use (default 4 GiB).  A tree whose estimated
        working set exceeds it is refused up front; raise it if your machine has more.

    Examples
    --------
    >>> tree = TokenTree(V=3, H=2, P=2)
    >>> tree.n_leaves, tree.tokens().shape
    (9, (9, 2))
    """

    V: int
    H: int
    rho0: np.ndarray | None = None
    P: int | None = None
    eos: int | None = None
    memory_budget: float = 4 * GiB
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        V = _check_int("V", self.V, 2)
        H = _check_int("H", self.H, 1)
        if self.rho0 is None:
            P = 1 if self.P is None else _check_int("P", self.P, 1)
            rho0 = np.full(P, 1.0 / P)
        else:
            rho0 = np.asarray(self.rho0, dtype=float)
            if rho0.ndim != 1 or rho0.size == 0:
                raise ValueError(f"rho0 must be a non-empty 1-D probability vector, got shape {rho0.shape}")
            if self.P is not None and _check_int("P", self.P, 1) != rho0.size:
                raise ValueError(f"P={self.P} disagrees with len(rho0)={rho0.size}")
            if not np.all(np.isfinite(rho0)) or np.any(rho0 < 0) or abs(rho0.sum() - 1.0) > 1e-9:
                raise ValueError(f"rho0 must be non-negative and sum to 1, got {rho0!r}")
            P = rho0.size
        rho0 = rho0.copy()
        rho0.setflags(write=False)
        if self.eos is not None:
            eos = _check_int("eos", self.eos, 0)
            if eos >= V:
                raise ValueError(f"eos must be a token index in [0, V={V}), got {eos}")
            object.__setattr__(self, "eos", eos)
        if not (isinstance(self.memory_budget, (int, float)) and self.memory_budget > 0):
            raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget!r}")
        object.__setattr__(self, "V", V)
        object.__setattr__(self, "H", H)
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "rho0", rho0)
        self.require_bytes(self.estimated_bytes(), "the tree's working set")

    # ------------------------------------------------------------------ sizes
    @property
    def n_leaves(self) -> int:
        """Leaves per prompt, ``V**H``."""
        return self.V**self.H

    def level_size(self, h: int) -> int:
        """Number of nodes at depth ``h`` (``V**h``) per prompt."""
        if not 0 <= h <= self.H:
            raise ValueError(f"depth h must be in [0, H={self.H}], got {h}")
        return self.V**h

    @property
    def n_edges(self) -> int:
        """Edges (node, action) per prompt: ``sum_h V**(h+1)``."""
        return sum(self.V ** (h + 1) for h in range(self.H))

    def estimated_bytes(self, itemsize: int = 8, arrays: int = _WORKING_ARRAYS) -> int:
        """Estimated bytes of ``arrays`` leaf-sized (plus per-level) arrays for all prompts."""
        return int(itemsize * arrays * self.P * (self.n_leaves + self.n_edges))

    def require_bytes(self, nbytes: float, what: str) -> None:
        """Refuse, with the estimated size, a computation that would exceed ``memory_budget``."""
        if nbytes > self.memory_budget:
            raise ValueError(
                f"{what} needs about {nbytes / GiB:.2f} GiB for a tree with P={self.P}, V={self.V}, "
                f"H={self.H} ({self.P * self.n_leaves:,} leaves), over memory_budget="
                f"{self.memory_budget / GiB:.2f} GiB; pass a larger memory_budget to TokenTree "
                "if the machine has the memory"
            )

    # ------------------------------------------------------------ enumeration
    def tokens(self) -> np.ndarray:
        """All completions as tokens, shape ``(V**H, H)``, lexicographic (leaf index) order."""
        if "tokens" not in self._cache:
            idx = np.arange(self.n_leaves)
            powers = self.V ** np.arange(self.H - 1, -1, -1)
            tok = (idx[:, None] // powers[None, :]) % self.V
            tok.setflags(write=False)
            self._cache["tokens"] = tok
        return self._cache["tokens"]

    def prefixes(self, h: int) -> np.ndarray:
        """Prefix tokens of the depth-``h`` nodes, shape ``(V**h, h)``."""
        n = self.level_size(h)
        idx = np.arange(n)
        powers = self.V ** np.arange(h - 1, -1, -1)
        return (idx[:, None] // powers[None, :]) % self.V

    def leaf_index(self, tokens) -> np.ndarray:
        """Leaf index of completions given as tokens of shape ``(..., H)``."""
        tok = np.asarray(tokens)
        if tok.shape[-1:] != (self.H,):
            raise ValueError(f"tokens must have last axis of length H={self.H}, got shape {tok.shape}")
        if not np.issubdtype(tok.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got dtype {tok.dtype}")
        if tok.size and (tok.min() < 0 or tok.max() >= self.V):
            raise ValueError(f"tokens must lie in [0, V={self.V}), got range [{tok.min()}, {tok.max()}]")
        powers = self.V ** np.arange(self.H - 1, -1, -1)
        return tok @ powers

    # -------------------------------------------------------------------- EOS
    def absorbed(self, h: int) -> np.ndarray:
        """Boolean ``(V**h,)``: depth-``h`` nodes whose prefix already contains EOS."""
        if self.eos is None:
            return np.zeros(self.level_size(h), dtype=bool)
        key = ("absorbed", h)
        if key not in self._cache:
            mask = np.any(self.prefixes(h) == self.eos, axis=1)
            mask.setflags(write=False)
            self._cache[key] = mask
        return self._cache[key]

    def valid_leaves(self) -> np.ndarray:
        """Boolean ``(V**H,)``: leaves reachable under some policy (all of them without EOS)."""
        if "valid" not in self._cache:
            if self.eos is None:
                v = np.ones(self.n_leaves, dtype=bool)
            else:
                tok = self.tokens()
                seen = np.cumsum(tok == self.eos, axis=1) > 0
                after = np.zeros_like(seen)
                after[:, 1:] = seen[:, :-1]
                v = ~np.any(after & (tok != self.eos), axis=1)
            v.setflags(write=False)
            self._cache["valid"] = v
        return self._cache["valid"]

    def lengths(self) -> np.ndarray:
        """Completion length of every leaf, shape ``(V**H,)``: first EOS position + 1, else ``H``."""
        if "lengths" not in self._cache:
            if self.eos is None:
                n = np.full(self.n_leaves, self.H)
            else:
                is_eos = self.tokens() == self.eos
                n = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, self.H)
            n.setflags(write=False)
            self._cache["lengths"] = n
        return self._cache["lengths"]

    def apply_eos(self, log_pi: tuple) -> tuple:
        """Force absorbed nodes to emit EOS with probability 1 (log-prob 0, others ``-inf``).

        Namespace-generic: each level stays in its namespace, dtype and device; the cached host
        masks are moved next to it and applied with ``xp.where`` (a new array per level that has
        absorbed nodes; other levels are returned as they are).
        """
        if self.eos is None:
            return tuple(log_pi)
        out = []
        row = np.full(self.V, -np.inf)
        row[self.eos] = 0.0
        for h, lp in enumerate(log_pi):
            mask = self.absorbed(h)
            if mask.any():
                xp = array_namespace(lp)
                lp = asarray(lp, xp=xp)
                lp = xp.where(asarray(mask[None, :, None], lp), asarray(row, lp, dtype=lp.dtype), lp)
            out.append(lp)
        return tuple(out)

    # ------------------------------------------------------------------ misc
    def average(self, per_prompt) -> float:
        """``E_{s0 ~ rho0}`` of a per-prompt quantity of shape ``(P,)`` (any namespace; a float)."""
        x = np.asarray(to_numpy(per_prompt), dtype=float)
        if x.shape != (self.P,):
            raise ValueError(f"per_prompt must have shape (P,)=({self.P},), got {x.shape}")
        mask = self.rho0 > 0
        return float(np.dot(self.rho0[mask], x[mask]))

    def check_leaf_array(self, name: str, x, allow_neg_inf: bool = False, like=None):
        """Validate a leaf array of shape ``(P, V**H)`` (or ``(V**H,)``, broadcast over prompts).

        Namespace-generic: the result is an array of ``x``'s namespace (of ``like``'s when ``x``
        is host data and ``like`` is a device array), float32 or float64 as given (other dtypes
        become float64).  One pass over the data checks for NaN and infinities.
        """
        xp = array_namespace(x, like)
        a = as_float(x, xp, like)
        if a.shape == (self.n_leaves,):
            a = xp.broadcast_to(a, (self.P, self.n_leaves))
        if a.shape != (self.P, self.n_leaves):
            raise ValueError(
                f"{name} must have shape (P, V**H)=({self.P}, {self.n_leaves}) or ({self.n_leaves},), "
                f"got {a.shape}"
            )
        ok = bool(xp.all(a < xp.inf)) if allow_neg_inf else bool(xp.all(xp.isfinite(a)))
        if not ok:
            if bool(xp.any(xp.isnan(a))):
                raise ValueError(f"{name} contains NaN")
            if allow_neg_inf:
                raise ValueError(f"{name} contains +inf")
            raise ValueError(f"{name} must be finite (got inf)")
        return a

    def check_levels(self, name: str, log_pi, like=None, check_normalised: bool = True) -> tuple:
        """Validate conditional log-probabilities: a sequence of ``H`` arrays ``(P, V**h, V)``.

        Namespace-generic like :meth:`check_leaf_array`; the levels are cast to one floating
        dtype.  Every node's conditionals must be normalised: ``|sum_a exp(log_pi[h][p, i, a])
        - 1| <= tol`` for every node, with the dtype-aware ``tol`` of :func:`normalisation_tol`
        (``max(1e-9, eps32 log V)`` in float64, ``1.7e-7`` for ``V = 4``, which admits float32
        log-probabilities promoted to float64; ``max(1e-4, 4 V eps32)`` in float32).  The check also rejects NaN and ``+inf`` (their rows do not sum to 1), any
        log-probability above ``log(1 + tol)`` (its row sums to more than ``1 + tol``) and
        nodes whose tokens all have probability zero (a row of ``-inf`` sums to 0).

        Cost: one ``exp`` per edge (the arguments clamped at
        :func:`toyrlhf._backend.exp_floor`, which keeps NumPy's ``exp`` off its slow path for
        ``-inf``; a clamped term is at most ``1e-304`` and cannot change a sum by ``tol``), in
        cache-sized blocks on the CPU (whole levels on a GPU).  It runs at the public entry
        points (policy-class constructors, ``sequence_kl``, ...), not inside optimiser loops,
        whose conditionals are built by ``log_softmax`` and normalised by construction.
        :func:`~toyrlhf.projections.soft_optimal_policy` passes ``check_normalised=False`` and
        runs the same check fused into its sweep, on the blocks of ``log_pi_ref`` it has in cache
        anyway (``benchmarks/bench_soft_vi.py`` times both).  With ``check_normalised=False``
        only the shapes and dtypes are checked, and the caller must check the rest.
        """
        if not isinstance(log_pi, (tuple, list)) or len(log_pi) != self.H:
            raise TypeError(f"{name} must be a tuple of H={self.H} per-level arrays (P, V**h, V)")
        xp = array_namespace(*log_pi, like)
        like = next((x for x in (*log_pi, like) if array_namespace(x) is xp and xp is not np), None)
        levels = [as_float(lp, xp, like) for lp in log_pi]
        dt = float_dtype(xp, *levels)
        tol = normalisation_tol(xp, dt, self.V)
        floor = exp_floor(xp, dt)
        prof = kernel_profile(xp)
        out = []
        for h, lp in enumerate(levels):
            want = (self.P, self.V**h, self.V)
            if lp.shape != want:
                raise ValueError(f"{name}[{h}] must have shape {want}, got {lp.shape}")
            if lp.dtype != dt:
                lp = xp.astype(lp, dt)
            if check_normalised:
                dev = _max_row_deviation(xp, lp, floor, prof)
                if not abs(dev) <= tol:  # NaN deviations fail too
                    _raise_unnormalised(xp, name, h, lp, dev, tol)
            out.append(lp)
        return tuple(out)

    def __repr__(self) -> str:
        eos = "" if self.eos is None else f", eos={self.eos}"
        return f"TokenTree(V={self.V}, H={self.H}, P={self.P}{eos})"
