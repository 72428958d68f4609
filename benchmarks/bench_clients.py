"""The published projects' own training and certification steps: their call path vs the same calls on robustkern.

The projects are not installable packages, so "original" is robustkern's faithful plain-PyTorch
re-implementation of each project's call path (``robustkern.reference``: ``bound_sequential``,
``smooth_train``, ``flatness``, ``macer``, ``smoothing``), written from the published code and tested equal to it
to 1e-6 (``tests/clients``); "robustkern" is the same script with the one import changed to
``robustkern.compat.<project>``. Models are the projects' own (``robustkern.reference.published.seed_models``), at the
batch sizes of their configs unless ``--small`` (CPU smoke run).

Cases (one training step = loss, backward and optimiser step; certification = one image)
  crown_ibp   CROWN-IBP train.py step, bound_type "crown-interval" (IBP + CROWN-IBP backward; the configs'
              default) and "interval" (IBP only): MNIST cnn_2layer (mnist_crown.json, batch 256; and the batch
              32 of a small run), CIFAR cnn_2layer width 2 (cifar_crown.json, batch 128). Two more providers
              for information: robustkern's own API, ``robustkern.bounds.crown_ibp_loss`` (``native``,
              ``sound=False``) and with ``sound=True`` (``native-sound``: the bounds computed in float64 and
              rounded outwards, the gradient that of the float32 bounds; the original has no such
              guarantee). And train.py's evaluation (``verify crown-interval``: the same bounds under
              no_grad, where a certificate is made).
  loss_landscape  Loss Landscape Matters' step (CROWN-IBP's, keeping the lower bound's decomposition), its
              CIFAR cnn_4layer (config cifar10.json: width 8, linear 512, batch 128; ``--small``: width 2)
  trades_rs   TRADES + random smoothing train_trades.py step (L2, 10 steps, eps 0.435, noise sd 0.12) and
              certify_trades.py on one image (N0, N, batch 1000), on MNIST SmallCNN
  macer       MACER's step (k = 16, batch 64) on its MNIST LeNet, and its soft certification (N0 100, N, batch
              1000, beta 16)
  lfr         LFR_loss step (MNIST_defense.py: eps 0.3, step 0.01, 40 steps, lambda 0.02, batch 128) on SmallCNN

Before timing, each robustkern step's loss (or certificate) is compared with the original's on the same
weights and seed; the difference goes into the note.

    PYTHONPATH=python:. python benchmarks/bench_clients.py --write-results
    PYTHONPATH=python:. python benchmarks/bench_clients.py --small          # seconds: smaller sizes
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from robustkern.reference.published import seed_models as sm  # noqa: E402

BENCH = "clients"
CLIENTS = ("crown_ibp", "loss_landscape", "trades_rs", "macer", "lfr")
NOTE = ("original = robustkern's faithful plain-PyTorch re-implementation of the project's call path (the "
        "projects are not installable packages); robustkern = the same script with the import changed to "
        "robustkern.compat")


# ----------------------------------------------------------------------------------------------- CROWN-IBP
def _margins(labels, num_class=10):
    eye = torch.eye(num_class, device=labels.device)
    c = eye[labels].unsqueeze(1) - eye.unsqueeze(0)
    keep = labels.unsqueeze(1) != torch.arange(num_class, device=labels.device).unsqueeze(0)
    sa = torch.tensor([[j if j < i else j + 1 for j in range(num_class - 1)] for i in range(num_class)],
                      device=labels.device)
    return c[keep].view(labels.shape[0], num_class - 1, num_class), sa[labels]


def _crown_ibp_step(call, x, y, eps, bound_type, beta=0.5, kappa=0.5):
    """The loss of CROWN-IBP's train.py for one batch (robust_natural, bounded input in [0, 1])."""
    C, sa = _margins(y)
    x_U, x_L = torch.clamp(x + eps, max=1.0), torch.clamp(x - eps, min=0.0)
    out = call("forward", x)
    kw = dict(norm=math.inf, x_U=x_U, x_L=x_L, eps=eps, C=C)
    ilb = call("interval_range", **kw)[1]
    lb = ilb if bound_type == "interval" else call("backward_range", **kw)[2] * beta + ilb * (1 - beta)
    lb = torch.zeros(x.shape[0], 10, device=x.device).scatter(1, sa, lb)
    return (1 - kappa) * F.cross_entropy(-lb, y) + kappa * F.cross_entropy(out, y)


