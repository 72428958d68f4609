"""Python's ``sum()`` over branch outputs traces as ``0 + a + b``: adding the constant 0 is the identity
(auto_LiRPA's example ResNet, ``examples/vision/models/resnet.py``, sums its ``Dense`` branches that way)."""
import pytest
import torch
from torch import nn

from robustkern.bounds import BoundedModule, UnsupportedLayerError, margin_spec


class TwoBranch(nn.Module):
    def __init__(self, use_sum: bool, const=0):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
        self.use_sum, self.const = use_sum, const

    def forward(self, x):
        if self.use_sum:
            h = sum(layer(x) for layer in (self.a, self.b))
            h = self.const + h
        else:
            h = self.a(x) + self.b(x)
        return self.head(h)


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_sum_start_zero_is_dropped(method):
    x = torch.rand(3, 2, 5, 5)
    C = margin_spec(torch.tensor([0, 3, 1]), 4)
    got = BoundedModule(TwoBranch(True, 0.0), x).compute_bounds(x, 0.05, C=C, method=method, sound=False)
    want = BoundedModule(TwoBranch(False), x).compute_bounds(x, 0.05, C=C, method=method, sound=False)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_adding_another_constant_is_still_refused():
    with pytest.raises(UnsupportedLayerError, match="constants"):
        BoundedModule(TwoBranch(True, 0.5), torch.rand(1, 2, 5, 5))
