"""robustkern.models: shapes, published parameter counts, layer types, torch.fx tracing, checkpoint layouts."""
import operator

import pytest
import torch
import torch.fx
from torch import nn

from robustkern.models import CIFAR10_MEAN, MODEL_NAMES, build_model, model_kwargs
from robustkern.nn import Normalize
from robustkern_cli.checkpoint import load_weights
from robustkern_cli.errors import ConfigError

ALLOWED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, nn.AvgPool2d, nn.Identity,
           Normalize)
PUBLISHED_MAXPOOL = {"small_cnn", "mnist_madry"}  # TRADES/LFR SmallCNN and Madry's CNN keep their max pooling


class LeafNormalizeTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_fx_trace_and_layer_types(zoo, name):
    kw = model_kwargs(name)
    model = zoo[name]
    x = torch.rand(2, kw["in_ch"], kw["in_dim"], kw["in_dim"])
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, kw["num_classes"])
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), y)
    allowed = ALLOWED + ((nn.MaxPool2d,) if name in PUBLISHED_MAXPOOL else ())
    leaves = [m for m in model.modules() if not list(m.children())]
    bad = {type(m).__name__ for m in leaves if not isinstance(m, allowed)}
    assert not bad, f"{name} uses layer types outside the bound-propagation set: {bad}"
    graph = LeafNormalizeTracer().trace(model)  # Normalize is one layer for bound propagation
    ops = {n.target for n in graph.nodes if n.op == "call_function"}
    assert ops <= {operator.add}, f"{name}: unexpected functional ops {ops}"


@pytest.mark.parametrize("name, count", [
    ("resnet110", 1_730_714),        # Cohen et al. cifar_resnet110: 1.731 M (research/randomized_smoothing.md 1.5)
    ("resnet20", 272_474),           # 0.272 M
    ("preact_resnet18", 11_172_170),  # 11.17 M (with the final BN)
    ("small_cnn", 312_202),          # TRADES SmallCNN: 320 + 9248 + 18496 + 36928 + 205000 + 40200 + 2010
    ("mnist_madry", 3_274_634),      # Madry et al. MNIST CNN: 3.27 M
])
def test_published_parameter_counts(zoo, name, count):
    assert n_params(zoo[name]) == count


def test_dm_and_crown_ibp_architectures():
    # DM small on MNIST: conv16 4x4/2 VALID (13x13), conv32 4x4/1 VALID (10x10), fc100, fc10
    small = build_model("mnist_small")
    assert [tuple(m.weight.shape) for m in small if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        (16, 1, 4, 4), (32, 16, 4, 4), (100, 3200), (10, 100)]
    # CROWN-IBP model_cnn_4layer(in_ch 3, in_dim 32, width 8, linear_size 512) = LossLandscapeMatters' cifar_medium
    crown = build_model("cifar_medium", padding=1)
    expected = (3 * 32 * 9 + 32) + (32 * 32 * 16 + 32) + (32 * 64 * 9 + 64) + (64 * 64 * 16 + 64) \
        + (4096 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert n_params(crown) == expected == 2_466_858
    # CROWN-IBP IBP_large(in_ch 1, in_dim 28): flatten of 128 x 14 x 14 into fc512
    large = build_model("mnist_large")
    assert large[11].in_features == 128 * 14 * 14 and large[13].out_features == 10
    # auto_LiRPA cnn_7layer_bn: Linear(128*16*16, 512) then BatchNorm1d
    cnn7 = build_model("cnn_7layer_bn")
    assert isinstance(cnn7[16], nn.Linear) and cnn7[16].in_features == 128 * 16 * 16
    assert isinstance(cnn7[17], nn.BatchNorm1d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cnn7) == 5


def test_resnet110_normalize_first_and_other_sizes():
    m = build_model("resnet110")
    assert isinstance(m[0], Normalize) and torch.allclose(m[0].mean, torch.tensor(CIFAR10_MEAN))
    bare = build_model("resnet110", mean=None, std=None)
    assert not any(isinstance(x, Normalize) for x in bare.modules())
    m48 = build_model("resnet20", in_dim=48, num_classes=7).eval()  # TRADES+RS trains at 48 and 64 px too
    assert m48(torch.rand(1, 3, 48, 48)).shape == (1, 7)
    gray = build_model("cifar_large", in_ch=1, in_dim=28)
    assert n_params(gray) == n_params(build_model("mnist_large"))


def test_unknown_model_and_keyword_are_value_errors():
    with pytest.raises(ValueError, match="known models: digits_mlp"):
        build_model("resnet1000")
    with pytest.raises(ValueError, match=r"no parameter\(s\) widht; valid: in_ch, in_dim, num_classes, width"):
        build_model("digits_cnn", widht=3)


def test_published_checkpoint_layouts_load():
    torch.manual_seed(1)
    src = build_model("resnet110")
    # Cohen et al.: {"arch", "state_dict"} of Sequential(NormalizeLayer, resnet); NormalizeLayer kept no buffers
    cohen = {"arch": "cifar_resnet110",
             "state_dict": {k: v for k, v in src.state_dict().items() if not k.startswith("0.")}}
    dst = build_model("resnet110")
    load_weights(dst, cohen)
    assert torch.equal(dst[1].layer3[17].conv2.weight, src[1].layer3[17].conv2.weight)
    # MACER: {"net": bare network}; DataParallel prefixes
    macer = {"net": {"module." + k: v for k, v in src[1].state_dict().items()}, "epoch": 440}
    bare = build_model("resnet110", mean=None, std=None)
    load_weights(bare, macer)
    assert torch.equal(bare.fc.weight, src[1].fc.weight)
    load_weights(dst, macer)  # a bare network's weights into Sequential(Normalize, net)
    with pytest.raises(ConfigError, match="does not match the model"):
        load_weights(build_model("resnet20"), macer)
