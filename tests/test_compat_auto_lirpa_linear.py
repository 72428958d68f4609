"""auto_LiRPA's verification example (examples/vision/simple_verification.py) on the facade: the layers and helpers
it imports from ``auto_LiRPA.utils``, ``output_name``/``input_name``, ``visualize``, and ``return_A`` with
``needed_A_dict``: the output's linear bounds over the input, whose concretisation over the input box is the bound.
Also the native ``return_linear``: the linear bounds hold at points of the input set."""
import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from robustkern.bounds import BoundedModule as RKModule, margin_spec
from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor, PerturbationLpNorm
from robustkern.compat.auto_lirpa import utils as lirpa_utils
from robustkern.compat.auto_lirpa.utils import Flatten, Unflatten, scale_gradients, sync_params
from test_alpha_crown import _auto_lirpa


def mnist_like_model():
    """The example's model shape (conv 4x4 stride 2 twice, then two linear layers), at 12x12 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 4, stride=2, padding=1),
                         nn.ReLU(), Flatten(), nn.Linear(8 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 10))


def _concretise(A, bias, lo, hi, upper):
    """min (max) of ``A x + bias`` over the box ``[lo, hi]``: the example's own check."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    far, near = (hi, lo) if upper else (lo, hi)
    return (pos * far + neg * near).flatten(2).sum(-1) + bias


@pytest.mark.parametrize("method", ["IBP+backward", "backward", "CROWN", "CROWN-Optimized"])
@pytest.mark.parametrize("with_spec", [False, True])
def test_return_A_concretises_to_the_bounds(method, with_spec):
    model = mnist_like_model()
    image = torch.rand(2, 1, 12, 12)
    lirpa_model = BoundedModule(model, torch.empty_like(image))
    eps = 0.05
    x = BoundedTensor(image, PerturbationLpNorm(norm=float("inf"), eps=eps))
    C = margin_spec(model(image).argmax(1), 10) if with_spec else None
    needed = defaultdict(set)
    needed[lirpa_model.output_name[0]].add(lirpa_model.input_name[0])
    lb, ub, A_dict = lirpa_model.compute_bounds(x=(x,), C=C, method=method, return_A=True, needed_A_dict=needed)
    entry = A_dict[lirpa_model.output_name[0]][lirpa_model.input_name[0]]
    rows = 9 if with_spec else 10
    assert tuple(entry["lA"].shape) == (2, rows, 1, 12, 12) and tuple(entry["lbias"].shape) == (2, rows)
    assert entry["lA"].dtype == torch.float32
    torch.testing.assert_close(_concretise(entry["lA"], entry["lbias"], image - eps, image + eps, False), lb,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_concretise(entry["uA"], entry["ubias"], image - eps, image + eps, True), ub,
                               rtol=1e-5, atol=1e-5)
    # the same numbers as the call without return_A
    lb2, ub2 = lirpa_model.compute_bounds(x=(x,), C=C, method=method)
    torch.testing.assert_close(lb, lb2)
    torch.testing.assert_close(ub, ub2)


def test_return_A_one_side_and_what_is_refused():
    model = mnist_like_model()
    image = torch.rand(2, 1, 12, 12)
    lirpa_model = BoundedModule(model, image)
    x = BoundedTensor(image, PerturbationLpNorm(eps=0.02))
    lb, ub, A_dict = lirpa_model.compute_bounds(x=(x,), method="CROWN", bound_upper=False, return_A=True)
    entry = A_dict[lirpa_model.output_name[0]][lirpa_model.input_name[0]]
    assert ub is None and entry["uA"] is None and entry["ubias"] is None and entry["lA"] is not None
    with pytest.raises(NotImplementedError, match="not for IBP"):
        lirpa_model.compute_bounds(x=(x,), method="IBP", return_A=True)
    hidden = [n.name for n in lirpa_model.bm.nodes if n.kind == "relu"][0]
    with pytest.raises(NotImplementedError, match="needed_A_dict"):
        lirpa_model.compute_bounds(x=(x,), method="CROWN", return_A=True,
                                   needed_A_dict={lirpa_model.output_name[0]: {hidden}})


