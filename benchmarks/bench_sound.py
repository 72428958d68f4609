"""Sound bounds: what they cost in tightness and in time, against unsound bounds and a float64 reference.

For every model and method (IBP, CROWN-IBP, CROWN) the margins ``C f(x)`` (C: the (B, 9, 10) margin
specification) are bounded three ways on the same inputs:

  sound      ``compute_bounds(..., sound=True)`` on the float32 model: bounds that hold for the real network
  unsound    ``sound=False`` on the float32 model (the working precision's numbers, no guarantee)
  float64    ``sound=False`` on a float64 copy of the model, with the float32 inputs: the same relaxation in
             float64, whose own rounding (~1e-16 relative) is far below what is measured here; the reference

Tightness, relative to the largest reference bound ``s = max |float64 bounds|`` (labels: the digits' own, the random
models' predictions):
  ``sound loose``  = max over bounds of how much looser sound is than float64
                     (``max(lb64 - lb_sound, ub_sound - ub64) / s``): what soundness costs;
  ``fp32 error``   = ``max |unsound - float64| / s``: the float32 computation's actual rounding error;
  a sound bound tighter than float64 by more than float64's own rounding is reported as an escape;
  ``verified``     = examples whose margin lower bounds are all positive, sound / float64 / unsound, at the
                     radius ``eps / 2^k`` where float64 verifies closest to half the batch (sound must equal
                     float64; below float32's resolution of ``x`` the unsound bounds may verify more, wrongly).

Time: the median of interleaved rounds (``common.time_cpu``) of sound and unsound, the forward alone (bounds of
the margins' lower side under ``no_grad``) and the forward + backward of the robust cross-entropy of those lower
bounds (the certified-training step; the parameters' versions are bumped before each call as an optimizer step
bumps them, so no float64 copy of the weights outlives a call, while the forward alone keeps them as certification
does: ``robustkern.bounds.precision.WideWeights``), with the ratio sound / unsound. Models (eval mode; BatchNorm running
statistics from one training-mode forward): small random nets (``mlp_small``, ``cnn_small`` with BatchNorm, 8x8
inputs), the digits models of the tests trained in-process (``digits_mlp``, ``digits_cnn``), ``cnn_4layer`` (MNIST
shape, as in ``bench_alpha_crown.py``), ``cifar_medium`` and ``cnn_7layer_bn`` (CIFAR shape, normalisation first).
CROWN runs on the models where its intermediate passes take seconds (not on the CIFAR models).

    PYTHONPATH=python:. python benchmarks/bench_sound.py                    # all models, 1 thread
    PYTHONPATH=python:. python benchmarks/bench_sound.py --models mlp_small,cnn_small --rounds 3
    PYTHONPATH=python:. python benchmarks/bench_sound.py --write-results
    PYTHONPATH=python:. python benchmarks/bench_sound.py --device cuda --batch 32 --write-results

``--floor`` prints (and with ``--write-results`` writes) instead what the fastest sound bounds could cost here
(``sound_floor``: which products must run in float64, their float64/float32 times at the models' shapes, and the
float64 relaxation's time, the floor of the sound forward; the forward + backward's floor is ``1 + t(fwd, float64) /
t(fwd+bwd, float32)``):


    PYTHONPATH=python:. python benchmarks/bench_sound.py --floor --models digits_cnn,cifar_medium,cnn_7layer_bn

On the GPU the sound float32 GEMMs run as float64 GEMMs (``robustkern.reference.interval``); that H100-class
float64 throughput makes them cost about what IEEE float32 does there is a hypothesis this script checks, not a
measured figure until it has run on one.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import sound_floor  # noqa: E402
from bench_ibp import build  # noqa: E402

from robustkern.bounds import BoundedModule, margin_spec, robust_cross_entropy  # noqa: E402

BENCH = "sound"
TITLE = "Sound bounds: tightness against float64 and time against unsound (`bench_sound.py`)"
FLOOR_TITLE = "Sound bounds: the floor of sound/unsound time on this CPU (`bench_sound.py --floor`)"
METHODS = ("IBP", "CROWN-IBP", "CROWN")
# Targets: sound looser than float64 by less than this (relative to the largest bound) ...
TARGET_LOOSE = 1e-5
# ... and the sound forward + backward at most this many times the unsound one (CPU).
TARGET_TIME = 1.15


@dataclass
class Model:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    methods: tuple


def _predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The labels of a random model: its own predictions (so that some margins can be verified)."""
    with torch.no_grad():
        return model(x).argmax(1)


