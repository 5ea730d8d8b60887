"""One code path for every array backend (toyrlhf._backend): portability and precision.

The kernels run on ``array_api_strict`` arrays placed on its non-CPU test device
(``Device("device1")``), where any NumPy-only call fails: ``np.asarray`` of such an array raises,
and ``array_api_strict`` refuses to combine its arrays with NumPy arrays or to run functions
outside the standard.  Their results must come back as ``array_api_strict`` arrays on that
device, and equal the NumPy results:

* float64: the same operations in the same order, so equal to ``1e-12`` (in practice bitwise);
* float32: compared with float64 NumPy on the *same* float32-rounded inputs, within
  ``tol32 = 4 * depth * (V + 2 + 3 * M) * eps32`` (``eps32 = 2**-23``, ``M`` the largest
  magnitude of the values combined).  Why: each level of a tree sweep (sum over a path, or a
  soft-max/log-sum-exp over ``V`` tokens) rounds an ``O(M)`` value a few times and sums ``V``
  terms, an absolute error of about ``(3 M + V + 2) eps``; a log-sum-exp passes the error of its
  inputs on with gain at most 1 (its gradient, the soft-max, sums to 1), so errors add up over
  the ``depth`` levels.  The factor 4 covers ``exp``/``log`` being accurate to a few ulps.

GPU tests (CuPy) run the same comparisons and skip, saying why, when CuPy or a GPU is absent.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest

from toyrlhf import _backend
from toyrlhf._backend import (
    CPU_PROFILE,
    DEVICE_PROFILE,
    BackendUnavailableError,
    KernelProfile,
    array_namespace,
    backend_namespace,
    exp_floor,
    to_numpy,
)
from toyrlhf.best_of_n import best_of_n_kl, best_of_n_logprobs, best_of_n_win_rate
from toyrlhf.losses import (
    GPO_FAMILY,
    dpo_loss,
    gpo_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    robust_dpo_loss,
    rpo_loss,
    simpo_loss,
    taylor_terms,
)
from toyrlhf.policies import (
    aggregate_to_edges,
    leaf_logprobs,
    log_softmax,
    policy_from_logits,
    random_policy,
    sample_completions,
    sample_leaves,
    sequence_entropy,
    sequence_kl,
)
from toyrlhf.preferences import sample_preferences
from toyrlhf.projections import (
    SoftOptimalPolicyClass,
    _lse_last,
    _soft_value_iteration,
    gibbs_policy,
    implicit_reward,
    kl_regularized_objective,
    soft_log_partition,
    soft_optimal_policy,
)
from toyrlhf.projections import dpo_loss as policy_dpo_loss
from toyrlhf.rewards import TabularReward
from toyrlhf.tree import GiB, TokenTree

xps = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed (pip install array-api-strict)")
from array_api_strict._array_object import Array as StrictArray  # noqa: E402

DEV = xps.Device("device1")  # not the CPU: implicit conversions to NumPy raise there
EPS32 = float(np.finfo(np.float32).eps)


def tol32(depth: int, V: int, M: float) -> float:
    """The float32 tolerance of the module docstring."""
    return 4 * depth * (V + 2 + 3 * M) * EPS32


def put(x, dtype=np.float64):
    """A host array as an array_api_strict array on the test device."""
    a = np.asarray(x)
    if dtype is not None and a.dtype.kind == "f":
        a = a.astype(dtype)
    return xps.asarray(a, device=DEV)


def back(x):
    """Check ``x`` is a strict array on the test device and return its values on the host."""
    assert isinstance(x, StrictArray), f"expected an array_api_strict array, got {type(x).__name__}"
    assert x.device == DEV
    return to_numpy(x)


def assert_same(got, want, atol):
    """Same shape, same -inf pattern, no NaN, finite entries within atol."""
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    assert got.shape == want.shape
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=0, atol=atol)


def problem(V=3, H=4, P=2, eos=None, zero_fraction=0.25, seed=0):
    rng = np.random.default_rng(seed)
    tree = TokenTree(V=V, H=H, P=P, eos=eos)
    ref = random_policy(tree, rng, zero_fraction=zero_fraction)
    r = 2.0 * rng.standard_normal((P, tree.n_leaves))
    return tree, ref, r, rng


def f32(x):
    """Round to float32 and back: the inputs a float32 computation actually sees."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


