"""Tests of toyrlhf.losses: every loss against an obvious formula, every gradient against
finite differences, the reductions between losses, the Taylor view, stability and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toyrlhf import losses as L

M = 7
H = 1e-6  # central-difference step


# ------------------------------------------------------------------------------- fixtures
def _data(seed: int = 0, m: int = M):
    rng = np.random.default_rng(seed)
    return dict(
        lc=rng.uniform(-8.0, -0.2, m),
        lr=rng.uniform(-8.0, -0.2, m),
        rc=rng.uniform(-8.0, -0.2, m),
        rr=rng.uniform(-8.0, -0.2, m),
        w=rng.dirichlet(np.ones(m)),
        nc=rng.integers(1, 6, m),
        nr=rng.integers(1, 6, m),
    )


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logistic(x: float) -> float:
    return math.log(1.0 + math.exp(-x))


DIRECT_F = {
    "logistic": logistic,
    "squared": lambda x: (x - 1.0) ** 2,
    "hinge": lambda x: max(0.0, 1.0 - x),
    "exponential": lambda x: math.exp(-x),
    "truncated_quadratic": lambda x: max(0.0, 1.0 - x) ** 2,
    "savage": lambda x: 1.0 / (1.0 + math.exp(x)) ** 2,
}

# (f(0), f'(0), f''(0)) worked by hand; e.g. Savage: f = s^2 with s = 1/(1+e^x), s' = -s(1-s),
# so f' = -2 s^2 (1-s) = -1/4 and f'' = s^2 (1-s)(4-6s) = 1/8 at s = 1/2.
AT_ZERO = {
    "logistic": (math.log(2.0), -0.5, 0.25),
    "squared": (1.0, -2.0, 2.0),
    "hinge": (1.0, -1.0, 0.0),
    "exponential": (1.0, -1.0, 1.0),
    "truncated_quadratic": (1.0, -2.0, 2.0),
    "savage": (0.25, -0.25, 0.125),
}


def _rho(d, i):
    return (d["lc"][i] - d["rc"][i]) - (d["lr"][i] - d["rr"][i])


def _fd_grads(fn, lc, lr):
    """Central finite differences of fn(lc, lr) -> float w.r.t. each entry of lc and lr."""
    out = []
    for which in (0, 1):
        g = np.empty(len(lc))
        for i in range(len(lc)):
            args_p = [lc.copy(), lr.copy()]
            args_m = [lc.copy(), lr.copy()]
            args_p[which][i] += H
            args_m[which][i] -= H
            g[i] = (fn(*args_p) - fn(*args_m)) / (2 * H)
        out.append(g)
    return out


# Paired losses as functions of (lc, lr) with everything else fixed: name -> (fn, direct)
def _paired_cases(d):
    rc, rr, w, nc, nr = d["rc"], d["rr"], d["w"], d["nc"], d["nr"]
    beta, eps, tau, gamma, lam, alpha = 0.7, 0.2, 0.4, 0.3, 0.8, 0.6
    cases = {}
    for name, f in DIRECT_F.items():
        cases[f"gpo_{name}"] = (
            lambda lc, lr, name=name: L.gpo_loss(name, lc, lr, rc, rr, beta=beta, weights=w),
            lambda lc, lr, f=f: sum(
                w[i] * f(beta * ((lc[i] - rc[i]) - (lr[i] - rr[i]))) for i in range(M)),
        )
    cases["dpo_smoothed"] = (
        lambda lc, lr: L.dpo_loss(lc, lr, rc, rr, beta=beta, label_smoothing=eps, weights=w),
        lambda lc, lr: sum(
            w[i] * ((1 - eps) * -math.log(sigmoid(beta * ((lc[i] - rc[i]) - (lr[i] - rr[i]))))
                    + eps * -math.log(sigmoid(-beta * ((lc[i] - rc[i]) - (lr[i] - rr[i])))))
            for i in range(M)),
    )
    cases["robust"] = (
        lambda lc, lr: L.robust_dpo_loss(lc, lr, rc, rr, beta=beta, label_smoothing=eps,
                                         weights=w),
        lambda lc, lr: sum(
            w[i] * ((1 - eps) * -math.log(sigmoid(beta * ((lc[i] - rc[i]) - (lr[i] - rr[i]))))
                    - eps * -math.log(sigmoid(-beta * ((lc[i] - rc[i]) - (lr[i] - rr[i])))))
            / (1 - 2 * eps)
            for i in range(M)),
    )
    cases["ipo"] = (
        lambda lc, lr: L.ipo_loss(lc, lr, rc, rr, tau=tau, weights=w),
        lambda lc, lr: sum(w[i] * (((lc[i] - rc[i]) - (lr[i] - rr[i])) - 1 / (2 * tau)) ** 2
                           for i in range(M)),
    )
    cases["simpo"] = (
        lambda lc, lr: L.simpo_loss(lc, lr, len_chosen=nc, len_rejected=nr, beta=beta,
                                    gamma=gamma, weights=w),
        lambda lc, lr: sum(
            -w[i] * math.log(sigmoid(beta / nc[i] * lc[i] - beta / nr[i] * lr[i] - gamma))
            for i in range(M)),
    )

    def log_odds(logp, n):
        p = math.exp(logp / n)
        return math.log(p / (1 - p))

    cases["orpo"] = (
        lambda lc, lr: L.orpo_loss(lc, lr, len_chosen=nc, len_rejected=nr, lam=lam, weights=w),
        lambda lc, lr: sum(
            w[i] * (-lc[i] / nc[i]
                    - lam * math.log(sigmoid(log_odds(lc[i], nc[i]) - log_odds(lr[i], nr[i]))))
            for i in range(M)),
    )
    cases["rpo"] = (
        lambda lc, lr: L.rpo_loss(lc, lr, rc, rr, beta=beta, alpha=alpha, len_chosen=nc,
                                  weights=w),
        lambda lc, lr: sum(
            w[i] * (-math.log(sigmoid(beta * ((lc[i] - rc[i]) - (lr[i] - rr[i]))))
                    - alpha * lc[i] / nc[i])
            for i in range(M)),
    )
    return cases


CASE_NAMES = list(_paired_cases(_data()))


# ------------------------------------------------------------------ values against formulas
@pytest.mark.parametrize("case", CASE_NAMES)
def test_loss_matches_direct_formula(case):
    for seed in range(3):
        d = _data(seed)
        fn, direct = _paired_cases(d)[case]
        value = fn(d["lc"], d["lr"])
        assert isinstance(value, L.LossValue)
        assert isinstance(value.loss, float)
        assert value.grad_chosen.shape == value.grad_rejected.shape == (M,)
        assert value.loss == pytest.approx(direct(d["lc"], d["lr"]), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_gradient_matches_finite_differences(case):
    d = _data(1)
    fn, _ = _paired_cases(d)[case]
    value = fn(d["lc"], d["lr"])
    fd_c, fd_r = _fd_grads(lambda a, b: fn(a, b).loss, d["lc"], d["lr"])
    np.testing.assert_allclose(value.grad_chosen, fd_c, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(value.grad_rejected, fd_r, rtol=1e-6, atol=1e-9)


def test_hinge_finite_difference_inputs_are_away_from_the_kink():
    # the FD test above is only valid if no beta * rho is within a step of the kink at 1
    d = _data(1)
    x = 0.7 * np.array([_rho(d, i) for i in range(M)])
    assert np.min(np.abs(x - 1.0)) > 1e-3
    assert (x > 1).any() and (x < 1).any()  # both branches exercised


def test_default_weights_are_uniform_mean():
    d = _data(2)
    v = L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=0.5)
    direct = np.mean([logistic(0.5 * _rho(d, i)) for i in range(M)])
    assert v.loss == pytest.approx(direct, rel=1e-12)
    v2 = L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=0.5, weights=np.ones(M))
    assert v2.loss == pytest.approx(M * v.loss, rel=1e-12)  # weighted SUM, not mean
    np.testing.assert_allclose(v2.grad_chosen, M * v.grad_chosen, rtol=1e-12)


def test_gradient_signs_gpo_family():
    # a larger margin never increases a monotone GPO loss (f' <= 0) ...
    d = _data(3)
    for name in set(L.GPO_FAMILY) - {"squared"}:
        v = L.gpo_loss(name, d["lc"], d["lr"], d["rc"], d["rr"], beta=0.9, weights=d["w"])
        assert (v.grad_chosen <= 0).all() and (v.grad_rejected >= 0).all()
        np.testing.assert_array_equal(v.grad_rejected, -v.grad_chosen)
    # ... but the squared (IPO) loss pulls margins beyond 1/beta back: f'(x) > 0 for x > 1
    v = L.gpo_loss("squared", [0.0, 0.0], [-3.0, -1.0], [0.0, 0.0], [0.0, 0.0], beta=0.5)
    assert v.grad_chosen[0] > 0 and v.grad_chosen[1] < 0


def test_kto_matches_direct_formula_and_finite_differences():
    rng = np.random.default_rng(5)
    logp, ref = rng.uniform(-6, -0.5, M), rng.uniform(-6, -0.5, M)
    desirable = np.array([True, False, True, True, False, False, True])
    w = rng.dirichlet(np.ones(M))
    kw = dict(z_ref=0.3, beta=0.8, lambda_D=1.3, lambda_U=0.7, weights=w)

    def direct(lp):
        total = 0.0
        for i in range(M):
            r = lp[i] - ref[i]
            if desirable[i]:
                total += w[i] * (1.3 - 1.3 * sigmoid(0.8 * (r - 0.3)))
            else:
                total += w[i] * (0.7 - 0.7 * sigmoid(0.8 * (0.3 - r)))
        return total

    v = L.kto_loss(logp, ref, desirable, **kw)
    assert isinstance(v, L.UnpairedLossValue)
    assert v.loss == pytest.approx(direct(logp), rel=1e-12)
    fd = np.empty(M)
    for i in range(M):
        e = np.zeros(M)
        e[i] = H
        fd[i] = (L.kto_loss(logp + e, ref, desirable, **kw).loss
                 - L.kto_loss(logp - e, ref, desirable, **kw).loss) / (2 * H)
    np.testing.assert_allclose(v.grad, fd, rtol=1e-6, atol=1e-9)
    # desirable examples are pushed up, undesirable ones down
    assert (v.grad[desirable] < 0).all() and (v.grad[~desirable] > 0).all()


def test_log_ratio_difference():
    d = _data(4)
    rho = L.log_ratio_difference(d["lc"], d["lr"], d["rc"], d["rr"])
    np.testing.assert_allclose(rho, [_rho(d, i) for i in range(M)], rtol=1e-14)


# ------------------------------------------------------------------ the GPO registry
@pytest.mark.parametrize("name", list(DIRECT_F))
def test_convex_registry_functions(name):
    c = L.GPO_FAMILY[name]
    assert c.name == name
    assert (c.f0, c.df0, c.d2f0) == pytest.approx(AT_ZERO[name], rel=1e-14, abs=1e-15)
    xs = np.array([-2.5, -1.3, -0.4, 0.3, 0.8, 1.6, 2.9])  # no kink (x = 1) within 1e-3
    np.testing.assert_allclose(c.f(xs), [DIRECT_F[name](x) for x in xs], rtol=1e-13)
    h = 1e-5
    np.testing.assert_allclose(c.df(xs), (c.f(xs + h) - c.f(xs - h)) / (2 * h),
                               rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(c.d2f(xs), (c.df(xs + h) - c.df(xs - h)) / (2 * h),
                               rtol=1e-7, atol=1e-9)


def test_registry_has_the_six_members():
    assert set(L.GPO_FAMILY) == set(DIRECT_F)
    assert {L.GPO_FAMILY[n].method for n in ("logistic", "squared", "hinge")} == {
        "DPO", "IPO", "SLiC"}


# ------------------------------------------------------------------ reductions
def test_smoothing_and_robust_at_zero_equal_dpo_and_gpo_logistic():
    d = _data(6)
    args = (d["lc"], d["lr"], d["rc"], d["rr"])
    ref = L.dpo_loss(*args, beta=0.4, weights=d["w"])
    for v in (
        L.dpo_loss(*args, beta=0.4, label_smoothing=0.0, weights=d["w"]),
        L.robust_dpo_loss(*args, beta=0.4, label_smoothing=0.0, weights=d["w"]),
        L.gpo_loss("logistic", *args, beta=0.4, weights=d["w"]),
        L.preference_loss("sigmoid", *args, beta=0.4, weights=d["w"]),
        L.preference_loss("logistic", *args, beta=0.4, weights=d["w"]),
    ):
        assert v.loss == pytest.approx(ref.loss, rel=1e-14)
        np.testing.assert_allclose(v.grad_chosen, ref.grad_chosen, rtol=1e-14)
        np.testing.assert_allclose(v.grad_rejected, ref.grad_rejected, rtol=1e-14)


def test_cdpo_is_dpo_averaged_over_label_flips():
    # label smoothing eps = expected DPO loss when each label is flipped with probability eps
    d = _data(7)
    eps, beta = 0.15, 0.6
    v = L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=beta, label_smoothing=eps)
    clean = L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=beta)
    flipped = L.dpo_loss(d["lr"], d["lc"], d["rr"], d["rc"], beta=beta)
    assert v.loss == pytest.approx((1 - eps) * clean.loss + eps * flipped.loss, rel=1e-13)


def test_robust_dpo_is_unbiased_under_label_noise():
    # Chowdhury et al. 2024: E_noise[robust loss] = clean DPO loss (and gradient)
    d = _data(8)
    eps, beta = 0.3, 0.6
    fwd = L.robust_dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=beta, label_smoothing=eps)
    bwd = L.robust_dpo_loss(d["lr"], d["lc"], d["rr"], d["rc"], beta=beta, label_smoothing=eps)
    clean = L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=beta)
    assert (1 - eps) * fwd.loss + eps * bwd.loss == pytest.approx(clean.loss, rel=1e-12)
    np.testing.assert_allclose((1 - eps) * fwd.grad_chosen + eps * bwd.grad_rejected,
                               clean.grad_chosen, rtol=1e-12)


def test_reference_free_equals_dpo_with_zero_reference():
    d = _data(9)
    z = np.zeros(M)
    ref = L.dpo_loss(d["lc"], d["lr"], z, z, beta=0.3, weights=d["w"])
    for v in (
        L.dpo_loss(d["lc"], d["lr"], beta=0.3, weights=d["w"], reference_free=True),
        # given reference log-probs are ignored
        L.dpo_loss(d["lc"], d["lr"], d["rc"], d["rr"], beta=0.3, weights=d["w"],
                   reference_free=True),
    ):
        assert v.loss == pytest.approx(ref.loss, rel=1e-14)
        np.testing.assert_allclose(v.grad_chosen, ref.grad_chosen, rtol=1e-14)


def test_simpo_with_unit_lengths_and_no_margin_is_reference_free_dpo():
    d = _data(10)
    ones = np.ones(M, dtype=int)
    s = L.simpo_loss(d["lc"], d["lr"], len_chosen=ones, len_rejected=ones, beta=0.5, gamma=0.0,
                     weights=d["w"])
    r = L.dpo_loss(d["lc"], d["lr"], beta=0.5, weights=d["w"], reference_free=True)
    assert s.loss == pytest.approx(r.loss, rel=1e-14)
    np.testing.assert_allclose(s.grad_chosen, r.grad_chosen, rtol=1e-14)
    np.testing.assert_allclose(s.grad_rejected, r.grad_rejected, rtol=1e-14)


def test_rpo_with_alpha_zero_is_dpo():
    d = _data(11)
    args = (d["lc"], d["lr"], d["rc"], d["rr"])
    r = L.rpo_loss(*args, beta=0.5, alpha=0.0, len_chosen=d["nc"], weights=d["w"])
    p = L.dpo_loss(*args, beta=0.5, weights=d["w"])
    assert r.loss == pytest.approx(p.loss, rel=1e-14)
    np.testing.assert_allclose(r.grad_chosen, p.grad_chosen, rtol=1e-14)
    # and alpha adds exactly alpha * w * NLL / len to the chosen gradient
    r2 = L.rpo_loss(*args, beta=0.5, alpha=2.0, len_chosen=d["nc"], weights=d["w"])
    np.testing.assert_allclose(r2.grad_chosen - p.grad_chosen, -2.0 * d["w"] / d["nc"],
                               rtol=1e-12)


def test_ipo_equals_gpo_squared_with_beta_two_tau():
    # (beta rho - 1)^2 = 4 tau^2 (rho - 1/(2 tau))^2 when beta = 2 tau
    d = _data(12)
    args = (d["lc"], d["lr"], d["rc"], d["rr"])
    for tau in (0.05, 0.5, 3.0):
        ipo = L.ipo_loss(*args, tau=tau, weights=d["w"])
        sq = L.gpo_loss("squared", *args, beta=2 * tau, weights=d["w"])
        scale = 4 * tau**2
        assert sq.loss == pytest.approx(scale * ipo.loss, rel=1e-12)
        np.testing.assert_allclose(sq.grad_chosen, scale * ipo.grad_chosen, rtol=1e-10)
        np.testing.assert_allclose(sq.grad_rejected, scale * ipo.grad_rejected, rtol=1e-10)
    assert L.preference_loss("ipo", *args, tau=0.5).loss == L.ipo_loss(*args, tau=0.5).loss


@pytest.mark.parametrize("name", ["hinge", "truncated_quadratic"])
def test_hinge_like_losses_have_zero_gradient_beyond_margin(name):
    rng = np.random.default_rng(13)
    beta = 0.5
    rc, rr = rng.uniform(-5, -1, M), rng.uniform(-5, -1, M)
    rho = np.array([2.5, 3.0, 10.0, -1.0, 0.0, 1.99, 2.01])  # beta rho > 1 iff rho > 2
    lc = rc + rho / 2 - 0.5
    lr = rr - rho / 2 - 0.5
    v = L.gpo_loss(name, lc, lr, rc, rr, beta=beta)
    beyond = beta * L.log_ratio_difference(lc, lr, rc, rr) > 1
    np.testing.assert_array_equal(beyond, rho > 2)
    assert (v.grad_chosen[beyond] == 0.0).all() and (v.grad_rejected[beyond] == 0.0).all()
    assert (v.grad_chosen[~beyond] < 0.0).all()
    if name == "hinge":
        assert L.hinge_loss(lc, lr, rc, rr, beta=beta).loss == v.loss


def test_dispatcher_matches_functions_and_rejects_unknown_names():
    d = _data(14)
    args = (d["lc"], d["lr"], d["rc"], d["rr"])
    assert L.preference_loss("robust", *args, beta=0.2, label_smoothing=0.1).loss == \
        L.robust_dpo_loss(*args, beta=0.2, label_smoothing=0.1).loss
    assert L.preference_loss("simpo", *args, beta=0.2, gamma=0.1, len_chosen=d["nc"],
                             len_rejected=d["nr"]).loss == \
        L.simpo_loss(d["lc"], d["lr"], beta=0.2, gamma=0.1, len_chosen=d["nc"],
                     len_rejected=d["nr"]).loss
    assert L.preference_loss("orpo", *args, lam=0.2, len_chosen=d["nc"],
                             len_rejected=d["nr"]).loss == \
        L.orpo_loss(d["lc"], d["lr"], lam=0.2, len_chosen=d["nc"], len_rejected=d["nr"]).loss
    assert L.preference_loss("savage", *args, beta=0.2).loss == \
        L.gpo_loss("savage", *args, beta=0.2).loss
    with pytest.raises(ValueError, match=r"unknown loss name 'dpoo'.*sigmoid"):
        L.preference_loss("dpoo", *args, beta=0.1)
    with pytest.raises(TypeError, match="name"):
        L.preference_loss(3, *args, beta=0.1)


# ------------------------------------------------------------------ Taylor view
def test_taylor_terms_match_definition():
    rng = np.random.default_rng(15)
    rho, w = rng.normal(size=M), rng.dirichlet(np.ones(M))
    for name, (f0, d1, d2) in AT_ZERO.items():
        t = L.taylor_terms(name, 0.7, rho, w)
        assert t.constant == pytest.approx(f0)
        assert t.preference == pytest.approx(d1 * 0.7 * float(np.sum(w * rho)), rel=1e-13)
        assert t.regularisation == pytest.approx(0.5 * d2 * 0.49 * float(np.sum(w * rho**2)),
                                                 rel=1e-13, abs=1e-16)
        c, p, r = t  # unpacks as a tuple
        assert t.approximation == pytest.approx(c + p + r)
    # every member's preference term has the same sign: first-order agreement up to scale
    prefs = [L.taylor_terms(n, 0.7, np.abs(rho)).preference for n in AT_ZERO]
    assert all(p < 0 for p in prefs)


# order of the first non-zero term after the quadratic at x = 0 (None: the quadratic is exact
# near 0).  Logistic: f'' = sigma(x) sigma(-x) is even, so f'''(0) = 0 and the error is O(x^4).
ERROR_ORDER = {"logistic": 4, "exponential": 3, "savage": 3,
               "squared": None, "truncated_quadratic": None, "hinge": None}


@pytest.mark.parametrize("name", list(ERROR_ORDER))
def test_taylor_error_scaling(name):
    rng = np.random.default_rng(16)
    base = rng.uniform(0.5, 1.0, M)  # positive, so odd-order errors do not cancel
    w = rng.dirichlet(np.ones(M))
    beta = 0.8

    def err(s):
        rho = s * base
        exact = L.gpo_loss(name, rho, np.zeros(M), np.zeros(M), np.zeros(M), beta=beta,
                           weights=w).loss
        return exact - L.taylor_terms(name, beta, rho, w).approximation

    order = ERROR_ORDER[name]
    if order is None:
        assert abs(err(0.1)) < 1e-14 and abs(err(0.05)) < 1e-14
    else:
        ratio = err(0.1) / err(0.05)
        assert ratio == pytest.approx(2.0**order, rel=0.05)
        # and the error is small compared with the regularisation term itself
        assert abs(err(0.05)) < 0.1 * abs(L.taylor_terms(name, beta, 0.05 * base,
                                                         w).regularisation)


# ------------------------------------------------------------------ stability
def _stability_cases(lc, lr, rc, rr, n):
    return {
        **{f"gpo_{k}": lambda k=k: L.gpo_loss(k, lc, lr, rc, rr, beta=1.0)
           for k in L.GPO_FAMILY},
        "dpo_smoothed": lambda: L.dpo_loss(lc, lr, rc, rr, beta=1.0, label_smoothing=0.1),
        "robust": lambda: L.robust_dpo_loss(lc, lr, rc, rr, beta=1.0, label_smoothing=0.1),
        "ipo": lambda: L.ipo_loss(lc, lr, rc, rr, tau=0.5),
        "simpo": lambda: L.simpo_loss(lc, lr, len_chosen=n, len_rejected=n, beta=1.0,
                                      gamma=0.5),
        "orpo": lambda: L.orpo_loss(lc, lr, len_chosen=n, len_rejected=n, lam=1.0),
        "rpo": lambda: L.rpo_loss(lc, lr, rc, rr, beta=1.0, alpha=1.0, len_chosen=n),
    }


@pytest.mark.parametrize("sign", [+1.0, -1.0])
def test_huge_margins_are_finite_without_warnings(sign):
    # margins of +-1e4 (pytest turns RuntimeWarning into an error; errstate makes numpy's
    # overflow/invalid/divide raise too)
    # (shifted by -1 so that no completion has probability 1, where ORPO is legitimately inf)
    a, b = np.array([-1.0, -1e4 - 1.0, -5e3]), np.array([-1e4 - 1.0, -1.0, -5e3])
    lc, lr = (a, b) if sign > 0 else (b, a)
    z, n = np.zeros(3), np.ones(3, dtype=int)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for name, fn in _stability_cases(lc, lr, z, z, n).items():
            v = fn()
            if name == "gpo_exponential":
                # e^{1e4} exceeds float64: documented +inf, never NaN, no warning
                assert not np.isnan(v.loss)
                assert not np.isnan(v.grad_chosen).any()
                continue
            assert np.isfinite(v.loss), name
            assert np.isfinite(v.grad_chosen).all() and np.isfinite(v.grad_rejected).all(), name
        k = L.kto_loss(np.array([0.0, -1e4]), np.array([-1e4, 0.0]), np.array([True, False]),
                       z_ref=0.0, beta=1.0)
        assert np.isfinite(k.loss) and np.isfinite(k.grad).all()


def test_exponential_overflows_to_inf_and_is_finite_where_representable():
    with np.errstate(over="raise", invalid="raise"):
        big = L.gpo_loss("exponential", [-1e4], [0.0], [0.0], [0.0], beta=1.0)
        assert big.loss == math.inf and big.grad_chosen[0] == -math.inf
        ok = L.gpo_loss("exponential", [-700.0], [0.0], [0.0], [0.0], beta=1.0)
        assert ok.loss == pytest.approx(math.exp(700.0), rel=1e-12)
        small = L.gpo_loss("exponential", [1e4], [0.0], [0.0], [0.0], beta=1.0)
        assert small.loss == 0.0 and small.grad_chosen[0] == 0.0


def test_large_margin_values_are_accurate():
    # DPO at margin -1e4 is ~1e4 (not inf), at +1e4 ~e^-1e4 = 0; gradient ~ -beta, ~0
    v = L.dpo_loss([-1e4, 0.0], [0.0, -1e4], [0.0, 0.0], [0.0, 0.0], beta=1.0,
                   weights=[1.0, 1.0])
    assert v.loss == pytest.approx(1e4, rel=1e-12)
    assert v.grad_chosen.tolist() == pytest.approx([-1.0, 0.0], abs=1e-300)
    s = L.gpo_loss("savage", [-1e4], [0.0], [0.0], [0.0], beta=1.0)
    assert s.loss == pytest.approx(1.0) and s.grad_chosen[0] == pytest.approx(0.0, abs=1e-300)


# ------------------------------------------------------------------ -inf rule
def test_neg_inf_raises_by_default_naming_the_argument():
    for arg, idx in (("logp_chosen", 0), ("logp_rejected", 1), ("ref_chosen", 2),
                     ("ref_rejected", 3)):
        arrays = [np.full(3, -1.0) for _ in range(4)]
        arrays[idx][1] = -np.inf
        with pytest.raises(ValueError, match=rf"{arg} contains -inf at index 1"):
            L.dpo_loss(*arrays, beta=0.1)


def test_zero_weight_pairs_are_dropped_even_with_neg_inf():
    d = _data(17)
    lc, rc = d["lc"].copy(), d["rc"].copy()
    lc[2], rc[2] = -np.inf, -np.inf  # undefined log-ratio, but the pair has weight 0
    w = d["w"].copy()
    w[2] = 0.0
    for name in ("sigmoid", "ipo", "exponential", "rpo"):
        keep = np.arange(M) != 2
        kw = {"tau": 0.5} if name == "ipo" else {"beta": 0.5}
        kw_sub = dict(kw)
        if name == "rpo":
            kw |= {"alpha": 1.0, "len_chosen": d["nc"]}
            kw_sub |= {"alpha": 1.0, "len_chosen": d["nc"][keep]}
        v = L.preference_loss(name, lc, d["lr"], rc, d["rr"], weights=w, **kw)
        sub = L.preference_loss(name, lc[keep], d["lr"][keep], rc[keep], d["rr"][keep],
                                weights=w[keep], **kw_sub)
        assert v.loss == pytest.approx(sub.loss, rel=1e-14)
        assert v.grad_chosen[2] == 0.0 and v.grad_rejected[2] == 0.0
        np.testing.assert_array_equal(v.grad_chosen[keep], sub.grad_chosen)


def test_allow_neg_inf_gives_the_limits():
    beta = 0.5
    # rejected has probability 0 under the policy: rho = +inf, DPO loss 0, gradient 0
    v = L.dpo_loss([-1.0], [-np.inf], [-1.0], [-2.0], beta=beta, allow_neg_inf=True)
    assert v.loss == 0.0 and v.grad_chosen[0] == 0.0 and v.grad_rejected[0] == 0.0
    # chosen has probability 0: rho = -inf, loss +inf, gradient -> -beta (finite)
    v = L.dpo_loss([-np.inf], [-1.0], [-1.0], [-2.0], beta=beta, allow_neg_inf=True)
    assert v.loss == math.inf and v.grad_chosen[0] == -beta and v.grad_rejected[0] == beta
    # limits agree with very negative finite values
    far = L.dpo_loss([-1e6], [-1.0], [-1.0], [-2.0], beta=beta)
    assert far.grad_chosen[0] == pytest.approx(-beta)
    # chosen outside the reference's support: rho = +inf
    v = L.gpo_loss("savage", [-1.0], [-1.0], [-np.inf], [-2.0], beta=beta, allow_neg_inf=True)
    assert v.loss == 0.0 and v.grad_chosen[0] == 0.0
    # undefined even as limits: -inf - (-inf) in a log-ratio, inf - inf in rho
    with pytest.raises(ValueError, match="logp_chosen and ref_chosen are both -inf"):
        L.dpo_loss([-np.inf], [-1.0], [-np.inf], [-1.0], beta=beta, allow_neg_inf=True)
    with pytest.raises(ValueError, match="rho is undefined"):
        L.dpo_loss([-1.0], [-1.0], [-np.inf], [-np.inf], beta=beta, allow_neg_inf=True)
    # robust DPO is unbounded below: +inf and -inf pair losses cannot be summed
    with pytest.raises(ValueError, match=r"\+inf and -inf"):
        L.robust_dpo_loss([-np.inf, -1.0], [-1.0, -np.inf], [-1.0, -1.0], [-1.0, -1.0],
                          beta=beta, label_smoothing=0.2, allow_neg_inf=True)
    # KTO limits: desirable with r = -inf loses lambda_D entirely, with zero gradient
    k = L.kto_loss([-np.inf], [-1.0], [True], z_ref=0.0, beta=1.0, lambda_D=2.0,
                   allow_neg_inf=True)
    assert k.loss == 2.0 and k.grad[0] == 0.0


def test_orpo_boundary_p_equal_one():
    n = np.array([2])
    lr = np.array([np.log(0.3) * 2])  # per-token p = 0.3
    # chosen certain (logp = 0): odds ratio penalty 0, gradient = its finite limit
    v = L.orpo_loss([0.0], lr, len_chosen=n, len_rejected=n, lam=1.0, weights=[1.0])
    odds_r = 0.3 / 0.7
    assert v.loss == 0.0  # NLL 0, log odds +inf => penalty 0
    assert v.grad_chosen[0] == pytest.approx((-1.0 - odds_r) / 2, rel=1e-12)
    assert v.grad_rejected[0] == 0.0
    near = L.orpo_loss([-1e-9], lr, len_chosen=n, len_rejected=n, lam=1.0, weights=[1.0])
    assert near.grad_chosen[0] == pytest.approx(v.grad_chosen[0], rel=1e-6)
    assert np.isfinite(near.grad_chosen[0]) and near.loss == pytest.approx(0.0, abs=1e-6)
    # rejected certain: infinite loss and gradient, never NaN
    with np.errstate(over="raise", invalid="raise"):
        v = L.orpo_loss(lr, [0.0], len_chosen=n, len_rejected=n, lam=1.0)
    assert v.loss == math.inf and v.grad_rejected[0] == math.inf
    assert np.isfinite(v.grad_chosen[0])
    with pytest.raises(ValueError, match="both 0"):
        L.orpo_loss([0.0], [0.0], len_chosen=n, len_rejected=n, lam=1.0)
    with pytest.raises(ValueError, match="logp_chosen must be <= 0"):
        L.orpo_loss([0.1], [-1.0], len_chosen=n, len_rejected=n, lam=1.0)


def test_log1mexp():
    a = np.array([-1e-20, -1e-5, -0.5, -np.log(2.0), -3.0, -50.0])
    # the two textbook forms, each where it is accurate (Maechler 2012)
    direct = [math.log(-math.expm1(x)) if x > -0.5 else math.log1p(-math.exp(x)) for x in a]
    np.testing.assert_allclose(L.log1mexp(a), direct, rtol=1e-14)
    with np.errstate(divide="raise"):
        assert L.log1mexp(0.0) == -math.inf and L.log1mexp(-np.inf) == 0.0


# ------------------------------------------------------------------ validation
def _ok():
    return [np.full(3, -1.0), np.full(3, -2.0), np.full(3, -1.5), np.full(3, -1.5)]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, match",
    [
        (lambda a: a.__setitem__(1, np.full(4, -1.0)), {}, ValueError, "logp_rejected"),
        (lambda a: a.__setitem__(0, np.full((3, 1), -1.0)), {}, ValueError, "logp_chosen"),
        (lambda a: a.__setitem__(3, np.full(2, -1.0)), {}, ValueError, "ref_rejected"),
        (lambda a: a[2].__setitem__(0, np.nan), {}, ValueError, "ref_chosen contains NaN"),
        (lambda a: a[1].__setitem__(0, np.inf), {}, ValueError, r"logp_rejected contains \+inf"),
        (lambda a: a.__setitem__(0, np.array(["a", "b", "c"])), {}, TypeError, "logp_chosen"),
        (lambda a: a.__setitem__(0, np.array([], dtype=float)), {}, ValueError, "logp_chosen"),
        (lambda a: a.__setitem__(2, None), {}, TypeError, "ref_chosen"),
        (None, {"beta": 0.0}, ValueError, "beta"),
        (None, {"beta": -1.0}, ValueError, "beta"),
        (None, {"beta": np.nan}, ValueError, "beta"),
        (None, {"beta": "0.1"}, TypeError, "beta"),
        (None, {"beta": True}, TypeError, "beta"),
        (None, {"label_smoothing": 0.5}, ValueError, "label_smoothing"),
        (None, {"label_smoothing": -0.01}, ValueError, "label_smoothing"),
        (None, {"weights": [0.5, -0.1, 0.6]}, ValueError, "weights"),
        (None, {"weights": [0.5, 0.5]}, ValueError, "weights"),
        (None, {"weights": [0.5, np.inf, 0.5]}, ValueError, "weights"),
    ],
)
def test_dpo_validation(mutate, kwargs, exc, match):
    arrays = _ok()
    if mutate is not None:
        mutate(arrays)
    kw = {"beta": 0.1} | kwargs
    with pytest.raises(exc, match=match):
        L.dpo_loss(*arrays, **kw)


def test_other_validation():
    lc, lr, rc, rr = _ok()
    n = np.ones(3, dtype=int)
    with pytest.raises(ValueError, match="tau"):
        L.ipo_loss(lc, lr, rc, rr, tau=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.robust_dpo_loss(lc, lr, rc, rr, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="len_chosen"):
        L.simpo_loss(lc, lr, len_chosen=[1, 0, 2], len_rejected=n, beta=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="len_rejected"):
        L.simpo_loss(lc, lr, len_chosen=n, len_rejected=[1, 1.5, 2], beta=1.0, gamma=0.0)
    with pytest.raises(ValueError, match="len_rejected"):
        L.orpo_loss(lc, lr, len_chosen=n, len_rejected=[1, 2], lam=1.0)
    with pytest.raises(TypeError, match="len_chosen"):
        L.rpo_loss(lc, lr, rc, rr, beta=0.1, alpha=1.0, len_chosen=None)
    with pytest.raises(ValueError, match="gamma"):
        L.simpo_loss(lc, lr, len_chosen=n, len_rejected=n, beta=1.0, gamma=np.inf)
    with pytest.raises(ValueError, match="lam"):
        L.orpo_loss(lc, lr, len_chosen=n, len_rejected=n, lam=0.0)
    with pytest.raises(ValueError, match="alpha"):
        L.rpo_loss(lc, lr, rc, rr, beta=0.1, alpha=-1.0, len_chosen=n)
    with pytest.raises(TypeError, match="desirable"):
        L.kto_loss(lc, rc, [1, 0, 1], z_ref=0.0, beta=0.1)
    with pytest.raises(ValueError, match="desirable"):
        L.kto_loss(lc, rc, np.array([True, False]), z_ref=0.0, beta=0.1)
    with pytest.raises(ValueError, match="z_ref"):
        L.kto_loss(lc, rc, np.array([True, False, True]), z_ref=np.nan, beta=0.1)
    with pytest.raises(ValueError, match="lambda_U"):
        L.kto_loss(lc, rc, np.array([True, False, True]), z_ref=0.0, beta=0.1, lambda_U=-1.0)
    with pytest.raises(ValueError, match="ref_logp contains -inf"):
        L.kto_loss(lc, np.array([-1.0, -np.inf, -1.0]), np.array([True, False, True]),
                   z_ref=0.0, beta=0.1)
    with pytest.raises(ValueError, match=r"unknown GPO loss 'cubic'.*logistic"):
        L.gpo_loss("cubic", lc, lr, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="unknown GPO loss"):
        L.taylor_terms("sigmoid", 0.1, [0.1])
    with pytest.raises(ValueError, match="beta"):
        L.taylor_terms("logistic", 0.0, [0.1])
    with pytest.raises(ValueError, match="rho"):
        L.taylor_terms("logistic", 0.1, [np.inf])


def test_custom_convex_loss_is_accepted():
    c = L.ConvexLoss("quartic", lambda x: (np.asarray(x) - 1.0) ** 4,
                     lambda x: 4 * (np.asarray(x) - 1.0) ** 3,
                     lambda x: 12 * (np.asarray(x) - 1.0) ** 2, "quartic", "test")
    v = L.gpo_loss(c, [-1.0], [-1.5], [-1.0], [-1.0], beta=2.0)
    assert v.loss == pytest.approx((2.0 * 0.5 - 1.0) ** 4 + 0.0)
    assert L.taylor_terms(c, 1.0, [0.0]) == (1.0, 0.0, 0.0)


# ------------------------------------------------------------------ experiment
def test_loss_shapes_experiment():
    from toyrlhf import experiments

    mod = experiments.get("loss_shapes")
    res = mod.run(mod.Config.quick())
    assert res.f.shape == res.taylor.shape == (len(res.members), res.x.size)
    for k, name in enumerate(res.members):
        np.testing.assert_allclose(res.f[k], [DIRECT_F[name](x) for x in res.x], rtol=1e-13)
        assert (res.f0[k], res.df0[k], res.d2f0[k]) == pytest.approx(AT_ZERO[name])
    # x = 0 on the grid: value and Taylor agree exactly there, and to O(x^3) nearby
    i0 = res.x.size // 2
    assert res.x[i0] == 0.0
    np.testing.assert_allclose(res.taylor[:, i0], res.f[:, i0], rtol=1e-15)
    near = np.abs(res.x) <= 0.2
    assert np.max(np.abs(res.f[:, near] - res.taylor[:, near])) < 0.2**3
    # first-order agreement up to scale: every normalised curve has slope -1 at 0
    xn = res.x_normalised
    slope = (res.normalised[:, i0 + 1] - res.normalised[:, i0 - 1]) / (xn[i0 + 1] - xn[i0 - 1])
    np.testing.assert_allclose(slope, -1.0, atol=0.05)
    # ... and the hinge alone has no offline regulariser
    assert dict(zip(res.members, res.curvature))["hinge"] == 0.0
    assert all(c > 0 for m, c in zip(res.members, res.curvature) if m != "hinge")
    fig = mod.figure(res)
    assert len(fig.axes) == 3 and "f''(0)/2" in fig._suptitle.get_text()
    # curves that coincide (squared and truncated quadratic share their Taylor terms, and their
    # normalised curves on [-1, 1]) are drawn so that both stay visible
    for ax in fig.axes:
        lines = ax.get_lines()
        for a in range(len(lines)):
            for b in range(a):
                la, lb = lines[a], lines[b]
                if np.array_equal(la.get_xydata(), lb.get_xydata()):
                    assert (la.get_linestyle(), la.get_marker()) != (lb.get_linestyle(), lb.get_marker())
    taylor_labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("truncated_quadratic" in t and "= squared" in t for t in taylor_labels)
