"""Per-call cost of the op floor: a call of a robustkern op on inputs so small that its arithmetic costs nothing,
against its implementation called directly (the C++ kernel below autograd, or the reference function on CPU for
ops that have no C++ kernel) and against the closest single ATen call. "floor adds" is op minus implementation:
what the floor (argument checks, backend choice, autograd wrapping) adds per call; algorithms call ops per layer
and per step, so this is the cost that tempts them to go around the floor.

    PYTHONPATH=python:. python benchmarks/bench_dispatch.py [--rounds 30] [--calls 2000] [--write-results]

Each provider is timed as ``--calls`` back-to-back calls, one thread, interleaved over ``--rounds`` rounds
(``common.time_cpu``); the table gives microseconds per call (median over rounds) and the overhead over ATen.
``--clock thread`` (the default) counts the CPU time of the calling thread, so that other processes on a shared
machine do not add their time slices to a difference of a few microseconds; ``--clock wall`` counts wall time.
"grad" rows call with an input that requires grad (the autograd node is recorded, no backward is run); for them the
table also gives a bare ``torch.autograd.Function`` whose forward calls the implementation and saves nothing:
torch's own cost of a Python custom autograd node (the compiled ops that declare what they keep record a C++ node
instead, ``csrc/autograd.cpp``). "fwd+bwd" rows also run the backward: the implementation is then the kernel plus
the op's backward formula called directly on a plain context (the math without the autograd engine), the ATen call
its forward and backward through autograd.

"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern import ops  # noqa: E402

BENCH = "dispatch"
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}
TARGET_US = 10.0  # what the floor may add per call on the CPU, so that no algorithm has a reason to go around it


def _direct(name: str, *args):
    """The op's CPU implementation called directly: its C++ kernel below the autograd layer, else its reference."""
    op = ops.OPS[name]
    if op.compiled:
        kernel = getattr(torch.ops.robustkern, name).default

        def call():
            with torch._C._AutoDispatchBelowAutograd():
                return kernel(*args)
        return call
    return lambda: op.reference(*args)


def _direct_fwd_bwd(name: str, args, grads):
    """The op's CPU kernel and its backward formula called directly, without autograd: the setup and backward
    of the op on a plain context, as the recorded node runs them."""
    from robustkern.ops._registry import _SavedContext

    op, forward = ops.OPS[name], _direct(name, *args)
    needs = tuple(isinstance(a, torch.Tensor) for a in args)

    def call():
        out = forward()
        ctx = _SavedContext(needs)
        op.setup_context(ctx, args, out)
        return op.backward(ctx, *grads, *(None,) * (len(out) - len(grads)))
    return call


def _fwd_bwd(fn, grads):
    def call():
        out = fn()
        torch.autograd.backward(out[:len(grads)], grads)
    return call


class _Bare(torch.autograd.Function):
    """The least a custom autograd node costs: forward runs the implementation, nothing is saved."""

    @staticmethod
    def forward(ctx, call, x):
        return call()

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - never run
        return None, None


def bare_function(direct, x):
    return lambda: _Bare.apply(direct, x)


def cases():
    """(name, robustkern call, direct implementation call, ATen call, the input that requires grad or None) on tiny
    CPU inputs."""
    ops.load()
    g = torch.Generator().manual_seed(0)
    m, r = torch.rand(2, 8, generator=g), torch.rand(2, 8, generator=g)
    mg = m.clone().requires_grad_()
    w, b = torch.rand(4, 8, generator=g), torch.rand(4, generator=g)
    A = torch.randn(2, 3, 8, generator=g)
    Ag = A.clone().requires_grad_()
    lo, hi = -torch.rand(2, 8, generator=g), torch.rand(2, 8, generator=g)
    x, gr = torch.rand(2, 8, generator=g), torch.randn(2, 8, generator=g)
    xg = x.clone().requires_grad_()
    eps = torch.full((2,), 0.1)
    logits, y = torch.randn(4, 5, generator=g), torch.randint(0, 5, (4,), generator=g)
    bits = ops.relu_pack_mask(x)
    cmg, cr = torch.rand(1, 2, 4, 4, generator=g).requires_grad_(), torch.rand(1, 2, 4, 4, generator=g)
    cw = torch.rand(3, 2, 3, 3, generator=g)
    conv = (cmg, cr, cw, None, [1, 1], [0, 0], [1, 1], 1, None, None, False, True)
    lin = (mg, r, w, b, None, None, False, True)
    g2, gc = (torch.ones(2, 4), torch.ones(2, 4)), (torch.ones(1, 3, 2, 2), torch.ones(1, 3, 2, 2))
    rows = [
        ("interval_affine (relu)", lambda: ops.interval_affine(m, r, relu=True),
         _direct("interval_affine", m, r, None, None, True, True), lambda: torch.relu(m)),
        ("interval_affine (relu), grad", lambda: ops.interval_affine(mg, r, relu=True),
         _direct("interval_affine", mg, r, None, None, True, True), lambda: torch.relu(mg)),
        ("interval_linear", lambda: ops.interval_linear(m, r, w, b),
         _direct("interval_linear", m, r, w, b, None, None, False, True), lambda: F.linear(m, w, b)),
        ("interval_linear, grad", lambda: ops.interval_linear(mg, r, w, b),
         _direct("interval_linear", mg, r, w, b, None, None, False, True), lambda: F.linear(mg, w, b)),
        ("interval_conv2d, grad", lambda: ops.interval_conv2d(cmg, cr, cw),
         _direct("interval_conv2d", *conv), lambda: F.conv2d(cmg, cw)),
        ("interval_linear, fwd+bwd", _fwd_bwd(lambda: ops.interval_linear(mg, r, w, b), g2),
         _direct_fwd_bwd("interval_linear", lin, g2), _fwd_bwd(lambda: (F.linear(mg, w, b),), g2[:1])),
        ("interval_conv2d, fwd+bwd", _fwd_bwd(lambda: ops.interval_conv2d(cmg, cr, cw), gc),
         _direct_fwd_bwd("interval_conv2d", conv, gc), _fwd_bwd(lambda: (F.conv2d(cmg, cw),), gc[:1])),
        ("crown_relu_backward", lambda: ops.crown_relu_backward(A, lo, hi),
         _direct("crown_relu_backward", A, lo, hi, 0, False), lambda: A.clamp(min=0)),
        ("crown_relu_backward, grad", lambda: ops.crown_relu_backward(Ag, lo, hi),
         _direct("crown_relu_backward", Ag, lo, hi, 0, False), lambda: Ag.clamp(min=0), Ag),
        ("pgd_step (linf)", lambda: ops.pgd_step(x, gr, x, eps, eps),
         _direct("pgd_step", x, gr, x, eps, eps, "linf"), lambda: x.clamp(0, 1)),
        ("pgd_step (linf), grad", lambda: ops.pgd_step(xg, gr, x, eps, eps),
         _direct("pgd_step", xg, gr, x, eps, eps, "linf"), lambda: xg.clamp(0, 1), xg),
        ("relu_masked", lambda: ops.relu_masked(gr, bits), _direct("relu_masked", gr, bits), lambda: torch.relu(gr)),
        ("softmax_ce_grad", lambda: ops.softmax_ce_grad(logits, y), _direct("softmax_ce_grad", logits, y),
         lambda: torch.softmax(logits, 1)),
    ]
    return [row if len(row) == 5 else row + ((mg,) if row[0].endswith(", grad") else (None,)) for row in rows]


