"""Model zoo: the published architectures of the experiments robustkern reproduces, and the per-channel
statistics of the data sets they are trained on.

Every builder takes ``in_ch``, ``in_dim`` (square inputs) and ``num_classes``, and ``mean``/``std``: when given,
a :class:`robustkern.nn.Normalize` layer comes first so the model takes pixels in [0, 1] and perturbations are
in pixel units. Plain chains are ``nn.Sequential``; residual networks use ``x + f(x)`` in ``forward`` with no
data-dependent control flow, so every model is ``torch.fx.symbolic_trace``-able. Layer types: Linear, Conv2d,
ReLU, BatchNorm1d/2d, Flatten, AvgPool2d, Identity, Normalize and ``+``; the two MNIST adversarial-training
models (``small_cnn``, ``mnist_madry``) keep their published MaxPool2d layers (``pool="avg"`` swaps them).

State-dict key names follow the original code where that lets published checkpoints load directly:
``resnet20``/``resnet110`` use bearpaw/Cohen/MACER names (``conv1``, ``layer1.0.bn1``, ``downsample.0``; with
normalisation the network is ``Sequential(Normalize, net)`` like Cohen's ``1.``-prefixed checkpoints),
``preact_resnet18`` uses Rice et al.'s (``layer1.0.shortcut.0``, ``bn``, ``linear``), ``small_cnn`` TRADES/LFR's
(``feature_extractor.conv1``, ``classifier.fc3``), the DM/CROWN-IBP chains CROWN-IBP's ``nn.Sequential`` indices.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable, Sequence

from torch import nn

from .nn import Normalize

__all__ = ["MODEL_NAMES", "build_model", "build_model_for", "model_kwargs", "DATASET_STATS", "CIFAR10_MEAN",
           "CIFAR10_STD"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # Cohen et al. datasets.py
# Per-channel mean and standard deviation of each data set's training images in [0, 1] (the ``mean``/``std`` of a
# model's Normalize layer): MNIST as in PyTorch's examples, CIFAR-10 as Cohen et al. and CROWN-IBP, SVHN as Loss
# Landscape Matters' datasets.py, digits: scikit-learn's 8x8 digits scaled to [0, 1].
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3054,), (0.3761,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _out(dim: int, k: int, s: int, p: int) -> int:
    return (dim + 2 * p - k) // s + 1


def _seq(layers: list, mean, std) -> nn.Sequential:
    if mean is not None:
        if std is None:
            raise ValueError("model: 'mean' is given but 'std' is not")
        layers = [Normalize(mean, std)] + list(layers)
    return nn.Sequential(*layers)


def _pool(kind: str) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(2, 2)
    if kind == "avg":
        return nn.AvgPool2d(2, 2)
    raise ValueError(f"pool must be 'max' or 'avg', got '{kind}'")


# ------------------------------------------------------------------------------------------ small demo models
def digits_mlp(in_ch=1, in_dim=8, num_classes=10, hidden=64, mean=None, std=None):
    """Two hidden layers of ``hidden`` ReLU units, for scikit-learn's 8x8 digits."""
    return _seq([nn.Flatten(), nn.Linear(in_ch * in_dim * in_dim, hidden), nn.ReLU(),
                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)], mean, std)