TREES = [dict(V=2, H=1, P=1), dict(V=3, H=4, P=2), dict(V=4, H=3, P=3, eos=1), dict(V=5, H=3, P=1, zero_fraction=0.0)]


# =========================================================================== the namespace layer
def test_array_namespace_rules():
    a = put(np.ones(3))
    assert array_namespace(np.ones(2), [1.0], 3.0, None) is np
    assert array_namespace() is np
    assert array_namespace(a) is xps
    assert array_namespace(np.ones(3), a, [1.0]) is xps  # host data never decides


def test_array_namespace_refuses_two_libraries():
    class Fake:
        def __array_namespace__(self, api_version=None):
            return types.ModuleType("fake_array_library")

    with pytest.raises(TypeError, match="mix array libraries"):
        array_namespace(put([1.0]), Fake())


class _OldCupyArray:
    """Stands for a CuPy < 14 array: no ``__array_namespace__``."""


_OldCupyArray.__module__ = "cupy._core.core"


def test_works_without_array_api_compat(monkeypatch):
    monkeypatch.setattr(_backend, "_compat", lambda: None)
    assert array_namespace(np.ones(2)) is np
    assert array_namespace(put([1.0, 2.0])) is xps  # via __array_namespace__
    tree, ref, r, _ = problem()
    sol = soft_optimal_policy(tree, ref, r, 0.5)
    assert isinstance(sol.log_Z, np.ndarray)
    got = soft_optimal_policy(tree, tuple(put(x) for x in ref), put(r), 0.5)
    assert_same(back(got.log_Z), sol.log_Z, 1e-12)
    # CuPy before version 14 has no __array_namespace__: its main namespace is used
    fake_cupy = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    assert array_namespace(_OldCupyArray()) is fake_cupy


def test_to_numpy_and_asarray_round_trip():
    x = np.arange(6.0).reshape(2, 3)
    assert to_numpy(x) is x
    a = _backend.asarray(x, put([0.0]))
    assert a.device == DEV
    np.testing.assert_array_equal(to_numpy(a), x)
    assert to_numpy([1, 2]).tolist() == [1, 2]


def test_backend_namespace_names_and_errors(monkeypatch):
    assert backend_namespace("numpy") is np
    assert backend_namespace("array_api_strict") is xps
    with pytest.raises(ValueError, match="backend must be one of 'numpy', 'cupy', 'array_api_strict'"):
        backend_namespace("torch")
    # CuPy not installed
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cupy' needs CuPy, which is not installed"):
        backend_namespace("cupy")
    # CuPy installed, but no GPU visible
    fake = types.ModuleType("cupy")

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cupy' needs a CUDA GPU, but none is visible.*no CUDA-capable"):
        backend_namespace("cupy")
    # CuPy and a GPU, but not array-api-compat
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setattr(_backend, "_compat", lambda: None)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cupy' needs array-api-compat"):
        backend_namespace("cupy")


def test_exp_floor_is_absorbed_exactly():
    for dt, want in ((np.float64, -700.0), (np.float32, -79.0)):
        floor = exp_floor(np, dt)
        assert floor == want
        tiny = np.exp(np.asarray(floor, dtype=dt))
        assert tiny >= np.finfo(dt).smallest_normal  # never subnormal
        one = np.asarray(1.0, dtype=dt)
        assert one + 64 * tiny == one  # below half an ulp of the largest term, even summed


def test_kernel_profiles():
    assert _backend.kernel_profile(np) == CPU_PROFILE
    assert _backend.kernel_profile(xps) == CPU_PROFILE  # array_api_strict computes with NumPy
    assert _backend.kernel_profile(types.ModuleType("cupy")) == DEVICE_PROFILE


