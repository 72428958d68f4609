"""The concretisation over a box that keeps the signs of the coefficients for its backward
(``robustkern.bounds.box_concretize``): the value and every gradient of ``crown_concretize`` (dense rows) and of
the products' sums (window rows), float64, zero coefficients included; it keeps int8 signs, not the coefficients,
when the box needs no gradient; and CROWN's gradients through it are those through the op."""
import pytest
import torch

from _conv_nets import conv_net
import robustkern.bounds.box_concretize as box_concretize
from robustkern.bounds import BoundedModule, margin_spec, robust_cross_entropy
from robustkern.bounds.box_concretize import concretize_box
from robustkern.ops.crown import crown_concretize


def _window_reference(A, bias, mid, rad, upper_side):
    sign = 1.0 if upper_side else -1.0
    return (A * mid).sum(-1) + bias + sign * (A.abs() * rad).sum(-1)


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("box_grad", [False, True])
def test_value_and_gradients_are_the_references(window, upper_side, box_grad):
    gen = torch.Generator().manual_seed(0)
    B, S, N = 3, 4, 30
    A = torch.randn(B, S, N, dtype=torch.float64, generator=gen)
    A[:, :, :5] = 0
    bias = torch.randn(B, S, dtype=torch.float64, generator=gen)
    box_shape = (B, S, N) if window else (B, N)
    mid = torch.randn(box_shape, dtype=torch.float64, generator=gen)
    rad = torch.rand(box_shape, dtype=torch.float64, generator=gen)
    g = torch.randn(B, S, dtype=torch.float64, generator=gen)
    reference = _window_reference if window else \
        (lambda A, b, m, r, up: crown_concretize(A, b, m, r, None, None, up))
    results = []
    for fn in (reference, concretize_box):
        leaves = [A.clone().requires_grad_(True), bias.clone().requires_grad_(True),
                  mid.clone().requires_grad_(box_grad), rad.clone().requires_grad_(box_grad)]
        val = fn(*leaves, upper_side)
        want = [t for t in leaves if t.requires_grad]
        results.append((val,) + torch.autograd.grad((val * g).sum(), want))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_keeps_int8_signs_not_the_coefficients():
    A = torch.randn(2, 3, 50, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        concretize_box(A * 1.0, torch.zeros(2, 3), torch.rand(2, 50), torch.rand(2, 50), False)
    big = [t for t in saved if t.numel() == A.numel()]
    assert big and all(t.dtype == torch.int8 for t in big)


def test_crown_gradients_through_it_are_the_ops(monkeypatch):
    torch.manual_seed(0)
    model = conv_net(3, 16, 4, 6, hidden=16, k1=4)
    x = torch.rand(3, 3, 16, 16)
    y = torch.tensor([0, 4, 7])
    bm = BoundedModule(model, x[:1])

    def run():
        model.zero_grad()
        lb, _ = bm.compute_bounds(x, 0.02, method="CROWN", C=margin_spec(y, 10), bound_upper=False, sound=False)
        robust_cross_entropy(lb).backward()
        return [lb.detach()] + [p.grad.clone() for p in model.parameters()]

    ours = run()
    monkeypatch.setattr(box_concretize._BoxConcretize, "apply",
                        lambda A, bias, mid, rad, up: crown_concretize(A, bias, mid, rad, None, None, up)
                        if mid.dim() == 2 else _window_reference(A, bias, mid, rad, up))
    theirs = run()
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
