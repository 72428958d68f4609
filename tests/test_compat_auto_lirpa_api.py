"""robustkern.compat.auto_lirpa as a package: the submodules and names auto_LiRPA scripts import
(``perturbations``, ``utils``, ``eps_scheduler``, wrappers), the epsilon schedulers' numbers, and the one-line
errors of what is not supported."""
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from robustkern.bounds import margin_spec, smoothed_eps


# ------------------------------------------------------------------ transcriptions of auto_LiRPA's schedules
def smooth_schedule_f64(batch: int, epoch_length: int, start: int, length: int, max_eps: float,
                        mid: float = 0.25, beta: float = 4.0) -> float:
    """auto_LiRPA's SmoothedScheduler.step_batch (DeepMind IBP's smooth_schedule), written out in float64:
    ``batch`` counts from 1 over the whole run; the ramp starts at epoch ``start`` (1-based) and lasts
    ``length`` epochs; up to the switch step it grows as ``a (step - s0)^beta`` with ``a`` chosen so that the
    slope there equals the slope of the straight line from the switch value to ``max_eps`` at the end."""
    step = batch - 1
    s0 = (start - 1) * epoch_length
    s1 = (start + length - 1) * epoch_length
    sm = int((s1 - s0) * mid) + s0
    p = float(sm - s0) ** (beta - 1.0)
    a = max_eps / ((s1 - sm) * beta * p + (sm - s0) * p)
    v_mid = a * float(sm - s0) ** beta
    if step <= s0:
        return 0.0
    if step < sm:
        return a * float(step - s0) ** beta
    return min(v_mid + (max_eps - v_mid) * (step - sm) / (s1 - sm), max_eps)


def linear_schedule_f64(epoch: int, batch: int, epoch_length: int, start: int, length: int, max_eps: float):
    """auto_LiRPA's LinearScheduler: within epoch ``epoch`` (1-based) eps goes linearly, batch by batch
    (``batch`` from 1), from ``max_eps (epoch - start) / length`` to ``max_eps (epoch - start + 1) / length``
    (both capped at ``max_eps``; 0 before ``start``); eps of batch ``b`` is the start value plus ``b - 1`` steps."""
    if epoch < start:
        e0 = e1 = 0.0
    else:
        k = epoch - start
        e0, e1 = min(k * max_eps / length, max_eps), min((k + 1) * max_eps / length, max_eps)
    if batch > epoch_length:
        return e1
    return e0 + (e1 - e0) / epoch_length * (batch - 1)


@pytest.mark.parametrize("opts", [dict(start=3, length=60), dict(start=2, length=80, mid=0.4),
                                  dict(start=1, length=7, mid=0.3, beta=2.5), dict(start=5, length=1)])
def test_smoothed_scheduler_matches_auto_lirpa_formula(opts):
    from robustkern.compat.auto_lirpa.eps_scheduler import SmoothedScheduler
    epoch_length = 13
    text = ",".join(f"{k}={v}" for k, v in opts.items())
    sched = SmoothedScheduler(0.3, text)
    mid, beta = opts.get("mid", 0.25), opts.get("beta", 4.0)
    batch = 0
    for epoch in range(1, opts["start"] + opts["length"] + 3):
        sched.train()
        sched.step_epoch()
        sched.set_epoch_length(epoch_length)
        for _ in range(epoch_length):
            sched.step_batch()
            batch += 1
            want = smooth_schedule_f64(batch, epoch_length, opts["start"], opts["length"], 0.3, mid, beta)
            assert sched.get_eps() == pytest.approx(want, rel=1e-12, abs=1e-15)
            # the same ramp from the library function, in steps
            got = smoothed_eps(batch - 1, (opts["start"] - 1) * epoch_length, opts["length"] * epoch_length,
                               0.3, mid, beta)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
        sched.eval()
        eps_eval = sched.get_eps()
        sched.step_epoch()
        sched.step_batch()   # evaluation epochs do not move the schedule
        assert sched.get_eps() == eps_eval
    assert sched.reached_max_eps() and sched.get_max_eps() == 0.3


