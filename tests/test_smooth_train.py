"""Smoothing-based training losses (robustkern.smoothing.augment / adversarial) against the faithful
transcriptions of the original training scripts (robustkern.reference.published.smooth_train), in float64 on tiny nets,
plus replay, projection, faithful-vs-fast, bad input and the app's registered losses."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern.reference.published.smooth_train import (consistency_loss_reference, smoothadv_attack_reference,
                                               smoothadv_loss_reference, trades_rs_loss_reference)
from robustkern.smoothing import (consistency_loss, gaussian_augment, smoothadv_attack, smoothadv_loss,
                                  smoothadv_warmup_eps, trades_rs_loss)
from robustkern.smoothing.augment import gaussian_noise

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = dict(rtol=1e-10, atol=1e-12)
B, SHAPE = 3, (2, 6, 6)


def tiny_net(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 4, 3)] + ([nn.BatchNorm2d(4)] if bn else []) + [nn.ReLU(), nn.Flatten(),
                                                                          nn.Linear(4 * 4 * 4, 5)]
    return nn.Sequential(*layers).double()


def batch(seed=1, b=B):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b,) + SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (b,), generator=g)
    return x, y


def noise_for(m=None, sigma=0.5, seed=2, b=B):
    g = torch.Generator().manual_seed(seed)
    shape = (b,) + ((m,) if m else ()) + SHAPE
    return torch.randn(shape, generator=g, dtype=torch.float64) * sigma


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def assert_same(a, b, **tol):
    tol = tol or F64
    torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("m,multi", [(1, True), (3, True), (3, False)])
def test_smoothadv_loss_matches_the_original(m, multi):
    net, (x, y), noise = tiny_net(), batch(), noise_for(m)
    loss, parts = smoothadv_loss(net, x, y, 0.5, 0.7, 4, m, train_multi_noise=multi, noise=noise)
    ref, ref_logits = smoothadv_loss_reference(net, x, y, noise, 0.7, 4, train_multi_noise=multi)
    assert_same(loss, ref)
    assert_same(parts["logits"].reshape(ref_logits.shape), ref_logits.detach())
    for g, r in zip(grads(loss, net), grads(ref, net)):
        assert_same(g, r)
    assert loss.item() > F.cross_entropy(net(x + noise[:, 0]), y).item()  # the attack did something


def test_smoothadv_attack_stays_in_the_ball_and_matches_the_original():
    net, (x, y), noise = tiny_net(), batch(), noise_for(4)
    eps = 0.3
    x_adv = smoothadv_attack(net, x, y, 0.5, eps, 6, 4, noise=noise)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps * (1 + 1e-9)).all() and (norms > 0.5 * eps).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    inputs = x.repeat((1, 4, 1, 1)).view((B * 4,) + SHAPE)
    ref = smoothadv_attack_reference(net.eval(), inputs, y, noise.reshape((B * 4,) + SHAPE), eps, 6, 4)
    assert_same(x_adv, ref[::4].detach())

    def soft_nll(z):  # the attack increases its objective
        avg = F.softmax(net(((z.unsqueeze(1) + noise).reshape((B * 4,) + SHAPE))), 1).reshape(B, 4, -1).mean(1)
        return F.nll_loss(avg.log(), y).item()

    assert soft_nll(x_adv) > soft_nll(x)


def test_smoothadv_eps_units_and_warmup():
    net, (x, y), noise = tiny_net(), batch(), noise_for(2)
    a = smoothadv_attack(net, x, y, 0.5, 64, 3, 2, noise=noise, eps_units="256")
    b = smoothadv_attack(net, x, y, 0.5, 0.25, 3, 2, noise=noise)
    assert torch.equal(a, b)
    assert [smoothadv_warmup_eps(e, 10, 0.25) for e in (0, 4, 9, 20)] == pytest.approx([0.025, 0.125, 0.25, 0.25])
    assert smoothadv_warmup_eps(0, 1, 0.5) == 0.5


def test_trades_rs_loss_matches_the_original():
    net, (x, y), noise = tiny_net(), batch(), noise_for()
    d0 = 0.001 * noise_for(seed=5)
    loss, parts = trades_rs_loss(net, x, y, 0.5, epsilon=0.4, num_steps=5, beta=6.0, noise=noise, delta_init=d0)
    ref, ref_logits = trades_rs_loss_reference(net, x, y, noise, d0, 0.4, 5, 6.0)
    assert_same(loss, ref)
    assert_same(parts["logits"], ref_logits.detach())
    assert (parts["x_adv"] - x).flatten(1).norm(dim=1).max() <= 0.4 * (1 + 1e-9)
    assert parts["robust"] > 0
    for g, r in zip(grads(loss, net), grads(ref, net)):
        assert_same(g, r)


@pytest.mark.parametrize("form,m", [("default", 2), ("default", 3), ("xent", 2), ("kl", 4), ("mse", 2)])
def test_consistency_loss_matches_the_original(form, m):
    net, (x, y), noise = tiny_net(), batch(), noise_for(m)
    loss, parts = consistency_loss(net, x, y, 0.5, m, 10.0, 0.5, noise=noise, form=form)
    ref, ref_logits = consistency_loss_reference(net, x, y, noise, 10.0, 0.5, form)
    assert_same(loss, ref)
    assert_same(parts["logits"], ref_logits.detach().reshape(m, B, -1).transpose(0, 1))
    assert parts["consistency"] > 0
    for g, r in zip(grads(loss, net), grads(ref, net)):
        assert_same(g, r)


def test_zero_gradient_takes_the_originals_random_direction():
    net = tiny_net()
    with torch.no_grad():
        net[0].weight.zero_()  # constant logits: the attack gradient is exactly 0
    (x, y), noise = batch(), noise_for(2)
    fast = smoothadv_attack(net, x, y, 0.5, 0.3, 3, 2, noise=noise, generator=torch.Generator().manual_seed(7))
    inputs = x.repeat((1, 2, 1, 1)).view((B * 2,) + SHAPE)
    ref = smoothadv_attack_reference(net.eval(), inputs, y, noise.reshape((B * 2,) + SHAPE), 0.3, 3, 2,
                                     generator=torch.Generator().manual_seed(7))
    assert_same(fast, ref[::2].detach())
    assert (fast - x).abs().max() > 0.01  # it moved
    seeded = [smoothadv_attack(net, x, y, 0.5, 0.3, 3, 2, noise=noise, seed=s) for s in (1, 1, 2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    d0 = 0.001 * noise_for(seed=5)
    t_fast, _ = trades_rs_loss(net, x, y, 0.5, 0.4, num_steps=3, noise=noise[:, 0], delta_init=d0,
                               generator=torch.Generator().manual_seed(3))
    t_ref, _ = trades_rs_loss_reference(net, x, y, noise[:, 0], d0, 0.4, 3, generator=torch.Generator().manual_seed(3))
    assert_same(t_fast, t_ref)


# ----------------------------------------------------------------------------------------------- faithful vs fast
def test_faithful_and_fast_agree_in_train_mode_and_differ_as_documented():
    (x, y), noise = batch(), noise_for(2)
    fast_net, faith_net, ref_net = tiny_net(bn=True), tiny_net(bn=True), tiny_net(bn=True)
    a, _ = smoothadv_loss(fast_net.train(), x, y, 0.5, 0.3, 3, 2, noise=noise)
    b, _ = smoothadv_loss(faith_net.train(), x, y, 0.5, 0.3, 3, 2, noise=noise, faithful=True)
    r, _ = smoothadv_loss_reference(ref_net.train(), x, y, noise, 0.3, 3)
    assert_same(a, r)
    assert_same(b, r)
    for net in (fast_net, faith_net):
        assert_same(net[1].running_mean, ref_net[1].running_mean)

    # a model in eval mode with a frozen layer: fast keeps both, faithful switches to train and unfreezes
    fast_net.eval()
    fast_net[0].weight.requires_grad_(False)
    faith_net.eval()
    faith_net[0].weight.requires_grad_(False)
    a, _ = smoothadv_loss(fast_net, x, y, 0.5, 0.3, 3, 2, noise=noise)
    b, _ = smoothadv_loss(faith_net, x, y, 0.5, 0.3, 3, 2, noise=noise, faithful=True)
    assert not fast_net.training and not fast_net[0].weight.requires_grad
    assert faith_net.training and faith_net[0].weight.requires_grad
    assert abs(a.item() - b.item()) > 1e-6  # eval-mode BN vs batch statistics in the training forward
    fast_net.train()
    fast_net[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    smoothadv_attack(fast_net, x, y, 0.5, 0.3, 1, 2, noise=noise)
    assert fast_net.training and fast_net[0].training and not fast_net[1].training


def test_trades_rs_faithful_reproduces_batchnorm_updates():
    (x, y), noise, d0 = batch(), noise_for(), 0.001 * noise_for(seed=5)
    nets = {k: tiny_net(bn=True).train() for k in ("fast", "faithful", "ref")}
    fast, _ = trades_rs_loss(nets["fast"], x, y, 0.5, 0.4, num_steps=3, noise=noise, delta_init=d0)
    faith, _ = trades_rs_loss(nets["faithful"], x, y, 0.5, 0.4, num_steps=3, noise=noise, delta_init=d0, faithful=True)
    ref, _ = trades_rs_loss_reference(nets["ref"], x, y, noise, d0, 0.4, 3)
    assert_same(faith, ref)
    assert_same(fast, ref)
    for g, r in zip(grads(fast, nets["fast"]), grads(ref, nets["ref"])):
        assert_same(g, r, rtol=1e-9, atol=1e-11)
    ref_stats = nets["ref"][1].running_var
    assert_same(nets["faithful"][1].running_var, ref_stats)
    assert nets["faithful"][1].num_batches_tracked == 3 and nets["fast"][1].num_batches_tracked == 2
    assert not torch.allclose(nets["fast"][1].running_var, ref_stats)
    frozen = tiny_net().eval()
    frozen[0].bias.requires_grad_(False)
    trades_rs_loss(frozen, x, y, 0.5, 0.4, num_steps=1, noise=noise, delta_init=d0, faithful=True)
    assert frozen.training and not frozen[0].bias.requires_grad  # trades.py: model.train(), no unfreezing


# ----------------------------------------------------------------------------------------------- noise and replay
def test_gaussian_augment_noise_sources():
    x = batch()[0].float()
    fused = gaussian_augment(x, 0.25, seed=11)
    assert torch.equal(fused, x + gaussian_noise(x, 0.25, seed=11))  # fused op == noise drawn separately
    assert torch.equal(fused, gaussian_augment(x, 0.25, seed=11)) and not torch.equal(fused, gaussian_augment(x, 0.25, seed=12))
    assert torch.equal(gaussian_augment(x, 0.25, noise=fused - x), x + (fused - x))
    torch.manual_seed(3)
    a = gaussian_augment(x, 0.25)
    torch.manual_seed(3)
    assert torch.equal(a, x + torch.randn_like(x) * 0.25)  # Cohen's train.py, global generator
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(gaussian_augment(x, 0.25, generator=g1), x + torch.randn(x.shape, generator=g2) * 0.25)
    big = gaussian_noise(torch.zeros(64, 3, 8, 8), 0.5, seed=1)
    assert abs(big.std().item() - 0.5) < 0.02 and abs(big.mean().item()) < 0.02
    copies = gaussian_noise(x, 0.5, 3, seed=1)
    assert copies.shape == (B, 3) + SHAPE and torch.equal(copies[:, 0], gaussian_noise(x, 0.5, seed=1))
    xd = x.double().requires_grad_()
    gaussian_augment(xd, 0.5, seed=1).sum().backward()
    assert torch.equal(xd.grad, torch.ones_like(xd))


@pytest.mark.parametrize("which", ["smoothadv", "trades_rs", "consistency"])
def test_seed_replays_the_loss_exactly(which):
    net, (x, y) = tiny_net(), batch()
    run = {
        "smoothadv": lambda **kw: smoothadv_loss(net, x, y, 0.5, 0.3, 2, 2, **kw),
        "trades_rs": lambda **kw: trades_rs_loss(net, x, y, 0.5, 0.3, num_steps=2, **kw),
        "consistency": lambda **kw: consistency_loss(net, x, y, 0.5, 2, 10.0, **kw),
    }[which]
    a, b, c = run(seed=5)[0], run(seed=5)[0], run(seed=6)[0]
    assert a.item() == b.item() and a.item() != c.item()
    m = None if which == "trades_rs" else 2
    if which != "trades_rs":  # the seeded noise is gaussian_noise(x, sigma, m, seed=...)
        assert run(noise=gaussian_noise(x, 0.5, m, seed=5))[0].item() == a.item()


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    net, (x, y) = tiny_net(), batch()
    with pytest.raises(ValueError, match="sigma"):
        gaussian_augment(x, -0.1)
    with pytest.raises(ValueError, match="NaN"):
        gaussian_augment(x * float("nan"), 0.1)
    with pytest.raises(ValueError, match="noise must have"):
        gaussian_augment(x, 0.1, noise=torch.zeros(2))
    with pytest.raises(TypeError, match="seed"):
        gaussian_augment(x, 0.1, seed=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smoothadv_loss(net, x + 1.0, y, 0.5, 0.3, 2, 2)
    with pytest.raises(ValueError, match="epsilon"):
        smoothadv_attack(net, x, y, 0.5, -0.3, 2, 2)
    with pytest.raises(ValueError, match="num_steps"):
        smoothadv_attack(net, x, y, 0.5, 0.3, 0, 2)
    with pytest.raises(ValueError, match="noise copies"):
        smoothadv_attack(net, x, y, 0.5, 0.3, 2, 0)
    with pytest.raises(ValueError, match="eps_units"):
        smoothadv_attack(net, x, y, 0.5, 0.3, 2, 2, eps_units="255")
    with pytest.raises(ValueError, match="noise must have shape"):
        smoothadv_loss(net, x, y, 0.5, 0.3, 2, 2, noise=noise_for(3))
    with pytest.raises(ValueError, match="not both"):
        smoothadv_loss(net, x, y, 0.5, 0.3, 2, 2, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="labels"):
        trades_rs_loss(net, x, y[:2], 0.5)
    with pytest.raises(ValueError, match="delta_init"):
        trades_rs_loss(net, x, y, 0.5, delta_init=torch.zeros(1))
    with pytest.raises(ValueError, match="form"):
        consistency_loss(net, x, y, 0.5, form="js")
    with pytest.raises(ValueError, match="sigma"):
        consistency_loss(net, x, y, 0.0)
    with pytest.raises(ValueError, match="warmup"):
        smoothadv_warmup_eps(0, 0, 0.25)


# ----------------------------------------------------------------------------------------------- the app
@pytest.mark.parametrize("method", ["gaussian", "smoothadv", "trades_rs", "consistency"])
def test_one_training_step_of_each_registered_loss_on_digits(method):
    from robustkern_cli.config import load_config
    from robustkern_cli.data import load_dataset
    from robustkern.models import build_model_for
    from robustkern_cli.evaluate import fill_all_defaults as _fill_all
    from robustkern_cli.losses import LOSSES, StepState

    overrides = [f"training_params:method={method}"]
    if method in ("smoothadv", "trades_rs"):
        overrides.append("training_params:method_params:num_steps=2")
    cfg = load_config("digits_standard", overrides, fill_defaults=_fill_all)
    ds = load_dataset("digits", "train")
    x = torch.stack([ds[i][0] for i in range(16)])
    y = torch.tensor([int(ds[i][1]) for i in range(16)])
    torch.manual_seed(0)
    model = build_model_for(cfg["model"]["name"], cfg["model"]["kwargs"], (1, 8, 8), 10).train()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(5)  # the app draws each step's noise seed from the global generator
    loss, metrics = LOSSES[method](model, x, y, cfg, StepState(epoch=0))
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item()) and 0 <= metrics["acc"] <= 1
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(before)
    torch.manual_seed(5)
    again, _ = LOSSES[method](model, x, y, cfg, StepState(epoch=0))  # the same generator state: the same noise
    assert again.item() == loss.item()
    if method == "smoothadv":
        assert metrics["eps"] == pytest.approx(0.025)  # epoch 0 of the 10-epoch warm-up of 0.25