def test_graph_names_and_visualize(tmp_path):
    model = mnist_like_model()
    lirpa_model = BoundedModule(model, torch.rand(1, 1, 12, 12))
    names = [n.name for n in lirpa_model.bm.nodes]
    assert lirpa_model.input_name == [names[0]]
    assert lirpa_model.output_name[0] in names and lirpa_model.output_name[0] != names[0]
    path = lirpa_model.visualize(str(tmp_path / "bounded"))
    text = open(path).read()
    assert path.endswith(".dot") and text.startswith("digraph")
    for n in lirpa_model.bm.nodes:
        assert f'"{n.name}"' in text
        for src in n.inputs:
            assert f'"{src}" -> "{n.name}"' in text


def test_return_linear_holds_inside_the_input_set():
    """Native API: ``A x' + bias <= C f(x') <= A' x' + bias'`` at random points and corners of the box (and the
    ball), sound or not; concretised, the lower linear bound is ``lb``."""
    model = mnist_like_model()
    x = torch.rand(3, 1, 12, 12)
    C = margin_spec(model(x).argmax(1), 10)
    bm = RKModule(model, x)
    for norm, eps in ((math.inf, 0.03), (2.0, 0.3)):
        for sound in (False, True):
            with torch.no_grad():
                lb, ub, lin = bm.compute_bounds(x, eps, norm=norm, method="CROWN", C=C, sound=sound,
                                                x_min=-math.inf, x_max=math.inf, return_linear=True)
                (lA, lbias), (uA, ubias) = lin["lower"], lin["upper"]
                for trial in range(20):
                    d = torch.rand_like(x) * 2 - 1
                    if norm == 2:
                        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(3, 1, 1, 1)
                    else:
                        d = d.sign() * eps if trial % 2 else d * eps
                    xp = x + d
                    out = torch.einsum("bsk,bk->bs", C.double(), model(xp).double())
                    low = (lA.double() * xp.double().unsqueeze(1)).flatten(2).sum(-1) + lbias.double()
                    high = (uA.double() * xp.double().unsqueeze(1)).flatten(2).sum(-1) + ubias.double()
                    assert bool((low <= out + 1e-5).all()) and bool((out <= high + 1e-5).all())
            if norm == math.inf:
                torch.testing.assert_close(_concretise(lA, lbias, x - eps, x + eps, False), lb, rtol=1e-5,
                                           atol=1e-5)


def test_alpha_crown_linear_bounds_are_those_of_the_returned_rows():
    """alpha-CROWN's linear bounds concretise to its (element-wise best) bounds and hold at sampled points."""
    model = mnist_like_model()
    x = torch.rand(2, 1, 12, 12)
    bm = RKModule(model, x)
    args = {"iteration": 5, "lr_alpha": 0.5}
    with torch.no_grad():
        lb, ub, lin = bm.compute_bounds(x, 0.04, method="alpha-CROWN", sound=False, x_min=-math.inf,
                                        x_max=math.inf, optimize_bound_args=args, return_linear=True)
        crown = bm.compute_bounds(x, 0.04, method="CROWN", sound=False, x_min=-math.inf, x_max=math.inf)
    assert bool((lb >= crown[0] - 1e-6).all()) and bool((lb > crown[0] + 1e-6).any())
    (lA, lbias), (uA, ubias) = lin["lower"], lin["upper"]
    torch.testing.assert_close(_concretise(lA, lbias, x - 0.04, x + 0.04, False), lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_concretise(uA, ubias, x - 0.04, x + 0.04, True), ub, rtol=1e-5, atol=1e-5)