def _random_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics from one training-mode forward (momentum 1), then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()
        model(x)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _digits(kind: str, batch: int):
    from tests import _digits

    _, _, xte, yte = _digits.digits()
    return _digits.trained(kind), xte[:batch], yte[:batch]


def make_model(name: str, batch: int, seed: int) -> Model:
    torch.manual_seed(seed)
    small = METHODS
    if name == "mlp_small":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        x = torch.rand(batch, 1, 8, 8)
        model = _random_stats(model, x)
        return Model(name, model, x, _predicted(model, x), 0.05, small)
    if name == "cnn_small":
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 16, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                              nn.ReLU(), nn.Linear(32, 10))
        x = torch.rand(batch, 1, 8, 8)
        model = _random_stats(model, x)
        return Model(name, model, x, _predicted(model, x), 0.05, small)
    if name in ("digits_mlp", "digits_cnn"):
        model, x, y = _digits(name.split("_")[1], batch)
        return Model(name, model, x, y, 0.05, small)
    if name == "cnn_4layer":
        from bench_alpha_crown import make_model as alpha_model
        model = alpha_model("cnn_4layer")
        x = torch.rand(batch, 1, 28, 28)
        model = _random_stats(model, x)
        return Model(name, model, x, _predicted(model, x), 0.1, small)
    if name in ("cifar_medium", "cnn_7layer_bn"):
        model = build("cifar_medium:padding=1" if name == "cifar_medium" else name)
        x = torch.rand(batch, 3, 32, 32)
        model = _random_stats(model, x)
        return Model(name, model, x, _predicted(model, x), 2 / 255, ("IBP", "CROWN-IBP"))
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(DEFAULT_BATCH)}")


DEFAULT_BATCH = {"mlp_small": 32, "cnn_small": 32, "digits_mlp": 64, "digits_cnn": 64, "cnn_4layer": 8,
                 "cifar_medium": 8, "cnn_7layer_bn": 4}


def to_device(m: Model, device: torch.device) -> Model:
    return Model(m.name, m.model.to(device), m.x.to(device), m.y.to(device), m.eps, m.methods)


def tightness(m: Model, method: str) -> dict:
    """``sound loose``, ``fp32 error`` and ``escape`` (module docstring) of one model and method."""
    C = margin_spec(m.y, 10)
    bm32 = BoundedModule(m.model, m.x[:1])
    m64 = copy.deepcopy(m.model).double()
    bm64 = BoundedModule(m64, m.x[:1].double())
    with torch.no_grad():
        ref = bm64.compute_bounds(m.x, m.eps, method=method, C=C.double(), sound=False)
        sound = bm32.compute_bounds(m.x, m.eps, method=method, C=C, sound=True)
        unsound = bm32.compute_bounds(m.x, m.eps, method=method, C=C, sound=False)
    scale = float(torch.maximum(ref[0].abs(), ref[1].abs()).max())
    gap = torch.maximum((ref[0] - sound[0].double()).max(), (sound[1].double() - ref[1]).max())
    inside = torch.minimum((ref[0] - sound[0].double()).min(), (sound[1].double() - ref[1]).min())
    err = torch.maximum((unsound[0].double() - ref[0]).abs().max(), (unsound[1].double() - ref[1]).abs().max())
    return {"loose": float(gap) / scale, "fp32_err": float(err) / scale,
            "escape": float(inside) < -1e-12 * scale, "scale": scale,
            "verified": verified_counts(bm32, bm64, m, C, method)}


