"""TRADES + random smoothing's API (``robustkern.compat.trades_smoothing``) gives the numbers of
hongyanz/TRADES-smoothing: ``trades_loss`` (both distances, with and without a mask; its L2 step ignores
``step_size``) equals the transcription ``robustkern.reference.published.smooth_train.trades_smoothing_loss_reference`` to
1e-6 with the same seed, gradients included, with the original's side effects; ``Smooth.certify(x, mask, ...)``
with ``rng="torch"`` returns the labels of the transcription ``robustkern.reference.smoothing
.TradesSmoothReference`` and its two-sided radius."""
import copy

import pytest
import torch

from robustkern.compat.trades_smoothing import Smooth, trades_loss
from robustkern.reference.published.seed_models import model_cnn_2layer
from robustkern.reference.published.smooth_train import trades_smoothing_loss_reference
from robustkern.reference.published.smoothing import TradesSmoothReference


def small_model(seed=0):
    """A small CNN with a ``.view`` flatten (the published runs use ResNet-110 on CIFAR-10)."""
    torch.manual_seed(seed)
    return model_cnn_2layer(1, 12, 2, 16).double()


def masks(b):
    half = torch.ones(b, 1, 12, 12, dtype=torch.float64)
    half[:, :, :, 6:] = 0
    return [None, torch.ones(b, 1, 12, 12, dtype=torch.float64), half]


@pytest.mark.parametrize("distance", ["l_inf", "l_2"])
@pytest.mark.parametrize("which_mask", [0, 1, 2])
def test_trades_loss_equals_the_original(distance, which_mask):
    model = small_model()
    reference_model = copy.deepcopy(model)
    torch.manual_seed(1)
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    y = torch.tensor([1, 7, 3])
    noise = torch.randn_like(x) * 0.25
    mask = masks(3)[which_mask]
    kw = dict(step_size=0.02, epsilon=0.3 if distance == "l_inf" else 1.0, perturb_steps=3, beta=6.0,
              distance=distance)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)               # the original zeroes the optimiser's gradients inside
    torch.manual_seed(5)
    got = trades_loss(model, x, y, opt, noise, mask, **kw)
    torch.manual_seed(5)
    want = trades_smoothing_loss_reference(reference_model, x, y, ref_opt, noise,
                                           torch.ones_like(x) if mask is None else mask, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert model.training and all(p.grad is None or not p.grad.any() for p in model.parameters())
    got.backward()
    want.backward()
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_l2_step_ignores_step_size():
    model = small_model(2)
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    y = torch.tensor([0, 4])
    noise = torch.randn_like(x) * 0.12
    values = []
    for step_size in (0.001, 0.5):
        torch.manual_seed(3)
        values.append(trades_loss(model, x, y, None, noise, None, step_size=step_size, epsilon=0.5,
                                  perturb_steps=2, distance="l_2"))
    assert torch.equal(values[0], values[1])
    torch.manual_seed(3)
    other = trades_loss(model, x, y, None, noise, None, epsilon=0.5, perturb_steps=4, distance="l_2")
    assert not torch.equal(values[0], other)


def test_trades_loss_rejects_bad_arguments():
    model = small_model()
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    y = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="distance"):
        trades_loss(model, x, y, None, torch.zeros_like(x), None, distance="l_1")
    with pytest.raises(ValueError, match="0 and 1"):
        trades_loss(model, x, y, None, torch.zeros_like(x), torch.full_like(x, 0.5))
    with pytest.raises(ValueError, match="noise"):
        trades_loss(model, x, y, None, 0.25, None)


@pytest.mark.parametrize("seed", range(3))
def test_certify_equals_the_original(seed):
    model = small_model(seed).float().eval()
    torch.manual_seed(10 + seed)
    x = torch.rand(1, 12, 12)
    mask = torch.ones_like(x)
    mask[:, :4] = 0
    torch.manual_seed(seed)
    got = Smooth(model, 10, 0.25, rng="torch").certify(x, mask, 30, 200, 0.01, 64)
    torch.manual_seed(seed)
    want = TradesSmoothReference(model, 10, 0.25).certify(x, mask, 30, 200, 0.01, 64)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], rel=1e-9, abs=1e-12)


def test_certify_abstains_and_philox_runs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 0.0, -5.0]))   # classes 0 and 1 tie: argmax takes 0 always
    x = torch.rand(1, 2, 2)
    label, radius = Smooth(model, 3, 0.5).certify(x, torch.ones_like(x), 10, 50, 0.001, 20, seed=1)
    assert (label, radius) != (Smooth.ABSTAIN, 0.0) and radius > 0
    model[1].weight.data[0, 0], model[1].weight.data[1, 0] = 1.0, -1.0     # now a coin flip between 0 and 1
    x = torch.zeros(1, 2, 2)
    label, radius = Smooth(model, 3, 0.5, rng="torch").certify(x, torch.ones_like(x), 10, 50, 0.001, 20)
    assert (label, radius) == (Smooth.ABSTAIN, 0.0)
