"""Benchmark: exact DPO on a 4-ary tree of depth 8 (65,536 leaves) from 20,000 labelled pairs, one core.

Run from the repository root::

    python benchmarks/bench_dpo.py                       # the issue's size, about 2 minutes
    python benchmarks/bench_dpo.py --tabular-timeout 0   # let dpo_tabular finish (~4 more minutes)
    python benchmarks/bench_dpo.py --H 6 --pairs 5000    # smaller, for a quick look

Problem (built before any timing): ``pi_ref`` = ``random_policy(zero_fraction=0.1)`` (some
``-inf`` reference log-probs), a random tabular gold reward ``N(0, 1)``, and
``sample_preferences(tree, gold, 20000, rng, log_pi_pair=pi_ref)``; ``beta = 0.1``.

Methods compared (wall-clock time on one core):

* ``toyrlhf.projections.dpo`` with ``TabularPolicy(tree, pi_ref)``: L-BFGS on the exact loss
  and gradient (``O(leaves)`` per evaluation) through ``toyrlhf.offline.fit_preference_loss``,
  with the attainment LP first; on separable data the point is then pushed to represent the
  limit.  The loss evaluations are counted and timed by wrapping ``toyrlhf.offline._objective``
  (instrumentation only).
* ``toyrlhf.projections.dpo_tabular``: the closed form through the tabular reward MLE
  (trust-region Newton-CG) and soft value iteration.  It runs in a child process under
  ``--tabular-timeout`` seconds so that the script stays near two minutes (0: no limit).
* a plain reference written here (:class:`PlainDPO`): a Python loop over the pairs that walks
  each completion's root-to-leaf path, computes the log-softmax of every node it visits
  (cached per evaluation) and accumulates the gradient into a per-node dict; optimised by the
  same scipy L-BFGS-B with the same options.  At the issue's size one evaluation takes about
  a second, so it runs ``--ref-iters`` iterations only, next to ``dpo(maxiter=--ref-iters)``
  from the same start (their iterates must agree: asserted); its time to finish is
  extrapolated as (seconds per evaluation) x (evaluations ``dpo`` needed in full).

A second, small control problem (depth ``--control-H``, flat ``pi_ref``, every completion
compared many times, so the optimum is attained and unique) runs all three methods to
convergence, and asserts that their leaf probabilities agree.

The columns: time, iterations (L-BFGS iterations, or trust-region iterations for the reward
MLE; ``f`` = loss evaluations), final DPO loss, ``attained`` (the documented criterion: for
the tabular class an exact separability LP), ``converged`` (the optimiser met its tolerance),
and ``max|dP|``, the largest difference of leaf probabilities from the row named in brackets.
"""

from __future__ import annotations

import os

# One core: must be set before NumPy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy import optimize  # noqa: E402

import toyrlhf.offline as off  # noqa: E402
import toyrlhf.projections as proj  # noqa: E402
from toyrlhf.policies import TabularPolicy, leaf_logprobs, random_policy  # noqa: E402
from toyrlhf.preferences import sample_preferences  # noqa: E402
from toyrlhf.rewards import TabularReward, random_tabular_reward  # noqa: E402
from toyrlhf.tree import TokenTree  # noqa: E402

#: The options toyrlhf.projections.dpo (through toyrlhf.offline.fit_preference_loss) passes to
#: L-BFGS-B (default tol and maxiter).
LBFGS_OPTIONS = {"gtol": 1e-10, "ftol": 1e-15, "maxiter": 5000, "maxcor": off._MAXCOR}


