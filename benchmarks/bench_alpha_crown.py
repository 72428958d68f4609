"""alpha-CROWN (Xu et al. 2021): robustkern's ``compute_bounds(method="alpha-CROWN")`` against auto_LiRPA 0.7.1's
``compute_bounds(method="CROWN-Optimized")`` on the same model, batch, specification and ``optimize_bound_args``
(``iteration``, ``lr_alpha`` 0.5, ``lr_decay`` 0.98, ``early_stop_patience`` 10): time per call and the lower
bounds of the margins ``f_y - f_j``.

Models (random weights, seeded; inputs uniform in [0, 1], L-inf eps clipped to [0, 1], so that many ReLUs are
unstable): ``mlp`` (784-256-256-10) and ``cnn_4layer`` (CROWN-IBP's, width 1, linear 256) on MNIST's shape.

Providers
  robustkern        ``sound=False``: the working precision, as auto_LiRPA
  robustkern-sound  ``sound=True``: rounding-error accounting, float64 backward passes (the certificate)
  auto_lirpa        auto_LiRPA itself, when it imports (``--lirpa-path``, paths separated by ``os.pathsep``, or
                    ``$AUTO_LIRPA_PATH``)
  crown             robustkern's CROWN (``sound=False``): the bound alpha-CROWN starts from

Columns beside the timings (notes): ``lb mean`` (mean lower bound over the batch and the 9 margins) and, for the
robustkern providers, ``vs lirpa``: the worst (minimum) and the mean over the entries of (robustkern lb -
auto_LiRPA lb), each over the mean |auto_LiRPA lb| (the bounds' scale: a per-entry ratio blows up at the margins
whose bound is near 0). Worst >= -1e-3: within 1e-3 relative or tighter; mean > 0: tighter on average.

    PYTHONPATH=python:. python benchmarks/bench_alpha_crown.py --threads 1 --write-results
    PYTHONPATH=python:. python benchmarks/bench_alpha_crown.py --models mlp --batch 4 --iterations 5 --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from robustkern.bounds import BoundedModule, margin_spec  # noqa: E402

BENCH = "alpha_crown"
TITLE = "alpha-CROWN against auto_LiRPA's CROWN-Optimized (`bench_alpha_crown.py`)"
PROVIDERS = ["robustkern", "robustkern-sound", "auto_lirpa", "crown"]


def make_model(name: str) -> nn.Sequential:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    if name == "cnn_4layer":
        return nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 4, stride=2, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))
    raise ValueError(f"unknown model {name!r}; choose mlp or cnn_4layer")


def providers(args, model, x, C, device):
    """``{provider: fn}``; each ``fn()`` returns the lower bounds (B, 9)."""
    eps = args.eps
    opt = {"iteration": args.iterations, "lr_alpha": 0.5, "lr_decay": 0.98, "early_stop_patience": 10}
    bm = BoundedModule(model, x[:1])
    out = {}
    for name in args.providers.split(","):
        if name in ("robustkern", "robustkern-sound"):
            sound = name == "robustkern-sound"
            out[name] = lambda sound=sound: bm.compute_bounds(x, eps, method="alpha-CROWN", C=C, bound_upper=False,
                                                              sound=sound, optimize_bound_args=opt)[0]
        elif name == "crown":
            out[name] = lambda: bm.compute_bounds(x, eps, method="CROWN", C=C, bound_upper=False, sound=False)[0]
        elif name == "auto_lirpa":
            try:
                lib = common.import_auto_lirpa(args.lirpa_path)
            except RuntimeError as e:
                print(f"auto_lirpa: skipped: {e}")
                continue
            lm = lib.BoundedModule(copy.deepcopy(model), torch.zeros_like(x), device=device, verbose=0,
                                   bound_opts={"optimize_bound_args": dict(opt)})
            ptb = lib.PerturbationLpNorm(eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
            bx = lib.BoundedTensor(x, ptb)
            out[name] = lambda lm=lm, bx=bx: lm.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized",
                                                               bound_upper=False)[0].detach()
        else:
            raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return out


def run(args) -> list[common.Row]:
    device = torch.device(args.device)
    rows = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = make_model(model_name).to(device).eval()
        x = torch.rand(args.batch, 1, 28, 28, device=device)
        with torch.no_grad():
            y = model(x).argmax(1)
        C = margin_spec(y, 10).to(device)
        fns = providers(args, model, x, C, device)
        lbs = {name: fn() for name, fn in fns.items()}          # the bounds, and a warm-up
        if device.type == "cuda":
            timings = {name: common.time_cuda(fn, min_reps=args.rounds) for name, fn in fns.items()}
        else:
            timings = common.time_cpu(fns, args.rounds, warmup=0)
        ref = lbs.get("auto_lirpa")
        for name in fns:
            lb = lbs[name].detach().float()
            extra = {"lb_mean": round(float(lb.mean()), 6)}
            note = f"lb mean {float(lb.mean()):.5f}"
            if ref is not None and name != "auto_lirpa":
                diff, scale = lb - ref.float(), float(ref.float().abs().mean())
                worst, mean = float(diff.min()) / scale, float(diff.mean()) / scale
                extra.update(worst_vs_lirpa=worst, mean_vs_lirpa=mean)
                note += f"; vs lirpa worst {worst:+.1e}, mean {mean:+.1e}"
            rows.append(common.Row({"model": model_name, "batch": args.batch, "iterations": args.iterations},
                                   name, timings[name], note=note, extra=extra))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,cnn_4layer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per provider (interleaved on the CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--lirpa-path", default=os.environ.get("AUTO_LIRPA_PATH", "/work/scratch/lirpa"))
    ap.add_argument("--no-save", action="store_true", help="do not append the rows to results/alpha_crown.csv")
    ap.add_argument("--write-results", action="store_true")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = common.start(device, args.threads if device.type == "cpu" else 0, args)
    t0 = time.perf_counter()
    rows = run(args)
    body = common.table(rows, ["model", "batch", "iterations"], device, "robustkern", "auto_lirpa")
    print(body)
    print(f"{time.perf_counter() - t0:.1f} s")
    if not args.no_save:
        common.append_csv(BENCH, rows, env, device)
    if args.write_results:
        intro = (f"{device.type.upper()}, MNIST-shaped random-weight models, batch {args.batch}, L-inf eps {args.eps} "
                 f"clipped to [0, 1], margin specification (9 rows), {args.iterations} iterations, lr_alpha 0.5, "
                 "lr_decay 0.98, lower bounds only. `x robustkern` = provider median / robustkern's (sound=False); "
                 "`x auto_lirpa` = over auto_LiRPA 0.7.1's CROWN-Optimized. Notes: the mean lower bound and, for "
                 "robustkern, the worst and the mean of (lb - auto_LiRPA lb) / mean |auto_LiRPA lb| (worst >= -1e-3: "
                 "within 1e-3 relative or tighter; mean > 0: tighter on average).\n\n")
        common.update_results_md(BENCH, TITLE, intro + body, env,
                                 variant=f"batch {args.batch}, {args.iterations} iterations")


if __name__ == "__main__":
    main()