# =========================================================================== kernels, float64
@pytest.mark.parametrize("spec", TREES)
def test_tree_kernels_are_namespace_generic(spec):
    tree, ref, r, rng = problem(**spec)
    ref_s = tuple(put(x) for x in ref)
    assert_same(back(leaf_logprobs(tree, ref_s)), leaf_logprobs(tree, ref), 1e-12)
    logits = [rng.standard_normal(x.shape) for x in ref]
    logits[0][0, 0, 0] = -np.inf
    got = policy_from_logits(tree, [put(z) for z in logits])  # includes apply_eos
    for g, w in zip(got, policy_from_logits(tree, logits)):
        assert_same(back(g), w, 1e-12)
    z = rng.standard_normal((2, 3, 4))
    assert_same(back(log_softmax(put(z))), log_softmax(z), 1e-12)
    assert_same(back(log_softmax(put(z), axis=1)), log_softmax(z, axis=1), 1e-12)
    for g, w in zip(aggregate_to_edges(tree, put(r)), aggregate_to_edges(tree, r)):
        assert_same(back(g), w, 1e-12)
    pol = policy_from_logits(tree, logits)
    pol_s = tuple(put(x) for x in pol)
    assert_same(back(sequence_kl(tree, pol_s, ref_s)), sequence_kl(tree, pol, ref), 1e-12)
    assert_same(back(sequence_entropy(tree, pol_s)), sequence_entropy(tree, pol), 1e-12)


@pytest.mark.parametrize("spec", TREES)
def test_soft_value_iteration_is_namespace_generic(spec):
    tree, ref, r, _ = problem(**spec)
    ref_s, r_s = tuple(put(x) for x in ref), put(r)
    want = soft_optimal_policy(tree, ref, r, 0.3)
    got = soft_optimal_policy(tree, ref_s, r_s, 0.3)
    assert_same(back(got.log_Z), want.log_Z, 1e-12)
    for g, w in zip(got.log_pi, want.log_pi):
        assert_same(back(g), w, 1e-12)
    assert_same(back(soft_log_partition(tree, ref_s, r_s, 0.3)), want.log_Z, 1e-12)
    # host reward next to device levels is moved to the device
    assert_same(back(soft_optimal_policy(tree, ref_s, r, 0.3).log_Z), want.log_Z, 1e-12)
    # every sweep strategy (tiny blocks split levels and prompts; whole levels; axis reductions)
    for prof in (KernelProfile(4, True), KernelProfile(7, False), CPU_PROFILE, DEVICE_PROFILE):
        log_pi, log_Z = _soft_value_iteration(xps, ref_s, r_s, 0.3, True, prof)
        assert_same(back(log_Z), want.log_Z, 1e-12)
        for g, w in zip(log_pi, want.log_pi):
            assert_same(back(g), w, 1e-12)
        _, log_Z = _soft_value_iteration(xps, ref_s, r_s, 0.3, False, prof)
        assert_same(back(log_Z), want.log_Z, 1e-12)
    # Gibbs form and the objective on leaves
    lp_ref = leaf_logprobs(tree, ref)
    g_lp, g_Z = gibbs_policy(put(lp_ref), r_s, 0.3)
    w_lp, w_Z = gibbs_policy(lp_ref, r, 0.3)
    assert_same(back(g_lp), w_lp, 1e-12)
    assert_same(back(g_Z), w_Z, 1e-12)
    pol_s = tuple(put(x) for x in want.log_pi)
    assert_same(back(kl_regularized_objective(tree, pol_s, ref_s, r_s, 0.3)),
                kl_regularized_objective(tree, want.log_pi, ref, r, 0.3), 1e-12)
    lp = leaf_logprobs(tree, want.log_pi)
    assert_same(back(implicit_reward(put(lp), put(lp_ref), 0.3)), implicit_reward(lp, lp_ref, 0.3), 1e-12)


def test_lse_last_every_profile():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((5, 7, 4))
    z[rng.random(z.shape) < 0.3] = -np.inf
    z[..., 0] = rng.standard_normal(z.shape[:-1])  # one finite entry per row
    want = _lse_last(z)
    np.testing.assert_allclose(want, np.log(np.exp(z).sum(axis=-1)), rtol=1e-14)
    for prof in (KernelProfile(8, True), KernelProfile(8, False), DEVICE_PROFILE, None):
        assert_same(back(_lse_last(put(z), prof)), want, 1e-12)


