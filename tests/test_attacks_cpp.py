"""The C++ CPU kernel of ``robustkern::pgd_step`` (csrc/cpu/attacks_cpu.cpp) against the reference: L-inf
bit-identical (float32 and float64, NaN where the reference has NaN), L2 within a few ulps (the two norms are
summed in another order); edge cases (zero gradients, eps 0, points on the ball's and [0, 1]'s borders,
non-contiguous inputs, B = 1, empty batches), the automatic backend choice, opcheck, bad input; and
``robustkern.attacks.pgd`` (which calls the kernel directly in its loop) unchanged: the same adversarial
examples as with the reference step and as the loop written out with the per-example objective summed."""
import pytest
import torch
import torch.nn as nn

import robustkern
from robustkern import _backend
from robustkern.attacks import pgd
from robustkern.attacks.pgd import attack_objective, random_start_point
from robustkern.ops import pgd_step
from robustkern.reference.attacks import pgd_step as ref_step
from robustkern.testing import portable_simd

pytestmark = pytest.mark.skipif(not _backend.available("cpp", "cpu", op="pgd_step"),
                                reason="the compiled extension has no pgd_step CPU kernel")

DTYPES = [torch.float32, torch.float64]
# L2: |d|, |g| summed in another order than torch.linalg.vector_norm -> results differ by a few ulps of 1
L2_ATOL = {torch.float32: 1e-6, torch.float64: 2e-15}  # observed at most 1 ulp of 1


def _kernel(*args):
    return torch.ops.robustkern.pgd_step(*args)


@pytest.fixture(params=["avx2", "portable"])
def code_path(request):
    """Both compiled copies of the kernel: AVX2 (chosen on CPUs that have it) and the x86-64 baseline."""
    with portable_simd(request.param == "portable"):
        yield request.param


