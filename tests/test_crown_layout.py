"""CROWN-IBP's fast paths give the same bounds and gradients as the plain ones: channels-last transposed
convolutions (with the ReLU step on the permuted layout), BatchNorm folded into the layer before it, and
the C++ kernels (forward and the fused backward ops) against the reference, on models with training-mode
BatchNorm (after convolutions and linear layers), stride-2 convolutions and Normalize (float64)."""
import pytest
import torch

import robustkern.bounds.crown as crown_mod
from robustkern import use_backend
from robustkern.bounds import BoundedModule, crown_ibp_loss
from robustkern.testing import backends_for
from test_bounds_ibp import random_sequential

FAST = "cpp" if "cpp" in backends_for("cpu") else "reference"


def loss_and_grads(model, x, y, eps, backend, channels_last, fold):
    saved = crown_mod.CHANNELS_LAST, crown_mod.FOLD_BATCHNORM
    crown_mod.CHANNELS_LAST, crown_mod.FOLD_BATCHNORM = channels_last, fold
    try:
        model.zero_grad()
        with use_backend(backend):
            bm = BoundedModule(model, x)
            loss, info = crown_ibp_loss(bm, x, y, eps, beta=1.0)
            loss.backward()
    finally:
        crown_mod.CHANNELS_LAST, crown_mod.FOLD_BATCHNORM = saved
    return info["lb"].detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("seed", range(4))
def test_fast_paths_match_plain_paths(seed):
    model = random_sequential(seed).double().train()
    torch.manual_seed(seed)
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    want_lb, want_g = loss_and_grads(model, x, y, 0.05, "reference", False, False)
    for backend, cl, fold in ((FAST, True, True), ("reference", True, False), (FAST, False, True)):
        lb, g = loss_and_grads(model, x, y, 0.05, backend, cl, fold)
        torch.testing.assert_close(lb, want_lb, atol=1e-10, rtol=1e-10)
        for a, b in zip(g, want_g):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
