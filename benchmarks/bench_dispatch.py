"""Per-call cost of the op floor: a call of a robustkern op on inputs so small that its arithmetic costs nothing,
against the closest direct ATen call on the same inputs. The difference is what the floor (argument checks,
backend choice, dispatch, autograd wrapping) adds per call; algorithms call ops per layer and per step, so this
is the cost that tempts them to go around the floor.

    PYTHONPATH=python:. python benchmarks/bench_dispatch.py [--rounds 30] [--calls 2000] [--write-results]

Each provider is timed as ``--calls`` back-to-back calls, one thread, interleaved over ``--rounds`` rounds
(``common.time_cpu``); the table gives microseconds per call (median over rounds) and the overhead over ATen.
"grad" rows call with an input that requires grad (the autograd wrapper is recorded, no backward is run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern import ops  # noqa: E402

BENCH = "dispatch"


def cases():
    """(name, robustkern call, ATen call) on tiny CPU inputs."""
    g = torch.Generator().manual_seed(0)
    m, r = torch.rand(2, 8, generator=g), torch.rand(2, 8, generator=g)
    mg = m.clone().requires_grad_()
    w, b = torch.rand(4, 8, generator=g), torch.rand(4, generator=g)
    A = torch.randn(2, 3, 8, generator=g)
    lo, hi = -torch.rand(2, 8, generator=g), torch.rand(2, 8, generator=g)
    x, gr = torch.rand(2, 8, generator=g), torch.randn(2, 8, generator=g)
    eps = torch.full((2,), 0.1)
    logits, y = torch.randn(4, 5, generator=g), torch.randint(0, 5, (4,), generator=g)
    bits = ops.relu_pack_mask(x)
    return [
        ("interval_affine (relu)", lambda: ops.interval_affine(m, r, relu=True), lambda: torch.relu(m)),
        ("interval_affine (relu), grad", lambda: ops.interval_affine(mg, r, relu=True), lambda: torch.relu(mg)),
        ("interval_linear", lambda: ops.interval_linear(m, r, w, b), lambda: F.linear(m, w, b)),
        ("crown_relu_backward", lambda: ops.crown_relu_backward(A, lo, hi), lambda: A.clamp(min=0)),
        ("pgd_step (linf)", lambda: ops.pgd_step(x, gr, x, eps, eps), lambda: x.clamp(0, 1)),
        ("relu_masked", lambda: ops.relu_masked(gr, bits), lambda: torch.relu(gr)),
        ("softmax_ce_grad", lambda: ops.softmax_ce_grad(logits, y), lambda: torch.softmax(logits, 1)),
    ]


def loop(fn, n):
    def run():
        for _ in range(n):
            fn()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--write-results", action="store_true", help="write the CSV rows and the RESULTS.md block")
    common.add_output_options(p)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    env = common.start(device, threads=1, args=args)
    rows, lines = [], []
    for name, ours, aten in cases():
        t = common.time_cpu({"robustkern": loop(ours, args.calls), "aten": loop(aten, args.calls)},
                            rounds=args.rounds, warmup=1)
        per_call = {k: common.Timing(v.median_ms / args.calls, v.low_ms / args.calls, v.high_ms / args.calls,
                                     v.samples) for k, v in t.items()}
        us = {k: v.median_ms * 1e3 for k, v in per_call.items()}
        over = us["robustkern"] - us["aten"]
        lines.append(f"| {name} | {us['robustkern']:.1f} | {us['aten']:.1f} | {over:.1f} |")
        rows += [common.Row(case={"op": name}, provider=k, timing=v) for k, v in per_call.items()]
    body = "\n".join(["| op | robustkern us/call | ATen us/call | floor adds us |", "|---|---|---|---|", *lines])
    print(body)
    if args.write_results:
        common.append_csv(BENCH, rows, env, device)
        common.update_results_md(BENCH, "Op floor: per-call cost of a tiny op call (CPU, one thread)", body, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
