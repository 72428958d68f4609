"""MACER loss tail on the CPU: forward + backward of ``robustkern.ops.macer_tail`` (auto backend: the reference
with the softmax cache) against the original's autograd (``robustkern.reference.macer.macer_tail_terms_reference``,
RuntianZ/macer's arithmetic), at (B, k, C) = (64, 16, 10) and (64, 16, 1000).

    PYTHONPATH=python:. python benchmarks/bench_macer_tail.py --threads 1 [--rounds 400] [--repeats 3]

Each repeat times both providers interleaved (``common.time_cpu``: one call each per round, order rotated) and
prints medians and the ratio; on a loaded machine take the median of the repeats' ratios. "saved MB": bytes
autograd keeps for the backward. The op is called with ``check_labels=False``, as ``macer_loss`` does."""
from __future__ import annotations

import argparse
import statistics

import torch

from common import saved_tensor_bytes, time_cpu
from robustkern.ops import macer_tail
from robustkern.reference.macer import macer_tail_terms_reference

SIGMA, GAMMA, BETA, LBD = 0.25, 8.0, 16.0, 12.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=400, help="rounds at C = 10 (C = 1000: a fifth)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for b, k, c in ((64, 16, 10), (64, 16, 1000)):
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(b, k, c, generator=g) * 0.3).requires_grad_()
        y = torch.randint(0, c, (b,), generator=g)

        def original():
            z.grad = None
            cl, rl = macer_tail_terms_reference(z, y, SIGMA, GAMMA, BETA)
            (cl + LBD * rl).backward()

        def robustkern():
            z.grad = None
            cl, rl = macer_tail(z, y, beta=BETA, gamma=GAMMA, sigma=SIGMA, check_labels=False)
            (cl.sum() + LBD * rl.sum()).backward()

        def fwd(f):
            def run():
                cl, rl = f()
                return cl.sum() + LBD * rl.sum()
            return run
        saved = {"original": saved_tensor_bytes(fwd(lambda: macer_tail_terms_reference(z, y, SIGMA, GAMMA, BETA))),
                 "robustkern": saved_tensor_bytes(fwd(lambda: macer_tail(z, y, beta=BETA, gamma=GAMMA, sigma=SIGMA,
                                                                         check_labels=False)))}
        ratios = []
        rounds = args.rounds if c <= 10 else max(args.rounds // 5, 10)
        for rep in range(args.repeats):
            t = time_cpu({"original": original, "robustkern": robustkern}, rounds=rounds, warmup=3)
            ratios.append(t["original"].median_ms / t["robustkern"].median_ms)
            print(f"(B,k,C)=({b},{k},{c}) repeat {rep}: original {t['original'].median_ms:.3f} ms, robustkern "
                  f"{t['robustkern'].median_ms:.3f} ms (fwd+bwd medians over {rounds} rounds), "
                  f"x robustkern {ratios[-1]:.2f}", flush=True)
        print(f"(B,k,C)=({b},{k},{c}): median x robustkern {statistics.median(ratios):.2f} (above 1: robustkern "
              f"faster); saved MB original {saved['original'] / 2**20:.2f}, robustkern "
              f"{saved['robustkern'] / 2**20:.2f}", flush=True)


if __name__ == "__main__":
    main()