# --------------------------------------------------------------------------- plain reference
class PlainDPO:
    """DPO over the tabular class, the obvious way: loop over pairs, walk each path.

    Parameters are the same as :class:`toyrlhf.policies.TabularPolicy` (logits added to
    ``log pi_ref`` at every node, level by level, node-major), so the two can share an
    optimiser and be compared iterate by iterate.  ``P = 1`` and no EOS.

    For a pair ``(xi+, xi-)`` with weight ``w``: ``log P(xi) = sum_h log pi(a_h | s_h)`` along
    the path, ``rho = log P(xi+)/P_ref(xi+) - log P(xi-)/P_ref(xi-)``,
    ``loss += -w log sigmoid(beta rho)``, and with ``g = -w beta sigmoid(-beta rho)`` every
    node ``s`` on the path of ``xi+`` (``xi-``) gets ``+g`` (``-g``) times
    ``d log pi(a|s) / d theta(s, b) = [b == a] - pi(b|s)``.
    """

    def __init__(self, tree: TokenTree, log_pi_ref, data, beta: float):
        if tree.P != 1 or tree.eos is not None:
            raise ValueError("PlainDPO handles one prompt and no EOS")
        self.V, self.H, self.beta = tree.V, tree.H, float(beta)
        self.base = [np.asarray(lp)[0].tolist() for lp in log_pi_ref]  # level h: V**h lists of V
        self.offsets = [0]
        for h in range(self.H):
            self.offsets.append(self.offsets[-1] + self.V ** (h + 1))
        self.n_params = self.offsets[-1]
        self.pairs = list(zip(data.chosen.tolist(), data.rejected.tolist(), data.weight.tolist()))
        self.paths = {}
        for c, r, _ in self.pairs:
            for leaf in (c, r):
                if leaf not in self.paths:
                    self.paths[leaf] = self.path(leaf)
        self.ref_logp = {leaf: sum(self.base[h][s][a] for h, s, a in p) for leaf, p in self.paths.items()}

    def path(self, leaf: int):
        """``(depth, node, token)`` along the root-to-leaf path of ``leaf``."""
        V, H = self.V, self.H
        return [(h, leaf // V ** (H - h), (leaf // V ** (H - 1 - h)) % V) for h in range(H)]

    def log_conditional(self, theta, h, s, cache):
        """``log pi(.|s)`` = log-softmax of ``log pi_ref(.|s) + theta(s, .)``, cached."""
        lp = cache.get((h, s))
        if lp is None:
            o = self.offsets[h] + s * self.V
            z = [b + t for b, t in zip(self.base[h][s], theta[o : o + self.V])]
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            lp = cache[(h, s)] = [x - lse for x in z]
        return lp

    def loss_grad(self, theta):
        theta = np.asarray(theta, dtype=float).tolist()
        cache, grads = {}, {}
        loss = 0.0
        for c, r, w in self.pairs:
            pc, pr = self.paths[c], self.paths[r]
            lc = sum(self.log_conditional(theta, h, s, cache)[a] for h, s, a in pc)
            lr = sum(self.log_conditional(theta, h, s, cache)[a] for h, s, a in pr)
            x = self.beta * ((lc - self.ref_logp[c]) - (lr - self.ref_logp[r]))
            loss += w * (math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)) - x)  # -log sigmoid(x)
            g = -w * self.beta / (1.0 + math.exp(x)) if x < 700 else 0.0
            for p, coef in ((pc, g), (pr, -g)):
                for h, s, a in p:
                    lp = cache[(h, s)]
                    acc = grads.get((h, s))
                    if acc is None:
                        acc = grads[(h, s)] = [0.0] * self.V
                    for b in range(self.V):
                        acc[b] -= coef * math.exp(lp[b])
                    acc[a] += coef
        out = np.zeros(self.n_params)
        for (h, s), acc in grads.items():
            o = self.offsets[h] + s * self.V
            out[o : o + self.V] = acc
        return loss, out

    def leaf_probs(self, theta):
        theta = np.asarray(theta, dtype=float).tolist()
        cache = {}
        return np.array(
            [math.exp(sum(self.log_conditional(theta, h, s, cache)[a] for h, s, a in self.path(x))) for x in range(self.V**self.H)]
        )


