"""Training-step time and memory of flatness regularisers: input-gradient penalties and LFR vs PGD-AT.

One "step" = loss + ``backward()`` to the parameters (gradients zeroed before; no optimizer update), on the same
inputs for every provider:
  plain            CE(f(x), y): the floor any regulariser adds to
  db-torch         CE + lam * mean ||grad_x CE||_1 by PyTorch double backprop (``autograd.grad(create_graph=True)``)
  db-robustkern    the same penalty by ``robustkern.flatness.input_grad_norm(p=1)`` (backend auto: the fused
                   second-order path when ``robustkern.flatness.fused`` supports the model in its mode and the
                   device (on the CPU auto keeps the penalty on PyTorch), else PyTorch; the note says which)
  fd-robustkern    the same penalty by ``input_grad_norm(method="finite_difference")`` (central difference, the
                   clean forward shared with the CE: forwards of B and 2B examples, an input-only backward,
                   first-order backprop to the parameters)
  lfr-upstream     LFR-K as published: ``robustkern.reference.published.lfr.lfr_loss_reference`` (the transcription of
                   LFR_loss.py: double backprop in every inner step and in the outer loss)
  lfr-robustkern   ``robustkern.flatness.lfr_loss`` (backend auto) with the same K
  pgd-at           ``robustkern.attacks.pgd_at_loss`` with the same K (Madry et al.), for scale

Models (``robustkern.models``): ``small_cnn`` (LFR's MNIST SmallCNN, max pooling, 1x28x28, eps 0.3, step
0.01), ``small_cnn_avg`` (the same with average pooling, which the fused path supports), ``preact_resnet18``
(3x32x32, eps 0.031, step 0.007, LFR's CIFAR defaults). ``--bn-modes train,eval``: the mode the model is in for
the step (eval = frozen BatchNorm statistics; only matters for the ResNet). LFR's inner search runs in eval mode
in every case (as published).

Memory: on CUDA the peak allocated during a step; on CPU the bytes autograd saves (``common.saved_tensor_bytes``,
double-backward graphs included).

    PYTHONPATH=python:. python benchmarks/bench_flatness.py --threads 1 --write-results     # CPU defaults
    PYTHONPATH=python:. python benchmarks/bench_flatness.py --quick                         # smoke test
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.attacks import pgd_at_loss  # noqa: E402
from robustkern.flatness import input_grad_norm, lfr_loss  # noqa: E402
from robustkern.reference.published.lfr import lfr_loss_reference  # noqa: E402

BENCH = "flatness"
PROVIDERS = ["plain", "db-torch", "db-robustkern", "fd-robustkern", "lfr-upstream", "lfr-robustkern", "pgd-at"]
MODELS = {"small_cnn": dict(build="small_cnn", kw={"pool": "max"}, shape=(1, 28, 28), eps=0.3, alpha=0.01),
          "small_cnn_avg": dict(build="small_cnn", kw={"pool": "avg"}, shape=(1, 28, 28), eps=0.3, alpha=0.01),
          "preact_resnet18": dict(build="preact_resnet18", kw={}, shape=(3, 32, 32), eps=0.031, alpha=0.007)}
# The GPU sizes; two shared CPU cores take seconds per LFR-10 step on a ResNet-18 even at batch 4.
DEFAULT_BATCH = {"cuda": {"small_cnn": 128, "small_cnn_avg": 128, "preact_resnet18": 128},
                 "cpu": {"small_cnn": 32, "small_cnn_avg": 32, "preact_resnet18": 4}}
LAM = 0.02


def _torch_penalty(model, x, y):
    """PyTorch's own double backprop of mean_i ||grad_x CE_i||_1."""
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    g, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg, create_graph=True)
    return logits, g.abs().flatten(1).sum(1).mean()


