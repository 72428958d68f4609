"""Soundness of the sound IBP bounds on the device, whichever convolution algorithm cuDNN picks.

``sound=True`` widens every product by a bound on the rounding error of a dot product summed in any order,
``gamma_{K+2} sum |w| |x|`` (``robustkern.reference.interval``). That bound covers direct and implicit-GEMM
convolutions. It does not cover transform algorithms: Winograd and FFT convolutions round in a transformed
domain, with an error that follows the norms of whole tiles or images rather than each output's own
``sum |w| |x|``. cuDNN chooses the algorithm by heuristics (``torch.backends.cudnn.benchmark = False``) or by
timing the candidates (``True``). This check runs both ways on every backend that runs on the device:

  model  ``BoundedModule(model).compute_bounds(x, eps, C=margins, sound=True)`` in float32 on the device must
         contain (a) the float64 IBP bounds of the same box (``naive_ibp`` on the CPU, no cuDNN) and (b) the
         float64 margins ``C f(x')`` at sampled points ``x'`` of the box (random corners and uniform points);
  op     ``robustkern.ops.interval_conv2d(sound=True)`` on the model's convolution shapes and weights, with
         centres over 6 decades ("wide") and point boxes ("point", all radius is widening), must contain the
         float64 interval image computed on the CPU (``sound=False``: within ``gamma_K(2^-53) sum |w| |x|`` of
         the exact one, which the sound box's own float64 widening, ``2 gamma_{K+2}(2^-53) sum |w| |x|``, covers;
         a float32 box is computed in float64 and rounded outwards, ``robustkern.reference.interval``);
  kernels  the device kernels that ran during one bound computation (torch.profiler, after a warm-up call so
         that cuDNN's own timing runs are not counted); names that look like Winograd or FFT are flagged.

TF32 is left as torch sets it (cuDNN convolutions may use it) so that the library's own IEEE-fp32 switch is
part of what is checked. Models and input boxes as ``bench_ibp.py`` (CIFAR-10 normalisation first), in eval mode
with random BatchNorm statistics. Exit status 1 when any box fails to contain its reference.

    PYTHONPATH=python:. python benchmarks/gpu_soundness.py                     # on a GPU
    PYTHONPATH=python:. python benchmarks/gpu_soundness.py --batch 2 --models cifar_medium:padding=1   # CPU
"""
from __future__ import annotations

import argparse
import copy
import sys
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_ibp import build  # noqa: E402

from robustkern import use_backend  # noqa: E402
from robustkern.bounds import BoundedModule, margin_spec  # noqa: E402
from robustkern.ops import interval_conv2d  # noqa: E402
from robustkern.reference import interval as ref_interval  # noqa: E402
from robustkern.reference.ibp_model import naive_ibp  # noqa: E402
from robustkern.testing import backends_for  # noqa: E402

TRANSFORM_WORDS = ("winograd", "fft")
CONV_WORDS = ("conv", "winograd", "fft", "gemm", "xmma", "cudnn", "implicit", "interval")


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Eval mode with non-trivial BatchNorm running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 3 - 1.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def escapes(lo32, hi32, lo_ref, hi_ref):
    """(entries of [lo_ref, hi_ref] outside [lo32, hi32], worst slack): the slack of an entry is its distance
    from the reference's end to the float32 box's end over the float32 half-width, on the tighter side
    (negative: the reference escapes; for point boxes the half-width is all rounding widening)."""
    lo32, hi32 = lo32.double().cpu(), hi32.double().cpu()
    half = ((hi32 - lo32) / 2).clamp_min(1e-300)
    slack = torch.minimum(lo_ref - lo32, hi32 - hi_ref) / half
    return int((slack < 0).sum()), float(slack.min())


