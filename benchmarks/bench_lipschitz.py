"""L2 Lipschitz certified training steps: the spectral-norm power iterations and BCP's ball-and-box propagation,
robustkern against a plain PyTorch transcription of the original step, forward + backward.

Steps (``--steps``), each on BCP's models at its configs' batch sizes (sungyoon-lee/bcp ``train_mnist.py``:
Wong et al.'s MNIST "large" = ``mnist_medium(padding=1)``, batch 50; ``train_cifar10.py``: 4C3F =
``cifar_medium(padding=1, init="he_fan_out")``, batch 128):

  power  the operator norm of every Linear/Conv2d layer by one power-iteration step from the layer's kept iterate
         (BCP's ``sniter`` 1), then the backward pass of their product (LMT's ``L``). original:
         ``power_iteration_linear_reference`` / ``power_iteration_conv_reference`` (BCP's ``power_iteration_evl``
         and ``power_iteration_conv_evl``, autograd through the step); robustkern:
         ``robustkern.bounds.lipschitz.estimated_norms`` (``PowerIteration``: the step without autograd, one
         differentiable application of the layer).
  bcp    BCP's training loss at eps 1.58 (MNIST) / 36/255 (CIFAR-10) with the power step above: original
         ``bcp_loss_reference`` (``BCP_loss``: ``net_BCP`` ball and box, ``BCP_translation`` with the configs'
         ``opt_iter``: 10 on MNIST, 1 on CIFAR-10); robustkern ``robustkern.bounds.bcp.bcp_loss`` (the same ball
         and box; the worst case over their intersection solved exactly through its dual).
  lmt    LMT's loss on the same power step: original ``lmt_loss_reference``; robustkern
         ``robustkern.bounds.lipschitz.lmt_loss``.

The transcriptions are ``robustkern.reference.published.bcp``. Each provider keeps its own iterates across calls,
as training does, first advanced ``--converge`` steps (500; BCP's iteration stops once its iterate moves by less
than 1e-5), as a few hundred training steps leave them: the power rows' values (``L``) then agree, and the loss
rows differ only where BCP's ``opt_iter`` clipping rounds leave its worst case short of the exact one. CPU:
``common.time_cpu`` (interleaved rounds, order rotated, ``--threads`` torch threads, 1 by default) and "saved MB"
(bytes autograd keeps for the backward); CUDA: ``common.time_cuda`` and "peak MB".

    PYTHONPATH=python:. python benchmarks/bench_lipschitz.py --threads 1 [--write-results]
    PYTHONPATH=python:. python benchmarks/bench_lipschitz.py --quick            # smoke test, seconds
    PYTHONPATH=python:. python benchmarks/bench_lipschitz.py --device cuda --write-results
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern import models  # noqa: E402
from robustkern.bounds import BoundedModule  # noqa: E402
from robustkern.bounds.bcp import bcp_loss  # noqa: E402
from robustkern.bounds.lipschitz import estimated_norms, lmt_loss, power_iteration_for  # noqa: E402
from robustkern.reference.published.bcp import (bcp_loss_reference, lmt_loss_reference,  # noqa: E402
                                                power_iteration_conv_reference, power_iteration_linear_reference)

BENCH = "lipschitz"
STEPS = ("power", "bcp", "lmt")
# model name -> (builder, input shape, eps, BCP's opt_iter in training, BCP's batch size)
MODELS = {
    "mnist_large": (lambda: models.mnist_medium(padding=1), (1, 28, 28), 1.58, 10, 50),
    "cifar_4c3f": (lambda: models.cifar_medium(padding=1, init="he_fan_out"), (3, 32, 32), 36 / 255, 1, 128),
}


def reference_power(model: torch.nn.Sequential, x1: torch.Tensor, u_list: list, steps: int = 1) -> torch.Tensor:
    """The product of BCP's per-layer power-iteration estimates (each layer's iterate kept in ``u_list``)."""
    L = x1.new_ones(())
    h = x1
    for i, layer in enumerate(model.children()):
        if isinstance(layer, torch.nn.Conv2d):
            p, u_list[i] = power_iteration_conv_reference(tuple(h.shape[1:]), layer, steps, u_list[i])
        elif isinstance(layer, torch.nn.Linear):
            p, u_list[i] = power_iteration_linear_reference(layer.weight, steps, u_list[i])
        else:
            p = None
        if p is not None:
            u_list[i] = u_list[i].detach()
            L = L * p
        with torch.no_grad():
            h = layer(h)
    return L


def run_case(name: str, batch: int, steps: list[str], args, device: torch.device) -> list[common.Row]:
    build, shape, eps, opt_iter, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((batch,) + shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    bm = BoundedModule(model, x[:1])
    params = list(model.parameters())
    rows = []
    for step in steps:
        power = power_iteration_for(bm, seed=0)
        u_list = [None] * len(list(model.children()))
        with torch.no_grad():           # both iterates near convergence, as a few hundred training steps leave them
            reference_power(model, x[:1], u_list, steps=args.converge)
            estimated_norms(bm, power, args.converge)

        if step == "power":
            def original_loss():
                return reference_power(model, x[:1], u_list)

            def robustkern_loss():
                return math.prod(estimated_norms(bm, power, 1).values())
        elif step == "bcp":
            def original_loss():
                loss, _, u_list[:] = bcp_loss_reference(model, x, y, eps, u_list, 1, opt_iter)
                return loss

            def robustkern_loss():
                return bcp_loss(bm, x, y, eps, norms=estimated_norms(bm, power, 1))[0]
        else:
            def original_loss():
                loss, _, u_list[:] = lmt_loss_reference(model, x, y, eps, u_list, 1)
                return loss

            def robustkern_loss():
                return lmt_loss(bm, x, y, eps, norms=estimated_norms(bm, power, 1))[0]

        def step_of(loss_fn):
            def run():
                for p in params:
                    p.grad = None
                loss_fn().backward()
            return run

        losses = {"original": original_loss, "robustkern": robustkern_loss}
        fns = {n: step_of(f) for n, f in losses.items()}
        for f in fns.values():          # both iterates past their random start before anything is measured
            f()
        values = {n: float(f().detach()) for n, f in losses.items()}
        if device.type == "cuda":
            t = {n: common.time_cuda(f, grad_to_none=params) for n, f in fns.items()}
            mem = {n: common.cuda_peak_bytes(f, device) for n, f in fns.items()}
        else:
            t = common.time_cpu(fns, rounds=args.rounds, warmup=1)
            mem = {n: common.saved_tensor_bytes(f, exclude=params) for n, f in losses.items()}
        ratio = t["original"].median_ms / t["robustkern"].median_ms
        print(f"{name} batch {batch} {step}: original {t['original'].median_ms:.1f} ms, robustkern "
              f"{t['robustkern'].median_ms:.1f} ms, x robustkern {ratio:.2f}", flush=True)
        case = {"model": name, "batch": batch, "step": step}
        what = "L" if step == "power" else "loss"
        for n in fns:
            rows.append(common.Row(case, n, t[n], mem[n], f"{what} {values[n]:.4g}"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batch", default=None,
                    help="comma-separated, one per model (default: BCP's batch sizes, 50 and 128)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--rounds", type=int, default=7, help="CPU rounds per provider")
    ap.add_argument("--converge", type=int, default=500,
                    help="power-iteration steps run on both providers' iterates before anything is measured")
    ap.add_argument("--quick", action="store_true", help="batch 4, 2 rounds: a smoke test")
    ap.add_argument("--no-save", action="store_true", help="do not append the rows to results/lipschitz.csv")
    ap.add_argument("--write-results", action="store_true", help="write this run's block into RESULTS.md")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
    steps = [s for s in args.steps.split(",") if s]
    if any(s not in STEPS for s in steps):
        ap.error(f"--steps takes {', '.join(STEPS)}, got {args.steps}")
    if args.quick:
        batches, args.rounds = [4] * len(names), 2
    elif args.batch:
        batches = [int(b) for b in args.batch.split(",")]
        if len(batches) == 1:
            batches *= len(names)
        if len(batches) != len(names):
            ap.error("--batch: one size, or one per model")
    else:
        batches = [MODELS[m][4] for m in names]
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    device = torch.device(args.device)
    env = common.start(device, args.threads if device.type == "cpu" else 0, args=args)
    rows = []
    for name, batch in zip(names, batches):
        rows += run_case(name, batch, steps, args, device)
    text = common.table(rows, ["model", "batch", "step"], device, ours="robustkern", floor="original")
    print("\n" + text)
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        if device.type == "cuda":
            how = ("median, p20/p80 from `common.time_cuda` (triton do_bench, at least 5 timed calls); peak MB = "
                   "peak allocated during one forward + backward")
        else:
            how = (f"threads {torch.get_num_threads()}; median/min/max over {args.rounds} interleaved rounds; saved "
                   "MB = bytes autograd keeps for the backward")
        body = "\n".join([
            f"- forward + backward of one training step's piece, each provider keeping its power-iteration iterates "
            f"across calls (first advanced {args.converge} steps): `power` = every layer's operator norm by one "
            "power step, backward of their product; "
            "`bcp` = BCP's loss (ball and box; original with BCP's `opt_iter`, 10 on MNIST, 1 on CIFAR-10); `lmt` "
            "= LMT's loss; original = `robustkern.reference.published.bcp` (BCP's code transcribed), eps 1.58 on "
            "MNIST, 36/255 on CIFAR-10",
            f"- {how}; `x robustkern` = provider median / robustkern median (above 1: robustkern faster); the note "
            "gives each provider's value (BCP's loss differs where `opt_iter` leaves its clipping short of the exact "
            "worst case)",
            "", text])
        variant = f"batch {','.join(str(b) for b in batches)}"
        common.update_results_md(BENCH, "L2 Lipschitz training steps (`bench_lipschitz.py`)", body, env, variant)
        print(f"updated {common.RESULTS_MD}")


if __name__ == "__main__":
    main()