def test_sampling_draws_on_the_host_and_agrees():
    tree, ref, _, _ = problem(V=3, H=4, P=3)
    ref_s = tuple(put(x) for x in ref)
    pa, ta = sample_completions(tree, ref, 500, np.random.default_rng(5))
    pb, tb = sample_completions(tree, ref_s, 500, np.random.default_rng(5))
    assert isinstance(tb, np.ndarray) and isinstance(pb, np.ndarray)  # samples come back to the host
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(ta, tb)
    lp = leaf_logprobs(tree, ref)
    pa, la = sample_leaves(tree, lp, 400, np.random.default_rng(6))
    pb, lb = sample_leaves(tree, put(lp), 400, np.random.default_rng(6))
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(la, lb)


def _loss_calls(lc, lr, rc, rr, w, nc, nr, des):
    """Every loss on the same inputs (functions of the given arrays only)."""
    kw = dict(weights=w)
    out = {
        "dpo": dpo_loss(lc, lr, rc, rr, beta=0.5, **kw),
        "cdpo": dpo_loss(lc, lr, rc, rr, beta=0.5, label_smoothing=0.1, **kw),
        "robust": robust_dpo_loss(lc, lr, rc, rr, beta=0.5, label_smoothing=0.2, **kw),
        "ipo": ipo_loss(lc, lr, rc, rr, tau=0.7, **kw),
        "simpo": simpo_loss(lc, lr, len_chosen=nc, len_rejected=nr, beta=2.0, gamma=0.3, **kw),
        "orpo": orpo_loss(lc, lr, len_chosen=nc, len_rejected=nr, lam=0.5, **kw),
        "rpo": rpo_loss(lc, lr, rc, rr, beta=0.5, alpha=0.3, len_chosen=nc, **kw),
    }
    for name in GPO_FAMILY:
        out[name] = gpo_loss(name, lc, lr, rc, rr, beta=1.5, **kw)
    out["kto"] = kto_loss(lc, rc, des, z_ref=0.1, beta=0.5, weights=w)
    return out


def test_losses_are_namespace_generic():
    rng = np.random.default_rng(7)
    M = 40
    lc, lr, rc, rr = (-rng.exponential(2.0, M) for _ in range(4))
    w = rng.random(M)
    w[3] = 0.0
    nc, nr = rng.integers(1, 6, M), rng.integers(1, 6, M)
    des = rng.random(M) < 0.5
    want = _loss_calls(lc, lr, rc, rr, w, nc, nr, des)
    got = _loss_calls(put(lc), put(lr), put(rc), put(rr), put(w), put(nc, None), put(nr, None), put(des, None))
    for name, g in got.items():
        v = want[name]
        assert g.loss == pytest.approx(v.loss, rel=1e-12, abs=1e-14), name
        if hasattr(v, "grad"):
            assert_same(back(g.grad), v.grad, 1e-12)
        else:
            assert_same(back(g.grad_chosen), v.grad_chosen, 1e-12)
            assert_same(back(g.grad_rejected), v.grad_rejected, 1e-12)
    # host lists mixed with device arrays, and the scalar helpers
    mixed = dpo_loss(list(lc), put(lr), rc, put(rr), beta=0.5)
    assert mixed.loss == pytest.approx(dpo_loss(lc, lr, rc, rr, beta=0.5).loss, rel=1e-12)
    a = -rng.exponential(1.0, 9)
    assert_same(back(log1mexp(put(a))), log1mexp(a), 1e-12)
    x = rng.standard_normal(11) * 5
    for c in GPO_FAMILY.values():
        for fn in (c.f, c.df, c.d2f):
            assert_same(back(fn(put(x))), fn(x), 1e-12)
    t = taylor_terms("logistic", 0.5, put(x), put(np.abs(x)))
    assert t == pytest.approx(taylor_terms("logistic", 0.5, x, np.abs(x)), rel=1e-12)
    # -inf at a zero-weight pair and limits under allow_neg_inf stay NaN-free on the device
    lr2 = lr.copy()
    lr2[0] = -np.inf
    v = dpo_loss(put(lc), put(lr2), put(rc), put(rr), beta=0.5, allow_neg_inf=True)
    assert_same(back(v.grad_chosen), dpo_loss(lc, lr2, rc, rr, beta=0.5, allow_neg_inf=True).grad_chosen, 1e-12)
    with pytest.raises(ValueError, match="logp_rejected contains -inf at index 0"):
        dpo_loss(put(lc), put(lr2), put(rc), put(rr), beta=0.5)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_is_namespace_generic(ties):
    tree, ref, r, _ = problem(V=3, H=3, P=2, zero_fraction=0.3, seed=2)
    if ties:
        r = np.round(r)  # level sets of several completions
    lq = leaf_logprobs(tree, ref)
    for n in (1, 3, 1000):
        assert_same(back(best_of_n_logprobs(tree, put(lq), put(r), n)), best_of_n_logprobs(tree, lq, r, n), 1e-12)
        assert_same(back(best_of_n_kl(tree, put(lq), put(r), n)), best_of_n_kl(tree, lq, r, n), 1e-12)
        assert_same(back(best_of_n_win_rate(tree, put(lq), put(r), n)), best_of_n_win_rate(tree, lq, r, n), 1e-12)


