"""CROWN-IBP robust loss: forward and forward+backward, providers side by side.

Loss: L-inf box of radius eps around each image clipped to [0, 1], margin specification C (B, 9, 10), robust
cross-entropy of the CROWN-IBP margin lower bounds (IBP intermediate bounds, one backward relaxation from C,
lower side only). Models and cases as ``bench_ibp.py`` (CIFAR-10 normalisation first; BatchNorm in training
mode with the clean batch's statistics).

Providers
  plain            forward + cross-entropy of the model: the floor
  robustkern-ibp   robustkern IBP loss (sound=False), for scale
  robustkern       ``robustkern.bounds.crown_ibp_loss(bm, x, y, eps, beta=1, sound=False)`` (fused ReLU step
                   ``robustkern::crown_relu_backward`` and concretisation ops; on CPU their C++ kernels, whose
                   single-pass backward recomputes the slopes)
  robustkern-lf    the same with ``loss_fusion=True`` (one backward spec row; robustkern.bounds.loss_fusion)
  eager            the same graph code with the two ops replaced by their plain PyTorch formulas under
                   ordinary autograd (unfused: autograd keeps A+, A-, slopes): what the fusion saves
  auto_lirpa       auto_LiRPA ``compute_bounds(method="CROWN-IBP", bound_upper=False)``
  auto_lirpa-lf    auto_LiRPA loss fusion (``CrossEntropyWrapper`` + ``loss_fusion``), when it parses

Device (``--device``, default CUDA when available). CPU: ``common.time_cpu`` (interleaved rounds, ``--threads``
torch threads) and "saved MB" (bytes autograd keeps for the backward, fwd+bwd rows only). CUDA: ``common.time_cuda``
per provider (triton do_bench, at least 5 timed calls) and "peak MB" (``common.cuda_peak_bytes``: peak allocated
during one call, both modes), TF32 off for every provider (robustkern's bound ops force IEEE fp32 themselves; the
run sets ``torch.backends.cuda.matmul.fp32_precision`` and ``torch.backends.cudnn.conv.fp32_precision`` to "ieee"
for the others), and robustkern's GPU targets below the table (``target_lines``).

Full CROWN and alpha-CROWN (``--full``): verification bounds (every ReLU's input bounds by back-substitution) on
the CROWN-IBP family's ``cnn_4layer`` (auto_LiRPA's ``examples/vision`` definition: two 4x4 stride-2 convolutions,
padding 1, then Linear to 256 and to 10; random weights, seeded) on MNIST (1x28x28, L-inf eps 0.1) and CIFAR
(3x32x32, eps 8/255) shapes, inputs uniform in [0, 1], the box clipped to [0, 1], margin specification (9 rows),
lower bounds. Modes: "CROWN" (under ``torch.no_grad()``: verification), "CROWN fwd+bwd" (the robust
cross-entropy of the bounds and its gradient: training), "alpha-CROWN" (no_grad, ``--alpha-iterations``, lr 0.5).
Providers: robustkern (``sound=False``: patches for the passes from convolutions, only unstable neurons
recomputed), robustkern-dense (the same with dense rows for every neuron: ``crown.PATCHES = False``,
``crown.SPARSE_INTERMEDIATE = False``; CROWN only) and auto_lirpa (auto_LiRPA 0.7.1 with its default options:
``conv_mode`` "patches", sparse intermediate bounds). "peak MB": ``common.torch_peak_bytes``, the peak of the
bytes held by torch tensors allocated during one call, replayed from ``torch.profiler``'s allocation records
(the same accounting for every provider, CPU or CUDA). Targets: robustkern's peak memory <= auto_lirpa's, time <=
``TARGET_FULL_TIME_X`` x auto_lirpa's.

    PYTHONPATH=python:. python benchmarks/bench_crown.py --device cpu --threads 1 [--write-results]
    PYTHONPATH=python:. python benchmarks/bench_crown.py --full --threads 1 --batch 16 --lirpa-path /tmp/lirpa \
        --write-results
    PYTHONPATH=python:. python benchmarks/bench_crown.py --device cuda --models cnn_7layer_bn --batch 256 \
        --write-results
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_ibp import Unavailable, backend_label, import_auto_lirpa, make_case  # noqa: E402

import robustkern.bounds.crown as rk_crown  # noqa: E402
from robustkern.bounds import BoundedModule, crown_ibp_loss, margin_spec, robust_cross_entropy  # noqa: E402
from robustkern.reference import crown as ref_crown  # noqa: E402

BENCH = "crown"
PROVIDERS = ["plain", "robustkern-ibp", "robustkern", "robustkern-lf", "eager", "auto_lirpa", "auto_lirpa-lf"]
# robustkern's GPU targets for the CROWN-IBP robust loss (fwd and fwd+bwd): robustkern at least 3x faster than
# auto_LiRPA's plain CROWN-IBP, at most half its peak memory, and robustkern's loss fusion faster than auto_LiRPA's.
TARGET_X_AUTO_LIRPA = 3.0
TARGET_MEM_X_AUTO_LIRPA = 0.5
FULL_PROVIDERS = ["robustkern", "robustkern-dense", "auto_lirpa"]
FULL_MODELS = "cnn_4layer:mnist,cnn_4layer:cifar"
FULL_MODES = ["CROWN", "CROWN fwd+bwd", "alpha-CROWN"]
FULL_SHAPES = {"mnist": (1, 28, 0.1), "cifar": (3, 32, 8 / 255)}   # channels, size, L-inf eps
TARGET_FULL_TIME_X = 0.7   # robustkern's time over auto_lirpa's, full CROWN and alpha-CROWN


def setup(name, case, args):
    model = case.model
    if name == "plain":
        return (lambda: F.cross_entropy(model(case.x), case.y)), list(model.parameters())
    if name in ("robustkern", "robustkern-ibp", "robustkern-lf", "eager"):
        bm = BoundedModule(model, case.x)
        beta = 0.0 if name == "robustkern-ibp" else 1.0

        def loss():
            if name != "eager":
                return crown_ibp_loss(bm, case.x, case.y, case.eps, beta=beta, loss_fusion=name == "robustkern-lf")[0]
            saved = rk_crown.crown_relu_backward, rk_crown.crown_concretize
            rk_crown.crown_relu_backward, rk_crown.crown_concretize = (ref_crown.crown_relu_backward,
                                                                     ref_crown.crown_concretize)
            try:
                return crown_ibp_loss(bm, case.x, case.y, case.eps, beta=beta)[0]
            finally:
                rk_crown.crown_relu_backward, rk_crown.crown_concretize = saved
        return loss, list(model.parameters())
    np, LBM, BoundedTensor, PerturbationLpNorm = import_auto_lirpa(args.lirpa_path)
    ptb = PerturbationLpNorm(norm=np.inf, eps=case.eps, x_L=case.lower, x_U=case.upper)
    if name == "auto_lirpa":
        bm = LBM(copy.deepcopy(model).eval(), torch.zeros_like(case.x[:1]), device=case.x.device,
                 bound_opts={"forward_before_compute_bounds": True})
        bm.train(model.training)
        xb = BoundedTensor(case.x, ptb)

        def loss():
            lb, _ = bm.compute_bounds(x=(xb,), C=case.C, method="CROWN-IBP", bound_upper=False)
            return robust_cross_entropy(lb)
        return loss, list(bm.parameters())
    try:  # loss fusion: needs the opset-11 exporter loaded first (see the research notes)
        importlib.import_module("torch.onnx._internal.torchscript_exporter.symbolic_opset11")
        from auto_LiRPA import CrossEntropyWrapper
        bm = LBM(CrossEntropyWrapper(copy.deepcopy(model).eval()), (torch.zeros_like(case.x[:1]), case.y[:1]),
                 device=case.x.device, bound_opts={"loss_fusion": True, "forward_before_compute_bounds": True})
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"loss fusion did not build ({type(e).__name__}: {str(e)[:80]})") from None
    bm.train(model.training)
    xb = BoundedTensor(case.x, ptb)
    wrapper = bm

    def loss():
        _, ub = wrapper.compute_bounds(x=(xb, case.y), method="CROWN-IBP", bound_lower=False)
        return torch.log(ub).mean()
    return loss, list(bm.parameters())


def target_lines(rows: list[common.Row]) -> list[str]:
    """robustkern's GPU targets per (model, batch, mode), from the medians and peak memory of ``rows``: robustkern
    >= ``TARGET_X_AUTO_LIRPA`` x faster than auto_lirpa, its peak memory <= ``TARGET_MEM_X_AUTO_LIRPA`` x
    auto_lirpa's, robustkern-lf faster than auto_lirpa-lf. A provider missing or failed reads "not measured"."""
    by_case: dict[tuple, dict[str, common.Row]] = {}
    for r in rows:
        by_case.setdefault((r.case["model"], r.case["batch"], r.case["mode"]), {})[r.provider] = r

    def verdict(x, met, want):
        got = "not measured" if x is None else f"{x:.2f}x -> {'met' if met(x) else 'MISSED'}"
        return f"{got} (target {want})"

    lines = []
    for (model, batch, mode), provs in by_case.items():
        ours, lirpa = provs.get("robustkern"), provs.get("auto_lirpa")
        ours_lf, lirpa_lf = provs.get("robustkern-lf"), provs.get("auto_lirpa-lf")
        speed = common.ratio(lirpa, ours) if ours and lirpa else None
        measured = ours and lirpa and ours.ok and lirpa.ok and ours.mem_bytes is not None and lirpa.mem_bytes
        mem = ours.mem_bytes / lirpa.mem_bytes if measured else None
        speed_lf = common.ratio(lirpa_lf, ours_lf) if ours_lf and lirpa_lf else None
        label = f"- {model} batch {batch} {mode}: "
        lines += [
            label + "robustkern speed-up over auto_lirpa: "
            + verdict(speed, lambda x: x >= TARGET_X_AUTO_LIRPA, f">= {TARGET_X_AUTO_LIRPA:.1f}x"),
            label + "robustkern peak memory over auto_lirpa's: "
            + verdict(mem, lambda x: x <= TARGET_MEM_X_AUTO_LIRPA, f"<= {TARGET_MEM_X_AUTO_LIRPA:.1f}x"),
            label + "robustkern-lf speed-up over auto_lirpa-lf: " + verdict(speed_lf, lambda x: x > 1, "> 1x")]
    return lines


