"""Benchmark: the namespace-generic tree kernels on every backend, against the machine's limits.

Run from the repository root::

    python benchmarks/bench_backends.py                 # NumPy (one core) and CuPy if present
    python benchmarks/bench_backends.py --H 10          # smaller trees, for a quick look
    python benchmarks/bench_backends.py --backends numpy,array_api_strict --H 8   # the generic path

Kernels (the public calls, argument validation included), in leaves per second:

* ``soft_optimal_policy`` (soft value iteration, returning the policy) and its ``log Z`` only;
* ``leaf_logprobs`` (sequence log-probabilities: one broadcast-add per depth);
* ``aggregate_to_edges`` (tree-aggregated gradients: one sum over the ``V`` children per depth);

on a ``V``-ary tree of depth ``H`` (default 4-ary, depth 12: 16,777,216 leaves on the CPU;
depth 14, 268,435,456 leaves, on a GPU), float64 and float32, with a reference policy of which
a quarter of the (node, token) pairs have probability 0 (``-inf`` log-probs).  On NumPy the
kernels also run with the GPU's sweep profile (whole levels, axis reductions), to show what the
CPU profile (cache-sized blocks, column-by-column reductions) buys.

Limits, measured on the same machine in the same run:

* memory bandwidth: the best of several copies of a 512 MiB array (``np.copyto``), counted as
  ``2 x size`` bytes (read + write) per second.  The *bandwidth bound* of a kernel is this
  bandwidth divided by its compulsory traffic per leaf (``bytes/leaf``: every input read once,
  every output written once, with ``E/N = V/(V-1)`` edges per leaf): soft VI with the policy
  ``s (1 + 2 E/N)`` (reward, reference, policy), ``log Z`` only ``s (1 + E/N)``, sequence
  log-probs ``s (E/N + 1)`` (all levels in, leaves out), aggregated gradients ``s E/N`` (leaves
  in, inner levels out), with ``s`` the item size.  Write-allocate traffic and the kernels'
  temporaries are not counted, so the bound is optimistic;
* ``np.exp`` throughput, in cache (64K values, ``out=``) and streaming over ``E`` values: soft
  VI needs one ``exp`` per edge, so ``exp values/s x N/E`` leaves/s bounds it.

Every script pins itself to one core before NumPy is imported (OMP/OPENBLAS/MKL threads = 1).
Targets: CPU soft VI >= 1e8 leaves/s on 16.7M leaves, float64, one core; GPU (H100) >= 5e10
leaves/s on 268M leaves, float32.  The script asserts that each backend agrees with NumPy
float64 (1e-10 for float64, the float32 tolerance of tests/test_backend.py for float32).
"""

from __future__ import annotations

import os

# One core: must be set before NumPy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from toyrlhf._backend import (  # noqa: E402
    DEVICE_PROFILE,
    BackendUnavailableError,
    array_namespace,
    asarray,
    backend_namespace,
    to_numpy,
)
from toyrlhf.policies import aggregate_to_edges, leaf_logprobs, random_policy  # noqa: E402
from toyrlhf.projections import _soft_value_iteration, soft_optimal_policy  # noqa: E402
from toyrlhf.tree import GiB, TokenTree  # noqa: E402

MiB = 2**20
TARGETS = {("numpy", "float64"): 1e8, ("cupy", "float32"): 5e10}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name(xp) -> str:
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:  # noqa: BLE001
        return "unknown GPU"


def make_sync(name):
    if name == "cupy":
        import cupy

        return lambda: cupy.cuda.Device().synchronize()
    return lambda: None