def test_dpo_through_a_device_policy_class_matches_the_host():
    """The host/device boundary of DPO: scipy's theta on the host, Pi(R) on the device."""
    tree, ref, _, rng = problem(V=3, H=3, P=2, zero_fraction=0.0)
    gold = rng.standard_normal((tree.P, tree.n_leaves))
    data = sample_preferences(tree, gold, 200, rng, log_pi_pair=ref)
    rc = TabularReward(tree)
    theta = 0.3 * rng.standard_normal(rc.n_params)
    lp_ref = leaf_logprobs(tree, ref)
    want = policy_dpo_loss(SoftOptimalPolicyClass(rc, ref, 0.5), theta, data, lp_ref, 0.5)
    got = policy_dpo_loss(SoftOptimalPolicyClass(rc, tuple(put(x) for x in ref), 0.5), theta, data, lp_ref, 0.5)
    assert isinstance(got[1], np.ndarray)  # the gradient comes back to the host for scipy
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-11, atol=1e-14)


# =========================================================================== float32
def test_float32_stays_float32_on_numpy():
    tree, ref, r, _ = problem()
    ref32 = tuple(x.astype(np.float32) for x in ref)
    sol = soft_optimal_policy(tree, ref32, r.astype(np.float32), 0.5)
    assert sol.log_Z.dtype == np.float32 and all(x.dtype == np.float32 for x in sol.log_pi)
    assert leaf_logprobs(tree, ref32).dtype == np.float32
    assert aggregate_to_edges(tree, r.astype(np.float32))[0].dtype == np.float32
    assert dpo_loss(np.float32([-1.0]), np.float32([-2.0]), np.float32([-1.0]), np.float32([-1.0]), beta=1.0).grad_chosen.dtype == np.float32


