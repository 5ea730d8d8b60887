"""Benchmark: sampled PPO on a 4-ary tree of depth 10 (1,048,576 leaves), batches of 4,096 completions.

Run from the repository root::

    python benchmarks/bench_ppo.py              # the issue's size: V=4, H=10, 4096 completions
    python benchmarks/bench_ppo.py --H 8        # smaller, for a quick look

One PPO update = sample a batch from the current policy (ancestral sampling), per-token KL
penalty (k1) in the reward, leave-one-out advantages over groups of 4 completions per prompt,
then ``--epochs`` full-batch ascent steps on the clipped surrogate (``toyrlhf.online.ppo_step``).
Rows (best of ``--repeat`` timings of ``--updates`` consecutive updates, one core):

* ``toyrlhf, path-local``: the default for tabular policies; conditionals and gradients only at
  the visited nodes, ``O(n H V)`` per epoch, plus one ``O(edges)`` pass for the sampling policy;
* ``toyrlhf, dense``: the generic evaluator any policy class gets (per-token weights scattered
  onto the edges, turned into leaf weights, pulled back by the class's ``leaf_logprobs_vjp``),
  ``O(edges)`` per epoch;
* ``toyrlhf, exact critic``: path-local, with GAE(0) advantages from the exact value function of
  the behaviour policy (one ``O(edges)`` backward pass per update);
* ``python loop``: a plain per-sample reference written below (a Python loop over completions and
  tokens for sampling, advantages and every epoch's gradient), timed on ``--ref-samples``
  completions and scaled linearly to the batch.

The last line reports how much of a toyrlhf update is the engine's ``conditionals`` call that
feeds the sampler (one ``O(edges)`` pass per update; the rest of the path-local update is
``O(n H V)`` plus ``O(n_params)`` vector arithmetic on the parameters).

Before timing, the reference and toyrlhf's building blocks are run on the *same* batch and the
resulting parameters are checked to agree to 1e-10.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from toyrlhf.online import (  # noqa: E402
    RLProblem,
    compute_advantages,
    ppo_step,
    ppo_surrogate,
    sample_rollouts,
    token_rewards,
)
from toyrlhf.policies import TabularPolicy, random_policy  # noqa: E402
from toyrlhf.tree import TokenTree  # noqa: E402


# --------------------------------------------------------------------------- plain reference
class LoopPPO:
    """PPO written the obvious way: one completion and one token at a time (tabular logits)."""

    def __init__(self, tree, log_pi_ref, reward, beta, clip_eps, lr, epochs, group_size):
        self.tree, self.reward, self.beta = tree, reward, beta
        self.clip_eps, self.lr, self.epochs, self.k = clip_eps, lr, epochs, group_size
        self.ref = [np.asarray(lp) for lp in log_pi_ref]
        sizes = [tree.P * tree.V**h * tree.V for h in range(tree.H)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def row(self, theta, h, p, node):
        """log pi(. | s) at one node: log-softmax of base + theta (pure Python over V tokens)."""
        V = self.tree.V
        start = self.offsets[h] + (p * V**h + node) * V
        z = [self.ref[h][p, node, a] + theta[start + a] for a in range(V)]
        m = max(z)
        lse = m + math.log(sum(math.exp(x - m) for x in z))
        return [x - lse for x in z], start

    def sample(self, theta, prompts, rng):
        out = []
        for p in prompts:  # one completion at a time
            node, toks = 0, []
            for h in range(self.tree.H):
                row, _ = self.row(theta, h, p, node)
                u, acc, a = rng.random(), 0.0, self.tree.V - 1
                for b in range(self.tree.V):
                    acc += math.exp(row[b])
                    if u < acc:
                        a = b
                        break
                toks.append(a)
                node = node * self.tree.V + a
            out.append(toks)
        return out

    def update(self, theta, prompts, tokens):
        H, V, n = self.tree.H, self.tree.V, len(prompts)
        theta = np.array(theta, dtype=float)
        # behaviour log-probs, per-token rewards and returns
        old, rets = [], []
        for p, toks in zip(prompts, tokens):
            node, lp_old, c = 0, [], []
            for h in range(H):
                row, _ = self.row(theta, h, p, node)
                a = toks[h]
                lp_old.append(row[a])
                c.append(-self.beta * (row[a] - self.ref[h][p, node, a]))
                node = node * V + a
            leaf = node
            c[-1] += self.reward[p, leaf]
            old.append(lp_old)
            rets.append(sum(c))
        adv = []
        for i in range(n):  # leave-one-out baseline within each group
            g0 = (i // self.k) * self.k
            others = [rets[j] for j in range(g0, g0 + self.k) if j != i]
            adv.append(rets[i] - sum(others) / len(others))
        for _ in range(self.epochs):
            grad = np.zeros_like(theta)
            for i, (p, toks) in enumerate(zip(prompts, tokens)):
                node = 0
                for h in range(H):
                    row, start = self.row(theta, h, p, node)
                    a = toks[h]
                    ratio = math.exp(row[a] - old[i][h])
                    A = adv[i]
                    unclipped = ratio * A
                    clipped = min(max(ratio, 1 - self.clip_eps), 1 + self.clip_eps) * A
                    if unclipped <= clipped:
                        w = ratio * A / n
                        for b in range(V):
                            grad[start + b] += w * ((1.0 if b == a else 0.0) - math.exp(row[b]))
                    node = node * V + a
            theta += self.lr * grad
        return theta


# --------------------------------------------------------------------------- helpers
def vectorised_update(pc, theta, prob, batch, clip_eps, lr, epochs, mode="auto"):
    """toyrlhf's building blocks on a given batch (what ppo_step does after sampling)."""
    A = compute_advantages(batch, token_rewards(batch, prob.reward, prob.beta), advantage="loo")
    th = theta
    for _ in range(epochs):
        th = th + lr * ppo_surrogate(pc, th, prob, batch, A, clip_eps=clip_eps, mode=mode)[1]
    return th


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--V", type=int, default=4)
    ap.add_argument("--H", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4096, help="completions per update")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (RLOO groups)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3, help="consecutive updates per timing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ref-samples", type=int, default=256, help="completions the Python loop is timed on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    tree = TokenTree(V=args.V, H=args.H)
    ref = random_policy(tree, rng)
    reward = rng.standard_normal((tree.P, tree.n_leaves))
    prob = RLProblem(tree, ref, reward, beta=0.05)
    pc = TabularPolicy(tree, ref)
    theta0 = 0.1 * rng.standard_normal(pc.n_params)
    n_groups = args.batch // args.group
    opts = dict(lr=0.5, epochs=args.epochs, clip_eps=0.2, n_groups=n_groups, group_size=args.group)

    # ---- correctness: the same batch through the Python reference and toyrlhf
    loop = LoopPPO(tree, ref, reward, prob.beta, 0.2, 0.5, args.epochs, args.group)
    check = sample_rollouts(tree, pc.conditionals(theta0), ref, max(1, args.ref_samples // args.group), args.group, rng)
    a = loop.update(theta0, check.prompts.tolist(), check.tokens.tolist())
    b = vectorised_update(pc, theta0, prob, check, 0.2, 0.5, args.epochs)
    c = vectorised_update(pc, theta0, prob, check, 0.2, 0.5, args.epochs, mode="dense")
    err = max(np.max(np.abs(a - b)), np.max(np.abs(a - c)))
    assert err < 1e-10, f"reference and toyrlhf disagree by {err}"

    # ---- timings
    def run_steps(**kw):
        def f():
            th = theta0
            r = np.random.default_rng(1)
            for _ in range(args.updates):
                th, _ = ppo_step(pc, th, prob, r, **opts, **kw)
        return f

    rows = []
    for name, kw in (
        ("toyrlhf, path-local (default)", dict(advantage="loo", reward_to_go=False)),
        ("toyrlhf, dense evaluator", dict(advantage="loo", reward_to_go=False, mode="dense")),
        ("toyrlhf, exact critic GAE(0)", dict(advantage="critic")),
    ):
        t = best_time(run_steps(**kw), args.repeat) / args.updates
        rows.append((name, t))

    t_cond = best_time(lambda: pc.conditionals(theta0), args.repeat)
    m = max(args.group, (args.ref_samples // args.group) * args.group)

    def ref_update():
        r = np.random.default_rng(2)
        prompts = np.repeat(r.choice(tree.P, size=m // args.group, p=tree.rho0), args.group).tolist()
        toks = loop.sample(theta0, prompts, r)
        loop.update(theta0, prompts, toks)

    t_ref = best_time(ref_update, max(1, args.repeat - 1)) * (args.batch / m)
    rows.append((f"python loop (timed on {m}, scaled)", t_ref))

    print(f"sampled PPO on TokenTree(V={tree.V}, H={tree.H}): {tree.n_leaves:,} leaves, {pc.n_params:,} parameters; "
          f"{args.batch} completions per update ({n_groups} prompts x {args.group}), {args.epochs} epochs, "
          f"clip 0.2, k1 per-token KL, leave-one-out advantages")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread; best of {args.repeat}; reference and toyrlhf agree to {err:.1e} on the same batch")
    print()
    head = f"{'implementation':<36} {'s / update':>11} {'updates/s':>10} {'completions/s':>14} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for name, t in rows:
        print(f"{name:<36} {t:>11.4f} {1 / t:>10.2f} {args.batch / t:>14,.0f} {t_ref / t:>8.1f}x")
    print()
    print(f"of each toyrlhf update, {t_cond:.4f} s is TabularPolicy.conditionals (all {pc.n_params:,} edges, "
          "computed once per update for sample_completions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
