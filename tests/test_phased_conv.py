"""The transposed convolution by its phases (``robustkern.bounds.phased_conv``): the entries of
``conv_transpose2d`` (strides, kernels not a multiple of the stride, padding, output padding), the box arranged in
the same order with zeros where the padding crops; and CROWN whose passes onto the input take it gives the bounds
of ``conv_transpose2d``, over a box and an L2 ball, with gradients."""
import pytest
import torch
import torch.nn.functional as F

from _conv_nets import conv_net
import robustkern.bounds.crown as crown
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.phased_conv import arrange, phased_transposed_conv


@pytest.mark.parametrize("k,s,p,opad", [(4, 2, 1, 0), (3, 2, 1, 1), (3, 1, 1, 0), (5, 3, 2, 0), (2, 2, 0, 0),
                                        ((3, 4), (1, 2), (0, 1), 0)])
def test_entries_and_arranged_box_are_the_transposed_convolutions(k, s, p, opad):
    gen = torch.Generator().manual_seed(0)
    k, s, p = (t if isinstance(t, tuple) else (t, t) for t in (k, s, p))
    A = torch.randn(6, 4, 5, 7, dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, *k, dtype=torch.float64, generator=gen)
    want = F.conv_transpose2d(A, w, None, s, p, opad)                   # (6, 3, H, W)
    got = phased_transposed_conv(A, w, s, p, tuple(want.shape[2:]))
    assert got is not None
    torch.testing.assert_close(got.spatial().permute(0, 3, 1, 2), want, rtol=1e-12, atol=1e-12)
    v = torch.randn(6, *want.shape[1:], dtype=torch.float64, generator=gen)
    # the phase-major entries against the box in the same order: the dense products, the cropped places at zero
    dots = (got.A.reshape(6, -1) * arrange(v, got.phases)).sum(-1)
    torch.testing.assert_close(dots, (want * v).sum((1, 2, 3)), rtol=1e-12, atol=1e-12)
    ones = arrange(torch.ones_like(v[:1]), got.phases)
    assert ones.sum() == v[0].numel()


def test_an_output_beyond_the_kernels_reach_is_refused():
    A, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 2, 2)
    assert phased_transposed_conv(A, w, (2, 2), (0, 0), (9, 9)) is None


@pytest.mark.parametrize("norm", [float("inf"), 2.0])
def test_crown_onto_the_input_by_phases_gives_the_same_bounds_and_gradients(norm, monkeypatch):
    torch.manual_seed(0)
    model = conv_net(3, 16, 4, 6, k1=4)
    x = torch.rand(3, 3, 16, 16)
    C = margin_spec(torch.tensor([0, 4, 7]), 10)
    bm = BoundedModule(model, x[:1])
    eps = 0.02 if norm == float("inf") else 0.3
    monkeypatch.setattr(crown, "PATCHES", False)       # dense rows: every pass ends in a convolution onto x

    def run():
        model.zero_grad()
        lb, ub = bm.compute_bounds(x, eps, norm=norm, method="CROWN", C=C, sound=False)
        (lb.sum() - ub.sum()).backward()
        return lb.detach(), ub.detach(), model[0].weight.grad.clone()

    calls = []
    real = crown.phased_transposed_conv
    monkeypatch.setattr(crown, "phased_transposed_conv", lambda *a: calls.append(1) or real(*a))
    phased = run()
    assert calls
    monkeypatch.setattr(crown, "PHASED_INPUT", False)
    plain = run()
    for got, want in zip(phased, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