@pytest.mark.parametrize("spec", TREES)
def test_float32_kernels_within_the_derived_tolerance(spec):
    tree, ref, r, _ = problem(**spec)
    beta = 0.5
    ref64, r64 = tuple(f32(x) for x in ref), f32(r)  # the float32 inputs, exactly, in float64
    ref_s, r_s = tuple(put(x, np.float32) for x in ref), put(r, np.float32)
    V, H = tree.V, tree.H
    # sequence log-probs: a sum over H levels of values up to M
    want = leaf_logprobs(tree, ref64)
    got = back(leaf_logprobs(tree, ref_s))
    assert got.dtype == np.float32
    M = np.max(np.abs(want[np.isfinite(want)]))
    assert_same(got, want, tol32(H, 1, M))
    # soft value iteration: values combine |r / beta| + |log pi_ref| + lower levels
    sol = soft_optimal_policy(tree, ref64, r64, beta)
    out = soft_optimal_policy(tree, ref_s, r_s, beta)
    assert out.log_Z.dtype == xps.float32 and all(x.dtype == xps.float32 for x in out.log_pi)
    M = np.max(np.abs(r64)) / beta + H * max(np.max(np.abs(x[np.isfinite(x)])) for x in ref64)
    assert_same(back(out.log_Z), sol.log_Z, tol32(H, V, M))
    for g, w in zip(out.log_pi, sol.log_pi):
        assert_same(back(g), w, 2 * tol32(H, V, M))  # z - V(s): two values of the sweep
    # tree-aggregated gradients: sums of V**(H-h) leaves per edge
    for g, w in zip(aggregate_to_edges(tree, r_s), aggregate_to_edges(tree, r64)):
        assert_same(back(g), w, tol32(H, V, np.sum(np.abs(r64), axis=1).max()))
    # losses: a few roundings per pair (M = 40 pairs, log-probs up to ~10)
    rng = np.random.default_rng(1)
    lc, lr, rc, rr = (f32(-rng.exponential(2.0, 40)) for _ in range(4))
    v64 = dpo_loss(lc, lr, rc, rr, beta=0.5)
    v32 = dpo_loss(put(lc, np.float32), put(lr, np.float32), put(rc, np.float32), put(rr, np.float32), beta=0.5)
    assert v32.grad_chosen.dtype == xps.float32
    Ml = np.max(np.abs(np.concatenate([lc, lr, rc, rr])))
    assert v32.loss == pytest.approx(v64.loss, abs=tol32(1, 4, Ml))
    assert_same(back(v32.grad_chosen), v64.grad_chosen, tol32(1, 4, Ml))
    # best-of-n: level masses are sums of at most N probabilities; the float64 reference gets the
    # float32 inputs renormalised in float64 (its rows must sum to 1 within 1e-8)
    lq32 = leaf_logprobs(tree, ref).astype(np.float32)
    lq64 = lq32.astype(np.float64)
    with np.errstate(divide="ignore"):
        lq64 = lq64 - np.log(np.exp(lq64).sum(axis=1, keepdims=True))
    b64 = best_of_n_kl(tree, lq64, r64, 4)
    b32 = back(best_of_n_kl(tree, put(lq32, np.float32), r_s, 4))
    assert b32.dtype == np.float32
    assert_same(b32, b64, tol32(4, tree.n_leaves, np.max(np.abs(lq64[np.isfinite(lq64)]))))


def test_no_nan_with_partial_support_on_any_profile():
    tree, ref, r, _ = problem(V=4, H=4, P=3, zero_fraction=0.5)
    r = 300.0 * r  # large rewards: exp arguments far below the clamp
    for dt in (np.float64, np.float32):
        ref_s, r_s = tuple(put(x, dt) for x in ref), put(r, dt)
        for prof in (KernelProfile(16, True), DEVICE_PROFILE):
            log_pi, log_Z = _soft_value_iteration(xps, tuple(xps.astype(x, r_s.dtype) for x in ref_s), r_s, 0.01, True, prof)
            for g, w in zip(log_pi, ref):
                gn = back(g)
                assert not np.isnan(gn).any()
                np.testing.assert_array_equal(np.isneginf(gn), np.isneginf(w))
            assert np.isfinite(back(log_Z)).all()


def near_cdf_boundary(tree, log_pi64, prompts, tokens, seed, delta):
    """(n,) bool: some draw of sample i, replayed in float64 along its own path, fell within
    ``delta`` (relative to the row total) of a boundary of the inverse-CDF table.

    Replays :func:`~toyrlhf.policies.sample_completions` with ``default_rng(seed)``: one
    ``random(n)`` for the prompts, then one per depth; ``tokens`` must be the float64 NumPy draws
    of that call, which the replay checks it reproduces.
    """
    n = prompts.size
    rng = np.random.default_rng(seed)
    rng.random(n)  # the prompts' uniforms
    node = np.zeros(n, dtype=np.int64)
    near = np.zeros(n, dtype=bool)
    for h in range(tree.H):
        u = rng.random(n)
        rows = np.asarray(log_pi64[h]).reshape(-1, tree.V)[prompts * tree.V**h + node]
        with np.errstate(under="ignore"):
            cdf = np.cumsum(np.exp(rows), axis=1)
        # the replay must reproduce the float64 draws it follows
        replayed = np.minimum(np.sum(cdf <= (u * cdf[:, -1])[:, None], axis=1), tree.V - 1)
        np.testing.assert_array_equal(replayed, tokens[:, h])
        bounds = cdf[:, :-1] / cdf[:, -1:]  # the last boundary, 1, is never crossed by u < 1
        near |= np.min(np.abs(bounds - u[:, None]), axis=1) <= delta
        node = node * tree.V + tokens[:, h]
    return near