def conv_kernels(fn, device) -> list[str]:
    """Names of the device kernels of one call of ``fn`` that look like convolutions or GEMMs."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in CONV_WORDS)}
    except Exception as e:  # noqa: BLE001 - the kernel list is informative; the containment checks still count
        return [f"(profiler failed: {type(e).__name__}: {str(e)[:80]})"]
    return sorted(names)


def hard_box(shape, kind, device, seed):
    g = torch.Generator().manual_seed(seed)
    mid = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    rad = torch.zeros(shape) if kind == "point" else torch.rand(shape, generator=g) * 1e-3
    return mid.to(device), rad.to(device)


def conv_shapes(model: nn.Module, x: torch.Tensor):
    """(conv layer, its input shape) for every Conv2d, from one forward."""
    return common.layer_input_shapes(model, x, (nn.Conv2d,))


def check_model(name, model, x, C, eps_label, backends, flags, args, device):
    rows = []
    eps = float(Fraction(eps_label))
    model64 = copy.deepcopy(model).double().cpu()
    x64, C64 = x.double().cpu(), C.double().cpu()
    lo64, hi64 = (x64 - eps).clamp(0, 1), (x64 + eps).clamp(0, 1)
    with torch.no_grad():
        ref_lb, ref_ub = naive_ibp(model64, lo64, hi64, C64)
        g = torch.Generator().manual_seed(1)
        points = []
        for p in range(args.points):
            t = (torch.randint(0, 2, x64.shape, generator=g) if p % 2 == 0 else torch.rand(x64.shape, generator=g))
            points.append(torch.einsum("bsk,bk->bs", C64, model64(lo64 + (hi64 - lo64) * t.double())))
    bm = BoundedModule(model, x[:1])
    for backend in backends:
        for flag in flags:
            torch.backends.cudnn.benchmark = flag
            case = {"level": "model", "what": f"{name} eps {eps_label}", "backend": backend, "cudnn.benchmark": flag}
            try:
                with use_backend(backend), torch.no_grad():
                    def call():
                        return bm.compute_bounds(x, eps, C=C, sound=True)
                    call()                                   # warm-up: autotuning, cuDNN's timing runs
                    lb, ub = call()
                    kernels = conv_kernels(call, device)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run the model is reported
                rows.append({**case, "escapes": None, "note": f"not run: {type(e).__name__}: {str(e)[:100]}"})
                continue
            n_ref, slack = escapes(lb, ub, ref_lb, ref_ub)
            n_pts = sum(int(((z < lb.double().cpu()) | (z > ub.double().cpu())).sum()) for z in points)
            flagged = [k for k in kernels if any(w in k.lower() for w in TRANSFORM_WORDS)]
            rows.append({**case, "escapes": n_ref + n_pts, "slack": slack,
                         "note": f"float64 IBP: {n_ref} escape; {args.points} points x {x.shape[0]}: {n_pts} escape"
                                 + (f"; TRANSFORM KERNELS: {', '.join(k[:50] for k in flagged)}" if flagged else ""),
                         "kernels": kernels})
    return rows


def check_ops(name, model, x, backends, flags, args, device):
    rows = []
    for i, (conv, shape) in enumerate(conv_shapes(model, x[:args.op_batch])):
        w = conv.weight.detach()
        b = None if conv.bias is None else conv.bias.detach()
        geo = (conv.stride, conv.padding, conv.dilation, conv.groups)
        for kind in ("wide", "point"):
            mid, rad = hard_box(shape, kind, device, seed=10 * i + (kind == "point"))
            e_m, e_r, _, _ = ref_interval.interval_conv2d(mid.double().cpu(), rad.double().cpu(), w.double().cpu(),
                                                          None if b is None else b.double().cpu(), *geo, sound=False)
            for backend in backends:
                for flag in flags:
                    torch.backends.cudnn.benchmark = flag
                    case = {"level": "op", "what": f"{name} conv{i} {tuple(w.shape)} on {shape} {kind}",
                            "backend": backend, "cudnn.benchmark": flag}
                    try:
                        with use_backend(backend), torch.no_grad():
                            interval_conv2d(mid, rad, w, b, *geo, sound=True)      # warm-up
                            m, r = interval_conv2d(mid, rad, w, b, *geo, sound=True)
                    except Exception as e:  # noqa: BLE001
                        rows.append({**case, "escapes": None, "note": f"not run: {type(e).__name__}: {str(e)[:100]}"})
                        continue
                    n, slack = escapes(m.double() - r.double(), m.double() + r.double(), e_m - e_r, e_m + e_r)
                    rows.append({**case, "escapes": n, "slack": slack, "note": ""})
    return rows


def table(rows) -> str:
    lines = ["| level | case | backend | cudnn.benchmark | escapes | worst slack / half-width | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        esc = "-" if r["escapes"] is None else str(r["escapes"])
        slack = f"{r['slack']:.2e}" if "slack" in r else "-"
        lines.append(f"| {r['level']} | {r['what']} | {r['backend']} | {r['cudnn.benchmark']} | {esc} | {slack} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn_7layer_bn,cifar_medium:padding=1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--op-batch", type=int, default=8, help="batch of the op-level convolution checks")
    ap.add_argument("--eps", default="2/255,8/255")
    ap.add_argument("--points", type=int, default=4, help="sampled points per image (even: corners, odd: uniform)")
    ap.add_argument("--backends", default=None, help="comma-separated (default: every backend that runs here)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-results", action="store_true", help="write this run's block into RESULTS.md")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = (args.backends.split(",") if args.backends else
                [b for b in backends_for(device.type, include_interpreter=False) if b != "auto"])
    flags = [False, True] if device.type == "cuda" else [False]   # cuDNN exists only on CUDA
    env = common.start(device, args=args)
    print(f"backends: {backends}; cudnn {torch.backends.cudnn.version() if device.type == 'cuda' else '-'}; "
          f"TF32 allowed for cuDNN convolutions: {torch.backends.cudnn.allow_tf32}", flush=True)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = randomise_bn(build(name), args.seed).to(device)
        g = torch.Generator().manual_seed(args.seed)
        x = torch.rand(args.batch, 3, 32, 32, generator=g).to(device)
        C = margin_spec(torch.randint(0, 10, (args.batch,), generator=g), 10).to(device)
        for eps in args.eps.split(","):
            rows += check_model(name, model, x, C, eps, backends, flags, args, device)
            print(f"done {name} eps {eps} (model level)", flush=True)
        rows += check_ops(name, model, x, backends, flags, args, device)
        print(f"done {name} (op level)", flush=True)
    torch.backends.cudnn.benchmark = False
    text = table(rows)
    kernels = sorted({k for r in rows for k in r.get("kernels", [])})
    bad = [r for r in rows if r["escapes"]]
    verdict = (f"{len(bad)} of {len(rows)} checks had boxes escaping their reference: NOT SOUND" if bad else
               f"all {sum(r['escapes'] is not None for r in rows)} checks that ran contain their reference")
    print("\n" + text + "\n\nconvolution/GEMM kernels seen:\n" + "\n".join(f"  {k}" for k in kernels)
          + f"\n\n{verdict}")
    if args.write_results:
        body = "\n".join([
            "- sound float32 IBP bounds (model level: CIFAR-10 normalisation first, eval mode, random BatchNorm "
            f"statistics, batch {args.batch}, margins of 10 classes) and `interval_conv2d` (op level, the model's "
            "convolutions on 'wide' and 'point' boxes) against float64 references on the CPU; escapes = entries of "
            "the reference outside the float32 box; worst slack / half-width = min over entries of the distance "
            "from the reference's end to the float32 box's end over the box's half-width (negative: escape)",
            f"- TF32 allowed for cuDNN convolutions by torch: {torch.backends.cudnn.allow_tf32}; cudnn "
            f"{torch.backends.cudnn.version() if device.type == 'cuda' else '-'}",
            "", text, "", "Convolution/GEMM kernels seen: " + (", ".join(f"`{k[:70]}`" for k in kernels) or "-"),
            "", f"Verdict: {verdict}."])
        common.update_results_md("soundness", "Sound IBP bounds under cuDNN's algorithm choice", body, env,
                                 variant=f"batch {args.batch}")
        print(f"updated {common.RESULTS_MD}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
