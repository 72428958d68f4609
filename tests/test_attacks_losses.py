"""Adversarial training losses (PGD-AT, TRADES fast and faithful), the large-eps schedules (extended AT, IAT)
and robust_accuracy over a loader, on digits models trained in the test."""
import pytest
import torch
import torch.nn.functional as F

import _digits as D
from _digits import one_thread  # noqa: F401
from robustkern.attacks import (PGD, extended_adversarial_training, iat_schedule, incremental_adversarial_training,
                                madry_steps, pgd, pgd_at_loss, robust_accuracy, trades_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n=64):
    _, _, x, y = D.digits()
    return x[:n], y[:n]


def test_pgd_at_loss_is_ce_at_the_attack_point_and_trains_weights():
    model = D.mlp()
    x, y = _batch()
    torch.manual_seed(0)
    loss, x_adv = pgd_at_loss(model, x, y, 0.1, 0.025, 3, return_adv=True)
    torch.manual_seed(0)
    want = pgd(model, x, y, 0.1, 0.025, 3)
    assert torch.equal(x_adv, want)
    torch.testing.assert_close(loss, F.cross_entropy(model(want), y))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.train()
    pgd_at_loss(model, x, y, 0.1, 0.025, 2, attack_mode="eval")
    assert model.training


@pytest.mark.parametrize("distance", ["l_inf", "l_2"])
def test_trades_fast_equals_faithful_on_a_model_without_bn(distance):
    model = D.trained("mlp")
    x, y = _batch()
    eps = 0.1 if distance == "l_inf" else 1.0
    kw = dict(step_size=0.02, epsilon=eps, perturb_steps=5, beta=6.0, distance=distance, return_parts=True)
    torch.manual_seed(0)
    fast = trades_loss(model, x, y, **kw)
    torch.manual_seed(0)
    slow = trades_loss(model, x, y, faithful=True, **kw)
    for a, b in zip(fast, slow):
        # L-inf: the same computation; L2: the step order differs (project-then-clamp vs clamp-then-renorm)
        torch.testing.assert_close(a, b, rtol=1e-5 if distance == "l_inf" else 0.1, atol=1e-6)
    assert float(fast[2].detach()) > 0  # the inner maximisation found a KL > 0


def test_trades_side_effects():
    model = D.trained("cnn")  # with BatchNorm
    x, y = _batch(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    stats = model[1].running_mean.clone()
    loss = trades_loss(model, x, y, step_size=0.02, epsilon=0.1, perturb_steps=2)
    assert not model.training  # fast mode restores the modes
    assert torch.equal(model[1].running_mean, stats)  # eval mode throughout: no BN statistic updates
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    trades_loss(model, x, y, opt, step_size=0.02, epsilon=0.1, perturb_steps=2, faithful=True)
    assert model.training  # upstream leaves the model in train mode ...
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # ... and zeroes the grads
    model.eval()
    with pytest.raises(ValueError, match="distance"):
        trades_loss(model, x, y, distance="l_1")
    with pytest.raises(ValueError, match="epsilon|eps"):
        trades_loss(model, x, y, epsilon=-1.0)


def test_schedules():
    assert madry_steps(16 / 255, 2 / 255) == 20 and madry_steps(32 / 255, 2 / 255) == 40
    assert madry_steps(0.4, 0.005) == 200
    assert [iat_schedule(t) for t in (0, 1, 3)] == [(0.01, 2), (0.02, 5), (0.04, 10)]
    assert iat_schedule(50, eps_max=0.4)[0] == 0.4
    with pytest.raises(ValueError):
        madry_steps(0.1, 0.0)


def test_extended_and_incremental_adversarial_training():
    xtr, ytr, xte, yte = D.digits()
    loader = [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, 1400, 200)]
    torch.manual_seed(0)
    model = D.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    hist = incremental_adversarial_training(model, loader, opt, epochs=3, eps_step=0.03, alpha=0.03)
    assert [(h["eps"], h["steps"]) for h in hist] == [(0.03, 2), (0.06, 5), (0.09, 7)]
    assert all(h["n"] == 1400 for h in hist)
    before = robust_accuracy(model, [(xte, yte)], PGD(model, eps=0.15, alpha=0.04, steps=10))
    hist = extended_adversarial_training(model, loader, opt, eps=0.15, alpha=0.05, epochs=3)
    assert hist[0]["steps"] == 7 and hist[-1]["epoch"] == 2
    after = robust_accuracy(model, [(xte, yte)], PGD(model, eps=0.15, alpha=0.04, steps=10))
    assert after["robust_accuracy"] >= before["robust_accuracy"]


def test_robust_accuracy():
    model = D.trained("mlp")
    _, _, x, y = D.digits()
    loader = [(x[i:i + 100], y[i:i + 100]) for i in range(0, len(y), 100)]
    model.train()
    res = robust_accuracy(model, loader, PGD(model, eps=0.1, alpha=0.025, steps=5))
    assert model.training
    assert res["n"] == len(y)
    assert res["clean_accuracy"] == pytest.approx(D.accuracy(model.eval(), x, y))
    assert 0 < res["robust_accuracy"] < res["clean_accuracy"]
    none = robust_accuracy(model, loader, lambda xb, yb: xb)
    assert none["robust_accuracy"] == none["clean_accuracy"]
    with pytest.raises(TypeError, match="callable"):
        robust_accuracy(model, loader, "pgd")