def assert_samples_differ_only_near_cdf_boundaries(tree, log_pi64, prompts, t64, t32, seed):
    """float32 inverse-CDF draws against float64 ones on the same float32-rounded log-probs.

    The float32 draw compares ``u`` (rounded to float32, relative error eps/2) with a CDF built from
    ``V`` float32 ``exp`` (a few ulps each) and a cumulative sum (``V - 1`` roundings), scaled by its
    float32 total: every boundary moves by less than ``delta = tol32(1, V, 0) = 4 (V + 2) eps32``
    of the row total.  So a float32 sample can differ from the float64 one only if one of its
    uniforms lies within ``delta`` of a boundary -- which the float64 replay detects.
    """
    delta = tol32(1, tree.V, 0.0)
    near = near_cdf_boundary(tree, log_pi64, prompts, t64, seed, delta)
    differ = np.any(t64 != t32, axis=1)
    assert not np.any(differ & ~near), np.flatnonzero(differ & ~near)
    return differ, near


def test_float32_sampling_differs_only_near_a_cdf_boundary():
    """The float32 tolerance of sampling, checked on the host with enough draws to see it act."""
    tree, ref, _, _ = problem(V=4, H=5, P=3)
    ref64 = tuple(f32(x) for x in ref)
    n = 100_000
    pa, ta = sample_completions(tree, ref64, n, np.random.default_rng(1))
    pb, tb = sample_completions(tree, tuple(put(x, np.float32) for x in ref), n, np.random.default_rng(1))
    np.testing.assert_array_equal(pa, pb)
    differ, near = assert_samples_differ_only_near_cdf_boundaries(tree, ref64, pa, ta, tb, 1)
    # the band is narrow: at most n H (V - 1) 2 delta = 8.6 flagged samples expected (fewer: some
    # boundaries coincide where pi_ref has zeros); 50 is beyond any Poisson(8.6) fluctuation, while a
    # tolerance a hundred times too wide would flag ~860.  (Measured: 6 flagged, 0 differ; at
    # 2,000,000 samples 1 differs, its uniform 1e-8 to 3e-8 from a boundary: float32 rounding of u.)
    assert near.sum() < 50 and differ.sum() <= near.sum()


# =========================================================================== GPU (CuPy)
def _cupy():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed (pip install 'toyrlhf[gpu]' on a machine with an NVIDIA GPU)")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"CuPy is installed but no CUDA GPU is visible ({exc})")
    if n == 0:
        pytest.skip("CuPy is installed but no CUDA GPU is visible")
    return backend_namespace("cupy")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_kernels_match_numpy(dtype):
    cp = _cupy()
    tree, ref, r, _ = problem(V=4, H=5, P=3)
    ref64, r64 = tuple(np.asarray(x, dtype).astype(np.float64) for x in ref), np.asarray(r, dtype).astype(np.float64)
    ref_c, r_c = tuple(cp.asarray(np.asarray(x, dtype)) for x in ref), cp.asarray(np.asarray(r, dtype))
    sol, out = soft_optimal_policy(tree, ref64, r64, 0.5), soft_optimal_policy(tree, ref_c, r_c, 0.5)
    assert out.log_Z.dtype == dtype and array_namespace(out.log_Z) is cp
    M = np.max(np.abs(r64)) / 0.5 + tree.H * max(np.max(np.abs(x[np.isfinite(x)])) for x in ref64)
    tol = 1e-12 if dtype == np.float64 else tol32(tree.H, tree.V, M)
    assert_same(to_numpy(out.log_Z), sol.log_Z, tol)
    for g, w in zip(out.log_pi, sol.log_pi):
        assert_same(to_numpy(g), w, 2 * tol)
    lp = leaf_logprobs(tree, ref64)
    assert_same(to_numpy(leaf_logprobs(tree, ref_c)), lp, 1e-12 if dtype == np.float64 else tol32(tree.H, 1, np.abs(lp[np.isfinite(lp)]).max()))
    for g, w in zip(aggregate_to_edges(tree, r_c), aggregate_to_edges(tree, r64)):
        assert_same(to_numpy(g), w, 1e-10 if dtype == np.float64 else tol32(tree.H, tree.V, np.abs(r64).sum(axis=1).max()))
    pa, ta = sample_completions(tree, ref64, 300, np.random.default_rng(0))
    pb, tb = sample_completions(tree, ref_c, 300, np.random.default_rng(0))
    np.testing.assert_array_equal(pa, pb)  # prompts: the same host uniforms against the same host rho0
    if dtype == np.float64:
        # same uniforms, CDFs equal up to a few float64 ulps: a uniform within that of one of the
        # 300 * 5 * 3 boundaries has probability ~1e-12, so the samples are identical
        np.testing.assert_array_equal(ta, tb)
    else:
        assert_samples_differ_only_near_cdf_boundaries(tree, ref64, pa, ta, tb, seed=0)


