"""Local Flatness Regularization's ``LFR_loss`` (``robustkern.compat.lfr``) returns the original's four values
(Uooga/Local-Flatness-Regularization ``loss_function/LFR_loss.py``), equal to 1e-6 to the transcription
``robustkern.reference.published.lfr.lfr_loss_reference`` given the same seed, with the same parameter gradients,
BatchNorm running statistics, train/eval mode and zeroed optimiser gradients afterwards, on its MNIST
``SmallCNN`` (its ``.view`` flatten included) and a model with BatchNorm; the original's prints are kept."""
import copy

import pytest
import torch
from torch import nn

from robustkern.compat.lfr import LFR_loss
from robustkern.reference.published.lfr import lfr_loss_reference
from robustkern.reference.published.seed_models import SmallCNN


def bn_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 10))


@pytest.mark.parametrize("name", ["small_cnn", "bn"])
def test_lfr_loss_equals_the_original(name, capsys):
    torch.manual_seed(0)
    if name == "small_cnn":
        model, x = SmallCNN(width=0.25).double(), torch.rand(3, 1, 28, 28, dtype=torch.float64)
    else:
        model, x = bn_model().double(), torch.rand(3, 1, 13, 13, dtype=torch.float64)
    y = torch.tensor([2, 0, 9])
    reference_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.eval()                                   # the original leaves the model in train mode
    torch.manual_seed(4)
    got = LFR_loss(model, x, y, 0.05, opt, step_size=0.02, epsilon=0.1, perturb_steps=3)
    printed = capsys.readouterr().out.splitlines()
    torch.manual_seed(4)
    noise = torch.randn(x.shape).to(x)
    want = lfr_loss_reference(reference_model, x, y, 0.05, noise, None, step_size=0.02, epsilon=0.1,
                              perturb_steps=3)
    assert len(got) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert [line.split(" tensor")[0] for line in printed] == ["loss normal", "loss grad in iteration",
                                                             "loss_adversarial"]
    assert model.training and all(p.grad is None or not p.grad.any() for p in model.parameters())
    for a, b in zip(model.buffers(), reference_model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    got[0].backward()
    want[0].backward()
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_lfr_loss_defaults_and_criterion():
    torch.manual_seed(1)
    model = bn_model().double()
    x = torch.rand(2, 1, 13, 13, dtype=torch.float64)
    y = torch.tensor([1, 2])
    reference_model = copy.deepcopy(model)
    torch.manual_seed(2)
    got = LFR_loss(model, x, y, 0.02, None, verbose=False)
    torch.manual_seed(2)
    want = lfr_loss_reference(reference_model, x, y, 0.02, torch.randn(x.shape).to(x))  # its defaults: 7 steps
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(NotImplementedError, match="CrossEntropyLoss"):
        LFR_loss(model, x, y, 0.02, None, criterion=nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(NotImplementedError, match="CrossEntropyLoss"):
        LFR_loss(model, x, y, 0.02, None, criterion=nn.NLLLoss())
