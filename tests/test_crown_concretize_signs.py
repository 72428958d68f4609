"""robustkern::crown_concretize over a box keeps int8 signs of ``A``, not ``A``, for its backward when the box's
centre and radius need no gradient (``A`` otherwise, and for an L2 ball); its value and every gradient are those of
the products ``A mid + bias -/+ |A| rad`` differentiated by autograd, float64, zero coefficients included, on every
backend; gradcheck and gradgradcheck; opcheck; window rows over boxes gathered per row
(``robustkern.bounds.patches.window_concretize``) are the op's; and CROWN's gradients through it are those of the
plain formula under autograd."""
import pytest
import torch

from _conv_nets import conv_net
from _devices import backend_device_params, to
import robustkern.bounds.crown as crown
import robustkern.bounds.patches as patches
from robustkern import use_backend
from robustkern.bounds import BoundedModule, margin_spec, robust_cross_entropy
from robustkern.bounds.patches import window_concretize
from robustkern.ops.crown import crown_concretize
from robustkern.reference import crown as R

BACKENDS = backend_device_params("reference", "cpp", "triton")


def _products(A, bias, mid, rad, upper_side):
    """The bound as written, per row: ``mid, rad`` (B, N) broadcast over the rows, or (B, S, N) one per row."""
    if mid.dim() == 2:
        mid, rad = mid.unsqueeze(1), rad.unsqueeze(1)
    sign = 1.0 if upper_side else -1.0
    return (A * mid).sum(-1) + bias + sign * (A.abs() * rad).sum(-1)


def _case(window: bool, gen: torch.Generator, B=3, S=4, N=30):
    A = torch.randn(B, S, N, dtype=torch.float64, generator=gen)
    A[:, :, :5] = 0
    bias = torch.randn(B, S, dtype=torch.float64, generator=gen)
    box_shape = (B, S, N) if window else (B, N)
    mid = torch.randn(box_shape, dtype=torch.float64, generator=gen)
    rad = torch.rand(box_shape, dtype=torch.float64, generator=gen)
    return A, bias, mid, rad


def _value_and_grads(fn, tensors, box_grad, g, device="cpu"):
    leaves = [t.clone().to(device).requires_grad_(i < 2 or box_grad) for i, t in enumerate(tensors)]
    val = fn(*leaves)
    want = [t for t in leaves if t.requires_grad]
    return [t.cpu() for t in (val,) + torch.autograd.grad((val * g.to(device)).sum(), want)]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("box_grad", [False, True])
def test_value_and_gradients_are_the_products(backend, device, upper_side, box_grad):
    gen = torch.Generator().manual_seed(0)
    tensors = _case(False, gen)
    g = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    want = _value_and_grads(lambda *t: _products(*t, upper_side), tensors, box_grad, g)
    with use_backend(backend):
        got = _value_and_grads(lambda *t: crown_concretize(*t, upper_side=upper_side), tensors, box_grad, g, device)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("upper_side", [False, True])
@pytest.mark.parametrize("box_grad", [False, True])
@pytest.mark.parametrize("shared_rows", [False, True])
def test_window_rows_are_the_op_per_row(upper_side, box_grad, shared_rows):
    gen = torch.Generator().manual_seed(1)
    A, bias, mid, rad = _case(True, gen)
    if shared_rows:      # rows every example shares: a batch of 1 that broadcasts
        A = A[:1]
    g = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    want = _value_and_grads(lambda *t: _products(*t, upper_side), (A, bias, mid, rad), box_grad, g)
    got = _value_and_grads(lambda *t: window_concretize(*t, None, None, upper_side), (A, bias, mid, rad), box_grad, g)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)


def test_window_rows_over_a_ball_take_the_tighter_bound():
    gen = torch.Generator().manual_seed(2)
    A, bias, mid, rad = _case(True, gen)
    center, eps = mid + 0.01, torch.tensor([0.05, 0.3, 4.0], dtype=torch.float64)
    got = window_concretize(A, bias, mid, rad, center, eps, False)
    ball = (A * center).sum(-1) + bias - eps.unsqueeze(1) * A.norm(dim=-1)
    torch.testing.assert_close(got, torch.maximum(_products(A, bias, mid, rad, False), ball), rtol=1e-12, atol=1e-12)