def providers(model, x, y, spec, steps):
    eps, alpha = spec["eps"], spec["alpha"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
    mode = model.training

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
            model.train(mode)  # the upstream LFR step leaves the model in train mode
        return run

    def db_torch():
        logits, pen = _torch_penalty(model, x, y)
        return F.cross_entropy(logits, y) + LAM * pen

    def db_robustkern():
        norms, logits = input_grad_norm(model, x, y, p=1, return_logits=True)
        return F.cross_entropy(logits, y) + LAM * norms.mean()

    def fd_robustkern():
        norms, logits = input_grad_norm(model, x, y, p=1, method="finite_difference", return_logits=True)
        return F.cross_entropy(logits, y) + LAM * norms.mean()

    def lfr_upstream():
        return lfr_loss_reference(model, x, y, LAM, noise, step_size=alpha, epsilon=eps, perturb_steps=steps)[0]

    return {
        "plain": step(lambda: F.cross_entropy(model(x), y)),
        "db-torch": step(db_torch),
        "db-robustkern": step(db_robustkern),
        "fd-robustkern": step(fd_robustkern),
        "lfr-upstream": step(lfr_upstream),
        "lfr-robustkern": step(lambda: lfr_loss(model, x, y, eps, alpha, steps, LAM, noise=noise)[0]),
        "pgd-at": step(lambda: pgd_at_loss(model, x, y, eps, alpha, steps)),
    }


def _fused_note(model) -> tuple[str, str]:
    """(penalty path, LFR inner-search path) the auto backend takes for ``model`` in its current mode, as
    ``robustkern.flatness.grad_norm`` decides it (on the CPU auto keeps the double-backprop penalty on torch)."""
    try:
        from robustkern.flatness import fused
        from robustkern.flatness.grad_norm import _use_fused
    except ImportError:
        return "torch (fused path absent)", "torch (fused path absent)"

    def path(auto_on_cpu):
        if _use_fused(model, "auto", auto_on_cpu=auto_on_cpu):
            return "fused"
        reason = fused.unsupported_reason(model)
        if reason is None:
            return "torch (auto's choice on this device)"
        short = reason.replace("robustkern.flatness.fused: ", "").split(";")[0].split(" (")[0].split(":")[0]
        return f"torch ({short})"

    mode = model.training
    outer = path(auto_on_cpu=False)
    model.eval()
    inner = path(auto_on_cpu=True)
    model.train(mode)
    return outer, inner


def run_case(name, batch, bn_mode, steps, args, device):
    from robustkern.models import build_model

    spec = MODELS[name]
    torch.manual_seed(args.seed)
    kw = dict(spec["kw"], in_ch=spec["shape"][0], in_dim=spec["shape"][1])
    model = build_model(spec["build"], **kw).to(device).train(bn_mode == "train")
    x = torch.rand((batch,) + spec["shape"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns = {p: f for p, f in providers(model, x, y, spec, steps).items() if p in args.providers}
    params = list(model.parameters())
    mem = {}
    for p, f in fns.items():
        if device.type == "cuda":
            mem[p] = common.cuda_peak_bytes(f, device)
        else:
            mem[p] = common.saved_tensor_bytes(f, exclude=params)
    if device.type == "cuda":
        timings = {p: common.time_cuda(f) for p, f in fns.items()}
    else:
        timings = common.time_cpu(fns, rounds=args.rounds, warmup=0)  # the memory pass above warmed up
    outer, inner = _fused_note(model)
    notes = {"db-robustkern": f"path: {outer}", "fd-robustkern": "first order",
             "lfr-robustkern": f"inner: {inner.split(' (')[0]}, outer: {outer.split(' (')[0]}"}
    case = {"model": name, "batch": batch, "bn_mode": bn_mode, "steps": steps}
    rows = []
    plain = timings.get("plain")
    for p in args.providers:
        t = timings.get(p)
        extra = {"x_plain": round(t.median_ms / plain.median_ms, 3)} if t and plain else {}
        note = notes.get(p, "")
        if extra:
            note = f"{extra['x_plain']:.1f}x plain" + (f"; {note}" if note else "")
        rows.append(common.Row(case, p, t, mem.get(p), note, extra))
    return rows, (outer, inner)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", default=None, help="comma-separated, one per model (default: per device)")
    p.add_argument("--bn-modes", default="train,eval", help="model modes; eval is run for BatchNorm models only")
    p.add_argument("--steps", type=int, default=10, help="K of LFR-K and PGD-K")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 2, 1 step, 1 round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--write-results", action="store_true", help="write this run's block into RESULTS.md")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: robustkern.cpu_malloc.keep_freed_memory() first, as the robustkern command does (no "
                        "page faults of re-allocated tensors; auto then takes the fused penalty step on the CPU)")
    common.add_output_options(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.keep_freed_memory:
        from robustkern.cpu_malloc import keep_freed_memory
        if device.type != "cpu" or not keep_freed_memory():
            p.error("--keep-freed-memory is for the CPU and needs glibc's mallopt")
    args.models = args.models.split(",")
    args.providers = args.providers.split(",")
    args.bn_modes = args.bn_modes.split(",")
    if args.batch:
        args.batch = [int(b) for b in args.batch.split(",")]
    else:
        args.batch = [DEFAULT_BATCH[device.type][m] for m in args.models]
    if args.quick:
        args.batch, args.steps, args.rounds = [2] * len(args.models), 1, 1
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    env = common.start(device, args.threads, args=args)
    rows = []
    for name, batch in zip(args.models, args.batch):
        for bn_mode in args.bn_modes:
            if bn_mode == "eval" and not name.startswith("preact"):
                continue  # no BatchNorm: the same computation as train mode
            case_rows, paths = run_case(name, batch, bn_mode, args.steps, args, device)
            rows += case_rows
            print(f"done {name} batch {batch} {bn_mode} (penalty path {paths[0]}; LFR inner {paths[1]})",
                  flush=True)
    text = common.table(rows, ["model", "batch", "bn_mode", "steps"], device, ours="db-robustkern",
                        floor="db-torch")
    print("\n" + text)
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        low = "min/max over interleaved rounds" if device.type == "cpu" else "p20/p80 from triton do_bench"
        mem = ("saved MB = bytes autograd saves during the step (double-backward graphs included)"
               if device.type == "cpu" else "peak MB = peak allocated during one step")
        threads = f"; threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
        body = "\n".join([
            f"- one training step = loss + backward to the parameters (no optimizer update){threads}; penalty "
            f"lam {LAM}, L1 input-gradient norm; LFR-{args.steps} and PGD-{args.steps}; LFR inner search in eval "
            "mode",
            f"- timings: median, {low}; `x db-robustkern` = provider median / db-robustkern median (above 1: "
            "robustkern's double backprop is faster); `x db-torch` = provider median / PyTorch double-backprop "
            f"median; note: median / plain-step median, and the path the auto backend took; {mem}",
            ] + (["- glibc keeps freed memory (`--keep-freed-memory`, as the robustkern command runs)"]
                 if args.keep_freed_memory else []) + ["", text])
        sizes = ", ".join(f"{m} batch {b}" for m, b in zip(args.models, args.batch))
        common.update_results_md(BENCH, "Flatness regularisers: training-step cost", body, env,
                                 variant=sizes + (", keep-freed-memory" if args.keep_freed_memory else ""))
        print(f"updated {common.RESULTS_MD}")


if __name__ == "__main__":
    main()
