"""robustkern::crown_relu_backward_slopes (the ReLU step with explicit lower slopes, Loss Landscape Matters and
alpha-CROWN): equal to crown_relu_backward where the slopes are that mode's, a valid relaxation for any slope (the
out-of-range ones clamped), opcheck, gradcheck and gradgradcheck in float64 for shared (B, 1, N) and per-row
(B, S, N) slopes, bad input."""
import pytest
import torch

from robustkern import use_backend
from robustkern.ops import crown_relu_backward, crown_relu_backward_slopes
from robustkern.reference.crown import relu_relaxation

from test_crown_ops import make


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("upper_side", [False, True])
def test_the_modes_slopes_give_the_modes_step(mode, upper_side):
    """Away from l = u = 0, where the modes differ among themselves and this op takes slope 1 (l >= 0)."""
    A, lo, hi = make()
    lo[:, :3] -= 0.05
    hi[:, :3] += 0.07
    d_l = relu_relaxation(lo, hi, mode)[0].unsqueeze(1)
    got = crown_relu_backward_slopes(A, lo, hi, d_l, upper_side)
    want = crown_relu_backward(A, lo, hi, mode, upper_side)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("upper_side", [False, True])
def test_any_slope_is_a_valid_relaxation(upper_side):
    """For slopes anywhere (out of [0, 1] too: clamped), ``A relu(z) >= A' z + bias`` (lower side; <= upper) at
    points z of the box."""
    A, lo, hi = make(S=4)
    slope = torch.randn(A.shape, dtype=A.dtype) * 1.5
    An, b = crown_relu_backward_slopes(A, lo, hi, slope, upper_side)
    t = torch.rand(64, *lo.shape, dtype=A.dtype)
    z = lo + t * (hi - lo)
    f = torch.einsum("bsn,tbn->tbs", A, z.clamp(min=0))
    lin = torch.einsum("bsn,tbn->tbs", An, z) + b
    assert bool((lin <= f + 1e-9).all()) if not upper_side else bool((lin >= f - 1e-9).all())


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("upper_side", [False, True])
def test_opcheck_gradcheck_and_gradgradcheck(shared, upper_side):
    A, lo, hi = make(B=2, S=3, N=6)
    lo[:, :3] -= 0.05      # away from the kinks for finite differences
    hi[:, :3] += 0.07
    slope = torch.rand(2, 1 if shared else 3, 6, dtype=torch.float64) * 0.8 + 0.1
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.robustkern.crown_relu_backward_slopes.default, (A, lo, hi, slope, upper_side))
        ts = tuple(t.clone().requires_grad_() for t in (A, lo, hi, slope))
        fn = lambda a, l, u, s: crown_relu_backward_slopes(a, l, u, s, upper_side)  # noqa: E731
        torch.autograd.gradcheck(fn, ts)
        torch.autograd.gradgradcheck(fn, ts)


def test_bad_slopes_are_clear_errors():
    A, lo, hi = make()
    with pytest.raises(ValueError, match=r"slope must have shape \(2, 1, 37\) or \(2, 3, 37\)"):
        crown_relu_backward_slopes(A, lo, hi, torch.rand(2, 2, 37, dtype=A.dtype))
    with pytest.raises(ValueError, match="slope must have A's dtype"):
        crown_relu_backward_slopes(A, lo, hi, torch.rand(2, 1, 37))


def test_lower_slopes_of_a_mode_by_name():
    from robustkern.ops.crown import RELU_LOWER_MODES, crown_relu_lower_slopes
    A, lo, hi = make()
    for name, mode in RELU_LOWER_MODES.items():
        assert torch.equal(crown_relu_lower_slopes(lo, hi, name), relu_relaxation(lo, hi, mode)[0])
    with pytest.raises(ValueError, match="mode must be one of"):
        crown_relu_lower_slopes(lo, hi, "steep")
