"""MACER (Zhai et al. ICLR 2020): the fused tail op robustkern::macer_tail against its float64 reference on every
backend (values, gradients, opcheck; Triton interpreted on the CPU, or compiled on CUDA when a GPU is present:
tests/_devices.py), macer_loss against the transcription of the original, bad input, and a training check on
the digits data (MACER certifies a larger average radius than Gaussian augmentation)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern.ops import macer_tail
from robustkern.reference import macer as ref
from robustkern.reference.published import macer as pub
from robustkern.smoothing import macer_loss, macer_train
from robustkern.testing import backend

from _devices import backend_device_params, sized, to
from _digits import digits, mlp

B, K, C = 5, 3, 7
SIGMA, GAMMA, BETA = 0.25, 8.0, 16.0


def backend_params():
    """(backend, device) pairs with a macer_tail implementation here (no compiled kernel: the reference on the
    CPU, Triton interpreted on the CPU or compiled on CUDA). The references are computed on the CPU."""
    return backend_device_params("reference", "triton")


def _logits(b=B, k=K, c=C, scale=0.15, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, c, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, c, (b,), generator=g)
    z[torch.arange(b), :, y] += 0.1          # most examples correctly classified, q moderate at beta = 16
    return z.to(dtype), y


def _kept(z, y, gamma=GAMMA):
    return ref._stats(z, y, BETA, gamma)[-1]


# ------------------------------------------------------------------------------------------------ contract
def test_reference_tail_equals_the_original_terms():
    """The op's contract and the line-by-line transcription of RuntianZ/macer agree (float64, no ties)."""
    for seed in range(4):
        z, y = _logits(b=16, seed=seed, scale=0.3)
        cl, rl = ref.macer_tail(z, y, BETA, GAMMA, SIGMA)
        cl_o, rl_o = pub.macer_tail_terms_reference(z, y, SIGMA, GAMMA, BETA)
        torch.testing.assert_close(cl.sum(), cl_o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rl.sum(), rl_o, rtol=1e-9, atol=1e-9)
        kept = _kept(z, y)
        assert 0 < int(kept.sum()) < 16       # the mask is exercised both ways
        assert torch.all(rl[~kept] == 0) and torch.all(rl[kept] > 0)


@pytest.mark.parametrize("bk, device", backend_device_params("triton"))
def test_ndtri_accuracy(bk, device):
    """The kernels' fp32 AS241 Phi^-1 (interpreted on the CPU, compiled on CUDA) against scipy's float64 ndtri
    over (1e-38, 1)."""
    sp = pytest.importorskip("scipy.special")
    from robustkern.kernels.macer import ndtri

    g = torch.Generator().manual_seed(0)
    p = torch.cat([torch.rand(3000, generator=g), 10 ** (-38 * torch.rand(3000, generator=g)),
                   1 - torch.rand(500, generator=g) * 1e-6, torch.tensor([0.5, 0.075, 0.925, 1e-30])]).float()
    p = p[(p > 0) & (p < 1)]
    got = ndtri(p.to(device)).double().cpu()
    want = torch.from_numpy(sp.ndtri(p.double().numpy()))
    err = (got - want).abs()
    assert float((err / want.abs().clamp_min(1e-3)).max()) < 1e-6, float(err.max())
    assert torch.equal(ndtri(torch.tensor([0.0, 1.0], device=device)).cpu(), torch.tensor([-math.inf, math.inf]))


# ------------------------------------------------------------------------------------------------ op values
@pytest.mark.parametrize("bk, device", backend_params())
def test_tail_matches_float64_reference(bk, device):
    z, y = _logits(b=sized(device, B, 300))
    want_cl, want_rl = ref.macer_tail(z, y, BETA, GAMMA, SIGMA)
    f32_cl, f32_rl = ref.macer_tail(z.float(), y, BETA, GAMMA, SIGMA)      # PyTorch's own fp32 error
    for dtype in (torch.float32, torch.float64):
        with backend(bk):
            cl, rl = macer_tail(*to(device, z.to(dtype), y), beta=BETA, gamma=GAMMA, sigma=SIGMA)
        assert cl.dtype == rl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert cl.device.type == rl.device.type == device
        cl, rl = cl.cpu(), rl.cpu()
        exact = dtype == torch.float64 and bk == "reference"
        for got, want, own in ((cl, want_cl, f32_cl), (rl, want_rl, f32_rl)):
            if exact:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            else:   # at most 2x PyTorch's fp32 error (plus a few ulps)
                bound = 2 * (own.double() - want).abs() + 1e-5 * (1 + want.abs())
                assert torch.all((got.double() - want).abs() <= bound), (got, want)