def _time_cuda_each(fns: dict, notes: dict) -> dict:
    """``common.time_cuda`` of each provider in turn; one that fails (out of memory, say) is dropped from ``fns``
    with a note, the others still run."""
    timings = {}
    for name, fn in list(fns.items()):
        try:
            timings[name] = common.time_cuda(fn)
        except Exception as e:  # noqa: BLE001
            notes[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            traceback.print_exc()
            del fns[name]
            torch.cuda.empty_cache()
    return timings


# ----------------------------------------------------------------------------------------------- full CROWN
def full_case(spec: str, batch: int, device):
    """(model, x, C, eps) of a ``--full`` case ``cnn_4layer:<mnist|cifar>``."""
    from bench_clients_lirpa import CNN4Layer
    name, _, shape = spec.partition(":")
    if name != "cnn_4layer" or shape not in FULL_SHAPES:
        raise SystemExit(f"--models for --full: cnn_4layer:mnist or cnn_4layer:cifar, got {spec!r}")
    ch, size, eps = FULL_SHAPES[shape]
    torch.manual_seed(0)
    model = CNN4Layer(ch, size).to(device)
    x = torch.rand(batch, ch, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, margin_spec(y, 10), eps


def full_setup(provider: str, mode: str, model, x, C, eps, args):
    """The call of one provider and mode, returning the lower bounds (B, 9); None when it does not apply."""
    iters = {"iteration": args.alpha_iterations, "lr_alpha": 0.5, "lr_decay": 0.98, "early_stop_patience": 10}
    method = "alpha-CROWN" if mode == "alpha-CROWN" else "CROWN"
    if provider in ("robustkern", "robustkern-dense"):
        if provider == "robustkern-dense" and method != "CROWN":
            return None
        bm = BoundedModule(model, x[:1])
        dense = provider == "robustkern-dense"

        def bound():
            saved = rk_crown.PATCHES, rk_crown.SPARSE_INTERMEDIATE
            if dense:
                rk_crown.PATCHES, rk_crown.SPARSE_INTERMEDIATE = False, False
            try:
                return bm.compute_bounds(x, eps, method=method, C=C, bound_upper=False, sound=False,
                                         optimize_bound_args=iters if method == "alpha-CROWN" else None)[0]
            finally:
                rk_crown.PATCHES, rk_crown.SPARSE_INTERMEDIATE = saved
        return bound, list(model.parameters())
    lib = common.import_auto_lirpa(args.lirpa_path)
    opts = {"optimize_bound_args": dict(iters)} if method == "alpha-CROWN" else {}
    lm = lib.BoundedModule(copy.deepcopy(model), torch.zeros_like(x[:1]), device=x.device, verbose=0,
                           bound_opts=opts)
    ptb = lib.PerturbationLpNorm(eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    bx = lib.BoundedTensor(x, ptb)
    lirpa_method = "CROWN-Optimized" if method == "alpha-CROWN" else "CROWN"
    return (lambda: lm.compute_bounds(x=(bx,), C=C, method=lirpa_method, bound_upper=False)[0]), list(lm.parameters())


def run_full(args, device, env) -> None:
    rows = []
    for spec in args.models.split(","):
        model, x, C, eps = full_case(spec, args.batch, device)
        for mode in FULL_MODES:
            fns, notes, bounds = {}, {}, {}
            for name in args.providers.split(","):
                try:
                    made = full_setup(name, mode, model, x, C, eps, args)
                except RuntimeError as e:
                    notes[name] = str(e)
                    continue
                if made is None:
                    continue
                bound, params = made
                if mode == "CROWN fwd+bwd":
                    fns[name] = (lambda bound=bound, params=params: _fwdbwd(lambda: robust_cross_entropy(bound()),
                                                                            params))
                elif mode == "alpha-CROWN" and name == "auto_lirpa":   # its optimisation needs autograd on
                    fns[name] = bound
                else:
                    fns[name] = (lambda bound=bound: _nograd(bound))
                with torch.no_grad() if mode != "alpha-CROWN" else torch.enable_grad():
                    bounds[name] = bound().detach()
            timings = common.time_cpu(fns, rounds=args.rounds) if device.type == "cpu" else \
                _time_cuda_each(fns, notes)
            ref = bounds.get("auto_lirpa")
            key = {"model": spec, "batch": args.batch, "mode": mode}
            for name in fns:
                lb = bounds[name]
                note = f"lb mean {float(lb.mean()):.5f}"
                if ref is not None and name != "auto_lirpa":
                    scale = float(ref.abs().mean())
                    note += f"; vs lirpa worst {float((lb - ref).min()) / scale:+.1e}"
                note = "; ".join(filter(None, [note, notes.get(name, "")]))
                rows.append(common.Row(key, name, timings.get(name), common.torch_peak_bytes(fns[name]), note))
            for name, why in notes.items():
                if name not in fns:
                    rows.append(common.Row(key, name, None, None, why))
    body = common.table(rows, ["model", "batch", "mode"], device, "robustkern", "auto_lirpa", mem="peak MB")
    targets = full_target_lines(rows)
    print(body + "\n\nTargets:\n" + "\n".join(targets))
    if not args.no_save:
        common.append_csv(BENCH + "_full", rows, env, device)
    if args.write_results:
        intro = (f"{device.type.upper()}, batch {args.batch}, cnn_4layer (auto_LiRPA's examples/vision definition, "
                 f"width 2, linear 256; random weights, seed 0) on MNIST (eps 0.1) and CIFAR (eps 8/255) shapes, "
                 f"inputs uniform in [0, 1], box clipped to [0, 1], 9 margin specs, lower bounds; alpha-CROWN "
                 f"{args.alpha_iterations} iterations. robustkern: sound=False, patches and unstable-only "
                 "intermediate passes; robustkern-dense: dense rows for every neuron (patches and unstable-only "
                 "passes off); auto_lirpa: auto_LiRPA 0.7.1, default bound_opts (conv_mode patches, sparse intermediate bounds). "
                 "`x robustkern` / `x auto_lirpa` = provider median over that provider's (above 1: slower); "
                 "peak MB = `common.torch_peak_bytes` (the peak of bytes held by torch tensors allocated during one "
                 "call, from torch.profiler's allocation records; the same accounting for every provider). Notes: "
                 "the mean lower bound and the worst (lb - auto_LiRPA lb) / mean |auto_LiRPA lb|.\n\n")
        common.update_results_md(BENCH, "Full CROWN and alpha-CROWN (`bench_crown.py --full`)",
                                 intro + body + "\n\nTargets:\n" + "\n".join(targets), env,
                                 variant=f"batch {args.batch}, full")


def full_target_lines(rows: list[common.Row]) -> list[str]:
    """Per (model, mode): robustkern's peak memory over auto_lirpa's (target <= 1) and time over auto_lirpa's
    (target <= ``TARGET_FULL_TIME_X``)."""
    by_case: dict[tuple, dict[str, common.Row]] = {}
    for r in rows:
        by_case.setdefault((r.case["model"], r.case["mode"]), {})[r.provider] = r
    lines = []
    for (model, mode), provs in by_case.items():
        ours, lirpa = provs.get("robustkern"), provs.get("auto_lirpa")
        if not (ours and lirpa and ours.ok and lirpa.ok):
            lines.append(f"- {model} {mode}: not measured")
            continue
        t = ours.timing.median_ms / lirpa.timing.median_ms
        m = ours.mem_bytes / lirpa.mem_bytes
        lines.append(f"- {model} {mode}: time {t:.2f}x auto_lirpa's -> "
                     f"{'met' if t <= TARGET_FULL_TIME_X else 'MISSED'} (target <= {TARGET_FULL_TIME_X}x); peak "
                     f"memory {m:.2f}x -> {'met' if m <= 1 else 'MISSED'} (target <= 1x)")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cifar_medium:padding=1,cnn_7layer_bn")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--lirpa-path", default=os.environ.get("AUTO_LIRPA_PATH"),
                    help="directory holding the auto_LiRPA package (default: $AUTO_LIRPA_PATH)")
    ap.add_argument("--no-save", action="store_true", help="do not append the rows to results/crown.csv")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--full", action="store_true", help="full CROWN and alpha-CROWN on cnn_4layer (see the docstring)")
    ap.add_argument("--alpha-iterations", type=int, default=20, help="alpha-CROWN iterations (--full)")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    if args.full:
        if args.models == ap.get_default("models"):
            args.models = FULL_MODELS
        if args.providers == ap.get_default("providers"):
            args.providers = ",".join(FULL_PROVIDERS)
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda":
        # Like for like: robustkern's bound ops force IEEE fp32 themselves; plain, eager and auto_LiRPA get it here.
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.set_num_threads(args.threads)
    common.use_output_options(args)
    env = common.Environment.capture(device)
    if args.full:
        return run_full(args, device, env)
    rows = []
    for model_name in args.models.split(","):
        case = make_case(model_name, args.batch, "2/255", "train", device, 0)
        for mode in ("fwd", "fwd+bwd"):
            fns, params, notes = {}, {}, {}
            for name in args.providers.split(","):
                try:
                    fn, ps = setup(name, case, args)
                    fn()
                except Unavailable as e:
                    notes[name] = str(e)
                    continue
                except Exception as e:  # noqa: BLE001
                    notes[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                    traceback.print_exc()
                    continue
                if mode == "fwd":
                    fns[name] = (lambda fn=fn: _nograd(fn))
                else:
                    fns[name] = (lambda fn=fn, ps=ps: _fwdbwd(fn, ps))
                params[name] = ps
            if device.type == "cuda":
                timings = _time_cuda_each(fns, notes)
            else:
                timings = common.time_cpu(fns, rounds=args.rounds) if fns else {}
            key = {"model": model_name, "batch": args.batch, "mode": mode}
            for name in args.providers.split(","):
                mem = None
                if name in fns and device.type == "cuda":
                    mem = common.cuda_peak_bytes(fns[name], device)
                elif name in fns and mode == "fwd+bwd":
                    mem = common.saved_tensor_bytes(lambda n=name: fns[n](), exclude=params[name])
                rows.append(common.Row(key, name, timings.get(name), mem, notes.get(name, "")))
    body = common.table(rows, ["model", "batch", "mode"], device, "robustkern", "plain")
    print(body)
    targets = target_lines(rows) if device.type == "cuda" else []
    if targets:
        print("\nGPU targets:\n" + "\n".join(targets))
    if not args.no_save:
        common.append_csv(BENCH, rows, env, device)
    if args.write_results:
        if device.type == "cuda":
            intro = (f"CUDA, batch {args.batch}, L-inf eps 2/255, 9 margin specs, BatchNorm in training mode; "
                     f"robustkern backend: {backend_label(device)}. TF32 off for every provider: robustkern's bound "
                     "ops force IEEE fp32 themselves, and the run sets `torch.backends.cuda.matmul.fp32_precision` "
                     "and `torch.backends.cudnn.conv.fp32_precision` to \"ieee\" for plain, eager and auto_LiRPA. "
                     "Timings: median, p20/p80 from `common.time_cuda` (triton do_bench, at least 5 timed calls) per "
                     "provider; peak MB: `torch.cuda.max_memory_allocated` during one call minus what was allocated "
                     "before; `x robustkern` = provider median / robustkern median (above 1: robustkern is faster)."
                     "\n\n")
            body += "\n\nGPU targets, from the medians and peak memory above:\n" + "\n".join(targets)
        else:
            intro = ("CPU, small batch (" + str(args.batch) + "), L-inf eps 2/255, 9 margin specs, BatchNorm in "
                     "training mode. GPU rows: see the GPU blocks (bench_crown.py --device cuda).\n\n")
        common.update_results_md(BENCH, "CROWN-IBP robust loss (`bench_crown.py`)", intro + body, env,
                                 variant=f"batch {args.batch}")


def _nograd(fn):
    with torch.no_grad():
        fn()


def _fwdbwd(fn, params):
    for p in params:
        p.grad = None
    fn().backward()


if __name__ == "__main__":
    main()
