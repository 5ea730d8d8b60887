"""Benchmark: exact soft value iteration on a 4-ary tree of depth 12 (16.7M leaves), one core.

Run from the repository root::

    python benchmarks/bench_soft_vi.py            # the issue's size: V=4, H=12, P=1
    python benchmarks/bench_soft_vi.py --H 10     # smaller, for a quick look

What it measures (best of ``--repeat`` runs, inputs built beforehand and not timed):

* ``toyrlhf.projections.soft_optimal_policy`` with and without ``return_policy``: the full
  public call, argument validation included (the validation alone is its own row);
* the previous toyrlhf ``soft_optimal_policy`` (same validation, column-by-column
  ``logsumexp`` over whole levels, no blocking), reproduced below, to show what the change buys;
* a plain reference, ``scipy.special.logsumexp(z, axis=-1)`` per level (plus ``z - V(s)`` for
  the policy);
* ``np.exp`` over as many values as the tree has edges (``sum_h V**(h+1)``), into a
  preallocated output: a roofline-ish bound, since soft VI needs one ``exp`` per edge; and the
  same with the reference policy's share of ``-inf`` values, which sends NumPy's SIMD ``exp``
  to a slow path (the kernel clamps its ``exp`` arguments at -700 to avoid it).

``leaves/s`` is ``V**H / time`` for every row, so the rows compare directly.  Memory: the
``tracemalloc`` peak of each call (NumPy reports its buffers to tracemalloc) and the process's
peak resident set (``ru_maxrss``, which includes building the inputs).  The script asserts that
toyrlhf and the scipy reference agree to 1e-10 (log Z and every finite log-probability, the same
``-inf`` pattern, no NaN) and that the blocked kernel is bitwise equal to the previous one.

``soft_optimal_policy`` is the namespace-generic kernel (array-API operations only, the same
code for NumPy, CuPy and array_api_strict; see ``toyrlhf/_backend.py`` and
``benchmarks/bench_backends.py`` for the other backends and float32).
"""

from __future__ import annotations

import os

# One core: must be set before NumPy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from toyrlhf.policies import random_policy  # noqa: E402
from toyrlhf.projections import soft_optimal_policy  # noqa: E402
from toyrlhf.tree import TokenTree  # noqa: E402

GiB = 2**30
MiB = 2**20
TARGET_LEAVES_PER_S = 1e8  # the CPU target of the array-backend issue (one core, float64)
TARGET_PEAK_BYTES = 2 * GiB


# --------------------------------------------------------------------------- references
def scipy_reference(tree, log_pi_ref, reward, beta, return_policy=True):
    """Plain soft VI: ``scipy.special.logsumexp(z, axis=-1)`` per level."""
    value = reward / beta
    out = [None] * tree.H
    for h in range(tree.H - 1, -1, -1):
        z = value.reshape(tree.P, tree.V**h, tree.V) + log_pi_ref[h]
        value = logsumexp(z, axis=-1)
        if return_policy:
            out[h] = z - value[..., None]
    return out, value.reshape(tree.P)


def _lse_columns_unblocked(z):
    """The previous toyrlhf ``_lse_last``: column by column over the whole array."""
    V = z.shape[-1]
    m = z[..., 0].copy()
    for a in range(1, V):
        np.maximum(m, z[..., a], out=m)
    s = np.zeros_like(m)
    tmp = np.empty_like(m)
    with np.errstate(under="ignore"):
        for a in range(V):
            np.subtract(z[..., a], m, out=tmp)
            np.exp(tmp, out=tmp)
            s += tmp
    np.log(s, out=s)
    s += m
    return s


def previous_kernel(tree, log_pi_ref, reward, beta, return_policy=True):
    """The previous toyrlhf ``soft_optimal_policy``: same validation, one full-level temporary
    per depth, column-by-column reduction over whole levels (no blocking, no clamping)."""
    reward = tree.check_leaf_array("reward", reward)
    log_pi_ref = tree.check_levels("log_pi_ref", log_pi_ref)
    value = reward / beta
    out = [None] * tree.H
    for h in range(tree.H - 1, -1, -1):
        z = value.reshape(tree.P, tree.V**h, tree.V) + log_pi_ref[h]
        value = _lse_columns_unblocked(z)
        if return_policy:
            z -= value[..., None]
            out[h] = z
    return out, value.reshape(tree.P)


