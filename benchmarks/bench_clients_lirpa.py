"""auto_LiRPA's ``examples/vision/simple_training.py`` on robustkern: the example's training batch through the
``robustkern.compat.auto_lirpa`` facade against the same quantities through robustkern's own API, side by side.

Models: the example's own definitions (``examples/vision/models/feedforward.py`` and ``resnet.py``, re-written
here from reading them: ``EXAMPLE_MODELS``), on its default data set's shapes (MNIST, 1x28x28, no
normalisation), batch 256 (its default), L-inf eps 0.15 (half its default target 0.3, so the CROWN-IBP mix
factor is 0.5), 10 classes.

Steps, forward + backward of the example's batch body (``example_batch``: C built as the example builds it, the
input box clipped to the data range, ``model(x)``, then by ``bound_type``):
  IBP         ``compute_bounds(IBP=True, C=c, method=None)``
  CROWN-IBP   the same, then ``compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)`` (CROWN-IBP
              over the stored IBP bounds) and ``lb = clb * factor + ilb * (1 - factor)``
  CROWN       (``--steps``) ``compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)`` alone: full CROWN
and the robust cross-entropy of ``lb``.

Providers
  facade      ``example_batch`` with ``from robustkern.compat.auto_lirpa import ...`` (the one-line switch)
  own         robustkern's own API: ``bm(x)`` then ``crown_ibp_loss(bm, x, y, eps, beta=factor, sound=False)``
              (``beta=0``: IBP) (``own_batch``); the floor for the facade's overhead
  auto_lirpa  ``example_batch`` on auto_LiRPA itself, when it imports (``--lirpa-path``, paths separated by
              ``os.pathsep``, or ``$AUTO_LIRPA_PATH``; see README.md)

Before timing, the facade's loss is checked against own's (the client test asserts it to 1e-6). ``x facade``:
provider median over the facade's (above 1: the facade is faster); ``x own``: over own's (the facade's
overhead, which includes the example's own per-batch preamble: C, the clipped box, the perturbation object).

    PYTHONPATH=python:. python benchmarks/bench_clients_lirpa.py --threads 1 [--write-results]
    PYTHONPATH=python:. python benchmarks/bench_clients_lirpa.py --models mlp_3layer --batch 32 --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from robustkern.bounds import BoundedModule, crown_ibp_loss  # noqa: E402

BENCH = "clients_lirpa"
TITLE = "auto_LiRPA simple_training.py through the facade (`bench_clients_lirpa.py`)"
PROVIDERS = ["facade", "own", "auto_lirpa"]
STEPS = ["IBP", "CROWN-IBP"]  # --steps also takes CROWN (the example's full-CROWN bound_type) and CROWN-FAST
DEFAULT_MODELS = "mlp_3layer,cnn_4layer,cnn_6layer,resnet"
NUM_CLASSES = 10
SHORT_S = 1.0   # steps faster than this (first call, seconds) are timed over --short-rounds rounds


# ------------------------------------------------------------------------------------- the example's models
class FlatMLP(nn.Module):
    """``mlp_2layer`` / ``mlp_3layer`` / ``mlp_5layer``: flatten, then Linear+ReLU layers of the given widths, then
    a Linear to 10 (``torch.flatten`` and ``F.relu`` in forward, as the example writes them)."""

    def __init__(self, in_features: int, widths: list[int]):
        super().__init__()
        sizes = [in_features] + widths + [NUM_CLASSES]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        h = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return self.layers[-1](h)


class CNN4Layer(nn.Module):
    """``cnn_4layer(in_ch, in_dim, width=2, linear_size=256)``: two 4x4 stride-2 convolutions (4w, 8w channels,
    padding 1), then Linear to ``linear_size`` and to 10, ReLU between."""

    def __init__(self, in_ch: int, in_dim: int, width: int = 2, linear_size: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 4 * width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * width * (in_dim // 4) ** 2, linear_size)
        self.fc2 = nn.Linear(linear_size, NUM_CLASSES)

    def forward(self, x):
        h = torch.flatten(F.relu(self.conv2(F.relu(self.conv1(x)))), 1)
        return self.fc2(F.relu(self.fc1(h)))


def conv_stack(in_ch: int, in_dim: int, width: int, linear_size: int, depth: int, bn: bool = False) -> nn.Sequential:
    """``cnn_6layer`` (depth 4, width 32, linear 256) and ``cnn_7layer`` (depth 5, width 64, linear 512): 3x3
    convolutions of ``w, w, 2w (stride 2), 2w, ...`` channels, padding 1, ReLU after each (BatchNorm before
    it for ``cnn_7layer_bn``), then flatten, Linear to ``linear_size``, ReLU, Linear to 10."""
    chans = [in_ch, width, width] + [2 * width] * (depth - 2)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(chans, chans[1:])):
        layers.append(nn.Conv2d(a, b, 3, stride=2 if i == 2 else 1, padding=1))
        layers += [nn.BatchNorm2d(b)] if bn else []
        layers.append(nn.ReLU())
    layers += [nn.Flatten(), nn.Linear((in_dim // 2) ** 2 * 2 * width, linear_size), nn.ReLU(),
               nn.Linear(linear_size, NUM_CLASSES)]
    return nn.Sequential(*layers)


class Dense(nn.Module):
    """The example ResNet's ``Dense(*layers)``: given the outputs of all earlier layers, applies its layers to the
    last ``len(layers)`` of them (a None layer skips one) and returns the ``sum()`` of the results."""

    def __init__(self, *layers):
        super().__init__()
        self.Ws = nn.ModuleList(list(layers))

    def forward(self, *xs):
        xs = xs[-len(self.Ws):]
        return sum(W(x) for x, W in zip(xs, self.Ws) if W is not None)


class DenseSequential(nn.Sequential):
    """A Sequential whose ``Dense`` members see every earlier output (the others see the previous one)."""

    def forward(self, x):
        outs = [x]
        for module in self._modules.values():
            outs.append(module(*outs) if isinstance(module, Dense) else module(outs[-1]))
        return outs[-1]


def resnet(in_ch: int = 3, in_dim: int = 32, width: int = 1, mult: int = 16, N: int = 1) -> DenseSequential:
    """``model_resnet`` (Wong et al. 2018's ResNet as auto_LiRPA's example writes it): a 3x3 stem (padding 3
    on 28x28 inputs so that it yields 32x32), residual blocks of ``Dense`` branches (a 3x3 or, downsampling,
    4x4 stride-2 convolution; then a 1x1 / 2x2 stride-2 shortcut plus a 3x3 convolution), ``N + 1`` blocks at
    ``mult * width`` channels, one block each at 2x and 4x (downsampling), then Linear 8*8*4w*mult -> 1000 ->
    10; convolutions He-initialised with zero bias."""
    def block(cin, cout, k, down):
        k1, stride, k_skip = (4, 2, 2) if down else (3, 1, 1)
        return [Dense(nn.Conv2d(cin, cout, k1, stride=stride, padding=1)), nn.ReLU(),
                Dense(nn.Conv2d(cin, cout, k_skip, stride=stride, padding=0), None,
                      nn.Conv2d(cout, cout, k, stride=1, padding=1)), nn.ReLU()]

    c = mult * width
    layers = [nn.Conv2d(in_ch, mult, 3, stride=1, padding=3 if in_dim == 28 else 1), nn.ReLU()]
    layers += block(mult, c, 3, False)
    for _ in range(N):
        layers += block(c, c, 3, False)
    layers += block(c, 2 * c, 3, True)
    for _ in range(N - 1):
        layers += block(2 * c, 2 * c, 3, False)
    layers += block(2 * c, 4 * c, 3, True)
    for _ in range(N - 1):
        layers += block(4 * c, 4 * c, 3, False)
    layers += [nn.Flatten(), nn.Linear(4 * c * 8 * 8, 1000), nn.ReLU(), nn.Linear(1000, NUM_CLASSES)]
    model = DenseSequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                m.bias.data.zero_()
    return model


EXAMPLE_MODELS = {
    "mlp_2layer": lambda in_ch, in_dim: FlatMLP(in_ch * in_dim * in_dim, [256]),
    "mlp_3layer": lambda in_ch, in_dim: FlatMLP(in_ch * in_dim * in_dim, [256, 128]),
    "mlp_5layer": lambda in_ch, in_dim: FlatMLP(in_ch * in_dim * in_dim, [256, 256, 256, 128]),
    "cnn_4layer": CNN4Layer,
    "cnn_6layer": lambda in_ch, in_dim: conv_stack(in_ch, in_dim, 32, 256, 4),
    "cnn_7layer": lambda in_ch, in_dim: conv_stack(in_ch, in_dim, 64, 512, 5),
    "cnn_7layer_bn": lambda in_ch, in_dim: conv_stack(in_ch, in_dim, 64, 512, 5, bn=True),
    "resnet": resnet,
}


# --------------------------------------------------------------------------------- the example's batch body
def example_spec(labels: torch.Tensor, data: torch.Tensor, num_class: int = NUM_CLASSES) -> torch.Tensor:
    """The example's C: rows ``e_y - e_j`` of every class ``j``, the row ``j = y`` removed (B, K-1, K)."""
    eye = torch.eye(num_class).type_as(data)
    c = eye[labels].unsqueeze(1) - eye.unsqueeze(0)
    keep = labels.unsqueeze(1) != torch.arange(num_class).type_as(labels).unsqueeze(0)
    return c[keep].view(data.size(0), num_class - 1, num_class)


