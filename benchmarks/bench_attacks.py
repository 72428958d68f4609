"""PGD-k throughput (images/s): robustkern vs torchattacks vs a plain eager loop, with the floor.

Providers (L-inf, random start, cross-entropy, model in eval mode, the same inputs):
  floor         k x (forward + backward to the input only): what any PGD must at least do
  eager         ``robustkern.reference.attacks.plain_pgd`` (a plain torchattacks-like loop, six element-wise ops
                per step)
  torchattacks  ``torchattacks.PGD(model, eps, alpha, steps, random_start=True)`` when installed
  robustkern    ``robustkern.attacks.pgd`` (fused ``pgd_step`` op; on CPU the compiled C++ kernel
                ``csrc/cpu/attacks_cpu.cpp``, called directly in the loop, or the reference without the extension)
  robustkern-graph  ``pgd(..., cuda_graph=True)``: the k-step loop replayed as a CUDA graph (CUDA only)

Models: ``mnist_small`` (MNIST CNN, 1x28x28, eps 0.3, alpha 0.01) and ``preact_resnet18`` (CIFAR, 3x32x32,
eps 8/255, alpha 2/255) from ``robustkern.models``.

    PYTHONPATH=python:. python benchmarks/bench_attacks.py --threads 1 --write-results     # CPU defaults
    PYTHONPATH=python:. python benchmarks/bench_attacks.py --quick                         # smoke test
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.attacks import pgd  # noqa: E402
from robustkern.reference.attacks import plain_pgd  # noqa: E402

BENCH = "attacks"
PROVIDERS = ["floor", "eager", "torchattacks", "robustkern", "robustkern-graph"]
MODELS = {"mnist_small": dict(shape=(1, 28, 28), eps=0.3, alpha=0.01),
          "preact_resnet18": dict(shape=(3, 32, 32), eps=8 / 255, alpha=2 / 255)}
# The GPU sizes; on 2 shared CPU cores PGD-100 on a ResNet-18 takes minutes per call at batch 128,
# so CPU runs default to small batches (pass --batch for others).
DEFAULT_BATCH = {"cuda": {"mnist_small": 256, "preact_resnet18": 128},
                 "cpu": {"mnist_small": 32, "preact_resnet18": 4}}


def _floor(model, x, y, steps):
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        g, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(adv), y, reduction="sum"), adv)
        adv = adv.detach()
    return g


def providers(model, x, y, eps, alpha, steps, device):
    fns, notes = {}, {}
    fns["floor"] = lambda: _floor(model, x, y, steps)
    fns["eager"] = lambda: plain_pgd(model, x, y, eps, alpha, steps)
    try:
        import torchattacks

        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        fns["torchattacks"] = lambda: atk(x, y)
    except Exception as e:  # noqa: BLE001 - an unavailable provider is reported, not fatal
        notes["torchattacks"] = f"not measured: {type(e).__name__}: {e}"
    fns["robustkern"] = lambda: pgd(model, x, y, eps, alpha, steps)
    if device.type == "cuda":
        fns["robustkern-graph"] = lambda: pgd(model, x, y, eps, alpha, steps, cuda_graph=True)
    else:
        notes["robustkern-graph"] = "not measured: CUDA graphs need a GPU"
    return fns, notes


def run_case(name, batch, steps, args, device):
    spec = MODELS[name]
    from robustkern.models import build_model

    torch.manual_seed(args.seed)
    kw = {"in_ch": spec["shape"][0], "in_dim": spec["shape"][1]}
    model = build_model(name, **kw).to(device).eval()
    x = torch.rand((batch,) + spec["shape"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns, notes = providers(model, x, y, spec["eps"], spec["alpha"], steps, device)
    fns = {p: f for p, f in fns.items() if p in args.providers}
    if device.type == "cuda":
        timings = {p: common.time_cuda(f) for p, f in fns.items()}
    else:
        timings = common.time_cpu(fns, rounds=args.rounds, warmup=1)
    case = {"model": name, "batch": batch, "steps": steps}
    rows = []
    for p in args.providers:
        t = timings.get(p)
        note = notes.get(p, "")
        extra = {}
        if t is not None:
            extra["images_per_s"] = round(batch / (t.median_ms * 1e-3), 2)
            note = f"{extra['images_per_s']:.1f} img/s"
        rows.append(common.Row(case, p, t, None, note, extra))
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", default=None, help="comma-separated, one per model (default: per device)")
    p.add_argument("--steps", default="20,100")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 2, 2 steps, 1 round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--write-results", action="store_true", help="write this run's block into RESULTS.md")
    common.add_output_options(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.models = args.models.split(",")
    args.providers = args.providers.split(",")
    args.steps = [int(s) for s in args.steps.split(",")]
    if args.batch:
        args.batch = [int(b) for b in args.batch.split(",")]
    else:
        args.batch = [DEFAULT_BATCH[device.type][m] for m in args.models]
    if args.quick:
        args.batch, args.steps, args.rounds = [2] * len(args.models), [2], 1
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    env = common.start(device, args.threads, args=args)
    rows = []
    for name, batch in zip(args.models, args.batch):
        for steps in args.steps:
            rows += run_case(name, batch, steps, args, device)
            print(f"done {name} batch {batch} PGD-{steps}", flush=True)
    text = common.table(rows, ["model", "batch", "steps"], device, ours="robustkern", floor="floor")
    print("\n" + text)
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        low = "min/max over interleaved rounds" if device.type == "cpu" else "p20/p80 from triton do_bench"
        body = "\n".join([
            f"- L-inf PGD-k, random start, CE, model in eval mode; threads: {torch.get_num_threads()}"
            if device.type == "cpu" else "- L-inf PGD-k, random start, CE, model in eval mode",
            f"- timings: median, {low}; `x robustkern` = provider median / robustkern median (above 1: "
            "robustkern is faster); `x floor` = provider median / floor median; note: images/s of the median",
            "", text])
        sizes = ", ".join(f"{m} batch {b}" for m, b in zip(args.models, args.batch))
        common.update_results_md(BENCH, "PGD attack throughput", body, env, variant=sizes)
        print(f"updated {common.RESULTS_MD}")


if __name__ == "__main__":
    main()