def test_return_linear_needs_a_backward_method():
    model = mnist_like_model()
    x = torch.rand(2, 1, 12, 12)
    bm = RKModule(model, x)
    with pytest.raises(ValueError, match="return_linear"):
        bm.compute_bounds(x, 0.01, method="IBP", return_linear=True)


def test_utils_layers_and_helpers():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(Flatten()(x), x.reshape(2, -1))
    assert isinstance(Flatten(), nn.Flatten)
    torch.testing.assert_close(Unflatten(4)(x.reshape(2, -1)), x)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = scale_gradients(opt, 4, grad_clip=1e9)
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g / 4)
    assert float(norm) == pytest.approx(float(torch.cat([(g / 4).flatten() for g in before]).norm()), rel=1e-6)
    assert scale_gradients(opt, 1) is None
    bounded = BoundedModule(model, torch.randn(1, 3))
    state = sync_params(model, bounded)
    assert state.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="another module"):
        sync_params(nn.Linear(3, 2), bounded)
    with pytest.raises(AttributeError, match="auto_LiRPA's own engine"):
        lirpa_utils.unravel_index  # noqa: B018 - the attribute lookup is the test


def test_toy_example_equals_auto_lirpa():
    """auto_LiRPA's examples/simple/toy.py (its model from test_graph_functional): the CROWN and alpha-CROWN bounds
    and linear bounds equal auto_LiRPA's where it imports."""
    from test_graph_functional import ToyMatmul
    lirpa = _auto_lirpa()
    x, lower, upper = torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 1.0]])
    got = {}
    for name, module, tensor, ptb in (
            ("theirs", lirpa.BoundedModule, lirpa.BoundedTensor, lirpa.PerturbationLpNorm),
            ("ours", BoundedModule, BoundedTensor, PerturbationLpNorm)):
        kw = {"verbose": 0} if name == "theirs" else {}
        model = module(ToyMatmul(), torch.empty_like(x), **kw)
        bx = tensor(x, ptb(norm=float("inf"), x_L=lower, x_U=upper))
        needed = {model.output_name[0]: {model.input_name[0]}}
        for method in ("CROWN", "alpha-CROWN"):
            lb, ub, A = model.compute_bounds(x=(bx,), method=method, return_A=True, needed_A_dict=needed)
            entry = A[model.output_name[0]][model.input_name[0]]
            got[name, method] = (lb, ub) + tuple(entry[k] for k in ("lA", "uA", "lbias", "ubias"))
    for method in ("CROWN", "alpha-CROWN"):
        for mine, theirs in zip(got["ours", method], got["theirs", method]):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_return_A_equals_auto_lirpa():
    """Where auto_LiRPA imports: CROWN-IBP's lA and lbias are auto_LiRPA's (same model, box and C)."""
    lirpa = _auto_lirpa()
    model = mnist_like_model()
    image = torch.rand(2, 1, 12, 12)
    C = margin_spec(model(image).argmax(1), 10)
    theirs = lirpa.BoundedModule(model, torch.empty_like(image), verbose=0)
    ours = BoundedModule(model, torch.empty_like(image))
    out = {}
    for name, mod, ptb in (("theirs", theirs, lirpa.PerturbationLpNorm(norm=math.inf, eps=0.03)),
                           ("ours", ours, PerturbationLpNorm(norm=math.inf, eps=0.03))):
        tensor = (lirpa.BoundedTensor if name == "theirs" else BoundedTensor)(image, ptb)
        needed = {mod.output_name[0]: {mod.input_name[0]}}
        lb, _, A_dict = mod.compute_bounds(x=(tensor,), C=C, method="IBP+backward", bound_upper=False,
                                           return_A=True, needed_A_dict=needed)
        out[name] = (lb, A_dict[mod.output_name[0]][mod.input_name[0]])
    torch.testing.assert_close(out["ours"][0], out["theirs"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ours"][1]["lA"], out["theirs"][1]["lA"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ours"][1]["lbias"], out["theirs"][1]["lbias"], rtol=1e-5, atol=1e-5)
