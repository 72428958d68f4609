"""Model definitions of the published projects robustkern's compatibility layers serve, written from their
published definitions (same layers, shapes and forward, including the ``.view`` flattening that needs NCHW
memory), for tests and benchmarks.

* CROWN-IBP (huanzhang12/CROWN-IBP ``model_defs.py``, ``model_defs_gowal.py``; the same in
  sungyoon-lee/LossLandscapeMatters): ``Flatten`` (``x.view(x.size(0), -1)``), ``model_mlp_any``,
  ``model_cnn_2layer``, ``model_cnn_3layer_fixed``, ``model_cnn_4layer``, ``IBP_large``.
* MACER (RuntianZ/macer ``model.py``): ``LeNet`` (MNIST, ``x.view(-1, 4*4*50)``).
* LFR (Uooga/Local-Flatness-Regularization ``models/mnist/small_cnn.py``) and TRADES
  (``code/models/small_cnn.py``): ``SmallCNN`` (``features.view(-1, 64*4*4)``); ``width`` scales the channels
  (1: the published model) so tests can run it small.

``view=False`` builds the same model with ``reshape`` (any memory layout), for comparisons. Weights keep
PyTorch's default initialisation (the originals' own initialisations are not reproduced).
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

__all__ = ["Flatten", "model_mlp_any", "model_cnn_2layer", "model_cnn_3layer_fixed", "model_cnn_4layer",
           "IBP_large", "LeNet", "SmallCNN"]


class Flatten(nn.Module):
    """CROWN-IBP's ``model_defs.Flatten``: ``x.view(x.size(0), -1)``."""

    def forward(self, x):
        return x.view(x.size(0), -1)


def model_mlp_any(in_dim: int, neurons, out_dim: int = 10) -> nn.Sequential:
    layers = [Flatten(), nn.Linear(in_dim, neurons[0])]
    for a, b in zip(neurons, neurons[1:]):
        layers += [nn.ReLU(), nn.Linear(a, b)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(neurons[-1], out_dim))


def model_cnn_2layer(in_ch: int, in_dim: int, width: int, linear_size: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, 4 * width, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1), nn.ReLU(),
        Flatten(), nn.Linear(8 * width * (in_dim // 4) ** 2, linear_size), nn.ReLU(), nn.Linear(linear_size, 10))


def model_cnn_3layer_fixed(in_ch: int, in_dim: int, kernel_size: int, width: int, linear_size=None) -> nn.Sequential:
    linear_size = width * 64 if linear_size is None else linear_size
    if kernel_size not in (3, 5):
        raise ValueError("kernel_size must be 3 or 5")
    h = (in_dim - 4) // 4 if kernel_size == 5 else in_dim // 4
    return nn.Sequential(
        nn.Conv2d(in_ch, 4 * width, kernel_size, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(4 * width, 8 * width, kernel_size, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(8 * width, 8 * width, 4, stride=4, padding=0), nn.ReLU(),
        Flatten(), nn.Linear(8 * width * h * h, linear_size), nn.ReLU(), nn.Linear(linear_size, 10))


def model_cnn_4layer(in_ch: int, in_dim: int, width: int, linear_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, 4 * width, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(4 * width, 4 * width, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4 * width, 8 * width, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(8 * width, 8 * width, 4, stride=2, padding=1), nn.ReLU(),
        Flatten(), nn.Linear(8 * width * (in_dim // 4) ** 2, linear_size), nn.ReLU(),
        nn.Linear(linear_size, linear_size), nn.ReLU(), nn.Linear(linear_size, 10))


def IBP_large(in_ch: int, in_dim: int, linear_size: int = 512) -> nn.Sequential:  # noqa: N802 - the published name
    """Gowal et al.'s "DM-large" as CROWN-IBP defines it."""
    return nn.Sequential(
        nn.Conv2d(in_ch, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.ReLU(),
        Flatten(), nn.Linear((in_dim // 2) ** 2 * 128, linear_size), nn.ReLU(), nn.Linear(linear_size, 10))


class LeNet(nn.Module):
    """MACER's MNIST LeNet (28x28 inputs)."""

    def __init__(self, view: bool = True):
        super().__init__()
        self.view = view
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5, 1), nn.Conv2d(20, 50, 5, 1)
        self.fc1, self.fc2 = nn.Linear(4 * 4 * 50, 500), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = x.view(-1, 4 * 4 * 50) if self.view else x.reshape(-1, 4 * 4 * 50)
        return self.fc2(F.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """LFR's / TRADES' MNIST SmallCNN (28x28 inputs): four 3x3 convolutions (32, 32, 64, 64 channels times
    ``width``), two 2x2 max pools, linear layers of 200 (times ``width``), dropout ``drop`` after the first."""

    def __init__(self, drop: float = 0.0, view: bool = True, width: float = 1.0):
        super().__init__()
        self.view = view
        c1, c2, fc = int(32 * width), int(64 * width), int(200 * width)
        self.flat = c2 * 4 * 4
        self.feature_extractor = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, c1, 3)), ("relu1", nn.ReLU(True)),
            ("conv2", nn.Conv2d(c1, c1, 3)), ("relu2", nn.ReLU(True)),
            ("maxpool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(c1, c2, 3)), ("relu3", nn.ReLU(True)),
            ("conv4", nn.Conv2d(c2, c2, 3)), ("relu4", nn.ReLU(True)),
            ("maxpool2", nn.MaxPool2d(2, 2))]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(self.flat, fc)), ("relu1", nn.ReLU(True)), ("drop", nn.Dropout(drop)),
            ("fc2", nn.Linear(fc, fc)), ("relu2", nn.ReLU(True)), ("fc3", nn.Linear(fc, 10))]))

    def forward(self, x):
        h = self.feature_extractor(x)
        return self.classifier(h.view(-1, self.flat) if self.view else h.reshape(-1, self.flat))