def crown_ibp_cases(args, device, module="crown_ibp"):
    import importlib

    from robustkern.bounds import BoundedModule, crown_ibp_loss
    from robustkern.reference.published.crown_ibp import BoundSequentialReference

    compat = importlib.import_module(f"robustkern.compat.{module}")
    if module == "crown_ibp":
        models = [("mnist cnn_2layer_width_1", lambda: sm.model_cnn_2layer(1, 28, 1, 128), 1, 28, 0.3, 32),
                  ("mnist cnn_2layer_width_1", lambda: sm.model_cnn_2layer(1, 28, 1, 128), 1, 28, 0.3, 256),
                  ("cifar cnn_2layer_width_2", lambda: sm.model_cnn_2layer(3, 32, 2, 256), 3, 32, 8 / 255, 128)]
        kinds = ("crown-interval", "interval")
    else:
        width = 2 if args.small else 8
        models = [(f"cifar cnn_4layer_linear_512_width_{width}", lambda: sm.model_cnn_4layer(3, 32, width, 512), 3,
                   32, 8 / 255, 128)]
        kinds = ("crown-interval",)
    for name, make, ch, dim, eps, batch in models:
        batch = min(batch, 16) if args.small else batch
        torch.manual_seed(0)
        base = make().to(device)
        x = torch.rand(batch, ch, dim, dim, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for kind in kinds:
            def original(model, kind=kind):
                ref = BoundSequentialReference(model)
                return lambda: _crown_ibp_step(lambda opt, *a, **k: ref.forward(*a) if opt == "forward" else
                                               getattr(ref, opt)(**k), x, y, eps, kind)

            def ours(model, kind=kind):
                bs = compat.BoundSequential.convert(model, {})
                return bs, lambda: _crown_ibp_step(lambda opt, *a, **k: bs(*a, method_opt=opt, **k), x, y, eps,
                                                   kind)

            providers = {"original": original, "robustkern": ours}
            if module == "crown_ibp":
                for prov, sound in (("native", False), ("native-sound", True)):
                    def native(model, sound=sound, kind=kind):
                        bm = BoundedModule(model, x)
                        beta = 0.0 if kind == "interval" else 0.5
                        return lambda: crown_ibp_loss(bm, x, y, eps, beta=beta, kappa=0.5, sound=sound)[0]
                    providers[prov] = native
            yield {"client": module, "model": name, "batch": batch, "step": f"train {kind}"}, base, providers
            if module == "crown_ibp" and kind == "crown-interval":
                # the evaluation of train.py (under no_grad): where the certificate is made, so where
                # robustkern's sound bounds are compared with the original's unsound ones
                yield ({"client": module, "model": name, "batch": batch, "step": f"verify {kind}"}, base,
                       {prov: _without_grad(make) for prov, make in providers.items()})


def _without_grad(make):
    """A provider whose step runs under ``torch.no_grad`` (an evaluation: no graph, no backward)."""
    def provider(model):
        built = make(model)
        owner, fn = built if isinstance(built, tuple) else (None, built)

        def step():
            with torch.no_grad():
                return fn()
        return step if owner is None else (owner, step)
    return provider


# ----------------------------------------------------------------------------------------------- TRADES + RS
def trades_cases(args, device):
    from robustkern.compat import trades_smoothing as compat
    from robustkern.reference.published.smooth_train import trades_smoothing_loss_reference
    from robustkern.reference.published.smoothing import TradesSmoothReference

    batch = 16 if args.small else args.trades_batch
    torch.manual_seed(0)
    base = sm.SmallCNN().to(device)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    noise = torch.randn_like(x) * 0.12
    mask = torch.ones_like(x)
    kw = dict(step_size=0.007, epsilon=0.435, perturb_steps=10, beta=6.0, distance="l_2")
    providers = {
        "original": lambda m: (lambda opt=torch.optim.SGD(m.parameters(), lr=0.0):
                               trades_smoothing_loss_reference(m, x, y, opt, noise, mask, **kw)),
        "robustkern": lambda m: (lambda opt=torch.optim.SGD(m.parameters(), lr=0.0):
                                 compat.trades_loss(m, x, y, opt, noise, mask, **kw)),
    }
    yield {"client": "trades_rs", "model": "mnist SmallCNN", "batch": batch, "step": "train l_2, 10 steps"}, base, \
        providers
    n = 2000 if args.small else args.certify_n
    img, img_mask = x[0], torch.ones_like(x[0])
    cert = {"original": lambda m: (lambda: TradesSmoothReference(m.eval(), 10, 0.12).certify(
                img, img_mask, 100, n, 0.001, 1000)),
            "robustkern": lambda m: (lambda: compat.Smooth(m.eval(), 10, 0.12, rng="torch").certify(
                img, img_mask, 100, n, 0.001, 1000)),
            "robustkern-philox": lambda m: (lambda: compat.Smooth(m.eval(), 10, 0.12).certify(
                img, img_mask, 100, n, 0.001, 1000, seed=0))}
    yield {"client": "trades_rs", "model": "mnist SmallCNN", "batch": 1000, "step": f"certify N0=100 N={n}"}, \
        base, cert


# ----------------------------------------------------------------------------------------------- MACER
def macer_cases(args, device):
    from robustkern.compat import macer as compat
    from robustkern.reference.published.macer import MacerSmoothReference, macer_train_reference

    batch = 8 if args.small else 64
    torch.manual_seed(0)
    base = sm.LeNet().to(device)
    loader = [(torch.rand(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device))]
    hyper = (0.25, 12.0, 16, 16.0, 8.0, 10)
    providers = {
        "original": lambda m: (lambda opt=torch.optim.SGD(m.parameters(), lr=0.0):
                               macer_train_reference(*hyper, m, loader, opt, device)),
        "robustkern": lambda m: (lambda opt=torch.optim.SGD(m.parameters(), lr=0.0):
                                 compat.macer_train(*hyper, m, loader, opt, device, verbose=False)),
    }
    yield {"client": "macer", "model": "mnist LeNet", "batch": batch, "step": "train k=16"}, base, providers
    n = 2000 if args.small else args.certify_n
    img = loader[0][0][0]
    cert = {"original": lambda m: (lambda: MacerSmoothReference(m.eval(), 10, 0.25, "soft", 16.0).certify(
                img, 100, n, 0.001, 1000)),
            "robustkern": lambda m: (lambda: compat.Smooth(m.eval(), 10, 0.25, device, "soft", 16.0,
                                                           rng="torch").certify(img, 100, n, 0.001, 1000)),
            "robustkern-philox": lambda m: (lambda: compat.Smooth(m.eval(), 10, 0.25, device, "soft", 16.0)
                                            .certify(img, 100, n, 0.001, 1000, seed=0))}
    yield {"client": "macer", "model": "mnist LeNet", "batch": 1000, "step": f"certify soft N0=100 N={n}"}, base, cert


# ----------------------------------------------------------------------------------------------- LFR
def lfr_cases(args, device):
    from robustkern.compat.lfr import LFR_loss
    from robustkern.reference.published.lfr import lfr_loss_reference

    batch = 16 if args.small else 128
    steps = 3 if args.small else args.lfr_steps
    torch.manual_seed(0)
    base = sm.SmallCNN().to(device)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    kw = dict(step_size=0.01, epsilon=0.3, perturb_steps=steps)

    def original(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        return lambda: lfr_loss_reference(m, x, y, 0.02, torch.randn(x.shape).to(x), opt, **kw)[0]

    def ours(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        return lambda: LFR_loss(m, x, y, 0.02, opt, verbose=False, **kw)[0]

    yield {"client": "lfr", "model": "mnist SmallCNN", "batch": batch, "step": f"train {steps} steps"}, base, \
        {"original": original, "robustkern": ours}


# ----------------------------------------------------------------------------------------------- driver
def _value(out):
    """A comparable result of a step: ``("loss", value)``, ``("certificate", (label, radius))`` or None."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], int):
        return "certificate", (out[0], float(out[1]))
    if isinstance(out, tuple):
        out = out[0]
    return ("loss", float(out.detach())) if isinstance(out, torch.Tensor) else None


def _agreement(fns, base) -> tuple[str, float]:
    """The robustkern step's result against the original's, same weights and seed; and the original's time
    for that call (ms, first call: an over-estimate)."""
    vals = {}
    for prov in ("original", "robustkern"):
        built = fns[prov](copy.deepcopy(base))
        torch.manual_seed(7)
        t0 = time.perf_counter()
        vals[prov] = _value((built[1] if isinstance(built, tuple) else built)())
        if prov == "original":
            ms = (time.perf_counter() - t0) * 1e3
    a, b = vals["original"], vals["robustkern"]
    if a is None or b is None:
        return "", ms
    if a[0] == "loss":
        return f"loss rel. diff vs original {abs(a[1] - b[1]) / max(abs(a[1]), 1e-12):.1e}", ms
    if a[1][0] != b[1][0]:
        return f"certificate differs: {a[1]} vs {b[1]}", ms
    return f"same label, radius rel. diff {abs(a[1][1] - b[1][1]) / max(abs(a[1][1]), 1e-12):.1e}", ms


def _training_step(fn, params, device):
    def step():
        for p in params:
            p.grad = None
        out = fn()
        loss = out[0] if isinstance(out, tuple) else out
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="smaller batches and models (smoke run)")
    ap.add_argument("--trades-batch", type=int, default=64, help="TRADES+RS batch (train_trades.py: 256)")
    ap.add_argument("--lfr-steps", type=int, default=40)
    ap.add_argument("--certify-n", type=int, default=20000, help="N of the certification cases (configs: 100000)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds at least (short steps get more)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: leave torch's default)")
    ap.add_argument("--write-results", action="store_true")
    common.add_output_options(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    env = common.start(device, args.threads if device.type == "cpu" else 0, args=args)
    makers = {"crown_ibp": lambda: crown_ibp_cases(args, device),
              "loss_landscape": lambda: crown_ibp_cases(args, device, "loss_landscape"),
              "trades_rs": lambda: trades_cases(args, device), "macer": lambda: macer_cases(args, device),
              "lfr": lambda: lfr_cases(args, device)}
    rows = []
    for client in args.clients.split(","):
        for case, base, fns in makers[client]():
            note, ms = _agreement(fns, base)
            # short steps get more rounds (about 2 s per provider, at most 40): shared-machine noise is large
            # against a few milliseconds
            rounds = max(args.rounds, min(40, int(2000 / max(ms, 1e-3))))
            steps = {}
            for prov, make in fns.items():
                model = copy.deepcopy(base)
                built = make(model)
                owner, fn = built if isinstance(built, tuple) else (model, built)
                steps[prov] = _training_step(fn, list(owner.parameters()), device)
            timings = common.time_cpu(steps, rounds=rounds, warmup=1) if device.type == "cpu" else {
                k: common.time_cuda(f) for k, f in steps.items()}
            for prov, t in timings.items():
                rows.append(common.Row(case=dict(case), provider=prov, timing=t,
                                       note=note if prov == "robustkern" else ""))
            print(f"{case}: " + ", ".join(f"{p} {t.median_ms:.1f} ms" for p, t in timings.items()), flush=True)
    keys = ["client", "model", "batch", "step"]
    text = common.table(rows, keys, device, ours="robustkern", floor="original")
    lines = []
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(tuple(r.case[k] for k in keys), {})[r.provider] = r
    for key, provs in by_case.items():
        speed = common.ratio(provs["original"], provs["robustkern"])
        verdict = "not slower" if speed >= 1.0 else ("parity within 5% run-to-run noise" if speed >= 0.95 else
                                                     "SLOWER")
        lines.append(f"- {' / '.join(map(str, key))}: original / robustkern = {speed:.2f} ({verdict})")
    body = "\n".join([text, "", NOTE + ".", "", *lines])
    print(body)
    if args.write_results:
        common.append_csv(BENCH, rows, env, device)
        common.update_results_md(BENCH, "The published projects' steps: original call path vs robustkern.compat",
                                 body, env, variant="small" if args.small else "config sizes")


if __name__ == "__main__":
    main()