@pytest.mark.parametrize("bk, device", backend_params())
def test_tail_grads_match_reference(bk, device):
    b = sized(device, B, 300)
    z, y = _logits(b=b)
    g = torch.Generator().manual_seed(1)
    g_cl, g_rl = torch.randn(b, generator=g, dtype=torch.float64), torch.randn(b, generator=g, dtype=torch.float64)
    want = ref.macer_tail_backward(g_cl, g_rl, z, y, BETA, GAMMA, SIGMA)
    zf = z.float().to(device).requires_grad_()
    with backend(bk):
        cl, rl = macer_tail(zf, y.to(device), beta=BETA, gamma=GAMMA, sigma=SIGMA)
        (cl * g_cl.float().to(device) + rl * g_rl.float().to(device)).sum().backward()
    assert zf.grad.dtype == torch.float32 and zf.grad.device.type == device
    torch.testing.assert_close(zf.grad.double().cpu(), want, rtol=1e-4, atol=1e-5)


def test_reference_backward_is_the_derivative():
    """gradcheck in float64 of the op on the reference path (closed-form backward vs finite differences), on
    logits where some examples are kept and some are not."""
    z, y = _logits()
    kept = _kept(z, y)
    assert 0 < int(kept.sum()) < B
    with backend("reference"):
        assert torch.autograd.gradcheck(lambda t: macer_tail(t, y, beta=BETA, gamma=GAMMA, sigma=SIGMA),
                                        (z.clone().requires_grad_(),))