def example_batch(lib, model, data, labels, eps: float, max_eps: float, bound_type: str,
                  mean=torch.tensor([0.0]), std=torch.tensor([1.0])) -> dict:
    """The body of simple_training.py's ``Train`` loop for one batch (L-inf norm), on ``lib`` (the facade
    package or auto_LiRPA): ``loss`` (robust CE, or the clean CE when eps < 1e-20), ``regular_ce``, ``lb`` (None
    for the clean step) and ``output``."""
    c = example_spec(labels, data)
    data_max = ((1.0 - mean) / std).reshape(1, -1, 1, 1)
    data_min = ((0.0 - mean) / std).reshape(1, -1, 1, 1)
    data_ub = torch.min(data + (eps / std).view(1, -1, 1, 1), data_max)
    data_lb = torch.max(data - (eps / std).view(1, -1, 1, 1), data_min)
    x = lib.BoundedTensor(data, lib.PerturbationLpNorm(norm=math.inf, eps=eps, x_L=data_lb, x_U=data_ub))
    output = model(x)
    regular_ce = F.cross_entropy(output, labels)
    if eps < 1e-20:
        return {"loss": regular_ce, "regular_ce": regular_ce, "lb": None, "output": output}
    if bound_type == "IBP":
        lb, _ = model.compute_bounds(IBP=True, C=c, method=None)
    elif bound_type == "CROWN":
        lb, _ = model.compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)
    elif bound_type == "CROWN-IBP":
        factor = (max_eps - eps) / max_eps
        ilb, _ = model.compute_bounds(IBP=True, C=c, method=None)
        if factor < 1e-5:
            lb = ilb
        else:
            clb, _ = model.compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)
            lb = clb * factor + ilb * (1 - factor)
    elif bound_type == "CROWN-FAST":
        model.compute_bounds(IBP=True, C=c, method=None)
        lb, _ = model.compute_bounds(IBP=False, C=c, method="backward", bound_upper=False)
    else:
        raise ValueError(f"example_batch: bound_type must be IBP, CROWN, CROWN-IBP or CROWN-FAST, got {bound_type!r}")
    padded = torch.cat((torch.zeros(lb.size(0), 1, dtype=lb.dtype, device=lb.device), lb), dim=1)
    robust_ce = F.cross_entropy(-padded, torch.zeros(lb.size(0), dtype=torch.int64, device=lb.device))
    return {"loss": robust_ce, "regular_ce": regular_ce, "lb": lb, "output": output}


