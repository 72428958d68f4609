"""APGD (Croce & Hein 2020): constraints, at least as strong as PGD with the same budget on trained digits
models, DLR losses, APGD-T, the AutoAttack-order cascade, bad input."""
import pytest
import torch

import _digits as D
from _digits import one_thread  # noqa: F401
from robustkern.attacks import APGD, APGDT, apgd, apgd_targeted, dlr_loss, dlr_loss_targeted, evaluate_robust, pgd

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGET = {"linf": 0.1, "l2": 1.0}


def _in_ball(adv, x, eps, norm, tol=1e-6):
    d = (adv - x).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((n <= eps + tol).all()) and adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("l2", "ce"), ("linf", "dlr"), ("l2", "dlr")])
def test_apgd_in_ball_and_as_strong_as_pgd(norm, loss):
    """APGD-CE vs PGD-CE and APGD-DLR vs PGD on the margin loss, same budget (20 gradient steps, one start);
    DLR in L2 is only checked to attack (it is a weaker loss than CE/margin there on this model)."""
    model = D.trained("mlp", 0.1)
    _, _, x, y = D.digits()
    eps = BUDGET[norm]
    adv = apgd(model, x, y, eps, steps=20, norm=norm, loss=loss, seed=0)
    _in_ball(adv, x, eps, norm)
    torch.manual_seed(0)
    ref = pgd(model, x, y, eps, eps / 4, 20, norm, loss="ce" if loss == "ce" else "margin")
    if (norm, loss) == ("l2", "dlr"):
        assert D.accuracy(model, adv, y) < D.accuracy(model, x, y) - 0.3
    else:
        assert D.accuracy(model, adv, y) <= D.accuracy(model, ref, y) + 0.01


def test_apgd_targeted_and_classes():
    model = D.trained("mlp", 0.1)
    _, _, x, y = D.digits()
    x, y = x[:200], y[:200]
    eps = 0.1
    adv_t = apgd_targeted(model, x, y, eps, steps=10, n_target_classes=3, seed=0)
    _in_ball(adv_t, x, eps, "linf")
    assert D.accuracy(model, adv_t, y) < D.accuracy(model, x, y)
    a = APGD(model, eps=eps, steps=10, seed=0)(x, y)
    torch.testing.assert_close(a, apgd(model, x, y, eps, 10, seed=0))
    b = APGDT(model, eps=eps, steps=5, n_classes=4)(x, y)
    _in_ball(b, x, eps, "linf")


def test_dlr_losses():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 4.0]])
    y = torch.tensor([0, 1])
    # sorted: row 0: pi1=3, pi2=2, pi3=1; y top -> -(3 - 2)/(3 - 1); row 1: -(1 - 4)/(4 - 1)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-0.5, 1.0]))
    t = torch.tensor([1, 3])
    # row 0: -(3 - 2)/(3 - (1 + 0)/2) ; row 1: -(1 - 4)/(4 - (1 + 0)/2)
    torch.testing.assert_close(dlr_loss_targeted(z, y, t), torch.tensor([-1 / 2.5, 3 / 3.5]))


def test_cascade_attacks_only_robust_points():
    model = D.trained("mlp", 0.1)
    _, _, x, y = D.digits()
    x, y = x[:150], y[:150]
    res = evaluate_robust(model, x, y, 0.1, steps=10, n_target_classes=2, bs=64)
    assert res["clean_accuracy"] >= res["after"]["apgd-ce"] >= res["after"]["apgd-t"] == res["robust_accuracy"]
    _in_ball(res["x_adv"], x, 0.1, "linf")
    with torch.no_grad():
        ok = model(res["x_adv"]).argmax(1) == y
    assert torch.equal(ok, res["robust"])
    assert "upper bound" in res["note"]


def test_apgd_bad_input():
    model = D.trained("mlp")
    x, y = D.digits()[2][:4], D.digits()[3][:4]
    with pytest.raises(ValueError, match="eps must be >= 0"):
        apgd(model, x, y, -1.0)
    with pytest.raises(ValueError, match="steps"):
        apgd(model, x, y, 0.1, steps=-2)
    with pytest.raises(ValueError, match="labels must lie"):
        apgd(model, x, torch.tensor([0, 1, 2, 12]), 0.1, steps=2)
    with pytest.raises(ValueError, match="loss must be"):
        apgd(model, x, y, 0.1, loss="margin")
    with pytest.raises(ValueError, match="unknown attacks"):
        evaluate_robust(model, x, y, 0.1, attacks=("fab-t",))