# =========================================================================== presets and CLI
def _gpu_presets():
    from toyrlhf.experiments import gen_verif_gap, overoptimisation

    return [m for m in (gen_verif_gap, overoptimisation) if callable(getattr(m.Config, "gpu", None))]


@pytest.mark.parametrize("module", _gpu_presets(), ids=lambda m: m.NAME)
def test_gpu_presets_construct_and_fit_their_budget(module):
    """The scaled-up presets: constructed (not run), sized for one GPU, checked up front."""
    c = module.Config.gpu()
    assert c.backend == "cupy"
    assert c.V**c.H >= 16_000_000 and c.P >= 2
    # the default 4 GiB budget refuses the tree, with its estimated size; the preset's accepts it
    with pytest.raises(ValueError, match=r"needs about .* GiB .* over memory_budget=4\.00 GiB"):
        TokenTree(V=c.V, H=c.H, P=c.P)
    tree = TokenTree(V=c.V, H=c.H, P=c.P, memory_budget=c.memory_gib * GiB)
    assert 4 * GiB < tree.estimated_bytes() <= c.memory_gib * GiB <= 80 * GiB  # fits an H100
    assert tree.n_leaves * tree.P == c.P * c.V**c.H
    # and running it here, without CuPy or a GPU, fails up front with the backend's message
    try:
        backend_namespace("cupy")
    except BackendUnavailableError as exc:
        with pytest.raises(BackendUnavailableError, match="backend 'cupy'"):
            module.run(c)
        assert "cupy" in str(exc)


@pytest.mark.parametrize("module", _gpu_presets(), ids=lambda m: m.NAME)
def test_backend_field_is_validated_and_is_a_cli_option(module):
    from toyrlhf.cli import config_parser, with_backend

    with pytest.raises(ValueError, match="backend must be one of"):
        dataclasses.replace(module.Config.quick(), backend="torch")
    parser, conv = config_parser(module)
    ns = parser.parse_args(["--backend", "array_api_strict"])
    assert ns.backend == "array_api_strict"
    cfg, has = with_backend(module.Config.quick(), "array_api_strict")
    assert has and cfg.backend == "array_api_strict"


def test_cli_backend_flag_reports_a_missing_gpu(monkeypatch, capsys):
    from toyrlhf.cli import main, with_backend
    from toyrlhf.experiments import loss_shapes

    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    for argv in (["figures", "--backend", "cupy", "loss_shapes"], ["run", "gen_verif_gap", "--quick", "--backend", "cupy"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "backend 'cupy' needs CuPy, which is not installed" in capsys.readouterr().err
    cfg, has = with_backend(loss_shapes.Config(), "cupy")
    assert not has and cfg == loss_shapes.Config()  # configs without the field keep NumPy


def _tiny(module):
    c = module.Config.quick()
    if module.NAME == "gen_verif_gap":
        return dataclasses.replace(c, V=2, H=3, P=2, sizes=(40,), n_seeds=2, levels=("unigram", "tabular"))
    return c


@pytest.mark.parametrize("module", _gpu_presets(), ids=lambda m: m.NAME)
def test_experiment_on_array_api_strict_equals_numpy(module):
    """A whole experiment through its backend field: the same numbers on another namespace."""
    c = _tiny(module)
    a = module.run(c)
    b = module.run(dataclasses.replace(c, backend="array_api_strict"))
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-12, err_msg=f.name)
        elif isinstance(x, float):
            assert y == pytest.approx(x, rel=1e-10, abs=1e-12), f.name
