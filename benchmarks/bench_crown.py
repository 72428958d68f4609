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

    PYTHONPATH=python:. python benchmarks/bench_crown.py --threads 1 [--write-results]
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
from bench_ibp import Unavailable, import_auto_lirpa, make_case  # noqa: E402

import robustkern.bounds.crown as rk_crown  # noqa: E402
from robustkern.bounds import BoundedModule, crown_ibp_loss, robust_cross_entropy  # noqa: E402
from robustkern.reference import crown as ref_crown  # noqa: E402

BENCH = "crown"
PROVIDERS = ["plain", "robustkern-ibp", "robustkern", "robustkern-lf", "eager", "auto_lirpa", "auto_lirpa-lf"]


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
        bm = LBM(copy.deepcopy(model).eval(), torch.zeros_like(case.x[:1]),
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
                 bound_opts={"loss_fusion": True, "forward_before_compute_bounds": True})
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"loss fusion did not build ({type(e).__name__}: {str(e)[:80]})") from None
    bm.train(model.training)
    xb = BoundedTensor(case.x, ptb)
    wrapper = bm

    def loss():
        _, ub = wrapper.compute_bounds(x=(xb, case.y), method="CROWN-IBP", bound_lower=False)
        return torch.log(ub).mean()
    return loss, list(bm.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cifar_medium:padding=1,cnn_7layer_bn")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--lirpa-path", default=os.environ.get("AUTO_LIRPA_PATH", "/work/scratch/lirpa"))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = common.Environment.capture(device)
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
            timings = common.time_cpu(fns, rounds=args.rounds) if fns else {}
            key = {"model": model_name, "batch": args.batch, "mode": mode}
            for name in args.providers.split(","):
                mem = None
                if name in fns and mode == "fwd+bwd":
                    mem = common.saved_tensor_bytes(lambda n=name: fns[n](), exclude=params[name])
                rows.append(common.Row(key, name, timings.get(name), mem, notes.get(name, "")))
    body = common.table(rows, ["model", "batch", "mode"], device, "robustkern", "plain")
    print(body)
    common.append_csv(BENCH, rows, env, device)
    if args.write_results:
        intro = ("CPU, small batch (" + str(args.batch) + "), L-inf eps 2/255, 9 margin specs, BatchNorm in training "
                 "mode. GPU rows: not measured: no GPU in this session.\n\n")
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
