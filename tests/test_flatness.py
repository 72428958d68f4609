"""robustkern.flatness: input-gradient norms, LFR, GradAlign, F-GR against PyTorch's own double backprop and
against the transcription of the published LFR step (robustkern.reference.published.lfr)."""
import copy
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _digits
from robustkern.flatness import fgr_penalty, gradalign_penalty, input_grad_norm, lfr_loss, lfr_perturb
from robustkern import cpu_malloc
from robustkern.flatness import grad_norm as grad_norm_module
from robustkern.reference.published.lfr import lfr_loss_reference

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = _digits.one_thread

try:
    from robustkern.flatness import fused as _fused
except ImportError:  # the fused path is a separate part
    _fused = None

BACKENDS = ["torch", "auto"] + (["fused"] if _fused is not None else [])


def _conv_net(bn=False, pool=None, act=nn.ReLU):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [act()]
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    d = 4 if pool else 8
    layers += [nn.Flatten(), nn.Linear(4 * d * d, 12), act(), nn.Linear(12, 5)]
    net = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics and affine parameters
        with torch.no_grad():
            net[1].running_mean.uniform_(-0.2, 0.2)
            net[1].running_var.uniform_(0.5, 2.0)
            net[1].weight.uniform_(0.5, 1.5)
            net[1].bias.uniform_(-0.1, 0.1)
    return net


def _batch(n=6, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def _torch_norm(model, x, y, p):
    """PyTorch's own double backprop: per-example ||grad_x CE||_p with its graph."""
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg, create_graph=True)
    return torch.linalg.vector_norm(g.flatten(1), ord=p, dim=1)


def _param_grads(value, model):
    return torch.autograd.grad(value, [p for p in model.parameters()])


def _assert_grads_close(a, b, rtol=1e-10, atol=1e-12):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------- input_grad_norm
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "bn_eval"])
def test_input_grad_norm_equals_torch_double_backprop(p, backend, kind):
    model = _conv_net(bn=kind == "bn_eval").eval()
    x, y = _batch()
    ref = _torch_norm(model, x, y, p)
    weights = torch.rand(x.shape[0], dtype=torch.float64)  # a non-uniform use of the norms
    ours = input_grad_norm(model, x, y, p=p, backend=backend)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-14)
    _assert_grads_close(_param_grads((ours * weights).sum(), model), _param_grads((ref * weights).sum(), model))
    assert all(q.grad is None for q in model.parameters())


@pytest.mark.parametrize("p", [1, 2])
def test_input_grad_norm_unsupported_model_falls_back_to_torch(p):
    model = _conv_net(pool="max").eval()  # max pooling: not on the fused path
    x, y = _batch()
    ref = _torch_norm(model, x, y, p)
    ours = input_grad_norm(model, x, y, p=p, backend="auto")
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-14)
    _assert_grads_close(_param_grads(ours.sum(), model), _param_grads(ref.sum(), model))


@pytest.mark.skipif(_fused is None, reason="robustkern.flatness.fused is not available")
def test_backend_choice_reaches_the_fused_path(monkeypatch):
    calls = []
    real = _fused.input_gradient

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_fused, "input_gradient", counting)
    x, y = _batch()
    input_grad_norm(_conv_net().eval(), x, y, backend="fused")
    assert len(calls) == 1
    input_grad_norm(_conv_net().eval(), x, y, backend="auto")  # CPU penalty: PyTorch's double backprop
    input_grad_norm(_conv_net().eval(), x, y, backend="torch")
    input_grad_norm(_conv_net(bn=True).train(), x, y, backend="auto")  # batch statistics: torch
    assert len(calls) == 1
    with cpu_malloc_kept():   # the allocator's state never changes which path runs
        input_grad_norm(_conv_net().eval(), x, y, backend="auto")
    assert len(calls) == 1
    pooled = _conv_net(pool="max").eval()   # max pooling takes the fused path too (its selections kept)
    torch.testing.assert_close(input_grad_norm(pooled, x, y, backend="fused"),
                               input_grad_norm(pooled, x, y, backend="torch"))
    assert len(calls) == 2
    with pytest.raises(TypeError, match="Tanh"):
        input_grad_norm(_conv_net(act=nn.Tanh).eval(), x, y, backend="fused")