# --------------------------------------------------------------------------- harness
def timed(fn, repeat):
    """Run ``fn`` ``repeat`` times; return (best, median) seconds and the last result."""
    times, result = [], None
    for _ in range(repeat):
        result = None  # free the previous result before the next run
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def traced_peak(fn):
    """Peak bytes allocated (tracemalloc) while ``fn`` runs, beyond what was live before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak


def max_rss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # kilobytes on Linux


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def compare_to_reference(sol, ref_pi, ref_logZ, tol=1e-10):
    """Assert toyrlhf agrees with the scipy reference; return the max abs differences."""
    d_logZ = float(np.max(np.abs(sol.log_Z - ref_logZ)))
    d_pi = 0.0
    for h, (a, b) in enumerate(zip(sol.log_pi, ref_pi)):
        assert not np.isnan(a).any(), f"NaN in toyrlhf log_pi[{h}]"
        fa, fb = np.isfinite(a), np.isfinite(b)
        assert np.array_equal(fa, fb), f"-inf patterns differ at level {h}"
        assert np.all(a[~fa] == -np.inf)
        if fa.any():
            d_pi = max(d_pi, float(np.max(np.abs(a[fa] - b[fa]))))
    assert d_logZ <= tol, f"log Z differs from the scipy reference by {d_logZ:.3g} > {tol}"
    assert d_pi <= tol, f"log pi differs from the scipy reference by {d_pi:.3g} > {tol}"
    return d_logZ, d_pi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--V", type=int, default=4)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--zero-fraction", type=float, default=0.25, help="fraction of -inf reference log-probs")
    ap.add_argument("--repeat", type=int, default=7, help="runs per fast method (best is reported)")
    ap.add_argument("--repeat-slow", type=int, default=3, help="runs for the scipy and previous kernels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"# soft value iteration benchmark: V={args.V}, H={args.H}, P=1, beta={args.beta}, float64, one core")
    print(f"# {cpu_name()}; Python {platform.python_version()}, NumPy {np.__version__}, SciPy {scipy.__version__}")
    print("# OMP/OPENBLAS/MKL_NUM_THREADS=1; times are the best of --repeat runs (median in brackets)")
    print(f"# load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    rng = np.random.default_rng(args.seed)
    tree = TokenTree(V=args.V, H=args.H, P=1)
    N, E = tree.n_leaves, tree.n_edges
    t0 = time.perf_counter()
    log_pi_ref = random_policy(tree, rng, zero_fraction=args.zero_fraction)
    reward = rng.standard_normal((1, N))
    t_build = time.perf_counter() - t0
    n_neginf = sum(int(np.isneginf(lp).sum()) for lp in log_pi_ref)
    input_bytes = reward.nbytes + sum(lp.nbytes for lp in log_pi_ref)
    rss_inputs = max_rss_bytes()
    print(
        f"# {N:,} leaves, {E:,} edges ({n_neginf:,} with pi_ref = 0, i.e. -inf log-probs); "
        f"inputs {input_bytes / MiB:.0f} MiB, built in {t_build:.1f} s (not timed); "
        f"peak RSS after building inputs {rss_inputs / MiB:.0f} MiB"
    )

    beta = args.beta
    rows = []

    def add(name, fn, repeat, values=None, trace=True):
        best, med, res = timed(fn, repeat)
        peak = traced_peak(fn) if trace else None
        rows.append((name, best, med, values, peak))
        return res

    # the toyrlhf calls
    sol = add("toyrlhf soft_optimal_policy", lambda: soft_optimal_policy(tree, log_pi_ref, reward, beta), args.repeat)
    sol_z = add(
        "toyrlhf soft_optimal_policy(return_policy=False)",
        lambda: soft_optimal_policy(tree, log_pi_ref, reward, beta, return_policy=False),
        args.repeat,
    )
    assert np.array_equal(sol.log_Z, sol_z.log_Z)
    del sol_z
    add(
        "  of which argument validation",
        lambda: (tree.check_leaf_array("reward", reward), tree.check_levels("log_pi_ref", log_pi_ref)),
        args.repeat,
    )

    # the previous kernel: bitwise equal, slower
    prev = add("previous soft_optimal_policy (unblocked)", lambda: previous_kernel(tree, log_pi_ref, reward, beta), args.repeat_slow)
    assert np.array_equal(prev[1], sol.log_Z) and all(np.array_equal(a, b) for a, b in zip(prev[0], sol.log_pi)), (
        "blocked kernel is not bitwise equal to the previous one"
    )
    del prev
    add(
        "previous soft_optimal_policy(return_policy=False)",
        lambda: previous_kernel(tree, log_pi_ref, reward, beta, return_policy=False),
        args.repeat_slow,
    )

    # the plain scipy reference
    ref_pi, ref_logZ = add(
        "scipy.special.logsumexp(axis=-1) per level", lambda: scipy_reference(tree, log_pi_ref, reward, beta), args.repeat_slow
    )
    d_logZ, d_pi = compare_to_reference(sol, ref_pi, ref_logZ)
    del ref_pi
    add(
        "scipy logsumexp per level, log Z only",
        lambda: scipy_reference(tree, log_pi_ref, reward, beta, return_policy=False),
        args.repeat_slow,
    )

    # roofline-ish: one exp per edge
    x = rng.standard_normal(E)
    y = np.empty_like(x)
    add(f"np.exp over {E:,} values (out=)", lambda: np.exp(x, out=y), args.repeat, values=E, trace=False)
    x[rng.random(E) < n_neginf / E] = -np.inf
    add(f"np.exp, same values but {100 * n_neginf / E:.0f}% of them -inf", lambda: np.exp(x, out=y), args.repeat, values=E, trace=False)
    x = y = None  # free them
    rss_end = max_rss_bytes()

    # ------------------------------------------------------------------ table
    w = max(len(r[0]) for r in rows)
    print()
    print(f"| {'method':<{w}} | time [s] (median) | leaves/s | extra peak memory |")
    print(f"|{'-' * (w + 2)}|-------------------|----------|-------------------|")
    for name, best, med, values, peak in rows:
        rate = f"{N / best:.3g}" if values is None else f"{N / best:.3g} ({values / best:.3g} values/s)"
        mem = "-" if peak is None else f"{peak / MiB:.0f} MiB"
        print(f"| {name:<{w}} | {best:.4f} ({med:.4f}) | {rate} | {mem} |")
    print()
    toy_best = rows[0][1]
    toy_rate = N / toy_best
    toy_peak = input_bytes + rows[0][4]
    print(f"agreement with scipy: max|d log Z| = {d_logZ:.2e}, max|d log pi| = {d_pi:.2e} (asserted <= 1e-10); "
          "bitwise equal to the previous kernel (asserted)")
    print(
        f"toyrlhf soft_optimal_policy: {toy_rate:.3g} leaves/s "
        f"({'meets' if toy_rate >= TARGET_LEAVES_PER_S else 'MISSES'} the {TARGET_LEAVES_PER_S:.0e} target); "
        f"{toy_rate / (N / rows[3][1]):.1f}x the previous version, {toy_rate / (N / rows[5][1]):.1f}x scipy"
    )
    print(
        f"memory: inputs {input_bytes / MiB:.0f} MiB + call peak {rows[0][4] / MiB:.0f} MiB = {toy_peak / MiB:.0f} MiB "
        f"for soft_optimal_policy ({'under' if toy_peak < TARGET_PEAK_BYTES else 'OVER'} the 2 GiB target); "
        f"process peak RSS (ru_maxrss, whole script incl. building inputs and the scipy reference) "
        f"{rss_end / MiB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