def own_batch(bm: BoundedModule, data, labels, eps: float, max_eps: float, bound_type: str) -> dict:
    """The same quantities through robustkern's own API (data in [0, 1], no normalisation): CROWN-IBP's loss
    with ``beta`` = the example's mix factor (IBP: 0; CROWN-FAST: 1; below 1e-5: 0), or CROWN's bounds."""
    if eps < 1e-20:
        output = bm(data)
        ce = F.cross_entropy(output, labels)
        return {"loss": ce, "regular_ce": ce, "lb": None, "output": output}
    if bound_type == "CROWN":
        from robustkern.bounds import margin_spec, robust_cross_entropy
        output = bm(data)
        lb, _ = bm.compute_bounds(data, eps, C=margin_spec(labels, NUM_CLASSES), method="CROWN", sound=False,
                                  bound_upper=False)
        return {"loss": robust_cross_entropy(lb), "regular_ce": F.cross_entropy(output, labels), "lb": lb,
                "output": output}
    factor = {"IBP": 0.0, "CROWN-FAST": 1.0}.get(bound_type, (max_eps - eps) / max_eps)
    loss, info = crown_ibp_loss(bm, data, labels, eps, beta=0.0 if factor < 1e-5 else factor, sound=False)
    return {"loss": loss, "regular_ce": info["natural"], "lb": info["lb"], "output": info["logits"]}