@contextlib.contextmanager
def cpu_malloc_kept():
    saved = list(cpu_malloc._APPLIED)
    cpu_malloc._APPLIED[:] = [True]
    try:
        yield
    finally:
        cpu_malloc._APPLIED[:] = saved


@functools.lru_cache(maxsize=None)
def _trained_here(kind):
    """A digits model trained in this test module (seeded before construction, so the weights do not depend on
    which tests ran before: a few seconds on one thread)."""
    torch.manual_seed(0)
    model = _digits.mlp() if kind == "mlp" else _digits.cnn()
    return _digits._train(model, epochs=10, seed=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("p", [1, 2])
def test_finite_difference_within_2_percent_on_trained_digits(kind, p):
    model = _trained_here(kind)
    _, _, xte, yte = _digits.digits()
    x, y = xte[:128], yte[:128]
    exact = input_grad_norm(model, x, y, p=p).detach()
    fd, logits = input_grad_norm(model, x, y, p=p, method="finite_difference", return_logits=True)
    rel = (fd.detach() - exact).abs() / exact
    assert float(rel.max()) < 0.02, f"max relative error {float(rel.max()):.4f}"
    torch.testing.assert_close(logits, model(x))  # the shared clean forward
    forward = input_grad_norm(model, x, y, p=p, method="finite_difference", scheme="forward").detach()
    rel_forward = (forward - exact).abs() / exact
    assert float(rel_forward.median()) < 0.02
    assert float(rel.median()) < float(rel_forward.median())  # O(h^2) against O(h)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_updates_bn_stats_from_the_clean_forward_only(scheme):
    x, y = _batch(8)
    model, clean_only = _conv_net(bn=True).train(), _conv_net(bn=True).train()
    input_grad_norm(model, x, y, method="finite_difference", scheme=scheme)
    clean_only(x)
    for a, b in zip(_bn_state(model), _bn_state(clean_only)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [1, 2])
def test_finite_difference_parameter_gradient_converges_on_a_smooth_net(p):
    """On a tanh net the parameter gradient of the FD penalty tends to the exact one (O(h^2)). In ReLU nets it
    does not in general: an example whose segment crosses a kink adds an O(1/h) term (module docstring)."""
    model = _conv_net(act=nn.Tanh).eval()
    x, y = _batch(8)
    exact = torch.cat([g.flatten() for g in _param_grads(input_grad_norm(model, x, y, p=p).mean(), model)])
    errors = []
    for h in (1e-2, 1e-3):
        fd = input_grad_norm(model, x, y, p=p, method="finite_difference", h=h)
        g_fd = torch.cat([g.flatten() for g in _param_grads(fd.mean(), model)])
        errors.append(float((g_fd - exact).norm() / exact.norm()))
    assert errors[1] < 1e-4 and errors[1] < errors[0] / 30


def test_finite_difference_keeps_accuracy_for_confident_examples():
    """Losses 1e-7..1e-5 in float32: the plain difference of two losses cancels (over 100% off); the
    log1p/expm1 form stays within 10% of the float64 truth (float32 double backprop itself is ~60% off here,
    since 1 - p_y rounds)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch.no_grad():
        model[3].weight.mul_(200.0)
    x, _ = _batch(256)
    x = x.float()
    with torch.no_grad():
        y = model(x).argmax(1)
        loss = F.cross_entropy(model(x), y, reduction="none")
    confident = (loss > 1e-9) & (loss < 1e-5)
    x, y = x[confident], y[confident]
    assert len(y) >= 8
    exact = input_grad_norm(copy.deepcopy(model).double(), x.double(), y, p=2).detach()
    fd = input_grad_norm(model, x, y, p=2, method="finite_difference").detach().double()
    assert float(((fd - exact).abs() / exact).max()) < 0.1
    _, g = grad_norm_module._input_gradient(model, x, y, False, "torch")
    u = g / g.flatten(1).norm(dim=1)[:, None, None, None]
    h = grad_norm_module.DEFAULT_H
    with torch.no_grad():
        naive = (F.cross_entropy(model(x + h * u), y, reduction="none")
                 - F.cross_entropy(model(x - h * u), y, reduction="none")) / (2 * h)
    assert float(((naive.double() - exact).abs() / exact).max()) > 1.0


# ----------------------------------------------------------------------------------------------- LFR
def _bn_state(model):
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn", [False, True])
def test_lfr_faithful_equals_reference(backend, bn):
    x, y = _batch(8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_model, our_model = _conv_net(bn=bn), _conv_net(bn=bn)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    our_opt = torch.optim.SGD(our_model.parameters(), lr=0.1)
    for m in (ref_model, our_model):  # stale gradients that the faithful step must clear
        for q in m.parameters():
            q.grad = torch.ones_like(q)
    ref_model.eval(), our_model.eval()
    if backend == "fused" and bn:  # the outer pass runs BatchNorm on batch statistics: not on the fused path
        with pytest.raises(TypeError, match="batch statistics"):
            lfr_loss(our_model, x, y, 0.1, 0.02, 4, 0.5, noise=noise, faithful=True, backend=backend)
        return
    ref = lfr_loss_reference(ref_model, x, y, 0.5, noise, ref_opt, step_size=0.02, epsilon=0.1, perturb_steps=4)
    ours = lfr_loss(our_model, x, y, 0.1, 0.02, 4, 0.5, noise=noise, faithful=True, optimizer=our_opt,
                    backend=backend)
    for a, b in zip(ours, ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert our_model.training and ref_model.training  # left in train mode, as upstream
    assert all(q.grad is None or not q.grad.any() for q in our_model.parameters())  # zero_grad() ran
    ref[0].backward()
    ours[0].backward()
    _assert_grads_close([q.grad for q in our_model.parameters()], [q.grad for q in ref_model.parameters()])
    for a, b in zip(_bn_state(our_model), _bn_state(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lfr_default_mode_restores_modes_and_updates_bn_stats_from_the_clean_pass_only():
    x, y = _batch(8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_model, our_model, clean_only = _conv_net(bn=True), _conv_net(bn=True), _conv_net(bn=True)
    our_model.train()
    our_model[2].eval()  # a mixed mode the call must hand back unchanged
    ref = lfr_loss_reference(ref_model, x, y, 0.5, noise, step_size=0.02, epsilon=0.1, perturb_steps=3)
    ours = lfr_loss(our_model, x, y, 0.1, 0.02, 3, 0.5, noise=noise)
    for a, b in zip(ours, ref[:3]):  # train-mode forwards do not read the running statistics
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert our_model.training and not our_model[2].training
    clean_only.train()(x)  # one clean train-mode forward
    for a, b in zip(_bn_state(our_model), _bn_state(clean_only)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    frozen = _conv_net(bn=True)
    before = _bn_state(frozen)
    lfr_loss(frozen.train(), x, y, 0.1, 0.02, 3, 0.5, noise=noise, inner_mode="train", bn_stats="none")
    for a, b in zip(_bn_state(frozen), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["l_inf", "l_2"])
def test_lfr_search_stays_in_the_ball_and_raises_the_gradient_norm(norm):
    model = _digits.trained("mlp")
    _, _, xte, yte = _digits.digits()
    x, y = xte[:64], yte[:64]
    eps, step = (0.1, 0.02) if norm == "l_inf" else (1.0, 0.2)
    p = 1 if norm == "l_inf" else 2
    start = lfr_perturb(model, x, y, eps, step, 0, norm=norm, seed=0)
    adv = lfr_perturb(model, x, y, eps, step, 10, norm=norm, seed=0)
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "l_inf" else d.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5) and float(adv.min()) >= 0 and float(adv.max()) <= 1
    before = input_grad_norm(model, start, y, p=p).detach()
    after = input_grad_norm(model, adv, y, p=p).detach()
    assert float(after.mean()) > 1.5 * float(before.mean())
    assert float((after > before).float().mean()) > 0.8


def test_lfr_is_replayable_from_seed_or_noise():
    model = _conv_net().eval()
    x, y = _batch(4)
    a = lfr_loss(model, x, y, 0.1, 0.02, 2, 1.0, seed=7, return_adv=True)
    b = lfr_loss(model, x, y, 0.1, 0.02, 2, 1.0, generator=torch.Generator().manual_seed(7), return_adv=True)
    c = lfr_loss(model, x, y, 0.1, 0.02, 2, 1.0, seed=8, return_adv=True)
    torch.testing.assert_close(a[3], b[3], rtol=0, atol=0)
    assert not torch.equal(a[3], c[3])


def test_lfr_app_loss_one_step_on_digits():
    from robustkern_cli.losses import LOSSES, METHOD_DEFAULTS, fill_method_defaults

    assert set(METHOD_DEFAULTS["lfr"]) == {"epsilon", "step_size", "num_steps", "lambada", "norm"}
    cfg = {"training_params": {"method": "lfr", "method_params": {"epsilon": 0.1, "step_size": 0.02,
                                                                   "num_steps": 3, "lambada": 0.05}}}
    fill_method_defaults(cfg)
    model = copy.deepcopy(_digits.trained("cnn")).train()
    xtr, ytr, _, _ = _digits.digits()
    x, y = xtr[:64], ytr[:64]
    twin = copy.deepcopy(model)  # the call updates BatchNorm statistics, which the next search reads
    torch.manual_seed(5)
    loss, metrics = LOSSES["lfr"](model, x, y, cfg, None)
    torch.manual_seed(5)
    direct = lfr_loss(twin, x, y, 0.1, 0.02, 3, 0.05)
    torch.testing.assert_close(loss, direct[0])
    assert metrics["loss_grad"] == pytest.approx(direct[2].item())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.manual_seed(5)
    assert LOSSES["lfr"](model, x, y, cfg, None)[0].item() < loss.item()
    from robustkern_cli.config import load_config
    from robustkern_cli.errors import ConfigError
    from robustkern_cli.evaluate import fill_all_defaults

    with pytest.raises(ConfigError, match="norm"):   # refused when the config is loaded
        load_config("digits_standard", ["training_params:method=lfr", "training_params:method_params:norm=l_1"],
                    fill_defaults=fill_all_defaults)


# ----------------------------------------------------------------------------------------------- GradAlign, F-GR
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradalign_equals_its_definition(backend):
    model = _conv_net().eval()
    x, y = _batch(6)
    eta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1) * 0.05
    ours, cos = gradalign_penalty(model, x, y, 0.05, lam=0.3, noise=eta, backend=backend, return_cos=True)
    xa = x.clone().requires_grad_(True)
    g1, = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
    xb = (x + eta).requires_grad_(True)
    g2, = torch.autograd.grad(F.cross_entropy(model(xb), y), xb, create_graph=True)
    ref_cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1, eps=0.0)
    ref = 0.3 * (1 - ref_cos.mean())
    torch.testing.assert_close(cos, ref_cos.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    _assert_grads_close(_param_grads(ours, model), _param_grads(ref, model))
    zero = gradalign_penalty(model, x, y, 0.05, noise=torch.zeros_like(x), backend=backend)
    assert abs(zero.item()) < 1e-12
    s1, s2 = gradalign_penalty(model, x, y, 0.05, seed=4), gradalign_penalty(model, x, y, 0.05, seed=4)
    assert s1.item() == s2.item() and s1.item() > 0


def test_fgr_gradients():
    x, y = _batch(8)
    model = _conv_net(bn=True).train()
    params = list(model.parameters())
    before_bn, before_params = _bn_state(model), [q.detach().clone() for q in params]
    gamma, h = 0.02, 0.05
    loss, plain, gsq = fgr_penalty(model, x, y, gamma, h)
    ours = torch.autograd.grad(loss, params)
    # the F-GR gradient by its definition: (1 - gamma/h) grad L(theta) + (gamma/h) grad L(theta + h grad L)
    ref_model = _conv_net(bn=True).train()
    with torch.no_grad():
        for a, b in zip(ref_model.parameters(), before_params):
            a.copy_(b)
    g0 = torch.autograd.grad(F.cross_entropy(ref_model(x), y), list(ref_model.parameters()))
    shifted = copy.deepcopy(ref_model)
    with torch.no_grad():
        for q, g in zip(shifted.parameters(), g0):
            q.add_(h * g)
    g1 = torch.autograd.grad(F.cross_entropy(shifted(x), y), list(shifted.parameters()))
    _assert_grads_close(ours, [(1 - gamma / h) * a + gamma / h * b for a, b in zip(g0, g1)])
    torch.testing.assert_close(gsq, sum((g * g).sum() for g in g0))
    for a, b in zip(params, before_params):  # the weights themselves are never moved
        assert torch.equal(a.detach(), b)
    clean_only = _conv_net(bn=True).train()
    clean_only(x)
    for a, b in zip(_bn_state(model), _bn_state(clean_only)):  # the shifted forward left the stats alone
        torch.testing.assert_close(a, b)
    assert not torch.equal(before_bn[0], _bn_state(model)[0])


def test_fgr_converges_to_double_backprop_for_smooth_nets_only():
    x, y = _batch(8)
    tanh = _conv_net(act=nn.Tanh)
    db_loss, _, _ = fgr_penalty(tanh, x, y, 0.1, method="double_backprop")
    xg = x
    plain = F.cross_entropy(tanh(xg), y)
    g = torch.autograd.grad(plain, list(tanh.parameters()), create_graph=True)
    ref = _param_grads(plain + 0.05 * sum((a * a).sum() for a in g), tanh)
    db = _param_grads(db_loss, tanh)
    _assert_grads_close(db, ref)
    flat = lambda gs: torch.cat([a.flatten() for a in gs])  # noqa: E731

    def fgr_error(model, h):
        fd = flat(_param_grads(fgr_penalty(model, x, y, 0.1, h)[0], model))
        exact = flat(_param_grads(fgr_penalty(model, x, y, 0.1, method="double_backprop")[0], model))
        plain_g = flat(_param_grads(F.cross_entropy(model(x), y), model))
        return float((fd - exact).norm() / (exact - plain_g).norm())  # relative to the regulariser's part

    e3, e5 = fgr_error(tanh, 1e-3), fgr_error(tanh, 1e-5)
    assert e5 < 1e-3 and e5 < e3 / 30  # linear convergence in h


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = _conv_net().eval()
    x, y = _batch(4)
    torch.testing.assert_close(input_grad_norm(model, x, y.int()), input_grad_norm(model, x, y))  # int32 labels
    with pytest.raises(ValueError, match="y must be an integer tensor of shape"):
        input_grad_norm(model, x, y[:3])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        input_grad_norm(model, x.long(), y)
    with pytest.raises(ValueError, match="NaN"):
        input_grad_norm(model, x.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="p must be one of"):
        input_grad_norm(model, x, y, p=3)
    with pytest.raises(ValueError, match="method must be one of"):
        input_grad_norm(model, x, y, method="exact")
    with pytest.raises(ValueError, match="h must be > 0"):
        input_grad_norm(model, x, y, method="finite_difference", h=-1e-3)
    with pytest.raises(ValueError, match="h is the finite-difference step"):
        input_grad_norm(model, x, y, h=1e-3)
    with pytest.raises(ValueError, match="backend must be one of"):
        input_grad_norm(model, x, y, backend="cuda")
    with pytest.raises(ValueError, match="labels must lie in"):
        input_grad_norm(model, x, y + 10, backend="torch")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        input_grad_norm(lambda t: t, x, y)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        lfr_loss(model, x, y, -0.1, 0.01, 2, 1.0)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        lfr_loss(model, x, y, 0.1, 0.0, 2, 1.0)
    with pytest.raises(ValueError, match="perturb_steps must be an integer"):
        lfr_loss(model, x, y, 0.1, 0.01, 2.5, 1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        lfr_loss(model, x, y, 0.1, 0.01, 2, -1.0)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        lfr_loss(model, x * 3, y, 0.1, 0.01, 2, 1.0)
    with pytest.raises(ValueError, match="noise must be a tensor of the input's shape"):
        lfr_loss(model, x, y, 0.1, 0.01, 2, 1.0, noise=torch.zeros(3))
    with pytest.raises(ValueError, match="norm must be one of"):
        lfr_loss(model, x, y, 0.1, 0.01, 2, 1.0, norm="l_1")
    with pytest.raises(ValueError, match="optimizer is only used by faithful=True"):
        lfr_loss(model, x, y, 0.1, 0.01, 2, 1.0, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        lfr_loss(model, x, y, 0.1, 0.01, 2, 1.0, bn_stats="some")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gradalign_penalty(model, x, y, -0.1)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        fgr_penalty(model, x, y, -1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        fgr_penalty(model, x, y, 0.1, method="central")