def verified_counts(bm: BoundedModule, bm64: BoundedModule, m: Model, C: torch.Tensor, method: str) -> tuple:
    """``(eps, sound, float64, unsound)``: the examples whose margins the sound bounds, the float64 reference and
    the unsound float32 bounds verify, at the radius ``m.eps / 2^k`` (k = 0..30) at which the reference verifies
    closest to half the batch (where a looser sound bound would show first). Below float32's resolution of ``x``
    the unsound float32 bounds can verify what the reference does not (``x -/+ eps`` rounds to ``x``)."""
    def count(eps, which):
        with torch.no_grad():
            if which == "float64":
                lb = bm64.compute_bounds(m.x, eps, method=method, C=C.double(), sound=False, bound_upper=False)[0]
            else:
                lb = bm.compute_bounds(m.x, eps, method=method, C=C, sound=which == "sound", bound_upper=False)[0]
        return int((lb > 0).all(1).sum())

    half = m.x.shape[0] / 2
    best = min((abs(count(m.eps / 2 ** k, "float64") - half), k) for k in range(31))[1]
    eps = m.eps / 2 ** best
    return (eps,) + tuple(count(eps, which) for which in ("sound", "float64", "unsound"))


def timings(m: Model, method: str, rounds: int, device: torch.device) -> dict:
    C = margin_spec(m.y, 10)
    bm = BoundedModule(m.model, m.x[:1])
    params = [p for p in m.model.parameters()]

    def fwd(sound):
        def run():
            with torch.no_grad():
                bm.compute_bounds(m.x, m.eps, method=method, C=C, sound=sound, bound_upper=False)
        return run

    def fwdbwd(sound):
        def run():
            for p in params:
                p.grad = None
                torch.autograd.graph.increment_version(p)   # as an optimizer step does: no kept float64 weights
            lb, _ = bm.compute_bounds(m.x, m.eps, method=method, C=C, sound=sound, bound_upper=False)
            robust_cross_entropy(lb).backward()
        return run

    # two groups, each interleaved: the training steps' version bumps must not reach the forward-only rounds
    groups = ({"fwd unsound": fwd(False), "fwd sound": fwd(True)},
              {"fwd+bwd unsound": fwdbwd(False), "fwd+bwd sound": fwdbwd(True)})
    if device.type == "cuda":
        return {k: common.time_cuda(fn).median_ms for fns in groups for k, fn in fns.items()}
    return {k: v.median_ms for fns in groups for k, v in common.time_cpu(fns, rounds=rounds).items()}