def test_reference_backward_equals_autograd_of_the_original():
    z, y = _logits(b=12, scale=0.3, seed=3)
    zz = z.clone().requires_grad_()
    cl, rl = pub.macer_tail_terms_reference(zz, y, SIGMA, GAMMA, BETA)
    (cl + 12.0 * rl).backward()
    ones = torch.ones(12, dtype=torch.float64)
    got = ref.macer_tail_backward(ones, 12.0 * ones, z, y, BETA, GAMMA, SIGMA)
    torch.testing.assert_close(got, zz.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bk, device", backend_params())
def test_opcheck(bk, device):
    z, y = to(device, *_logits(b=3, k=2, c=4, dtype=torch.float32))
    with backend(bk):
        for cache in (False, True):
            torch.library.opcheck(torch.ops.robustkern.macer_tail.default,
                                  (z.clone().requires_grad_(), y, BETA, GAMMA, SIGMA, cache))
            _, _, coef, i2, s, t = torch.ops.robustkern.macer_tail(z, y, BETA, GAMMA, SIGMA, cache)
            torch.library.opcheck(torch.ops.robustkern.macer_tail_backward.default,
                                  (*to(device, torch.rand(3), torch.rand(3)), z, y, i2, coef, s, t, BETA))


@pytest.mark.parametrize("bk, device", backend_params())
@pytest.mark.parametrize("cache", [False, True])
def test_saved_coefficients_give_the_closed_form_backward(bk, device, cache):
    """The forward op's saved (B, 3) coefficients and runner-up index (and, with ``cache``, the per-copy
    softmaxes), turned into the gradient by the backward op, equal the closed-form backward computed from the
    logits alone (float64 reference), kept and dropped examples both present."""
    z, y = _logits(b=16, seed=2, scale=0.3)
    kept = _kept(z, y)
    assert 0 < int(kept.sum()) < 16
    g = torch.Generator().manual_seed(3)
    g_cl, g_rl = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    want = ref.macer_tail_backward(g_cl, g_rl, z, y, BETA, GAMMA, SIGMA)
    _, _, c64, i64, s64, t64 = ref.macer_tail_fwd(z, y, BETA, GAMMA, SIGMA, cache)
    assert s64.shape == t64.shape == ((16, K, C) if cache else (0,))
    if cache:
        torch.testing.assert_close(t64, torch.softmax(BETA * z, 2), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ref.macer_tail_bwd(g_cl, g_rl, z, y, i64, c64, s64, t64, BETA), want, rtol=1e-12,
                               atol=1e-14)
    zd, yd, gd_cl, gd_rl = to(device, z.float(), y, g_cl.float(), g_rl.float())
    with backend(bk):
        cl, rl, coef, i2, s, t = torch.ops.robustkern.macer_tail(zd, yd, BETA, GAMMA, SIGMA, cache)
        got = torch.ops.robustkern.macer_tail_backward(gd_cl, gd_rl, zd, yd, i2, coef, s, t, BETA)
    assert got.device.type == coef.device.type == device
    got, coef, i2 = got.cpu(), coef.cpu(), i2.cpu()
    assert coef.shape == (16, 3) and i2.dtype == torch.int64
    assert torch.equal(i2[kept], i64[kept]) and torch.all(coef[~kept, 1:] == 0)
    torch.testing.assert_close(coef.double(), c64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bk, device", backend_params())
def test_many_classes_loop_over_copies(bk, device):
    """C = 1500: the kernel holds 2048 columns and reads the k = 5 copies two rows at a time (three blocks)."""
    z, y = _logits(b=2, k=5, c=1500, scale=0.05, dtype=torch.float32)
    g = torch.tensor([0.7, -1.3])
    want = ref.macer_tail(z.double(), y, BETA, GAMMA, SIGMA)
    want_grad = ref.macer_tail_backward(g.double(), 2 * g.double(), z.double(), y, BETA, GAMMA, SIGMA)
    zz = z.clone().to(device).requires_grad_()
    with backend(bk):
        cl, rl = macer_tail(zz, y.to(device), beta=BETA, gamma=GAMMA, sigma=SIGMA)
        (cl * g.to(device) + rl * 2 * g.to(device)).sum().backward()
    assert int(_kept(z.double(), y).sum()) >= 1
    assert cl.device.type == zz.grad.device.type == device
    for a, w in zip((cl, rl), want):
        torch.testing.assert_close(a.double().cpu(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zz.grad.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bk, device", backend_params())
def test_odd_shapes_noncontiguous_and_empty(bk, device):
    z, y = _logits(b=4, k=5, c=11, dtype=torch.float32)
    zd, yd = to(device, z, y)
    zt = zd.transpose(0, 1).contiguous().transpose(0, 1)              # (4, 5, 11), non-contiguous
    assert not zt.is_contiguous()
    want = ref.macer_tail(z.double(), y, BETA, GAMMA, SIGMA)
    with backend(bk):
        got = macer_tail(zt, yd, beta=BETA, gamma=GAMMA, sigma=SIGMA)
        empty = macer_tail(*to(device, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.int64)))
        single = macer_tail(zd[:, :1], yd, beta=BETA, gamma=GAMMA, sigma=SIGMA)   # k = 1
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), w, rtol=1e-4, atol=1e-5)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
    for a, w in zip(single, ref.macer_tail(z[:, :1].double(), y, BETA, GAMMA, SIGMA)):
        torch.testing.assert_close(a.double().cpu(), w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("bk, device", backend_params())
def test_no_example_kept_gives_zero_robustness_and_gradient(bk, device):
    z, y = _logits(dtype=torch.float32)
    wrong = (y + 1) % C                                                # the label is never top-1
    z = z.clone()
    z[torch.arange(B), :, wrong] += 1.0
    z, y = to(device, z, y)
    zz = z.requires_grad_()
    with backend(bk):
        cl, rl = macer_tail(zz, y, beta=BETA, gamma=GAMMA, sigma=SIGMA)
        rl.sum().backward()
    assert rl.device.type == zz.grad.device.type == device
    assert torch.all(rl == 0) and torch.all(zz.grad == 0)
    assert torch.all(cl > 0)
    with backend(bk):                                                  # gamma = 0: the hinge keeps nothing
        _, rl0 = macer_tail(z.detach(), y, beta=BETA, gamma=0.0, sigma=SIGMA)
    assert torch.all(rl0 == 0)


@pytest.mark.parametrize("bk, device", backend_params())
def test_saturated_and_near_one_probabilities(bk, device):
    """p1 = 1 in fp32 (Phi^-1 infinite: dropped, finite gradient), p1 near 1 but xi <= gamma (kept), a
    confident but wrong example."""
    z = torch.zeros(3, 2, 4)
    y = torch.tensor([0, 1, 2])
    z[0, :, 0] = 10.0             # beta z = 160: q1 == 1 exactly in fp32
    z[1, :, 1] = 0.25             # q1 ~ 0.95: kept, xi ~ 3.2
    z[1, :, 3] = 0.05
    z[2, :, 3] = 5.0              # wrong
    zz = z.clone().to(device).requires_grad_()
    with backend(bk):
        cl, rl = macer_tail(zz, y.to(device), beta=BETA, gamma=GAMMA, sigma=SIGMA)
        (cl.sum() + rl.sum()).backward()
    assert rl.device.type == zz.grad.device.type == device
    cl, rl = cl.cpu(), rl.cpu()
    want_cl, want_rl = ref.macer_tail(z.double(), y, BETA, GAMMA, SIGMA)
    assert rl[0] == 0 and rl[2] == 0 and rl[1] > 0
    torch.testing.assert_close(rl.double(), want_rl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl.double(), want_cl, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(zz.grad).all()
    with torch.no_grad():                                              # the original drops example 0 too
        _, rl_o = pub.macer_tail_terms_reference(z, y, SIGMA, GAMMA, BETA)
    torch.testing.assert_close(rl_o.double(), want_rl.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bk, device", backend_params())
def test_exact_tie_goes_to_the_label(bk, device):
    """beta z saturates the softmax, so q_bar is a multiple of 1/k and exact ties are common: the op counts a
    tie between the label and another class as correctly classified (xi = 0, rl = sigma/2 gamma); the
    original's torch.topk orders ties arbitrarily."""
    z = torch.zeros(2, 2, 5)
    z[:, 0, 1] = 10.0
    z[:, 1, 3] = 10.0                                                   # q_bar = (0, 1/2, 0, 1/2, 0)
    y = torch.tensor([1, 3])
    with backend(bk):
        _, rl = macer_tail(*to(device, z, y), beta=BETA, gamma=GAMMA, sigma=SIGMA)
    assert rl.device.type == device
    torch.testing.assert_close(rl.cpu(), torch.full((2,), SIGMA / 2 * GAMMA))


def test_tail_bad_input():
    z, y = _logits(dtype=torch.float32)
    with pytest.raises(ValueError, match="3-D"):
        macer_tail(z[0], y)
    with pytest.raises(ValueError, match="two classes"):
        macer_tail(z[..., :1], y)
    with pytest.raises(ValueError, match="labels must be"):
        macer_tail(z, y[:3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        macer_tail(z, torch.full((B,), 7))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        macer_tail(z, y, sigma=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        macer_tail(z, y, beta=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        macer_tail(z, y, gamma=float("nan"))


# ------------------------------------------------------------------------------------------------ macer_loss
def _batch(n=6, k=4, seed=0):
    xtr, ytr, _, _ = digits()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, k) + tuple(xtr.shape[1:]), generator=g)
    return xtr[:n], ytr[:n], noise


@pytest.mark.parametrize("faithful", [False, True])
def test_macer_loss_equals_the_original_given_the_same_noise(faithful):
    """Same noise, same weights: macer_loss (fused tail, or faithful) equals the transcription of the original,
    values and parameter gradients. Unsaturated logits (beta z of a few units), so q_bar has no exact ties
    (where torch.topk's order is unspecified) and both the kept and the dropped branch occur."""
    x, y, noise = _batch()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        z = model((x.unsqueeze(1) + 0.5 * noise).reshape(-1, 1, 8, 8)).reshape(6, 4, 10)
        y = torch.softmax(BETA * z, 2).mean(1).argmax(1)
    y[:2] = (y[:2] + 1) % 10                                            # two examples misclassified
    model_ref = copy.deepcopy(model)
    got = macer_loss(model, x, y, 0.5, k=4, lbd=12.0, noise=noise, faithful=faithful)
    want = pub.macer_loss_reference(model_ref, x, y, 0.5, k=4, lbd=12.0, noise=noise)
    kept = _kept(z.double(), y)
    assert int(kept.sum()) == 4 and want[2].item() > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got[0].backward()
    want[0].backward()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_macer_loss_noise_sources_replay():
    x, y, _ = _batch()
    model = mlp()
    a = macer_loss(model, x, y, 0.25, k=3, seed=5)[0]
    b = macer_loss(model, x, y, 0.25, k=3, seed=5)[0]
    c = macer_loss(model, x, y, 0.25, k=3, seed=6)[0]
    assert a == b and a != c
    # the default draws are the original's: torch.randn of shape (B*k, ...) from the generator
    got = macer_loss(model, x, y, 0.25, k=3, generator=torch.Generator().manual_seed(3))
    want = pub.macer_loss_reference(model, x, y, 0.25, k=3, generator=torch.Generator().manual_seed(3))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_macer_loss_bad_input():
    x, y, noise = _batch()
    model = mlp()
    with pytest.raises(ValueError, match="sigma must be > 0"):
        macer_loss(model, x, y, -0.1)
    with pytest.raises(ValueError, match="k .* >= 1"):
        macer_loss(model, x, y, 0.25, k=0)
    with pytest.raises(ValueError, match="y must be"):
        macer_loss(model, x, y[:2], 0.25)
    with pytest.raises(ValueError, match="< the number of classes 10"):
        macer_loss(model, x, torch.full_like(y, 10), 0.25, k=2)
    with pytest.raises(ValueError, match="NaN"):
        macer_loss(model, torch.full_like(x, float("nan")), y, 0.25)
    with pytest.raises(ValueError, match="noise must have shape"):
        macer_loss(model, x, y, 0.25, k=2, noise=noise)
    with pytest.raises(ValueError, match="lbd must be >= 0"):
        macer_loss(model, x, y, 0.25, lbd=-1.0)



@pytest.mark.parametrize("bk, device", backend_params())
def test_macer_loss_without_value_checks_is_identical_on_valid_input(bk, device):
    """check_values=False changes nothing on valid input: the same loss terms and parameter gradients, bit for
    bit, from explicit noise and from counter-based noise; and macer_train passes it on (same weights)."""
    x, _, noise = to(device, *_batch(n=4, k=2))
    torch.manual_seed(0)
    model = mlp().to(device)
    with torch.no_grad():
        y = model(x).argmax(1)                              # labels the model gets right: kept examples
    with backend(bk):
        for source in ({"noise": noise}, {"seed": 11}):
            runs = []
            for check in (True, False):
                m = copy.deepcopy(model)
                out = macer_loss(m, x, y, 0.25, k=2, lbd=3.0, check_values=check, **source)
                out[0].backward()
                runs.append((out, [p.grad for p in m.parameters()]))
            (out_a, g_a), (out_b, g_b) = runs
            assert out_a[2].item() > 0                      # the robustness term takes part
            for a, b in zip(out_a + tuple(g_a), out_b + tuple(g_b)):
                assert torch.equal(a, b)
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    trained = []
    for check in (True, False):
        m = copy.deepcopy(model)
        r = macer_train(0.25, 3.0, 2, BETA, GAMMA, 10, m, loader, torch.optim.SGD(m.parameters(), lr=0.1), device,
                        generator=torch.Generator(device).manual_seed(2), check_values=check)
        trained.append((r, m))
    assert trained[0][0] == trained[1][0]
    for p, q in zip(trained[0][1].parameters(), trained[1][1].parameters()):
        assert torch.equal(p, q)


def test_macer_loss_value_checks_still_raise_by_default():
    """check_values=True (the default) still rejects NaN inputs and labels outside [0, C)."""
    x, y, _ = _batch()
    model = mlp()
    for check in ({}, {"check_values": True}):
        with pytest.raises(ValueError, match="x contains NaN"):
            macer_loss(model, torch.where(torch.arange(x.numel()).view_as(x) == 5, float("nan"), x), y, 0.25, k=2,
                       **check)
        with pytest.raises(ValueError, match="labels must be >= 0, got -1"):
            macer_loss(model, x, torch.where(y == y[0], -1, y), 0.25, k=2, **check)
        with pytest.raises(ValueError, match="< the number of classes 10, got 12"):
            macer_loss(model, x, torch.where(y == y[0], 12, y), 0.25, k=2, **check)
    # the argument checks stay without value checks
    with pytest.raises(ValueError, match="y must be"):
        macer_loss(model, x, y.int(), 0.25, check_values=False)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        macer_loss(model, x, y, 0.0, check_values=False)


class _HostSync(Exception):
    pass


@pytest.mark.parametrize("bk, device", backend_params())
def test_macer_loss_without_value_checks_reads_no_tensor_value(bk, device, monkeypatch):
    """With check_values=False, macer_loss reads no tensor value on the host: Tensor.item / __bool__ / __int__ /
    __float__ / tolist (the ways a check syncs) raise while it runs, forward and backward (noise given; with
    the counter-based noise too on Triton). The same patch
    catches the default call's checks, so the test would notice a check that sneaks back."""
    x, y, noise = to(device, *_batch(n=4, k=2))
    model = mlp().to(device)

    def sync(self, *args, **kwargs):
        raise _HostSync("a tensor value was read on the host")

    with backend(bk):
        want = macer_loss(model, x, y, 0.25, k=2, noise=noise, check_values=False)[0].item()
        with monkeypatch.context() as mp:
            for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
                mp.setattr(torch.Tensor, name, sync)
            loss, cl, rl = macer_loss(model, x, y, 0.25, k=2, noise=noise, check_values=False)
            loss.backward()
            if bk == "triton":  # counter-based noise (the reference noise op reads its seed tensor on the host)
                macer_loss(model, x, y, 0.25, k=2, seed=4, check_values=False)[0].backward()
            with pytest.raises(_HostSync):
                macer_loss(model, x, y, 0.25, k=2, noise=noise)
        assert loss.item() == want


def test_macer_train_deferred_epochs_and_reference_loop():
    """One epoch of macer_train equals the transcription of the original's loop (same generator); with
    deferred_epochs the robustness term does not reach the weights."""
    xtr, ytr, _, _ = digits()
    loader = [(xtr[i:i + 20], ytr[i:i + 20]) for i in range(0, 60, 20)]
    torch.manual_seed(0)
    m1, m2 = mlp(), mlp()
    m2.load_state_dict(m1.state_dict())
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.05), torch.optim.SGD(m2.parameters(), lr=0.05)
    r1 = macer_train(0.25, 12.0, 4, BETA, GAMMA, 10, m1, loader, o1, "cpu", generator=torch.Generator().manual_seed(1))
    r2 = pub.macer_train_reference(0.25, 12.0, 4, BETA, GAMMA, 10, m2, loader, o2, "cpu",
                                   generator=torch.Generator().manual_seed(1))
    assert r1 == pytest.approx(r2, rel=1e-4)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    # deferred: lbd = 0 in epoch 0 < 1, so the update equals that of lbd = 0
    m3, m4 = mlp(), mlp()
    m4.load_state_dict(m3.state_dict())
    o3, o4 = torch.optim.SGD(m3.parameters(), lr=0.05), torch.optim.SGD(m4.parameters(), lr=0.05)
    macer_train(0.25, 12.0, 4, BETA, GAMMA, 10, m3, loader, o3, "cpu", epoch=0, deferred_epochs=1,
                generator=torch.Generator().manual_seed(1))
    macer_train(0.25, 0.0, 4, BETA, GAMMA, 10, m4, loader, o4, "cpu", generator=torch.Generator().manual_seed(1))
    for p, q in zip(m3.parameters(), m4.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="needs the current epoch"):
        macer_train(0.25, 12.0, 4, BETA, GAMMA, 10, m3, loader, o3, "cpu", deferred_epochs=1)


# ------------------------------------------------------------------------------------------------ the app
def _app_cfg(*overrides):
    from robustkern_cli.config import load_config
    from robustkern_cli.evaluate import fill_all_defaults as _fill_all

    return load_config("digits_gaussian", ["training_params:method=macer", "training_params:method_params:gauss_num=2",
                                           *overrides], fill_defaults=_fill_all)


def test_app_macer_step_is_macer_loss():
    from robustkern_cli.errors import ConfigError
    from robustkern_cli.losses import LOSSES, StepState

    cfg = _app_cfg("training_params:method_params:lbd=3.0")
    x, y, _ = _batch()
    model = mlp()
    torch.manual_seed(7)
    loss, metrics = LOSSES["macer"](model, x, y, cfg, StepState(epoch=0))
    torch.manual_seed(7)
    want = macer_loss(model, x, y, 0.25, k=2, lbd=3.0)
    assert loss.item() == want[0].item() and metrics["robustness"] == want[2].item() and metrics["lbd"] == 3.0
    deferred = _app_cfg("training_params:method_params:deferred=true", "training_params:lr_schedule=multistep",
                        "training_params:lr_milestones=[2]")
    assert LOSSES["macer"](model, x, y, deferred, StepState(epoch=1))[1]["lbd"] == 0.0
    assert LOSSES["macer"](model, x, y, deferred, StepState(epoch=2))[1]["lbd"] == 12.0
    with pytest.raises(ConfigError, match="deferred"):   # refused when the config is loaded
        _app_cfg("training_params:method_params:deferred=true")


def test_app_trains_macer_on_digits(tmp_path, one_thread):
    from robustkern_cli.train import train

    cfg = _app_cfg("training_params:epochs=2", "training_params:method_params:lbd=1.0")
    res = train(cfg, tmp_path / "macer", progress=False, log=lambda s: None)
    first, last = res.history[0], res.history[-1]
    assert math.isfinite(last["train_loss"]) and last["train_loss"] < first["train_loss"]
    assert last["train_robustness"] > 0 and last["train_classification"] < first["train_classification"]


# ------------------------------------------------------------------------------------------------ training
def _epochs(model, opt, method, sigma, epochs, g, lbd=4.0, k=16):
    """``epochs`` passes over the digits training set (batches of 100, order and noise from ``g``): Gaussian
    augmentation (cross-entropy of one noisy copy) or MACER (k copies, gamma 8, beta 16)."""
    xtr, ytr, _, _ = digits()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 100):
            x, y = xtr[perm[i:i + 100]], ytr[perm[i:i + 100]]
            if method == "macer":
                loss = macer_loss(model, x, y, sigma, k=k, lbd=lbd, generator=g)[0]
            else:
                loss = F.cross_entropy(model(x + sigma * torch.randn(x.shape, generator=g)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.slow
def test_macer_certifies_larger_radii_than_gaussian_augmentation(one_thread):
    """The issue's check: on the digits MLP, MACER gives a higher average certified radius (ACR = mean of
    radius * 1[correct]) than Gaussian augmentation at the same sigma. Fair and cheap: 10 epochs of Gaussian
    augmentation (Adam, lr 3e-3), then 10 further epochs of each method from that same checkpoint (same weights,
    optimizer state, batch order and noise generator); the 397 test images certified with Cohen's CERTIFY
    (n0 32, n 2000, alpha 0.01, the same noise for both).

    sigma = 0.25, lbd = 4, k = 16: the ACR gap MACER - Gaussian over training seeds 0-9 is 0.0035, 0.0081,
    0.0097, 0.0149, 0.0134, 0.0132, 0.0231, 0.0079, 0.0240, 0.0150 (ACR about 0.45 -> 0.46-0.47; mean 0.0133, sd
    0.0061), all ten positive; asserted on seed 0, the smallest of the ten, with a margin of 0.002 (below it, so
    the assertion is that the gap keeps its sign and size, not that seed 0 is typical). At sigma = 0.5 the gap is
    within about +-0.02 and changes sign with the seed; at sigma = 1.0 (lbd 12) it is positive but the ACR is only
    about 0.07-0.10. MACER must not buy its radii by collapsing: its certified accuracy at radius 0 stays within
    0.05 of Gaussian augmentation's (seeds 0-9: at most 0.023 lower)."""
    from robustkern.smoothing import certify_batch

    sigma, seed = 0.25, 0
    _, _, xte, yte = digits()
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    _epochs(model, opt, "gaussian", sigma, 10, g)
    checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), g.get_state())
    result = {}
    for method in ("gaussian", "macer"):
        model.load_state_dict(checkpoint[0])
        opt.load_state_dict(checkpoint[1])
        g.set_state(checkpoint[2])
        _epochs(model, opt, method, sigma, 10, g)
        pred, radius = certify_batch(model, xte, 10, sigma, 32, 2000, 0.01, 8192, seed=0)
        correct = pred == yte
        result[method] = (float((radius * correct).mean()), float(correct.float().mean()))
    (acr_g, acc_g), (acr_m, acc_m) = result["gaussian"], result["macer"]
    assert acr_m > acr_g + 0.002, result
    assert acc_m >= acc_g - 0.05, result