def loop(fn, n):
    def run():
        for _ in range(n):
            fn()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="thread",
                   help="thread: CPU time of this thread (default); wall: wall-clock time")
    p.add_argument("--write-results", action="store_true", help="write the CSV rows and the RESULTS.md block")
    common.add_output_options(p)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    env = common.start(device, threads=1, args=args)
    rows, lines, floors = [], [], []
    for name, ours, direct, aten, grad_input in cases():
        providers = {"robustkern": loop(ours, args.calls), "implementation": loop(direct, args.calls),
                     "aten": loop(aten, args.calls)}
        if grad_input is not None:
            providers["autograd.Function"] = loop(bare_function(direct, grad_input), args.calls)
        t = common.time_cpu(providers, rounds=args.rounds, warmup=1, clock=CLOCKS[args.clock])
        per_call = {k: common.Timing(v.median_ms / args.calls, v.low_ms / args.calls, v.high_ms / args.calls,
                                     v.samples) for k, v in t.items()}
        us = {k: v.median_ms * 1e3 for k, v in per_call.items()}
        over = us["robustkern"] - us["implementation"]
        floors.append((name, over))
        bare = us.get("autograd.Function")
        lines.append(f"| {name} | {us['robustkern']:.1f} | {us['implementation']:.1f} | {us['aten']:.1f} | "
                     f"{over:.1f} | " + ("-" if bare is None else f"{bare:.1f} | {us['robustkern'] - bare:.1f}")
                     + (" | -" if bare is None else "") + " |")
        rows += [common.Row(case={"op": name}, provider=k, timing=v) for k, v in per_call.items()]
    legend = (f"Microseconds per call ({'CPU time of the calling thread' if args.clock == 'thread' else 'wall time'}), "
              "median of interleaved rounds. `implementation`: the op's CPU kernel called directly below autograd "
              "(or its reference where it has no C++ kernel); in the fwd+bwd rows, the kernel and the op's backward "
              "formula called on a plain context. `floor adds` = robustkern - implementation: argument checks, "
              "backend choice, the IEEE-products context (reference and Triton only; the compiled kernels hold "
              "their own) and, in the grad rows, the autograd node (a C++ node for the compiled ops that declare "
              "what they keep, "
              "`csrc/autograd.cpp`; a Python `autograd.Function` for the others), in the fwd+bwd rows also the "
              "autograd engine's backward pass. `bare autograd.Function`: the implementation inside a Python custom "
              "autograd node that saves nothing (torch's own cost of a Python node); `over bare` = robustkern - "
              "that.")
    missed = [f"- missed: {name}: the floor adds {over:.1f} us" for name, over in floors
              if over >= TARGET_US and not name.endswith("fwd+bwd")]
    body = "\n".join([legend, "", "| op | robustkern us/call | implementation us/call | one ATen call us | floor adds us "
                      "| bare autograd.Function us | over bare us |",
                      "|---|---|---|---|---|---|---|", *lines, "",
                      f"Target: the floor adds < {TARGET_US:.0f} us per call (the fwd+bwd rows, which include the "
                      "autograd engine, excepted).", *(missed or ["- met on every row"])])
    print(body)
    if args.write_results:
        common.append_csv(BENCH, rows, env, device)
        common.update_results_md(BENCH, "Op floor: per-call cost of a tiny op call (CPU, one thread)", body, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
