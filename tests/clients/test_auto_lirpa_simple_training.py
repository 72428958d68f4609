"""auto_LiRPA's ``examples/vision/simple_training.py`` with its import lines switched to
``robustkern.compat.auto_lirpa``: its ``Train`` loop replayed for a few batches (training epochs, then an
evaluation pass) on the example's own model definitions and default options, on random MNIST-shaped data. Every
batch's margin lower bounds and losses equal robustkern's own API computing the same quantities (CROWN-IBP's
loss with the example's mix factor; 1e-6), and so do the gradients the optimiser steps with (1e-4)."""
import copy

import pytest
import torch
import torch.optim as optim

from _bench import load_bench
from robustkern.bounds import BoundedModule as OwnBoundedModule
from robustkern.compat import auto_lirpa
# the example's import lines, switched
from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor  # noqa: F401
from robustkern.compat.auto_lirpa.perturbations import *  # noqa: F401,F403
from robustkern.compat.auto_lirpa.utils import MultiAverageMeter
from robustkern.compat.auto_lirpa.eps_scheduler import (LinearScheduler, AdaptiveScheduler,  # noqa: F401
                                                        SmoothedScheduler, FixedScheduler)

bench = load_bench("bench_clients_lirpa")   # the example's models and batch body, shared with the benchmark
pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("model_name, bound_type", [
    ("resnet", "CROWN-IBP"),        # the example's defaults
    ("mlp_3layer", "CROWN-IBP"),
    ("cnn_4layer", "IBP"),
    ("cnn_6layer", "CROWN-FAST"),
    ("mlp_3layer", "CROWN"),
])
def test_simple_training_loop_equals_robustkern(model_name, bound_type):
    torch.manual_seed(100)
    model_ori = bench.EXAMPLE_MODELS[model_name](1, 28)        # models.Models[args.model](in_ch=1, in_dim=28)
    ref_model = copy.deepcopy(model_ori)
    dummy_input = torch.randn(2, 1, 28, 28)
    # the example's defaults: --bound_opts None, --conv_mode patches, --lr 5e-4, SmoothedScheduler; a short ramp
    # ("start=1,length=1" instead of "start=3,length=60") so that four batches reach every branch: the clean
    # step at eps 0, the CROWN-IBP mix (eps 0.15), and the pure IBP step once eps reaches its maximum
    model = BoundedModule(model_ori, dummy_input, bound_opts={"activation_bound_option": None,
                                                              "conv_mode": "patches"}, device="cpu")
    opt = optim.Adam(model.parameters(), lr=5e-4)
    eps_scheduler = SmoothedScheduler(0.3, "start=1,length=1")
    ref_bm = OwnBoundedModule(ref_model, dummy_input)
    batch, batches = 2, 2
    data = torch.rand(2 * batches + 1, batch, 1, 28, 28)
    labels = torch.randint(0, 10, (2 * batches + 1, batch))
    seen = set()
    for t in range(1, 3):
        meter = MultiAverageMeter()
        model.train()
        eps_scheduler.train()
        eps_scheduler.step_epoch()
        eps_scheduler.set_epoch_length(batches)
        losses = []
        for i in range(batches):
            xb, yb = data[(t - 1) * batches + i], labels[(t - 1) * batches + i]
            eps_scheduler.step_batch()
            eps = eps_scheduler.get_eps()
            opt.zero_grad()
            out = bench.example_batch(auto_lirpa, model, xb, yb, eps, eps_scheduler.get_max_eps(), bound_type)
            out["loss"].backward()
            eps_scheduler.update_loss(out["loss"].item() - out["regular_ce"].item())
            meter.update("Loss", out["loss"].item(), xb.size(0))
            losses.append(out["loss"].item())
            ref_model.zero_grad()
            ref = bench.own_batch(ref_bm, xb, yb, eps, eps_scheduler.get_max_eps(), bound_type)
            ref["loss"].backward()
            _close(out["loss"], ref["loss"], f"loss, epoch {t} batch {i} eps {eps}")
            _close(out["regular_ce"], ref["regular_ce"], "clean CE")
            if out["lb"] is not None:
                _close(out["lb"], ref["lb"], f"margin lower bounds, epoch {t} batch {i}")
            for g, r in zip(_grads(model_ori.parameters()), _grads(ref_model.parameters())):
                # the input box is computed by different expressions (clamp vs the engine's clipped ball): the
                # bounds agree to rounding, which the backward pass through every layer grows to ~1e-5
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * max(1.0, float(r.abs().max())))
            factor = (0.3 - eps) / 0.3
            seen.add("clean" if eps < 1e-20 else "ibp-only" if factor < 1e-5 else "mixed")
            opt.step()
            # the reference goes on from the same weights (Adam's normalised step would turn rounding-level
            # differences of near-zero gradients into differences of up to the learning rate)
            ref_model.load_state_dict(model_ori.state_dict())
        assert meter.avg("Loss") == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert seen == {"clean", "mixed", "ibp-only"}
    # the example's evaluation pass: eval mode, no_grad, the scheduler held at its last value
    model.eval()
    ref_model.eval()
    eps_scheduler.eval()
    eps_scheduler.step_batch()
    with torch.no_grad():
        out = bench.example_batch(auto_lirpa, model, data[-1], labels[-1], eps_scheduler.get_eps(), 0.3,
                                  bound_type)
        ref = bench.own_batch(ref_bm, data[-1], labels[-1], eps_scheduler.get_eps(), 0.3, bound_type)
    _close(out["loss"], ref["loss"], "evaluation loss")
    _close(out["lb"], ref["lb"], "evaluation lower bounds")
