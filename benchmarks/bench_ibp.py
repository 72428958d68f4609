"""IBP robust loss: forward and forward+backward, providers side by side.

The loss is the one certified training minimises: an L-inf box of radius eps around each image, clipped to
[0, 1]; the margin specification C (B, 9, 10) with rows e_y - e_j; the robust cross-entropy
CE([0, -lb], 0) of the lower bounds lb (B, 9) of the margins. BatchNorm runs in training mode with the
clean batch's statistics, as in certified training (``--bn eval`` uses running statistics instead).

Providers
  plain       forward + cross-entropy (+ backward) of the model on the clean batch: the floor
  eager       hand-written IBP, ``robustkern.reference.ibp_model.naive_ibp`` (what users write)
  compile     ``torch.compile`` of the eager loss (default mode)
  robustkern  ``robustkern.bounds.BoundedModule(...).compute_bounds(x, eps, method="IBP", C=C)``;
              ``robustkern-unsound`` passes ``sound=False`` when compute_bounds accepts it
  auto_lirpa  auto_LiRPA's IBP, when importable (``--lirpa-path`` or ``$AUTO_LIRPA_PATH``; see README.md)

Before timing, every provider's lower bounds are checked against the eager ones. robustkern's targets are
evaluated from the measured medians and printed below the table.

    PYTHONPATH=python:. python benchmarks/bench_ibp.py                 # defaults for this device
    PYTHONPATH=python:. python benchmarks/bench_ibp.py --quick         # smoke test, seconds
"""
from __future__ import annotations

import argparse
import ast
import copy
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.reference.ibp_model import margin_spec, naive_ibp, record_bn_stats, robust_cross_entropy  # noqa: E402

BENCH = "ibp"
PROVIDERS = ["plain", "eager", "compile", "robustkern", "robustkern-unsound", "auto_lirpa"]
MODES = ["fwd", "fwd+bwd"]
NUM_CLASSES = 10
# robustkern's targets, per device type: provider -> the least (provider time / robustkern time) that meets it.
# For "plain" that is 1/2.3: robustkern at most 2.3x the plain step.
TARGETS = {
    "cuda": {"auto_lirpa": 2.0, "eager": 1.3, "plain": 1 / 2.3},
    "cpu": {"auto_lirpa": 1.3, "eager": 1.0},
}


# The models: CNN-7 (auto_LiRPA's cnn_7layer_bn) and the CROWN-IBP "cifar_medium" 4-conv CNN with SAME
# padding (conv32 3x3, conv32 4x4/2, conv64 3x3, conv64 4x4/2, fc 4096->512; the zoo's version has one more
# 512->512 layer before the final linear, as CROWN-IBP's model_cnn_4layer does).
DEFAULT_MODELS = "cnn_7layer_bn,cifar_medium:padding=1"
# The GPU sizes; on 2 shared CPU cores CNN-7 at batch 256 takes seconds per step, so CPU runs
# default to batch 32 for it (pass --batch 256,64 for the GPU sizes).
DEFAULT_BATCH = {"cuda": {"cnn_7layer_bn": 256, "cifar_medium": 64}, "cpu": {"cnn_7layer_bn": 32, "cifar_medium": 64}}


class Unavailable(Exception):
    """A provider that cannot run here; the reason goes into the table."""


@dataclass
class Case:
    model_name: str
    batch: int
    eps: float
    eps_label: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    C: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def key(self) -> dict:
        return {"model": self.model_name, "batch": self.batch, "eps": self.eps_label}


def build(spec: str) -> torch.nn.Module:
    """A zoo model from ``name`` or ``name:key=value:key=value``, with CIFAR-10 normalisation as its first
    layer (so boxes are clipped to [0, 1] in pixel units, as in certified training)."""
    from robustkern.models import CIFAR10_MEAN, CIFAR10_STD, build_model

    name, *opts = spec.split(":")
    kw = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in opts)}
    return build_model(name, mean=CIFAR10_MEAN, std=CIFAR10_STD, **kw)


def make_case(model_name: str, batch: int, eps_label: str, bn_mode: str, device: torch.device, seed: int) -> Case:
    torch.manual_seed(seed)
    model = build(model_name).to(device)
    model.train(bn_mode == "train")
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(NUM_CLASSES, (batch,), device=device)
    eps = float(Fraction(eps_label))
    return Case(model_name, batch, eps, eps_label, model, x, y, margin_spec(y, NUM_CLASSES),
                (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))


# ------------------------------------------------------------------------------------------------ providers
@dataclass
class Setup:
    loss: Callable[[], tuple]          # () -> (loss, lb); lb is None for the floor
    params: list                       # what the backward writes .grad to (cleared before each step)