# --------------------------------------------------------------------------- helpers
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_problem(V, H, pairs, seed, temperature, zero_fraction):
    rng = np.random.default_rng(seed)
    tree = TokenTree(V=V, H=H)
    log_pi_ref = random_policy(tree, rng, temperature=temperature, zero_fraction=zero_fraction)
    gold = random_tabular_reward(tree, rng)
    data = sample_preferences(tree, gold, pairs, rng, log_pi_pair=log_pi_ref)
    return tree, log_pi_ref, data


def run_dpo(data, policy_class, log_pi_ref, beta, **kw):
    """``proj.dpo`` with its loss evaluations counted and timed; returns (fit, seconds, nfev, eval seconds)."""
    stats = {"n": 0, "t": 0.0}
    original = off._objective

    def counted(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            stats["n"] += 1
            stats["t"] += time.perf_counter() - t0

    off._objective = counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", proj.NotAttainedWarning)
            t0 = time.perf_counter()
            fit = proj.dpo(data, policy_class, log_pi_ref, beta, **kw)
            seconds = time.perf_counter() - t0
    finally:
        off._objective = original
    return fit, seconds, stats["n"], stats["t"]


def _dpo_tabular(data, tree, log_pi_ref, beta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", proj.NotAttainedWarning)
        t0 = time.perf_counter()
        pfit, rfit = proj.dpo_tabular(data, tree, log_pi_ref, beta)
        seconds = time.perf_counter() - t0
    return seconds, pfit.n_iter, pfit.loss, pfit.attained, pfit.converged, np.exp(pfit.leaf_logp[0])


def _dpo_tabular_child(conn, data, tree, log_pi_ref, beta):
    conn.send(_dpo_tabular(data, tree, log_pi_ref, beta))
    conn.close()


def run_dpo_tabular(data, tree, log_pi_ref, beta, timeout):
    """``proj.dpo_tabular`` in a forked child, stopped after ``timeout`` s (0: no limit).

    Returns ``(seconds, n_iter, loss, attained, converged, leaf_probs)`` or ``None`` on timeout.
    """
    if timeout <= 0:
        return _dpo_tabular(data, tree, log_pi_ref, beta)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_dpo_tabular_child, args=(child, data, tree, log_pi_ref, beta))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(timeout) else None
    if result is None:
        proc.terminate()  # only the child this function started
    proc.join()
    return result


def run_plain(plain, theta0, maxiter):
    """The plain reference under the same L-BFGS-B options; returns (result, seconds)."""
    options = dict(LBFGS_OPTIONS, maxiter=maxiter)
    t0 = time.perf_counter()
    res = optimize.minimize(plain.loss_grad, theta0, jac=True, method="L-BFGS-B", options=options)
    return res, time.perf_counter() - t0


def print_table(rows):
    head = ("method", "time [s]", "iterations", "final loss", "attained", "converged", "max|dP| (vs)")
    cells = [head] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def max_dp(p, q):
    return float(np.max(np.abs(np.asarray(p) - np.asarray(q))))


def yes(flag):
    return "yes" if flag else "no"


# --------------------------------------------------------------------------- scenarios
def main_scenario(args):
    tree, log_pi_ref, data = build_problem(args.V, args.H, args.pairs, args.seed, 1.0, 0.1)
    beta = args.beta
    cov = int(data.coverage(tree).sum())
    t0 = time.perf_counter()
    separable = proj.separation_direction(proj._margin_design(data, TabularReward(tree))) is not None
    t_lp = time.perf_counter() - t0
    print(
        f"## Main problem: V={args.V}, H={args.H} ({tree.n_leaves:,} leaves, {tree.n_edges:,} tabular policy parameters), "
        f"{args.pairs:,} sampled pairs -> {len(data):,} distinct triples, {data.n:.0f} kept comparisons; "
        f"{cov:,} of {tree.n_leaves:,} completions compared; separable (LP, {t_lp:.2f} s): {yes(separable)}; beta={beta}"
    )
    pc = TabularPolicy(tree, log_pi_ref)
    lref = leaf_logprobs(tree, log_pi_ref)
    rows = []

    # toyrlhf dpo, full run
    fit, t_dpo, nfev, t_eval = run_dpo(data, pc, log_pi_ref, beta)
    p_dpo = np.exp(fit.leaf_logp[0])
    rows.append(("toyrlhf dpo (TabularPolicy, L-BFGS)", f"{t_dpo:.2f}", f"{fit.n_iter} (f={nfev})", f"{fit.loss:.10f}",
                 yes(fit.attained), yes(fit.converged), "-"))
    rows.append(("  of which dpo_loss evaluations", f"{t_eval:.2f}", f"{1e3 * t_eval / nfev:.2f} ms/eval", "", "", "", ""))

    # toyrlhf dpo_tabular (closed form via reward MLE)
    tab = run_dpo_tabular(data, tree, log_pi_ref, beta, args.tabular_timeout)
    if tab is None:
        rows.append(("toyrlhf dpo_tabular (reward MLE + soft VI)", f"> {args.tabular_timeout:g} (stopped)", "-", "-", "-", "-", "-"))
    else:
        t_tab, it_tab, loss_tab, att_tab, conv_tab, p_tab = tab
        rows.append(("toyrlhf dpo_tabular (reward MLE + soft VI)", f"{t_tab:.2f}", str(it_tab), f"{loss_tab:.10f}",
                     yes(att_tab), yes(conv_tab), f"{max_dp(p_tab, p_dpo):.2e} (dpo)"))

    # reference vs dpo for the same few iterations
    k = args.ref_iters
    # the same L-BFGS on toyrlhf's loss kernel, without dpo's attainment LP and limit push, so the
    # iterates can be compared one for one with the plain loop's
    t0 = time.perf_counter()
    res_k = optimize.minimize(lambda t: proj.dpo_loss(pc, t, data, lref, beta), pc.init(), jac=True,
                              method="L-BFGS-B", options={**LBFGS_OPTIONS, "maxiter": k})
    t_dpo_k = time.perf_counter() - t0
    lp_k = pc.leaf_logprobs(res_k.x)
    rows.append((f"toyrlhf dpo_loss + L-BFGS, maxiter={k}", f"{t_dpo_k:.2f}", f"{res_k.nit} (f={res_k.nfev})",
                 f"{res_k.fun:.10f}", "-", "-", "-"))
    plain = PlainDPO(tree, log_pi_ref, data, beta)
    # gradient check at a random point before timing anything
    theta = 0.3 * np.random.default_rng(args.seed + 1).standard_normal(pc.n_params)
    l_ref, g_ref = plain.loss_grad(theta)
    l_toy, g_toy = proj.dpo_loss(pc, theta, data, lref, beta)
    d_grad = float(np.max(np.abs(g_ref - g_toy)))
    assert abs(l_ref - l_toy) <= 1e-10 and d_grad <= 1e-12, (abs(l_ref - l_toy), d_grad)
    res, t_plain = run_plain(plain, pc.init(), k)
    p_plain = plain.leaf_probs(res.x)
    d_plain = max_dp(p_plain, np.exp(lp_k[0]))
    assert d_plain <= 1e-8, f"plain reference and dpo disagree after {k} iterations: max|dP| = {d_plain:.3g}"
    per_eval = t_plain / res.nfev
    rows.append((f"plain per-pair loop + L-BFGS, maxiter={k}", f"{t_plain:.2f}", f"{res.nit} (f={res.nfev})", f"{res.fun:.10f}",
                 "-", "-", f"{d_plain:.2e} (dpo_loss, maxiter={k})"))
    rows.append(("plain per-pair loop, extrapolated to dpo's run", f"~{per_eval * nfev:.0f}",
                 f"{fit.n_iter} (f={nfev}) at {per_eval:.2f} s/eval", "", "", "", ""))
    print_table(rows)
    if separable:
        print(
            "the data are separable, so the DPO optimum is not attained: dpo and dpo_tabular follow different "
            "paths towards infinity and stop at different points (large max|dP| between them is expected; "
            "compare their losses)"
        )
    print(
        f"gradient check at a random theta: |d loss| = {abs(l_ref - l_toy):.1e}, max|d grad| = {d_grad:.1e} "
        f"(asserted); dpo_loss is {per_eval / (t_eval / nfev):.0f}x faster per evaluation than the plain loop"
    )
    print()


def control_scenario(args):
    H = args.control_H
    tree, log_pi_ref, data = build_problem(args.V, H, args.pairs, args.seed, 0.3, 0.0)
    beta = args.beta
    cov = int(data.coverage(tree).sum())
    print(
        f"## Control (attained, unique optimum): V={args.V}, H={H} ({tree.n_leaves} leaves), flat pi_ref, "
        f"{args.pairs:,} pairs -> {len(data):,} triples; {cov} of {tree.n_leaves} completions compared; beta={beta}"
    )
    pc = TabularPolicy(tree, log_pi_ref)
    fit, t_dpo, nfev, _ = run_dpo(data, pc, log_pi_ref, beta)
    p_dpo = np.exp(fit.leaf_logp[0])
    t_tab, it_tab, loss_tab, att_tab, conv_tab, p_tab = run_dpo_tabular(data, tree, log_pi_ref, beta, 0)
    plain = PlainDPO(tree, log_pi_ref, data, beta)
    res, t_plain = run_plain(plain, pc.init(), LBFGS_OPTIONS["maxiter"])
    p_plain = plain.leaf_probs(res.x)
    rows = [
        ("toyrlhf dpo (TabularPolicy, L-BFGS)", f"{t_dpo:.3f}", f"{fit.n_iter} (f={nfev})", f"{fit.loss:.12f}",
         yes(fit.attained), yes(fit.converged), "-"),
        ("toyrlhf dpo_tabular (reward MLE + soft VI)", f"{t_tab:.3f}", str(it_tab), f"{loss_tab:.12f}",
         yes(att_tab), yes(conv_tab), f"{max_dp(p_tab, p_dpo):.2e} (dpo)"),
        ("plain per-pair loop + L-BFGS (full run)", f"{t_plain:.3f}", f"{res.nit} (f={res.nfev})", f"{res.fun:.12f}",
         "-", yes(res.success), f"{max_dp(p_plain, p_dpo):.2e} (dpo)"),
    ]
    print_table(rows)
    if not (fit.attained and att_tab):
        print("the control data are separable with these settings (optimum not attained): agreement not checked")
    else:
        assert max_dp(p_tab, p_dpo) <= 1e-4 and max_dp(p_plain, p_dpo) <= 1e-6
        assert abs(loss_tab - fit.loss) <= 1e-9 and abs(res.fun - fit.loss) <= 1e-9
        print("asserted: all three agree (|dP| <= 1e-4 for dpo_tabular, 1e-6 for the plain loop; losses within 1e-9)")
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--V", type=int, default=4)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-iters", type=int, default=5, help="L-BFGS iterations for the plain reference at full size")
    ap.add_argument("--tabular-timeout", type=float, default=60.0, help="seconds allowed to dpo_tabular (0: no limit)")
    ap.add_argument("--control-H", type=int, default=3, help="depth of the control problem (0: skip it)")
    args = ap.parse_args(argv)
    print(f"# exact DPO benchmark, one core: {cpu_name()}; Python {platform.python_version()}, "
          f"NumPy {np.__version__}, SciPy {scipy.__version__}")
    print(f"# load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print()
    t0 = time.perf_counter()
    main_scenario(args)
    if args.control_H > 0:
        control_scenario(args)
    print(f"total wall time {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