def test_smoothed_eps_edges():
    assert smoothed_eps(0, 0, 100, 0.3) == 0.0 and smoothed_eps(-5, 0, 100, 0.3) == 0.0
    assert smoothed_eps(100, 0, 100, 0.3) == pytest.approx(0.3) and smoothed_eps(500, 0, 100, 0.3) == 0.3
    # a switch point at the start (length * mid < 1): a straight ramp, no division by zero
    assert smoothed_eps(1, 0, 3, 0.3, mid=0.25) == pytest.approx(0.1)
    assert smoothed_eps(2, 0, 0, 0.3) == 0.3 and smoothed_eps(0, 0, 0, 0.3) == 0.0
    with pytest.raises(ValueError, match="beta"):
        smoothed_eps(1, 0, 10, 0.3, beta=1.5)
    with pytest.raises(ValueError, match="mid"):
        smoothed_eps(1, 0, 10, 0.3, mid=1.5)


def test_linear_fixed_and_adaptive_schedulers():
    from robustkern.compat.auto_lirpa.eps_scheduler import AdaptiveScheduler, FixedScheduler, LinearScheduler
    sched = LinearScheduler(0.2, "start=2,length=3")
    for epoch in range(1, 8):
        sched.step_epoch()
        sched.set_epoch_length(4)
        for b in range(1, 6):  # one batch more than announced: auto_LiRPA then holds the epoch's end value
            sched.step_batch()
            assert sched.get_eps() == pytest.approx(linear_schedule_f64(epoch, b, 4, 2, 3, 0.2), abs=1e-15)
    fixed = FixedScheduler(0.1)
    fixed.step_epoch()
    fixed.step_batch()
    assert fixed.get_eps() == 0.1 and fixed.reached_max_eps()
    ada = AdaptiveScheduler(1.0, "start=1,min_step=0.01,max_step=0.1,increase_factor=2")
    ada.step_epoch()
    ada.step_batch()
    ada.step_batch()   # the first two steps (no loss history) take min_step
    assert ada.get_eps() == pytest.approx(0.02)
    ada.update_loss(2.0)
    ada.update_loss(1.0)  # loss fell: the step doubles (capped by max_step), then eps grows by it
    ada.step_batch()
    assert ada.get_eps() == pytest.approx(0.04)
    ada.update_loss(5.0)  # loss rose by more than decrease_thresh (1.5x): the step halves
    ada.step_batch()
    assert ada.get_eps() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="set_epoch_length"):
        s = LinearScheduler(0.1, "start=1,length=2")
        s.step_epoch()
        s.step_batch()
    with pytest.raises(ValueError, match="start"):
        LinearScheduler(0.1, "length=2")
    with pytest.raises(ValueError, match="key=value"):
        LinearScheduler(0.1, "start:1")
    from robustkern.compat.auto_lirpa.eps_scheduler import SmoothedScheduler
    with pytest.raises(ValueError, match="epoch_length must stay the same"):
        s = SmoothedScheduler(0.1, "start=1,length=2")
        s.set_epoch_length(3)
        s.set_epoch_length(4)


def test_star_import_of_perturbations_gives_what_scripts_use():
    ns: dict = {}
    exec("from robustkern.compat.auto_lirpa.perturbations import *", ns)
    # simple_training.py takes np and torch from this star import (it imports neither itself)
    assert ns["np"] is np and ns["torch"] is torch
    for name in ("PerturbationLpNorm", "PerturbationL0Norm", "Perturbation"):
        assert name in ns
    from robustkern.compat.auto_lirpa import PerturbationLpNorm
    assert ns["PerturbationLpNorm"] is PerturbationLpNorm
    x = torch.rand(2, 3)
    p = PerturbationLpNorm(norm=np.inf, eps=0.1, x_L=x - 0.1, x_U=x + 0.2)
    torch.testing.assert_close(p.eps, torch.full_like(x, 0.15))  # auto_LiRPA keeps the box half-width as eps