def eager_ibp_loss(model, x, lower, upper, C):
    """The robust loss as users write it: a clean forward for the BatchNorm batch statistics (training mode),
    then IBP with C folded into the last layer."""
    stats = None
    if any(m.training for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
        _, stats = record_bn_stats(model, x)
    lb, _ = naive_ibp(model, lower, upper, C, bn_stats=stats)
    return robust_cross_entropy(lb), lb


def setup_plain(case: Case, args) -> Setup:
    return Setup(lambda: (F.cross_entropy(case.model(case.x), case.y), None), list(case.model.parameters()))


def setup_eager(case: Case, args) -> Setup:
    return Setup(lambda: eager_ibp_loss(case.model, case.x, case.lower, case.upper, case.C),
                 list(case.model.parameters()))


def setup_compile(case: Case, args) -> Setup:
    compiled = torch.compile(eager_ibp_loss)
    return Setup(lambda: compiled(case.model, case.x, case.lower, case.upper, case.C),
                 list(case.model.parameters()))


def _robustkern_bounded(case: Case):
    try:
        import robustkern.bounds as rb
        rb.BoundedModule, rb.robust_cross_entropy  # noqa: B018 - probe the API
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"robustkern.bounds API missing ({e})") from None
    return rb, rb.BoundedModule(case.model, case.x[:1])


def setup_robustkern(case: Case, args, sound: bool | None = None) -> Setup:
    rb, bm = _robustkern_bounded(case)
    kwargs = {}
    if sound is not None:
        if "sound" not in inspect.signature(bm.compute_bounds).parameters:
            raise Unavailable("compute_bounds has no `sound` argument")
        kwargs["sound"] = sound

    def loss():
        lb, _ = bm.compute_bounds(case.x, case.eps, method="IBP", C=case.C, **kwargs)
        return rb.robust_cross_entropy(lb), lb
    params = list(case.model.parameters())
    if isinstance(bm, torch.nn.Module):
        params += [p for p in bm.parameters() if all(p is not q for q in params)]
    return Setup(loss, params)