def _saved(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    return saved


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_keeps_int8_signs_not_the_coefficients(backend, device):
    A = torch.randn(2, 3, 50, requires_grad=True, device=device)
    mid, rad = torch.rand(2, 50, device=device), torch.rand(2, 50, device=device)
    with use_backend(backend):
        saved = _saved(lambda: crown_concretize(A * 1.0, torch.zeros(2, 3, device=device), mid, rad))
    big = [t for t in saved if t.numel() == A.numel()]
    assert len(big) == 1 and big[0].dtype == torch.int8
    assert sum(t.numel() * t.element_size() for t in saved) == A.numel() + mid.nbytes + rad.nbytes


def test_keeps_the_coefficients_where_the_box_or_a_ball_needs_them():
    A = torch.randn(2, 3, 50, requires_grad=True)
    bias, mid, rad = torch.zeros(2, 3), torch.rand(2, 50), torch.rand(2, 50)
    for args in ((bias, mid.clone().requires_grad_(True), rad), (bias, mid, rad, mid + 0.1, torch.ones(2))):
        big = [t for t in _saved(lambda: crown_concretize(A * 1.0, *args)) if t.numel() == A.numel()]
        assert len(big) == 1 and big[0].dtype == torch.float32


def test_window_rows_keep_int8_signs():
    P = torch.randn(2, 5, 12, requires_grad=True)
    mid, rad = torch.rand(2, 5, 12), torch.rand(2, 5, 12)
    saved = _saved(lambda: window_concretize(P * 1.0, torch.zeros(2, 5), mid, rad, None, None, True))
    assert [t.dtype for t in saved].count(torch.int8) == 1     # the signs, beside the boxes (no gradient)
    assert sum(t.numel() * t.element_size() for t in saved) == P.numel() + mid.nbytes + rad.nbytes


@pytest.mark.parametrize("box_grad", [False, True])
def test_gradcheck_gradgradcheck_and_opcheck(box_grad):
    A, bias, mid, rad = _case(False, torch.Generator().manual_seed(3), B=2, S=2, N=6)
    A = A + 0.5 * (A >= 0) - 0.25 * (A < 0)          # away from the kink of |A| at 0 for finite differences
    leaves = [A.requires_grad_(), bias.requires_grad_(), mid.requires_grad_(box_grad), rad.requires_grad_(box_grad)]
    fn = lambda *t: crown_concretize(*t, upper_side=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)
    torch.library.opcheck(torch.ops.robustkern.crown_concretize.default, (*leaves, None, None, False))
    torch.library.opcheck(torch.ops.robustkern.crown_concretize_sign_grad.default,
                          (torch.sign(A.detach()).to(torch.int8), mid.detach(), rad.detach(), bias.detach(), True))


@pytest.mark.parametrize("patches_on", [False, True])
def test_crown_gradients_are_those_of_the_plain_formula(patches_on, monkeypatch):
    torch.manual_seed(0)
    model = conv_net(3, 16, 4, 6, hidden=16, k1=4).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 4, 7])
    bm = BoundedModule(model, x[:1])
    monkeypatch.setattr(crown, "PATCHES", patches_on)

    def run():
        model.zero_grad()
        lb, _ = bm.compute_bounds(x, 0.02, method="CROWN", C=margin_spec(y, 10), bound_upper=False, sound=False)
        robust_cross_entropy(lb).backward()
        return [lb.detach()] + [p.grad.clone() for p in model.parameters()]

    ours = run()
    plain = lambda A, bias, mid, rad, center=None, eps=None, upper_side=False: \
        R.crown_concretize(A, bias, mid, rad, center, eps, upper_side)  # noqa: E731
    monkeypatch.setattr(crown, "crown_concretize", plain)        # autograd over the products, keeping A
    monkeypatch.setattr(patches, "crown_concretize", plain)
    theirs = run()
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