def digits_cnn(in_ch=1, in_dim=8, num_classes=10, width=16, linear_size=100, mean=None, std=None):
    """conv(w) 3x3 - conv(2w) 4x4/2 - fc - fc, a CROWN-IBP-style small CNN for 8x8 inputs."""
    d = _out(in_dim, 4, 2, 1)
    return _seq([nn.Conv2d(in_ch, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
                 nn.Flatten(), nn.Linear(2 * width * d * d, linear_size), nn.ReLU(),
                 nn.Linear(linear_size, num_classes)], mean, std)


# ------------------------------------------------------------------------ Gowal et al. (DM) / CROWN-IBP models
def dm_small(in_ch=1, in_dim=28, num_classes=10, mean=None, std=None):
    """DM "small": conv16 4x4/2, conv32 4x4/1 (VALID), fc100, final linear (interval-bound-propagation
    examples/train.py ``layers('small')``)."""
    d = _out(_out(in_dim, 4, 2, 0), 4, 1, 0)
    return _seq([nn.Conv2d(in_ch, 16, 4, 2, 0), nn.ReLU(), nn.Conv2d(16, 32, 4, 1, 0), nn.ReLU(), nn.Flatten(),
                 nn.Linear(32 * d * d, 100), nn.ReLU(), nn.Linear(100, num_classes)], mean, std)


def dm_medium(in_ch=1, in_dim=28, num_classes=10, width=8, linear_size=512, padding=0, init="default", mean=None,
              std=None):
    """DM "medium": conv32 3x3, conv32 4x4/2, conv64 3x3, conv64 4x4/2, fc512, fc512, final linear.

    ``padding=0`` is DM's VALID padding; ``padding=1`` gives CROWN-IBP's ``model_cnn_4layer(width, linear_size)``
    (the "cifar_medium" of CROWN-IBP and LossLandscapeMatters), which is also Wong et al.'s "large" MNIST/CIFAR
    model and BCP's "large"/4C3F (sungyoon-lee/bcp utils.py). Channels are ``4*width, 4*width, 8*width,
    8*width``. ``init="he_fan_out"``: convolution weights from N(0, 2 / (k*k*C_out)) and zero biases, as BCP's
    and Wong et al.'s CIFAR models initialise them.
    """
    c1, c2, p = 4 * width, 8 * width, padding
    d = _out(_out(_out(_out(in_dim, 3, 1, p), 4, 2, p), 3, 1, p), 4, 2, p)
    return _init(_seq([nn.Conv2d(in_ch, c1, 3, 1, p), nn.ReLU(), nn.Conv2d(c1, c1, 4, 2, p), nn.ReLU(),
                       nn.Conv2d(c1, c2, 3, 1, p), nn.ReLU(), nn.Conv2d(c2, c2, 4, 2, p), nn.ReLU(), nn.Flatten(),
                       nn.Linear(c2 * d * d, linear_size), nn.ReLU(), nn.Linear(linear_size, linear_size), nn.ReLU(),
                       nn.Linear(linear_size, num_classes)], mean, std), init)


def _init(model: nn.Module, init: str) -> nn.Module:
    if init == "he_fan_out":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
    elif init != "default":
        raise ValueError(f"init must be 'default' or 'he_fan_out', got {init!r}")
    return model


def dm_large(in_ch=1, in_dim=28, num_classes=10, linear_size=512, mean=None, std=None):
    """DM "large" = CROWN-IBP ``IBP_large``: conv64-conv64-conv128/2-conv128-conv128 (3x3, SAME), fc512, linear."""
    d = _out(in_dim, 3, 2, 1)
    return _seq([nn.Conv2d(in_ch, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
                 nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(),
                 nn.Conv2d(128, 128, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(128 * d * d, linear_size),
                 nn.ReLU(), nn.Linear(linear_size, num_classes)], mean, std)


def mnist_small(in_ch=1, in_dim=28, num_classes=10, mean=None, std=None):
    return dm_small(in_ch, in_dim, num_classes, mean, std)


def mnist_medium(in_ch=1, in_dim=28, num_classes=10, width=8, linear_size=512, padding=0, init="default", mean=None,
                 std=None):
    return dm_medium(in_ch, in_dim, num_classes, width, linear_size, padding, init, mean, std)


def mnist_large(in_ch=1, in_dim=28, num_classes=10, linear_size=512, mean=None, std=None):
    return dm_large(in_ch, in_dim, num_classes, linear_size, mean, std)


def cifar_small(in_ch=3, in_dim=32, num_classes=10, mean=None, std=None):
    return dm_small(in_ch, in_dim, num_classes, mean, std)


def cifar_medium(in_ch=3, in_dim=32, num_classes=10, width=8, linear_size=512, padding=0, init="default", mean=None,
                 std=None):
    return dm_medium(in_ch, in_dim, num_classes, width, linear_size, padding, init, mean, std)


def cnn_6c2f(in_ch=3, in_dim=32, num_classes=10, linear_size=512, padding=1, init="he_fan_out", mean=None, std=None):
    """BCP's 6C2F CIFAR model (sungyoon-lee/bcp utils.py ``c6f2_``): conv32 3x3, conv32 3x3, conv32 4x4/2,
    conv64 3x3, conv64 3x3, conv64 4x4/2 (``padding`` 1), fc512, final linear; BCP's initialisation by default."""
    p = padding
    d = _out(_out(_out(_out(_out(_out(in_dim, 3, 1, p), 3, 1, p), 4, 2, p), 3, 1, p), 3, 1, p), 4, 2, p)
    return _init(_seq([nn.Conv2d(in_ch, 32, 3, 1, p), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, p), nn.ReLU(),
                       nn.Conv2d(32, 32, 4, 2, p), nn.ReLU(), nn.Conv2d(32, 64, 3, 1, p), nn.ReLU(),
                       nn.Conv2d(64, 64, 3, 1, p), nn.ReLU(), nn.Conv2d(64, 64, 4, 2, p), nn.ReLU(), nn.Flatten(),
                       nn.Linear(64 * d * d, linear_size), nn.ReLU(), nn.Linear(linear_size, num_classes)], mean, std),
                 init)


def cifar_large(in_ch=3, in_dim=32, num_classes=10, linear_size=512, mean=None, std=None):
    return dm_large(in_ch, in_dim, num_classes, linear_size, mean, std)


def cnn_7layer_bn(in_ch=3, in_dim=32, num_classes=10, width=64, linear_size=512, mean=None, std=None):
    """auto_LiRPA's ``cnn_7layer_bn`` (the "CNN7" of SABR/TAPS/CTBench): DM-large with BatchNorm after every
    conv and after the hidden linear layer."""
    w, w2 = width, 2 * width
    d = _out(in_dim, 3, 2, 1)
    return _seq([nn.Conv2d(in_ch, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(),
                 nn.Conv2d(w, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(),
                 nn.Conv2d(w, w2, 3, 2, 1), nn.BatchNorm2d(w2), nn.ReLU(),
                 nn.Conv2d(w2, w2, 3, 1, 1), nn.BatchNorm2d(w2), nn.ReLU(),
                 nn.Conv2d(w2, w2, 3, 1, 1), nn.BatchNorm2d(w2), nn.ReLU(),
                 nn.Flatten(), nn.Linear(w2 * d * d, linear_size), nn.BatchNorm1d(linear_size), nn.ReLU(),
                 nn.Linear(linear_size, num_classes)], mean, std)


# ------------------------------------------------------------------------------- adversarial-training CNNs
def small_cnn(in_ch=1, in_dim=28, num_classes=10, pool="max", mean=None, std=None):
    """TRADES' ``SmallCNN`` as used by LFR (Uooga/Local-Flatness-Regularization models/mnist/small_cnn.py):
    conv32-conv32-pool-conv64-conv64-pool (3x3, no padding), fc200-fc200-fc; Kaiming-normal convs, zero last
    layer. The published model has dropout p=0 between fc1 and fc2 (a no-op, omitted here)."""
    d = (((in_dim - 4) // 2) - 4) // 2
    features = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_ch, 32, 3)), ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(32, 32, 3)),
        ("relu2", nn.ReLU()), ("maxpool1", _pool(pool)), ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()), ("maxpool2", _pool(pool))]))
    classifier = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(64 * d * d, 200)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(200, 200)),
        ("relu2", nn.ReLU()), ("fc3", nn.Linear(200, num_classes))]))
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.zeros_(classifier.fc3.weight)
    nn.init.zeros_(classifier.fc3.bias)
    layers = OrderedDict([("feature_extractor", features), ("flatten", nn.Flatten()), ("classifier", classifier)])
    if mean is not None:
        layers = OrderedDict([("normalize", Normalize(mean, std))] + list(layers.items()))
    return nn.Sequential(layers)