def _fmt(v: float, kind: str) -> str:
    return f"{v:.1e}" if kind == "rel" else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default=",".join(DEFAULT_BATCH))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=0, help="one batch size for every model (default: per model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="print the floor of the sound/unsound ratios on this CPU instead (sound_floor.py)")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = common.start(device, args.threads, args)
    if args.floor:
        return floor(args, env)
    head = ["model", "batch", "method", "sound loose", "fp32 error", "verified sound / float64 / unsound",
            "fwd unsound ms", "fwd sound ms", "fwd x", "fwd+bwd unsound ms", "fwd+bwd sound ms", "fwd+bwd x", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows, misses = [], []
    wanted = [s.strip().upper() for s in args.methods.split(",")]
    for name in args.models.split(","):
        m = to_device(make_model(name, args.batch or DEFAULT_BATCH[name], args.seed), device)
        for method in (mt for mt in METHODS if mt.upper() in wanted):
            if method not in m.methods:
                continue
            tight = tightness(m, method)
            t = timings(m, method, args.rounds, device)
            fx, bx = t["fwd sound"] / t["fwd unsound"], t["fwd+bwd sound"] / t["fwd+bwd unsound"]
            note = "ESCAPE: sound tighter than float64" if tight["escape"] else ""
            if tight["loose"] >= TARGET_LOOSE:
                misses.append(f"{name} {method}: sound {tight['loose']:.1e} looser than float64 (target "
                              f"< {TARGET_LOOSE:.0e})")
            eps_v, v_sound, v_64, v_unsound = tight["verified"]
            if v_sound != v_64:
                misses.append(f"{name} {method}: at eps {eps_v:.3g} sound bounds verify {v_sound} examples, float64 "
                              f"{v_64}")
            if bx > TARGET_TIME and device.type == "cpu":
                misses.append(f"{name} {method}: sound forward+backward {bx:.2f}x unsound (target <= {TARGET_TIME})")
            cells = [name, str(m.x.shape[0]), method, _fmt(tight["loose"], "rel"), _fmt(tight["fp32_err"], "rel"),
                     f"{v_sound} / {v_64} / {v_unsound} (eps {eps_v:.2g})",
                     _fmt(t["fwd unsound"], "ms"), _fmt(t["fwd sound"], "ms"), f"{fx:.2f}",
                     _fmt(t["fwd+bwd unsound"], "ms"), _fmt(t["fwd+bwd sound"], "ms"), f"{bx:.2f}", note]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            rows.append(common.Row({"model": name, "batch": m.x.shape[0], "method": method}, "sound",
                                   common.Timing(t["fwd+bwd sound"], t["fwd+bwd sound"], t["fwd+bwd sound"], -1),
                                   extra={"sound_loose": tight["loose"], "fp32_err": tight["fp32_err"],
                                          "verify_eps": eps_v, "verified_sound": v_sound,
                                          "verified_float64": v_64, "verified_unsound": v_unsound,
                                          "escape": tight["escape"], **{k.replace(" ", "_").replace("+", "_"): v
                                                                         for k, v in t.items()}}))
    body = "\n".join(lines)
    targets = ["Targets: sound looser than float64 by < 1e-5 of the largest bound; sound bounds verify the examples "
               f"float64 does; sound forward+backward <= {TARGET_TIME}x unsound on the CPU."]
    targets += [f"- missed: {s}" for s in misses] or ["- all met"]
    timing = ("medians over interleaved rounds, one thread" if device.type == "cpu" else
              "CUDA medians (`common.time_cuda`)")
    legend = ("`sound loose`: how much looser the sound float32 bounds are than the same relaxation in float64, "
              "over the largest bound; `fp32 error`: the unsound float32 bounds' distance from float64 (the "
              "actual rounding error), same scale; `verified`: examples whose margins' lower bounds are all "
              "positive (sound / float64 / unsound), at the radius eps / 2^k where float64 verifies closest to "
              "half the batch (labels: the digits' own, the random models' predictions; below float32's resolution "
              "of x, x -/+ eps rounds to x and the unsound bounds verify what float64 does not); times: "
              f"{timing}, the lower bounds of the margins; `x`: sound / unsound.")
    text = legend + "\n\n" + body + "\n\n" + "\n".join(targets) + "\n"
    print("\n" + text)
    if args.write_results:
        common.append_csv(BENCH, rows, env, device)
        common.update_results_md(BENCH, TITLE, text, env)


def floor(args, env) -> None:
    """``--floor``: the products' float64/float32 times and the float64 relaxation's (``sound_floor``)."""
    if args.device != "cpu":
        raise SystemExit("bench_sound.py: --floor measures the CPU floor; leave out --device")
    ops, floors = [], []
    wanted = [s.strip().upper() for s in args.methods.split(",")]
    for name in args.models.split(","):
        m = make_model(name, args.batch or DEFAULT_BATCH[name], args.seed)
        ops += sound_floor.op_rows(name, m.model, m.x, args.rounds)
        methods = [mt for mt in METHODS if mt.upper() in wanted and mt in m.methods]
        floors += sound_floor.floor_rows(name, m.model, m.x, m.y, m.eps, methods, args.rounds)
    text = "\n".join([sound_floor.OP_HEAD, *ops, "", sound_floor.FLOOR_HEAD, *floors, "",
                      "floor: every GEMM and convolution in float64 and nothing else (sound_floor.py's docstring); "
                      "medians over interleaved rounds, one thread"]) + "\n"
    print("\n" + text)
    if args.write_results:
        common.update_results_md(BENCH, FLOOR_TITLE, text, env, variant="floor")


if __name__ == "__main__":
    main()