# ------------------------------------------------------------------------------------------------ providers
def import_lib(name: str, lirpa_path: str | None):
    """The package a provider's script imports from: the facade, or auto_LiRPA (``common.Unavailable``-like
    ``RuntimeError`` when it does not import)."""
    if name == "facade":
        return importlib.import_module("robustkern.compat.auto_lirpa")
    for p in reversed((lirpa_path or "").split(os.pathsep)):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        return importlib.import_module("auto_LiRPA")
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        raise RuntimeError(f"auto_LiRPA not importable ({type(e).__name__}: {e})") from None


def setup(provider: str, model: nn.Module, data, labels, eps, max_eps, step, lirpa_path):
    """``(fn, params)``: ``fn()`` runs one batch and returns the loss; ``params`` are the model's parameters."""
    if provider == "own":
        bm = BoundedModule(model, data)
        return (lambda: own_batch(bm, data, labels, eps, max_eps, step)["loss"]), list(model.parameters())
    lib = import_lib(provider, lirpa_path)
    # auto_LiRPA copies the parameters of the module it is given: each provider gets its own copy
    mine = model if provider == "facade" else copy.deepcopy(model)
    lirpa = lib.BoundedModule(mine, torch.zeros(2, *data.shape[1:]), device=data.device,
                              bound_opts={"activation_bound_option": None, "conv_mode": "patches"})
    lirpa.train()
    return (lambda: example_batch(lib, lirpa, data, labels, eps, max_eps, step)["loss"]), list(lirpa.parameters())


def _fwdbwd(fn, params):
    for p in params:
        p.grad = None
    fn().backward()