def mnist_madry(in_ch=1, in_dim=28, num_classes=10, pool="max", mean=None, std=None):
    """Madry et al.'s MNIST CNN (conv32 5x5, pool, conv64 5x5, pool, fc1024, fc), used by Shaeiri et al.'s
    extended adversarial training / IAT on MNIST."""
    d = in_dim // 4
    return _seq([nn.Conv2d(in_ch, 32, 5, 1, 2), nn.ReLU(), _pool(pool), nn.Conv2d(32, 64, 5, 1, 2), nn.ReLU(),
                 _pool(pool), nn.Flatten(), nn.Linear(64 * d * d, 1024), nn.ReLU(), nn.Linear(1024, num_classes)],
                mean, std)


# ------------------------------------------------------------------------------------------ residual networks
class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))`` (pre-2016 "v1" block, bearpaw naming)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.downsample = nn.Identity()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.downsample(x))


class CifarResNet(nn.Module):
    """Depth 6n+2 CIFAR ResNet (He et al. 2016, bearpaw/pytorch-classification; Cohen et al.'s
    ``cifar_resnet``): conv16, three stages of n BasicBlocks (16/32/64 channels), global average pool, linear."""

    def __init__(self, depth: int, in_ch: int = 3, in_dim: int = 32, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_ch, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AvgPool2d(math.ceil(in_dim / 4))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # bearpaw's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(inplanes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(inplanes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(n)])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _wrap_normalize(net: nn.Module, mean, std) -> nn.Module:
    if mean is None:
        return net
    return _seq([net], mean, std)


def resnet110(in_ch=3, in_dim=32, num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """Cohen et al.'s CIFAR ResNet-110 (1.73 M parameters) behind a Normalize layer with the CIFAR-10 mean/std,
    i.e. ``Sequential(Normalize, net)``; ``mean=None`` gives the bare network (MACER, TRADES+RS)."""
    return _wrap_normalize(CifarResNet(110, in_ch, in_dim, num_classes), mean, std)


def resnet20(in_ch=3, in_dim=32, num_classes=10, mean=None, std=None):
    """CIFAR ResNet-20 (0.27 M parameters; LFR's CIFAR model). No normalisation unless ``mean``/``std``."""
    return _wrap_normalize(CifarResNet(20, in_ch, in_dim, num_classes), mean, std)


class PreActBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(p)))) + shortcut``, ``p = relu(bn1(x))``; the shortcut is
    ``x`` or a 1x1 conv of ``p`` (He et al. 2016b; Rice et al.'s naming)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.project = stride != 1 or in_planes != planes
        if self.project:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        p = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(p))))
        if self.project:  # fixed at construction: not data-dependent
            return out + self.shortcut(p)
        return out + x


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (11.17 M parameters), the common adversarial-training baseline (Rice et al. 2020,
    GradAlign), with the final BN + ReLU before global average pooling."""

    def __init__(self, in_ch: int = 3, in_dim: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        planes, layers = 64, []
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(PreActBlock(planes, width, stride), PreActBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(math.ceil(in_dim / 8))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.flatten(self.avgpool(self.relu(self.bn(x)))))


def preact_resnet18(in_ch=3, in_dim=32, num_classes=10, mean=None, std=None):
    return _wrap_normalize(PreActResNet18(in_ch, in_dim, num_classes), mean, std)


# ---------------------------------------------------------------------------------------------------- registry
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (
        digits_mlp, digits_cnn, mnist_small, mnist_medium, mnist_large, cifar_small, cifar_medium, cifar_large,
        cnn_6c2f, cnn_7layer_bn, small_cnn, mnist_madry, resnet20, resnet110, preact_resnet18)
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def model_kwargs(name: str) -> dict:
    """The keyword arguments a zoo model accepts, with their defaults."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(MODEL_NAMES)}")
    return {k: p.default for k, p in inspect.signature(_BUILDERS[name]).parameters.items()}


def build_model(name: str, **kw) -> nn.Module:
    """Build zoo model ``name``; an unknown name or keyword raises ValueError listing the valid ones."""
    valid = model_kwargs(name)
    bad = sorted(set(kw) - set(valid))
    if bad:
        raise ValueError(f"model '{name}' has no parameter(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return _BUILDERS[name](**kw)


def build_model_for(name: str, kwargs: dict, shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build ``name`` for inputs of ``shape`` (C, H, W): fills in_ch/in_dim/num_classes unless given."""
    valid = model_kwargs(name)
    kw = dict(kwargs)
    for key, value in (("in_ch", shape[0]), ("in_dim", shape[-1]), ("num_classes", num_classes)):
        if key in valid:
            kw.setdefault(key, value)
    return build_model(name, **kw)