def best_time(fn, repeat, sync):
    """Best of ``repeat`` runs (after one warm-up run), synchronising a device before each clock."""
    result = fn()
    sync()
    best = np.inf
    for _ in range(repeat):
        result = None
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bandwidth(xp, sync, nbytes=512 * MiB, repeat=5):
    """Copy bandwidth in bytes/s: ``2 x nbytes`` (read + write) per copy."""
    if xp is np:
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        t, _ = best_time(lambda: np.copyto(dst, src), repeat, sync)
    else:
        src = xp.ones(nbytes // 8, dtype=xp.float64)
        t, _ = best_time(lambda: xp.asarray(src, copy=True), repeat, sync)
    return 2 * nbytes / t


def exp_rates(xp, dtype, E, sync, repeat=5):
    """``exp`` values/s: in cache (64K values, out=; NumPy only) and streaming over E values."""
    rng = np.random.default_rng(1)
    rates = {}
    if xp is np:
        x = -np.abs(rng.standard_normal(1 << 16)).astype(dtype)
        y = np.empty_like(x)
        t, _ = best_time(lambda: [np.exp(x, out=y) for _ in range(64)], repeat, sync)
        rates["cache"] = 64 * x.size / t
        xs = -np.abs(rng.standard_normal(E)).astype(dtype)
        ys = np.empty_like(xs)
        t, _ = best_time(lambda: np.exp(xs, out=ys), repeat, sync)
        rates["stream"] = E / t
    else:
        xs = asarray(-np.abs(rng.standard_normal(E)).astype(dtype), xp=xp)
        t, _ = best_time(lambda: xp.exp(xs), repeat, sync)
        rates["stream"] = E / t
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="numpy,cupy", help="comma-separated: numpy, cupy, array_api_strict")
    ap.add_argument("--V", type=int, default=4)
    ap.add_argument("--H", type=int, default=12, help="depth of the CPU trees (default 12: 16.7M leaves)")
    ap.add_argument("--H-gpu", type=int, default=14, help="depth of the GPU trees (default 14: 268M leaves)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--zero-fraction", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"# toyrlhf backend benchmark: V={args.V}, P=1, beta={args.beta}, zero fraction {args.zero_fraction}")
    print(f"# CPU: {cpu_name()}; Python {platform.python_version()}, NumPy {np.__version__}; "
          "OMP/OPENBLAS/MKL_NUM_THREADS=1 (one core)")
    print(f"# load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    rows, limits, notes = [], [], []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            xp = backend_namespace(name)
        except BackendUnavailableError as exc:
            for dt in ("float64", "float32"):
                rows.append((name, dt, "soft_optimal_policy", None, None, None, None, None))
            notes.append(f"{name}: not measured: {exc}")
            continue
        sync = make_sync(name)
        H = args.H_gpu if name == "cupy" else args.H
        tree = TokenTree(V=args.V, H=H, P=1, memory_budget=256 * GiB)
        N, E = tree.n_leaves, tree.n_edges
        rng = np.random.default_rng(args.seed)
        ref_np = random_policy(tree, rng, zero_fraction=args.zero_fraction)
        r_np = rng.standard_normal((1, N))
        truth = soft_optimal_policy(tree, ref_np, r_np, args.beta)
        M = np.abs(r_np).max() / args.beta + H * max(np.abs(x[np.isfinite(x)]).max() for x in ref_np)  # float32 tolerance scale
        bw = bandwidth(xp, sync)
        dev = gpu_name(xp) if name == "cupy" else cpu_name()
        limits.append(f"{name} ({dev}): copy bandwidth {bw / 1e9:.1f} GB/s")
        for dt in (np.float64, np.float32):
            s = np.dtype(dt).itemsize
            ref = tuple(asarray(x.astype(dt), xp=xp) for x in ref_np)
            r = asarray(r_np.astype(dt), xp=xp)
            g = asarray(rng.standard_normal((1, N)).astype(dt), xp=xp)
            ex = exp_rates(xp, dt, E, sync)
            limits.append(f"{name} {np.dtype(dt).name}: exp " + ", ".join(f"{k} {v:.3g} values/s" for k, v in ex.items())
                          + f" -> soft VI exp bound {max(ex.values()) * N / E:.3g} leaves/s")
            epl = E / N
            kernels = [
                ("soft_optimal_policy", s * (1 + 2 * epl), lambda t=tree, q=ref, x=r: soft_optimal_policy(t, q, x, args.beta)),
                ("soft_optimal_policy(log Z only)", s * (1 + epl),
                 lambda t=tree, q=ref, x=r: soft_optimal_policy(t, q, x, args.beta, return_policy=False)),
                ("leaf_logprobs", s * (epl + 1), lambda t=tree, q=ref: leaf_logprobs(t, q)),
                ("aggregate_to_edges", s * epl, lambda t=tree, x=g: aggregate_to_edges(t, x)),
            ]
            if xp is np:
                kernels.append(("soft VI, GPU profile (whole levels)", s * (1 + 2 * epl),
                                lambda q=ref, x=r: _soft_value_iteration(np, q, x, args.beta, True, DEVICE_PROFILE)))
            for kname, bpl, fn in kernels:
                t, res = best_time(fn, args.repeat, sync)
                if kname == "soft_optimal_policy":  # agreement with NumPy float64
                    got = to_numpy(res.log_Z).astype(float)
                    tol = 1e-10 if dt == np.float64 else 4 * H * (args.V + 2 + 3 * M) * np.finfo(np.float32).eps
                    err = float(np.max(np.abs(got - truth.log_Z)))
                    assert err <= tol, f"{name} {np.dtype(dt).name}: log Z differs from NumPy float64 by {err:.3g} > {tol:.3g}"
                    notes.append(f"{name} {np.dtype(dt).name}: |log Z - NumPy float64| = {err:.2e} (asserted <= {tol:.1e}); "
                                 f"namespace of the result: {array_namespace(res.log_Z).__name__}")
                res = None
                rows.append((name, np.dtype(dt).name, kname, N, t, N / t, bpl, bw / bpl))
            ref = r = g = kernels = None
        truth = ref_np = r_np = None

    print()
    w = max(len(r[2]) for r in rows)
    print(f"| backend | dtype | {'kernel':<{w}} | leaves | time [s] | leaves/s | bytes/leaf | bandwidth bound [leaves/s] | % of bound |")
    print(f"|---------|-------|{'-' * (w + 2)}|--------|----------|----------|------------|----------------------------|------------|")
    for name, dt, k, N, t, rate, bpl, bound in rows:
        if t is None:
            print(f"| {name} | {dt} | {k:<{w}} | - | - | not measured: no GPU in this session | - | - | - |")
            continue
        print(f"| {name} | {dt} | {k:<{w}} | {N:,} | {t:.4f} | {rate:.3g} | {bpl:.1f} | {bound:.3g} | {100 * rate / bound:.0f}% |")
    print()
    for line in limits + notes:
        print(line)
    for (name, dt), target in TARGETS.items():
        hit = [r for r in rows if r[0] == name and r[1] == dt and r[2] == "soft_optimal_policy"]
        if not hit or hit[0][4] is None:
            print(f"target {name} {dt} soft VI >= {target:.0e} leaves/s: not measured (no {name} backend here)")
        else:
            rate = hit[0][5]
            print(f"target {name} {dt} soft VI >= {target:.0e} leaves/s: {rate:.3g} ({'meets' if rate >= target else 'MISSES'} it)")


if __name__ == "__main__":
    main()