def run(args) -> list[common.Row]:
    device = torch.device(args.device)
    rows = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = EXAMPLE_MODELS[model_name](1, 28).to(device).train()
        data = torch.rand(args.batch, 1, 28, 28, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
        for step in args.steps.split(","):
            fns, notes = {}, {}
            losses, first_s = {}, 0.0
            for name in args.providers.split(","):
                try:
                    fn, params = setup(name, model, data, labels, args.eps, args.max_eps, step, args.lirpa_path)
                    t0 = time.perf_counter()
                    losses[name] = float(fn().detach())
                    first_s = max(first_s, time.perf_counter() - t0)
                except RuntimeError as e:
                    notes[name] = str(e)[:120]
                    continue
                except Exception as e:  # noqa: BLE001
                    notes[name] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                    traceback.print_exc()
                    continue
                fns[name] = (lambda fn=fn, params=params: _fwdbwd(fn, params))
            if "facade" in losses and "own" in losses:
                rel = abs(losses["facade"] - losses["own"]) / max(abs(losses["own"]), 1e-30)
                notes["facade"] = f"loss {losses['facade']:.6g}, own's {losses['own']:.6g} (rel diff {rel:.1e})"
            if "auto_lirpa" in losses and "facade" in losses:
                notes["auto_lirpa"] = f"loss {losses['auto_lirpa']:.6g}"
            if device.type == "cuda":
                timings = {n: common.time_cuda(f) for n, f in fns.items()}
            else:
                # short steps get more rounds: their medians move with the load of a shared machine
                rounds = args.rounds if first_s > SHORT_S else max(args.rounds, args.short_rounds)
                timings = common.time_cpu(fns, rounds=rounds) if fns else {}
            key = {"model": model_name, "batch": args.batch, "step": step + " fwd+bwd"}
            for name in args.providers.split(","):
                rows.append(common.Row(key, name, timings.get(name), None, notes.get(name, "")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"from {', '.join(EXAMPLE_MODELS)}")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", default=",".join(STEPS), help="bound types: IBP, CROWN-IBP, CROWN-FAST, CROWN")
    ap.add_argument("--eps", type=float, default=0.15)
    ap.add_argument("--max-eps", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (CPU)")
    ap.add_argument("--short-rounds", type=int, default=15,
                    help=f"rounds for steps whose first call took under {SHORT_S} s (CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--lirpa-path", default=os.environ.get("AUTO_LIRPA_PATH", "/work/scratch/lirpa"))
    ap.add_argument("--no-save", action="store_true", help="do not append the rows to results/clients_lirpa.csv")
    ap.add_argument("--write-results", action="store_true")
    common.add_output_options(ap)
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="CPU: robustkern.cpu_malloc.keep_freed_memory() first (what the robustkern command does: no "
                         "page faults of re-allocated tensors), for every provider alike")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in EXAMPLE_MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(EXAMPLE_MODELS)}")
    bad = [s for s in args.steps.split(",") if s not in ("IBP", "CROWN-IBP", "CROWN-FAST", "CROWN")]
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from IBP, CROWN-IBP, CROWN-FAST, CROWN")
    device = torch.device(args.device)
    if args.keep_freed_memory:
        from robustkern.cpu_malloc import keep_freed_memory
        if device.type != "cpu" or not keep_freed_memory():
            ap.error("--keep-freed-memory is for the CPU and needs glibc's mallopt")
    env = common.start(device, args.threads if device.type == "cpu" else 0, args)
    rows = run(args)
    body = common.table(rows, ["model", "batch", "step"], device, "facade", "own")
    print(body)
    if not args.no_save:
        common.append_csv(BENCH, rows, env, device)
    if args.write_results:
        intro = (f"{device.type.upper()}, the example's MNIST shapes, batch {args.batch}, L-inf eps {args.eps} of "
                 f"{args.max_eps} (CROWN-IBP factor {(args.max_eps - args.eps) / args.max_eps:g}), models in "
                 "training mode. `x facade` = provider median / facade median; `x own` = over robustkern's own "
                 "API (the facade's overhead; the facade and auto_lirpa rows include the example's own per-batch "
                 "preamble: building C, the clipped box and the perturbation, which own does not need). "
                 "auto_lirpa: auto_LiRPA 0.7.1 itself running the same batch body. "
                 f"Rounds: {args.rounds}, {args.short_rounds} for steps under {SHORT_S:g} s."
                 + (" Freed memory kept in the process (`--keep-freed-memory`) for every provider alike."
                    if args.keep_freed_memory else "") + "\n\n")
        steps = "" if args.steps == ",".join(STEPS) else f", {args.steps}"
        kept = ", keep-freed-memory" if args.keep_freed_memory else ""
        common.update_results_md(BENCH, TITLE, intro + body, env, variant=f"batch {args.batch}{steps}{kept}")


if __name__ == "__main__":
    main()
