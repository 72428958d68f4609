"""Loss Landscape Matters' ``bound_layers`` API (``robustkern.compat.loss_landscape``): CROWN-IBP's numbers
plus what this version keeps and adds (per-layer input bounds, the lower bound's decomposition ``lower_A``,
``A_x``, ``A_norm``, ``ReLU_lower_b``, ``not_ReLU_lower_b``, ``backward_range_frozen``, ``define_bound_opts`` /
``convert_bounds``), against the float64 transcription ``robustkern.reference.published.crown_ibp`` on the same
weights, to 1e-6 relative; its optimised slopes raise ``NotImplementedError``."""
import math

import pytest
import torch

from robustkern import use_backend
from robustkern.compat.loss_landscape import BoundSequential
from robustkern.reference.published.crown_ibp import BoundSequentialReference
from robustkern.reference.published.seed_models import model_cnn_4layer
from robustkern.testing import backends_for

from .test_crown_ibp import box, close, spec

BACKENDS = backends_for("cpu", include_interpreter=False)


def setup(seed=0, batch=2):
    torch.manual_seed(seed)
    model = model_cnn_4layer(2, 8, 1, 8).double()
    x = torch.rand(batch, 2, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 10, (batch,))
    x_U, x_L = box(x, 0.08, torch.full((1, 2, 1, 1), 0.5, dtype=torch.float64), bounded=True)
    return model, x, labels, x_U, x_L


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_range_keeps_the_original_decomposition(backend):
    model, x, labels, x_U, x_L = setup()
    C, _ = spec(labels)
    opts = {"same-slope": False, "zero-lb": False, "one-lb": False, "binary": False, "ours": False,
            "uniform": False}
    with use_backend(backend):
        ours = BoundSequential.convert(model, opts)
        ours.define_bound_opts(opts)
        ref = BoundSequentialReference(model, opts)
        ours(x, method_opt="forward")
        ref.forward(x)
        ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="interval_range")
        ref.interval_range(math.inf, x_U, x_L, 0.08, C)
        for i, layer in enumerate(ours):
            close(layer.lower_l, ref.layer_inputs[i][0])
            close(layer.upper_u, ref.layer_inputs[i][1])
        got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="backward_range", lower_d_list2=[])
        want = ref.backward_range(math.inf, x_U, x_L, 0.08, C)
        close(got[2], want[2])
        close(got[3], want[3])
        assert not got[3].requires_grad and got[2].requires_grad
        close(ours.lower_A, ref.lower["A"])
        close(ours.A_x, ref.lower["A_x"])
        close(ours.A_norm, ref.lower["A_norm"])
        close(ours.ReLU_lower_b, ref.lower["relu_b"])
        close(ours.not_ReLU_lower_b, ref.lower["layer_b"])
        assert ours.ReLU_lower_b.device.type == "cpu" and ours.lower_d_list == []
        close(ours.A_x.squeeze(-1) + ours.A_norm.squeeze(-1) + ours.ReLU_lower_b + ours.not_ReLU_lower_b,
              got[2].detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [0, 3, 6, 20])
def test_backward_range_frozen_equals_the_original(backend, frozen):
    model, x, labels, x_U, x_L = setup(seed=1)
    C, _ = spec(labels)
    n = len(model)
    with use_backend(backend):
        ours = BoundSequential.convert(model, {})
        ref = BoundSequentialReference(model, {})
        ours(x, method_opt="forward")
        ref.forward(x)
        ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="interval_range")
        ref.interval_range(math.inf, x_U, x_L, 0.08, C)
        got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="backward_range_frozen",
                   frozen=frozen)
        want = ref.backward_range(math.inf, x_U, x_L, 0.08, C, first=max(n - frozen - 1, 0))
        close(got[2], want[2])
        close(got[3], want[3])
        close(ours.A_x, ref.lower["A_x"])


def test_bound_option_switches_and_planned_slopes():
    model, x, labels, x_U, x_L = setup(seed=2)
    C, _ = spec(labels)
    ours = BoundSequential.convert(model, {"same-slope": False})
    ours(x, method_opt="forward")
    ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="interval_range")
    ref = BoundSequentialReference(model, {"same-slope": True})
    ref.forward(x)
    ref.interval_range(math.inf, x_U, x_L, 0.08, C)
    ours.convert_bounds({"same-slope": True})
    assert ours.bound_opts == {"same-slope": True} and all(m.bound_opts == {"same-slope": True} for m in ours)
    got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="backward_range")
    close(got[2], ref.backward_range(math.inf, x_U, x_L, 0.08, C)[2])
    for key in ("ours", "binary", "uniform"):
        with pytest.raises(NotImplementedError, match="optimised lower slopes"):
            BoundSequential.convert(model, {key: True})
        with pytest.raises(NotImplementedError, match="optimised lower slopes"):
            ours.convert_bounds({key: True})
    with pytest.raises(NotImplementedError, match="lower_d_list2"):
        ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.08, C=C, method_opt="backward_range",
             lower_d_list2=[torch.zeros(1)])
