"""The ReLU step with explicit slopes on dense rows for unsound passes (``robustkern.bounds.slope_step``): the values
and every gradient of the op ``crown_relu_backward_slopes`` (float64, up to rounding), slopes outside [0, 1]
included; and alpha-CROWN through it gives the op's bounds."""
import pytest
import torch

from _conv_nets import conv_net
import robustkern.bounds.crown as crown
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.slope_step import relu_step_with_slopes
from robustkern.ops.crown import crown_relu_backward_slopes


def _case(shared: bool, inside: bool, gen: torch.Generator):
    B, S, N = 3, 5, 40
    A = torch.randn(B, S, N, dtype=torch.float64, generator=gen)
    A[:, :, :4] = 0                                            # zero coefficients: no side of the split
    lower = torch.randn(B, N, dtype=torch.float64, generator=gen)
    upper = lower + 2 * torch.rand(B, N, dtype=torch.float64, generator=gen)
    lower[:, 4:8], upper[:, 8:12] = 0, 0                       # active and inactive at the ends
    slope = torch.rand(B, 1 if shared else S, N, dtype=torch.float64, generator=gen)
    if not inside:
        slope = slope * 1.6 - 0.3
    return A, lower, upper, slope


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("inside", [True, False])
def test_values_and_gradients_are_the_ops(shared, upper_side, inside):
    gen = torch.Generator().manual_seed(1)
    A, lower, upper, slope = _case(shared, inside, gen)
    w_A = torch.randn(A.shape, dtype=A.dtype, generator=gen)
    w_b = torch.randn(A.shape[:2], dtype=A.dtype, generator=gen)
    results = []
    for step in (crown_relu_backward_slopes, relu_step_with_slopes):
        leaves = [t.clone().requires_grad_(True) for t in (A, lower, upper, slope)]
        out, bias = step(*leaves, upper_side)
        grads = torch.autograd.grad((out * w_A).sum() + (bias * w_b).sum(), leaves)
        results.append((out, bias) + grads)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("upper_side", [False, True])
def test_gradcheck_and_gradgradcheck(shared, upper_side):
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen)
    lower = torch.tensor([-1.0, -0.5, 0.3, -2.0, -0.2, 0.5], dtype=torch.float64).repeat(2, 1)
    upper = torch.tensor([0.7, 1.5, 0.9, -0.4, 0.1, 2.0], dtype=torch.float64).repeat(2, 1)
    slope = torch.rand(2, 1 if shared else 3, 6, dtype=torch.float64, generator=gen) * 0.8 + 0.1
    leaves = [t.requires_grad_(True) for t in (A, lower, upper, slope)]
    fn = lambda *t: relu_step_with_slopes(*t, upper_side)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_bad_slopes_are_clear_errors():
    A = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="slope must have shape"):
        relu_step_with_slopes(A, torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 2, 4), False)


def test_alpha_crown_through_it_gives_the_ops_bounds(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    x = torch.rand(4, 1, 8, 8)
    C = margin_spec(torch.tensor([0, 1, 2, 3]), 10)
    bm = BoundedModule(model, x[:1])
    args = {"iteration": 5}
    lb, ub = bm.compute_bounds(x, 0.05, method="alpha-CROWN", C=C, sound=False, optimize_bound_args=args)
    monkeypatch.setattr(crown, "relu_step_with_slopes", crown_relu_backward_slopes)
    lb_op, ub_op = bm.compute_bounds(x, 0.05, method="alpha-CROWN", C=C, sound=False, optimize_bound_args=args)
    torch.testing.assert_close(lb, lb_op, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ub, ub_op, rtol=1e-5, atol=1e-5)
    lb_crown, ub_crown = bm.compute_bounds(x, 0.05, method="CROWN", C=C, sound=False)
    assert (lb > lb_crown + 1e-4).any()                        # the slopes moved: the step's gradients count


def test_slopes_held_channels_last_give_the_same_bounds(monkeypatch):
    import robustkern.bounds.alpha_crown as alpha_crown
    torch.manual_seed(1)
    model = conv_net(2, 10, 4, 5, hidden=12)
    x = torch.rand(3, 2, 10, 10)
    C = margin_spec(torch.tensor([1, 5, 9]), 10)
    bm = BoundedModule(model, x[:1])
    held = []
    init = alpha_crown._Passes.__init__

    def recording(self, *a, **k):
        init(self, *a, **k)
        held.append(len(self.hwc))
    monkeypatch.setattr(alpha_crown._Passes, "__init__", recording)
    monkeypatch.setattr(crown, "PATCHES", False)     # dense rows from the second convolution as well
    run = lambda: bm.compute_bounds(x, 0.05, method="alpha-CROWN", C=C, sound=False,  # noqa: E731
                                    optimize_bound_args={"iteration": 4})
    lb, ub = run()
    assert held and all(n > 0 for n in held)
    monkeypatch.setattr(crown, "CHANNELS_LAST", False)   # NCHW coefficients: the slopes held as they come
    held.clear()
    lb_plain, ub_plain = run()
    assert held and all(n == 0 for n in held)
    torch.testing.assert_close(lb, lb_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ub, ub_plain, rtol=1e-5, atol=1e-5)