def test_utils_meter_and_logger():
    from robustkern.compat.auto_lirpa.utils import MultiAverageMeter, get_spec_matrix, logger
    assert isinstance(logger, logging.Logger)
    meter = MultiAverageMeter()
    meter.update("CE", 1.0, 2)
    meter.update("CE", torch.tensor(4.0), 1)
    meter.update("Err", 0.5, 3)
    meter.update("skip", None)
    assert meter.avg("CE") == pytest.approx(2.0) and meter.last("CE") == 4.0 and meter.avg("none") == 0.0
    assert str(meter) == "CE=2.0000 Err=0.5000"
    y = torch.tensor([2, 0, 1])
    torch.testing.assert_close(get_spec_matrix(torch.zeros(3, 4), y, 4), margin_spec(y, 4))


def test_unsupported_names_import_and_fail_at_use_with_advice():
    from robustkern.compat import auto_lirpa
    from robustkern.compat.auto_lirpa import (BoundedModule, BoundedParameter, CrossEntropyWrapper,
                                              PerturbationL0Norm, register_custom_op)
    with pytest.raises(NotImplementedError, match="use PerturbationLpNorm"):
        PerturbationL0Norm(eps=3, ratio=1.0)
    with pytest.raises(NotImplementedError, match="BoundedTensor"):
        BoundedParameter(torch.zeros(3), None)
    with pytest.raises(NotImplementedError, match="robustkern.bounds"):
        register_custom_op("custom::op", object)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    wrapped = CrossEntropyWrapper(model)
    x, y = torch.rand(2, 4), torch.tensor([0, 2])
    z = model(x)
    torch.testing.assert_close(wrapped(x, y), torch.exp(z - z.gather(1, y[:, None])).sum(1, keepdim=True))
    with pytest.raises(NotImplementedError, match="loss_fusion=True"):
        BoundedModule(wrapped, (x, y), bound_opts={"loss_fusion": True})
    for name in ("BoundDataParallel", "PerturbationSynonym", "CrossEntropyWrapperMultiInput",
                 "unregister_custom_op", "BoundedTensor"):
        assert hasattr(auto_lirpa, name)


def test_method_opt_call_and_bound_data_parallel():
    from robustkern.compat.auto_lirpa import (BoundDataParallel, BoundedModule, BoundedTensor,
                                              PerturbationLpNorm)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(4, 2, 2, 2)
    C = margin_spec(torch.tensor([0, 1, 2, 0]), 3)
    lirpa = BoundedModule(model, x)
    xb = BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=0.1))
    want = lirpa.compute_bounds(x=(xb,), C=C, method="CROWN-IBP")
    got = lirpa(method_opt="compute_bounds", x=(xb,), C=C, method="CROWN-IBP", no_replicas=True)
    torch.testing.assert_close(got[0], want[0])
    par = BoundDataParallel(lirpa)
    torch.testing.assert_close(par(xb), model(x))
    par(method_opt="compute_bounds", x=(xb,), IBP=True, C=C, method=None, no_replicas=True)
    got = par(method_opt="compute_bounds", IBP=False, C=C, method="backward", bound_upper=False)
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(NotImplementedError, match="get_property"):
        par(get_property=True, node_class=object, att_name="max_input")


def test_bounded_tensor_moves_with_its_perturbation():
    from robustkern.compat.auto_lirpa import BoundedTensor, PerturbationLpNorm
    x = torch.rand(2, 3)
    ptb = PerturbationLpNorm(norm=np.inf, eps=0.1, x_L=x - 0.1, x_U=x + 0.1)
    xb = BoundedTensor(x, ptb)
    for moved in (xb.to(torch.float64), xb.clone(), xb.cpu()):
        assert isinstance(moved, BoundedTensor) and moved.ptb is not None
    assert xb.to(torch.float64).ptb.x_L.dtype == torch.float64
    assert type(xb + 1) is torch.Tensor and xb.size(0) == 2
    assert "BoundedTensor" in repr(xb) and math.isinf(xb.ptb.norm)