def _exact(a, b):
    """Equal bit for bit (signed zeros included), NaN where the other has NaN (any payload)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    bits = torch.int32 if a.dtype == torch.float32 else torch.int64
    keep = ~a.isnan()
    assert torch.equal(a.contiguous().view(bits)[keep], b.contiguous().view(bits)[keep])


def _edge_inputs(shape, dtype, seed=0):
    """Random rows with the borders the step meets: x0 and x_adv on 0 / 1, x_adv exactly on x0 +- eps,
    gradients exactly 0 (both signs), tiny and huge; row 0 has eps 0, row 1 (when B > 1) eps above 1."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    x0.view(-1)[::11] = 0.0
    x0.view(-1)[5::13] = 1.0
    eps = torch.rand(b, generator=g, dtype=torch.float64) * 0.3
    eps[0] = 0.0
    if b > 1:
        eps[1] = 1.5
    alpha = torch.rand(b, generator=g, dtype=torch.float64) * 0.1 + 0.005
    x0, eps, alpha = (t.to(dtype) for t in (x0, eps, alpha))
    rows = (-1,) + (1,) * (len(shape) - 1)
    e = eps.reshape(rows)
    xa = (x0 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)).clamp(0, 1)
    flat = xa.view(-1)
    flat[1::9] = (x0 + e).view(-1)[1::9]  # on the ball's border (in the input precision)
    flat[2::9] = (x0 - e).view(-1)[2::9]
    flat[3::17] = 0.0
    flat[4::17] = 1.0
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    gf = grad.view(-1)
    gf[::7] = 0.0
    gf[3::29] = -0.0
    gf[6::31] = torch.finfo(dtype).tiny
    gf[8::37] = -1e30  # float32: |g|^2 overflows, so |g| = inf (L2), as in the reference
    return xa, grad, x0, eps, alpha


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1, 7, 9), (3, 3072), (1, 40), (2, 1)])
def test_linf_bit_identical_to_reference(dtype, shape, code_path):
    args = _edge_inputs(shape, dtype)
    out = _kernel(*args, "linf")
    _exact(out, ref_step(*args, "linf"))
    assert out.is_contiguous() and out.dtype == dtype
    x0, eps = args[2], args[3]
    assert bool((out == x0)[0].all())  # eps = 0 keeps the clean point
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_linf_signed_zeros_bit_identical(dtype, code_path):
    """Ties of +0 and -0 in max / min give the reference's zero: its vectorised loop's (the second operand).
    128 elements per tensor: no scalar remainder in ATen's loop (which would give the first) up to AVX-512."""
    g = torch.Generator().manual_seed(8)
    pick = lambda vals: torch.tensor(vals, dtype=dtype)[torch.randint(0, len(vals), (2, 64), generator=g)]  # noqa: E731
    xa, x0 = pick([0.0, -0.0, 0.25, 1.0]), pick([0.0, -0.0, 0.25])
    grad = pick([0.0, -0.0, 1.0, -1.0])
    eps, alpha = torch.tensor([0.0, 0.25], dtype=dtype), torch.tensor([0.25, -0.0], dtype=dtype)
    out = _kernel(xa, grad, x0, eps, alpha, "linf")
    ref = ref_step(xa, grad, x0, eps, alpha, "linf")
    _exact(out, ref)
    assert bool(torch.signbit(ref).any())  # the inputs do produce negative zeros


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1, 7, 9), (3, 3072), (1, 40), (2, 1)])
def test_l2_matches_reference(dtype, shape, code_path):
    args = _edge_inputs(shape, dtype)
    out = _kernel(*args, "l2")
    torch.testing.assert_close(out, ref_step(*args, "l2"), rtol=0, atol=L2_ATOL[dtype])
    x0, eps = args[2], args[3]
    d = (out - x0).reshape(shape[0], -1).double().norm(dim=1)
    assert bool((d <= eps.double() * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_degenerate_rows(dtype, code_path):
    """A zero gradient (u = 0), d = 0 exactly, eps = 0 with d != 0 (gives x0 exactly), a long row."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(4, 3000, generator=g, dtype=torch.float64).to(dtype)
    xa = (x0 + 0.01 * torch.randn(4, 3000, generator=g, dtype=torch.float64).to(dtype)).clamp(0, 1)
    grad = torch.randn(4, 3000, generator=g, dtype=torch.float64).to(dtype)
    grad[0] = 0.0
    xa[1], grad[1] = x0[1], 0.0
    eps = torch.tensor([0.05, 0.0, 0.0, 0.5], dtype=dtype)
    alpha = torch.full((4,), 0.02, dtype=dtype)
    out = _kernel(xa, grad, x0, eps, alpha, "l2")
    torch.testing.assert_close(out, ref_step(xa, grad, x0, eps, alpha, "l2"), rtol=0, atol=L2_ATOL[dtype])
    _exact(out[1], x0[1])
    _exact(out[2], x0[2])


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_where_the_reference_has_nan(norm, dtype, code_path):
    xa, grad, x0, eps, alpha = _edge_inputs((4, 30), dtype, seed=2)
    nan = float("nan")
    xa[0, 3] = nan
    grad[1, 4] = nan  # sign(NaN) = 0 for L-inf; a NaN norm for L2
    x0[2, 5] = nan
    eps[3] = nan
    out = _kernel(xa, grad, x0, eps, alpha, norm)
    ref = ref_step(xa, grad, x0, eps, alpha, norm)
    assert torch.equal(out.isnan(), ref.isnan())
    if norm == "linf":
        _exact(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=0, atol=L2_ATOL[dtype], equal_nan=True)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_noncontiguous_and_empty(norm, code_path):
    xa, grad, x0, eps, alpha = _edge_inputs((6, 4, 10), torch.float32, seed=3)
    t = [a.transpose(1, 2)[:, ::2] for a in (xa, grad, x0)]  # (6, 5, 4), strided
    e, a = eps.repeat(2)[::2], alpha.repeat(2)[::2]  # strided (6,)
    out = _kernel(*t, e, a, norm)
    want = ref_step(*[v.contiguous() for v in t], e.contiguous(), a.contiguous(), norm)
    assert out.is_contiguous()
    if norm == "linf":
        _exact(out, want)
    else:
        torch.testing.assert_close(out, want, rtol=0, atol=L2_ATOL[torch.float32])
    for shape in [(0, 4, 10), (3, 0)]:
        z = torch.zeros(shape)
        empty = _kernel(z, z, z, torch.zeros(shape[0]), torch.ones(shape[0]), norm)
        assert empty.shape == shape


def test_auto_picks_cpp_and_explicit_cpp_equals_kernel():
    with robustkern.use_backend("auto"):
        assert _backend.select("cpu", op="pgd_step") == "cpp"
    args = _edge_inputs((3, 2, 5), torch.float64, seed=5)
    for norm in ("linf", "l2"):
        with robustkern.use_backend("cpp"):
            out = pgd_step(*args, norm)
        _exact(out, _kernel(*args, norm))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_opcheck_cpp(norm):
    args = _edge_inputs((3, 2, 4), torch.float32, seed=1)
    with robustkern.use_backend("cpp"):
        torch.library.opcheck(torch.ops.robustkern.pgd_step.default, (*args, norm))
        leaves = [t.clone().requires_grad_(True) for t in args]
        torch.library.opcheck(torch.ops.robustkern.pgd_step.default, (*leaves, norm))


def test_kernel_bad_input():
    xa, grad, x0, eps, alpha = _edge_inputs((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="norm must be"):
        _kernel(xa, grad, x0, eps, alpha, "l1")
    with pytest.raises(RuntimeError, match="eps must have shape"):
        _kernel(xa, grad, x0, eps[:2], alpha, "linf")
    with pytest.raises(RuntimeError, match="x_orig has dtype Double"):
        _kernel(xa, grad, x0.double(), eps, alpha, "linf")
    with pytest.raises(RuntimeError, match="grad has shape"):
        _kernel(xa, grad[:, :3], x0, eps, alpha, "linf")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _kernel(xa.half(), grad.half(), x0.half(), eps.half(), alpha.half(), "linf")


# ------------------------------------------------------------------------------------------- the attack
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def _written_out_pgd(model, x, y, eps, alpha, steps, norm, loss, targeted):
    """The loop as it stood before the CPU fast path: per-example objective summed, the reference step, the
    L-inf start out of place."""
    b = x.shape[0]
    e, a = torch.full((b,), eps), torch.full((b,), alpha)
    if norm == "linf":  # the start as first written (pgd now forms it in place)
        adv = (x + (torch.rand_like(x) * 2 - 1) * e.reshape(-1, 1, 1, 1)).clamp(0, 1)
    else:
        adv = random_start_point(x, e, norm)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        obj = attack_objective(model(adv), y, loss, targeted).sum()
        grad, = torch.autograd.grad(obj, adv)
        adv = ref_step(adv.detach(), grad, x, e, a, norm)
    return adv.detach()


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.02), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("loss,targeted", [("ce", False), ("ce", True), ("margin", False)])
def test_pgd_unchanged(norm, eps, alpha, loss, targeted):
    model = _model()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    runs = {}
    for bk in ("cpp", "reference"):
        torch.manual_seed(11)
        with robustkern.use_backend(bk):
            runs[bk] = pgd(model, x, y, eps, alpha, 6, norm, loss=loss, targeted=targeted)
    torch.manual_seed(11)
    written = _written_out_pgd(model, x, y, eps, alpha, 6, norm, loss, targeted)
    _exact(runs["reference"], written)
    if norm == "linf":
        _exact(runs["cpp"], runs["reference"])
    else:  # the rounding of the two norms, carried through 6 steps
        torch.testing.assert_close(runs["cpp"], runs["reference"], rtol=0, atol=1e-5)
    assert not torch.equal(runs["cpp"], x)
