"""One training step with an input-gradient penalty: robustkern's fused second-order path vs PyTorch double backprop.

Step: ``loss = CE_mean(f(x), y) + lam * mean_i ||grad_x CE(f(x_i), y_i)||_p`` and the parameter gradients of it.
Providers (model in eval mode, the same inputs and parameters):
  plain        forward + parameter gradients of CE only (the first-order floor)
  torch-db     ``torch.autograd.grad(CE_sum, x, create_graph=True)``, penalty, ``torch.autograd.grad(loss, params)``
  robustkern   ``robustkern.flatness.fused.input_gradient(create_graph=True)``, penalty, the same autograd call
and the LFR inner ascent direction ``d/dx sum_i ||grad_x CE_i||_1`` (``--lfr``):
  torch-db-lfr    double backprop w.r.t. the input
  robustkern-lfr  ``robustkern.flatness.fused.lfr_ascent_direction`` (JVP, fused softmax curvature, VJP; no graph)

Memory: "saved MB" = bytes autograd keeps (``common.saved_tensor_bytes``, up to the final backward). (Peak RSS
growth per step in a fresh process was tried and reads 0: the import-time peak of torch is higher.)

    PYTHONPATH=python:. python benchmarks/bench_flatness_fused.py --threads 1 --rounds 7 --lfr
``providers(model, x, y, lam, p)`` is importable for other benchmarks (e.g. bench_flatness.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.flatness import fused  # noqa: E402

BENCH = "flatness_fused"
MODELS = ("mnist_small", "mnist_medium", "mnist_large")


def _penalty(g: torch.Tensor, p) -> torch.Tensor:
    return g.flatten(1).norm(p=p, dim=1).mean()


def providers(model, x, y, lam: float = 0.1, p=1):
    """name -> zero-argument callable computing the penalised step's parameter gradients (or the LFR
    direction), on the same model and batch."""
    params = [q for q in model.parameters() if q.requires_grad]

    def plain():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def torch_db(grads=True):
        xx = x.detach().requires_grad_(True)
        z = model(xx)
        g, = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), xx, create_graph=True)
        loss = F.cross_entropy(z, y) + lam * _penalty(g, p)
        return torch.autograd.grad(loss, params) if grads else loss

    def robustkern(grads=True):
        z, g = fused.input_gradient(model, x, y, create_graph=True)
        loss = F.cross_entropy(z, y) + lam * _penalty(g, p)
        return torch.autograd.grad(loss, params) if grads else loss

    def torch_db_lfr():
        xx = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(xx), y, reduction="sum"), xx, create_graph=True)
        return torch.autograd.grad(g.flatten(1).abs().sum(), xx)[0]

    def robustkern_lfr():
        return fused.lfr_ascent_direction(model, x, y, p=1)

    return ({"plain": plain, "torch-db": torch_db, "robustkern": robustkern,
             "torch-db-lfr": torch_db_lfr, "robustkern-lfr": robustkern_lfr},
            {"torch-db": lambda: torch_db(False), "robustkern": lambda: robustkern(False), "plain":
             lambda: F.cross_entropy(model(x), y)})


def _setup(name: str, batch: int, seed: int):
    from robustkern_cli.models import build_model

    torch.manual_seed(seed)
    model = build_model(name).eval()
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_small,mnist_large")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lfr", action="store_true", help="also time the LFR inner ascent direction")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="robustkern.cpu_malloc.keep_freed_memory() first (what the robustkern command does): no "
                         "page faults of re-allocated tensors in any provider (a separate RESULTS block)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from robustkern.cpu_malloc import keep_freed_memory
        if not keep_freed_memory():
            ap.error("--keep-freed-memory needs glibc's mallopt")
    device = torch.device("cpu")
    env = common.Environment.capture(device)
    print(f"device: {env.device}\ntorch {env.torch}, commit {env.commit}\ncommand: {env.command}")
    rows = []
    for name in args.models.split(","):
        model, x, y = _setup(name, args.batch, args.seed)
        fns, losses = providers(model, x, y)
        names = ["plain", "torch-db", "robustkern"] + (["torch-db-lfr", "robustkern-lfr"] if args.lfr else [])
        a, b = fns["torch-db"](), fns["robustkern"]()
        err = max(((u - v).abs().max() / u.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b))
        timings = common.time_cpu({n: fns[n] for n in names}, rounds=args.rounds,
                                  warmup=4 if args.keep_freed_memory else 1)  # the heap settles in a few steps
        params = list(model.parameters())
        for n in names:
            saved = common.saved_tensor_bytes(losses[n], exclude=params) if n in losses else None
            note = f"max rel. diff of param grads vs torch-db {err:.1e}" if n == "robustkern" else ""
            rows.append(common.Row({"model": name, "batch": args.batch}, n, timings[n], saved, note))
        print(f"done {name}", flush=True)
    text = common.table(rows, ["model", "batch"], device, ours="robustkern", floor="plain")
    print("\n" + text)
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        body = "\n".join([
            f"- step: CE + 0.1 * mean ||grad_x CE||_1, parameter gradients; eval mode; threads {args.threads}; "
            f"median/min/max over {args.rounds} interleaved rounds; `x robustkern` = provider median / "
            "robustkern median (above 1: robustkern faster); the LFR rows compare the inner ascent direction; "
            + ("glibc keeps freed memory (`--keep-freed-memory`, as the robustkern command runs): no provider "
               "pays page faults for re-allocated tensors" if args.keep_freed_memory else
               "default glibc allocator: large tensors are re-mapped, and page-faulted, every step"),
            "", text])
        common.update_results_md(BENCH, "Input-gradient penalty step (second order)", body, env,
                                 variant=f"batch {args.batch}" + (", keep-freed-memory" if args.keep_freed_memory
                                                                  else ""))


if __name__ == "__main__":
    main()