def import_auto_lirpa(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        import numpy as np
        from auto_LiRPA import BoundedModule, BoundedTensor
        from auto_LiRPA.perturbations import PerturbationLpNorm
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        raise Unavailable(f"auto_LiRPA not importable ({type(e).__name__}: {e})") from None
    return np, BoundedModule, BoundedTensor, PerturbationLpNorm


def setup_auto_lirpa(case: Case, args) -> Setup:
    np, BoundedModule, BoundedTensor, PerturbationLpNorm = import_auto_lirpa(args.lirpa_path)
    # BoundedModule copies the parameters of the module it is given: give it its own copy, in eval mode while
    # it traces (a training-mode BatchNorm1d rejects the batch-of-one dummy input).
    # forward_before_compute_bounds: a training-mode BatchNorm takes its statistics from the clean forward
    # that compute_bounds(x=...) then runs first (without it, the previous call's statistics are used).
    bm = BoundedModule(copy.deepcopy(case.model).eval(), torch.zeros_like(case.x[:1]), device=case.x.device,
                       bound_opts={"forward_before_compute_bounds": True})
    # auto_LiRPA turns off requires_grad of every parameter in eval mode, so with running BatchNorm statistics
    # (--bn eval) the module stays in training mode and only its BatchNorm nodes are switched to eval.
    bm.train()
    if not case.model.training:
        for node in bm.modules():
            if type(node).__name__ == "BoundBatchNormalization":
                node.eval()
    ptb = PerturbationLpNorm(norm=np.inf, eps=case.eps, x_L=case.lower, x_U=case.upper)
    xb = BoundedTensor(case.x, ptb)

    def loss():
        lb, _ = bm.compute_bounds(x=(xb,), C=case.C, method="IBP")
        return robust_cross_entropy(lb), lb
    return Setup(loss, list(bm.parameters()))


SETUPS = {
    "plain": setup_plain,
    "eager": setup_eager,
    "compile": setup_compile,
    "robustkern": setup_robustkern,
    "robustkern-unsound": lambda case, args: setup_robustkern(case, args, sound=False),
    "auto_lirpa": setup_auto_lirpa,
}


# ------------------------------------------------------------------------------------------------ running
def step(setup: Setup, mode: str) -> Callable[[], None]:
    """One timed call: the loss under no_grad ("fwd"), or the loss and its backward ("fwd+bwd")."""
    loss_fn, params = setup.loss, setup.params
    if mode == "fwd":
        def run():
            with torch.no_grad():
                loss_fn()
    else:
        def run():
            for p in params:
                p.grad = None
            loss_fn()[0].backward()
    return run


def check_bounds(name: str, lb: torch.Tensor, ref: torch.Tensor) -> str:
    """Compare a provider's lower bounds with the eager ones; returns a note for the table."""
    diff = (lb.double() - ref.double())
    scale = ref.double().abs().max().clamp_min(1e-30)
    rel = float(diff.abs().max() / scale)
    looser = float((-diff).clamp_min(0).max() / scale)       # how far below the eager bound, relative
    tighter = float(diff.clamp_min(0).max() / scale)
    print(f"    {name:<20} max|lb - lb_eager| = {float(diff.abs().max()):.3e}  "
          f"(relative {rel:.2e}; looser by up to {looser:.2e}, tighter by up to {tighter:.2e})")
    # Same arithmetic up to summation order: agreement to ~1e-6 relative. robustkern's sound bounds are widened
    # by a bound on their rounding error (relative O(K u) per layer, K up to 32768 here), so only looser.
    sound_variant = name == "robustkern"
    tol_tight = 1e-5
    tol_loose = 5e-2 if sound_variant else 1e-5
    if tighter > tol_tight or looser > tol_loose or not torch.isfinite(lb).all():
        return f"BOUNDS DIFFER (rel {rel:.1e})"
    return f"looser by {looser:.1e} rel" if sound_variant and looser > 0 else ""


def run_case(case: Case, args, device: torch.device) -> list[common.Row]:
    print(f"\n== {case.model_name}  batch {case.batch}  eps {case.eps_label}  BN {args.bn}", flush=True)
    setups, notes, rows = {}, {}, []
    for name in args.providers:
        try:
            setups[name] = SETUPS[name](case, args)
        except Unavailable as e:
            notes[name] = f"unavailable: {e}"
        except Exception as e:  # noqa: BLE001 - a provider that breaks is reported, the others still run
            notes[name] = f"setup failed: {type(e).__name__}: {e}"
            traceback.print_exc()
    # Correctness gate (and the first call, which also triggers compilation).
    print("  bounds check against eager:")
    with torch.no_grad():
        ref = setups["eager"].loss()[1] if "eager" in setups else None
        for name in list(setups):
            try:
                lb = setups[name].loss()[1]
            except Exception as e:  # noqa: BLE001
                notes[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                del setups[name]
                traceback.print_exc()
                continue
            if lb is not None and ref is not None and name != "eager":
                notes[name] = check_bounds(name, lb, ref)
    flops = {}
    for mode in args.modes:
        fns = {n: step(setup, mode) for n, setup in setups.items()}
        failed = {}
        for n, fn in list(fns.items()):  # one untimed call per mode: compiles, and counts the work (aten ops)
            try:
                if n in ("plain", "eager"):
                    flops[n] = common.count_flops(fn)
                else:
                    fn()
            except Exception as e:  # noqa: BLE001
                failed[n] = f"failed: {type(e).__name__}: {str(e)[:120]}"
                del fns[n]
        print(f"  timing {mode}: {', '.join(fns)}", flush=True)
        if device.type == "cuda":
            timings = {n: common.time_cuda(fn) for n, fn in fns.items()}
        else:
            timings = common.time_cpu(fns, rounds=args.rounds, warmup=args.warmup)
        for name in args.providers:
            mem = None
            if name in fns:
                if device.type == "cuda":
                    mem = common.cuda_peak_bytes(fns[name], device)
                elif mode == "fwd+bwd":
                    mem = common.saved_tensor_bytes(setups[name].loss, exclude=setups[name].params)
            row_flops = flops.get("plain" if name == "plain" else "eager")
            rows.append(common.Row(
                case={**case.key, "mode": mode}, provider=name, timing=timings.get(name), mem_bytes=mem,
                note=failed.get(name) or notes.get(name, ""),
                extra={"bn": args.bn, "backend": args.backend, "threads": torch.get_num_threads(),
                       "gflop": row_flops and round(row_flops / 1e9, 3)}))
    return rows


def check_targets(rows: list[common.Row], device: torch.device) -> list[str]:
    """robustkern's targets, evaluated on the measured medians."""
    lines = []
    by_case: dict[tuple, dict[str, common.Row]] = {}
    for r in rows:
        by_case.setdefault(tuple(r.case.values()), {})[r.provider] = r
    for key, provs in by_case.items():
        ours = provs.get("robustkern")
        for other, need in TARGETS[device.type].items():
            r = common.ratio(provs[other], ours) if other in provs and ours else None
            label = " ".join(f"{k}={v}" for k, v in zip(("model", "batch", "eps", "mode"), key))
            if other == "plain":
                want = f"robustkern <= {1 / need:.1f}x plain"
                got = None if r is None else 1 / r
                verdict = "not measured" if r is None else f"{got:.2f}x -> {'met' if r >= need else 'MISSED'}"
            else:
                want = f"robustkern >= {need:.1f}x faster than {other}"
                verdict = "not measured" if r is None else f"{r:.2f}x -> {'met' if r >= need else 'MISSED'}"
            lines.append(f"- {label}: {want}: {verdict}")
    return lines


def backend_label(device: torch.device) -> str:
    """Which robustkern implementation runs on ``device`` (``robustkern.info()``)."""
    try:
        import robustkern
        rep = robustkern.info(file=False)
        kind = "CUDA" if device.type == "cuda" else "CPU"
        return f"{rep.get(f'backend for {kind} tensors')} (extension: {rep.get('extension')})"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated robustkern.models names, each optionally followed by "
                        ":key=value builder arguments (default: %(default)s)")
    p.add_argument("--batch", default=None,
                   help="batch size per model, comma-separated (default: 256 for CNN-7 and 64 for cifar_medium on "
                        "CUDA; 32 and 64 on CPU)")
    p.add_argument("--eps", default="2/255,8/255", help="comma-separated L-inf radii in pixel units")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of %(default)s")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--bn", choices=["train", "eval"], default="train",
                   help="BatchNorm with clean-batch statistics (train) or running statistics (eval)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--tf32", choices=["off", "default"], default="off",
                   help="CUDA: TF32 off for every provider (IEEE fp32, as robustkern's bounds), or torch's default")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (CPU)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds before timing (CPU), besides the first call of each provider")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lirpa-path", default=os.environ.get("AUTO_LIRPA_PATH"),
                   help="directory holding the auto_LiRPA package (default: $AUTO_LIRPA_PATH)")
    p.add_argument("--quick", action="store_true", help="smoke test: batch 4, 2 rounds, one eps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not append to results/ibp.csv")
    p.add_argument("--write-results", action="store_true",
                   help="replace this device's IBP section of benchmarks/RESULTS.md with this run")
    common.add_output_options(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.models = args.models.split(",")
    args.providers = [s for s in args.providers.split(",") if s]
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    args.modes = args.modes.split(",")
    if args.batch:
        args.batch = [int(b) for b in args.batch.split(",")]
    else:
        args.batch = [DEFAULT_BATCH[device.type].get(m.split(":")[0], 64) for m in args.models]
    if len(args.batch) == 1:
        args.batch *= len(args.models)
    if len(args.batch) != len(args.models):
        p.error("--batch needs one size, or one per model")
    args.eps = args.eps.split(",")
    if args.quick:
        args.batch, args.eps, args.rounds = [4] * len(args.models), args.eps[:1], 2
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backend = backend_label(device)
    if device.type == "cuda" and args.tf32 == "off":     # like for like: robustkern's bounds use IEEE fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    common.use_output_options(args)
    env = common.Environment.capture(device)
    print(f"device: {env.device}\ntorch {env.torch}, triton {env.triton}, commit {env.commit}\n"
          f"robustkern backend: {args.backend}\ncommand: {env.command}")
    rows = []
    for model_name, batch in zip(args.models, args.batch):
        for eps in args.eps:
            case = make_case(model_name, batch, eps, args.bn, device, args.seed)
            rows += run_case(case, args, device)
    keys = ["model", "batch", "eps", "mode"]
    peak = common.cuda_matmul_flops_per_s(device) if device.type == "cuda" else None
    text = common.table(rows, keys, device, ours="robustkern", floor="plain", peak_flops_per_s=peak)
    targets = check_targets(rows, device)
    print("\n" + text + "\n\nTargets (" + device.type + "):\n" + "\n".join(targets))
    if not args.no_save:
        print(f"\nappended to {common.append_csv(BENCH, rows, env, device)}")
    if args.write_results:
        mem = ("saved MB: bytes autograd keeps for backward (unique storages, parameters left out)"
               if device.type == "cpu" else "peak MB: torch.cuda.max_memory_allocated during one call")
        low = "min/max over interleaved rounds" if device.type == "cpu" else "p20/p80 from triton do_bench"
        body = "\n".join([
            f"- BatchNorm: {args.bn} mode; robustkern backend: {args.backend}; "
            + (f"TF32: {args.tf32}" if device.type == "cuda" else f"threads: {torch.get_num_threads()}"),
            "- GFLOP/s: matmul and convolution FLOPs of the eager IBP (of the plain step for `plain`), counted by "
            "torch.utils.flop_counter, over each provider's median"
            + ("; % matmul peak: over a measured 8192^3 fp32 (IEEE) matmul" if peak else ""),
            f"- timings: median, {low}; `x robustkern` = provider median / robustkern median "
            f"(above 1: robustkern is faster); `x plain` = provider median / plain median; {mem}",
            "", text, "", f"Targets ({device.type}), from the medians above:", *targets])
        sizes = ", ".join(f"{m} batch {b}" for m, b in zip(args.models, args.batch))
        common.update_results_md(BENCH, "IBP robust loss", body, env, variant=sizes)
        print(f"updated {common.RESULTS_MD}")


if __name__ == "__main__":
    main()
