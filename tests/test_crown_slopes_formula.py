"""robustkern::crown_relu_backward_slopes, its few-pass forward and backward formulas: the values and every gradient
(A, the bounds, shared and per-row slopes, slopes outside [0, 1] and zero coefficients included) are those of the
textbook step ``A+ d_l + A- d_u``, ``sum A- b_u`` differentiated by autograd, in float64 on every backend;
gradcheck and gradgradcheck on the default backend; what it keeps for the backward is its inputs; opcheck of its
backward op; and alpha-CROWN's slopes move through it."""
import pytest
import torch

from _conv_nets import conv_net
from _devices import backend_device_params, to
import robustkern.bounds.crown as crown
from robustkern import use_backend
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.ops.crown import crown_relu_backward_slopes
from robustkern.reference.crown import relu_relaxation

BACKENDS = backend_device_params("reference", "cpp", "triton")


def _case(shared: bool, inside: bool, gen: torch.Generator, B=3, S=5, N=40):
    A = torch.randn(B, S, N, dtype=torch.float64, generator=gen)
    A[:, :, :4] = 0                                            # zero coefficients: no side of the split
    lower = torch.randn(B, N, dtype=torch.float64, generator=gen)
    upper = lower + 2 * torch.rand(B, N, dtype=torch.float64, generator=gen)
    slope = torch.rand(B, 1 if shared else S, N, dtype=torch.float64, generator=gen)
    if not inside:
        slope = slope * 1.6 - 0.3
    return A, lower, upper, slope


def _textbook(A, lower, upper, slope, upper_side):
    """The step as written, differentiated by autograd: the sign split by ``where`` (so ``A = 0`` takes the
    upper line on the lower side, as the op does), the lower slope ``clamp(slope, 0, 1)`` on unstable neurons."""
    _, d_u, b_u = (t.unsqueeze(1) for t in relu_relaxation(lower, upper, 0))
    l1, u1 = lower.unsqueeze(1), upper.unsqueeze(1)
    d_l = torch.where(l1 >= 0, 1.0, torch.where(u1 <= 0, 0.0, slope.clamp(0.0, 1.0)))
    pos = A > 0
    Ap, An = torch.where(pos, A, 0.0), torch.where(pos, 0.0, A)
    if upper_side:
        return Ap * d_u + An * d_l, (Ap * b_u).sum(-1)
    return Ap * d_l + An * d_u, (An * b_u).sum(-1)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("inside", [True, False])
def test_values_and_gradients_are_the_textbook_steps(backend, device, shared, upper_side, inside):
    gen = torch.Generator().manual_seed(1)
    A, lower, upper, slope = _case(shared, inside, gen, N=12 if backend == "triton" else 40)
    w_A = torch.randn(A.shape, dtype=A.dtype, generator=gen)
    w_b = torch.randn(A.shape[:2], dtype=A.dtype, generator=gen)
    results = []
    for step, where in ((_textbook, "cpu"), (crown_relu_backward_slopes, device)):
        leaves = [t.clone().requires_grad_(True) for t in to(where, A, lower, upper, slope)]
        with use_backend(backend):
            out, bias = step(*leaves, upper_side)
            grads = torch.autograd.grad((out * w_A.to(where)).sum() + (bias * w_b.to(where)).sum(), leaves)
        results.append([t.cpu() for t in (out, bias) + grads])
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
    fn = lambda *t: crown_relu_backward_slopes(*t, upper_side)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("shared", [False, True])
def test_keeps_only_its_inputs_for_the_backward(shared):
    A, lower, upper, slope = _case(shared, True, torch.Generator().manual_seed(3))
    leaves = [t.requires_grad_(True) for t in (A, lower, upper, slope)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        crown_relu_backward_slopes(*(t * 1.0 for t in leaves), False)
    assert sum(t.numel() * t.element_size() for t in saved) == \
        sum(t.numel() * t.element_size() for t in leaves)      # A, the bounds and the slopes; no A+, A-, d_l


@pytest.mark.parametrize("need_A, need_slope", [(True, True), (True, False), (False, True)])
def test_opcheck_of_the_backward_op(need_A, need_slope):
    A, lower, upper, slope = _case(False, False, torch.Generator().manual_seed(4), B=2, S=3, N=6)
    g_A, g_b = torch.randn_like(A), torch.randn(2, 3, dtype=A.dtype)
    torch.library.opcheck(torch.ops.robustkern.crown_relu_backward_slopes_grad.default,
                          (A, lower, upper, slope, True, g_A, g_b, need_A, need_slope))


def test_alpha_crown_slopes_move_through_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    x = torch.rand(4, 1, 8, 8)
    C = margin_spec(torch.tensor([0, 1, 2, 3]), 10)
    bm = BoundedModule(model, x[:1])
    lb, ub = bm.compute_bounds(x, 0.05, method="alpha-CROWN", C=C, sound=False, optimize_bound_args={"iteration": 5})
    lb_crown, ub_crown = bm.compute_bounds(x, 0.05, method="CROWN", C=C, sound=False)
    assert (lb > lb_crown + 1e-4).any() and (lb >= lb_crown - 1e-5).all()   # the step's gradients count


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
