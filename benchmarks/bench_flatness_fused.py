"""One training step with an input-gradient penalty: robustkern's fused second-order path vs PyTorch double backprop.

Step: ``loss = CE_mean(f(x), y) + lam * mean_i ||grad_x CE(f(x_i), y_i)||_p`` and the parameter gradients of it.
Providers (model in eval mode, the same inputs and parameters):
  plain        forward + parameter gradients of CE only (the first-order floor)
  torch-db     ``torch.autograd.grad(CE_sum, x, create_graph=True)``, penalty, ``torch.autograd.grad(loss, params)``
  robustkern   ``robustkern.flatness.fused.input_gradient(create_graph=True)``, penalty, the same autograd call
and the LFR inner ascent direction ``d/dx sum_i ||grad_x CE_i||_1`` (``--lfr``):
  torch-db-lfr    double backprop w.r.t. the input
  robustkern-lfr  ``robustkern.flatness.fused.lfr_ascent_direction`` (JVP, fused softmax curvature, VJP; no graph)

Memory: on CPU "saved MB" = bytes autograd keeps (``common.saved_tensor_bytes``, up to the final backward; peak
RSS growth per step in a fresh process was tried and reads 0: the import-time peak of torch is higher); on CUDA
"peak MB" = peak allocated during one call of the provider (``common.cuda_peak_bytes``, the whole step).
Timing: CPU ``common.time_cpu`` (interleaved rounds); CUDA ``common.time_cuda`` per provider. On CUDA
``input_gradient``/``lfr_ascent_direction`` (``impl="auto"``) take the op chain (Triton kernels); the run ends
with the GPU targets: the robustkern penalised step <= 2.0x the plain step in time and <= 1.3x in peak memory.

    PYTHONPATH=python:. python benchmarks/bench_flatness_fused.py --device cpu --threads 1 --rounds 7 --lfr
    PYTHONPATH=python:. python benchmarks/bench_flatness_fused.py --device cuda --models mnist_small,mnist_large \
        --batch 128 --lfr --write-results
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
TARGET_TIME_X_PLAIN = 2.0    # GPU targets of the exact gradient-norm step, over the plain step
TARGET_MEM_X_PLAIN = 1.3


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


def _setup(name: str, batch: int, seed: int, device: torch.device = torch.device("cpu")):
    from robustkern.models import build_model

    torch.manual_seed(seed)
    model = build_model(name).eval()
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return model.to(device), x.to(device), y.to(device)   # drawn on the CPU: the same batch on every device


def target_lines(rows: list[common.Row]) -> list[str]:
    """Per model: the robustkern penalised step over the plain step, in median time and in memory, against the
    GPU targets (``TARGET_TIME_X_PLAIN``, ``TARGET_MEM_X_PLAIN``), with torch-db's ratios beside them."""
    by_case: dict[tuple, dict[str, common.Row]] = {}
    for r in rows:
        by_case.setdefault((r.case["model"], r.case["batch"]), {})[r.provider] = r
    lines = []
    for (model, batch), provs in by_case.items():
        plain, ours, db = provs.get("plain"), provs.get("robustkern"), provs.get("torch-db")
        if plain is None or ours is None:
            continue

        def times(r):
            return common.ratio(r, plain) if r is not None else None

        def mems(r):
            return r.mem_bytes / plain.mem_bytes if r is not None and r.mem_bytes and plain.mem_bytes else None

        def verdict(x, target):
            return "-" if x is None else f"{x:.2f}x ({'met' if x <= target else 'MISSED'}: target <= {target}x)"

        def plain_x(x):
            return "-" if x is None else f"{x:.2f}x"

        lines.append(f"{model} batch {batch}: robustkern step time {verdict(times(ours), TARGET_TIME_X_PLAIN)}, "
                     f"memory {verdict(mems(ours), TARGET_MEM_X_PLAIN)} of plain; torch-db "
                     f"{plain_x(times(db))} time, {plain_x(mems(db))} memory")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist_small,mnist_large")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lfr", action="store_true", help="also time the LFR inner ascent direction")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="robustkern.cpu_malloc.keep_freed_memory() first (what the robustkern command does): no "
                         "page faults of re-allocated tensors in any provider (a separate RESULTS block); CPU only")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and args.keep_freed_memory:
        ap.error("--keep-freed-memory changes glibc's heap, the CPU allocator: CPU runs only")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from robustkern.cpu_malloc import keep_freed_memory
        if not keep_freed_memory():
            ap.error("--keep-freed-memory needs glibc's mallopt")
    common.use_output_options(args)
    env = common.Environment.capture(device)
    print(f"device: {env.device}\ntorch {env.torch}, commit {env.commit}\ncommand: {env.command}")
    rows = []
    for name in args.models.split(","):
        model, x, y = _setup(name, args.batch, args.seed, device)
        fns, losses = providers(model, x, y)
        names = ["plain", "torch-db", "robustkern"] + (["torch-db-lfr", "robustkern-lfr"] if args.lfr else [])
        a, b = fns["torch-db"](), fns["robustkern"]()
        err = max(((u - v).abs().max() / u.abs().max().clamp_min(1e-30)).item() for u, v in zip(a, b))
        params = list(model.parameters())
        if device.type == "cuda":
            for n in names:                          # compile and autotune before the memory pass
                fns[n]()
            mem = {n: common.cuda_peak_bytes(fns[n], device) for n in names}
            timings = {n: common.time_cuda(fns[n]) for n in names}
        else:
            timings = common.time_cpu({n: fns[n] for n in names}, rounds=args.rounds,
                                      warmup=4 if args.keep_freed_memory else 1)  # the heap settles in a few steps
            mem = {n: common.saved_tensor_bytes(losses[n], exclude=params) for n in names if n in losses}
        for n in names:
            saved = mem.get(n)
            note = f"max rel. diff of param grads vs torch-db {err:.1e}" if n == "robustkern" else ""
            rows.append(common.Row({"model": name, "batch": args.batch}, n, timings[n], saved, note))
        print(f"done {name}", flush=True)
    text = common.table(rows, ["model", "batch"], device, ours="robustkern", floor="plain")
    print("\n" + text)
    targets = target_lines(rows) if device.type == "cuda" else []
    if targets:
        print("\nGPU targets:\n" + "\n".join(targets))
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results and device.type == "cuda":
        body = "\n".join([
            "- step: CE + 0.1 * mean ||grad_x CE||_1, parameter gradients; eval mode; median, p20/p80 from "
            "`common.time_cuda` (triton do_bench, at least 5 timed calls); peak MB = peak allocated during one "
            "call; `x robustkern` = provider median / robustkern median (above 1: robustkern faster); the LFR rows "
            "compare the inner ascent direction; robustkern = `fused.input_gradient(impl=\"auto\")`: the op chain "
            "(Triton kernels)",
            *(f"- target: {line}" for line in targets),
            "", text])
    elif args.write_results:
        body = "\n".join([
            f"- step: CE + 0.1 * mean ||grad_x CE||_1, parameter gradients; eval mode; threads {args.threads}; "
            f"median/min/max over {args.rounds} interleaved rounds; `x robustkern` = provider median / "
            "robustkern median (above 1: robustkern faster); the LFR rows compare the inner ascent direction; "
            + ("glibc keeps freed memory (`--keep-freed-memory`, as the robustkern command runs): no provider "
               "pays page faults for re-allocated tensors" if args.keep_freed_memory else
               "default glibc allocator: large tensors are re-mapped, and page-faulted, every step"),
            "", text])
    if args.write_results:
        common.update_results_md(BENCH, "Input-gradient penalty step (second order)", body, env,
                                 variant=f"batch {args.batch}" + (", keep-freed-memory" if args.keep_freed_memory
                                                                  else ""))


if __name__ == "__main__":
    main()
