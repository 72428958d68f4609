"""Small random convolutional networks for the bound tests."""
import torch


def conv_net(in_ch: int, size: int, c1: int, c2: int, hidden: int | None = None,
             k1: int = 3) -> torch.nn.Sequential:
    """Two stride-2 convolutions (kernel ``k1`` then 3, padding 1, ``c1`` and ``c2`` channels) on ``in_ch x size x
    size`` inputs, a ReLU after each, then a Linear layer to ``hidden`` and a ReLU (when given) and one to 10."""
    after = (size + 2 - k1) // 2 + 1
    after = (after + 2 - 3) // 2 + 1
    layers = [torch.nn.Conv2d(in_ch, c1, k1, stride=2, padding=1), torch.nn.ReLU(),
              torch.nn.Conv2d(c1, c2, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten()]
    width = c2 * after * after
    if hidden:
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
