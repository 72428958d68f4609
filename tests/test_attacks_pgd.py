"""PGD / FGSM (robustkern.attacks.pgd): constraints, strength against an independent plain PGD
(robustkern.reference.attacks.plain_pgd) on digits models trained in the test, input-only gradients, restarts,
the torchattacks-style classes, bad input, and (GPU) the CUDA-graph loop."""
import pytest
import torch
from torch import nn

import _digits as D
from _digits import one_thread  # noqa: F401
from robustkern.attacks import FGSM, PGD, PGDL2, attack_objective, fgsm, pgd
from robustkern.reference.attacks import plain_pgd

pytestmark = pytest.mark.usefixtures("one_thread")
NORMS = ["linf", "l2"]
BUDGET = {"linf": (0.1, 0.025), "l2": (1.0, 0.25)}


def _in_ball(adv, x, eps, norm, tol=1e-6):
    d = (adv - x).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    eps = torch.as_tensor(eps, dtype=n.dtype).expand_as(n)
    assert bool((n <= eps + tol).all()), f"{norm} ball left by {float((n - eps).max())}"
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss,targeted,restarts", [("ce", False, 1), ("margin", False, 3), ("ce", True, 2)])
def test_pgd_stays_in_ball_and_box(norm, loss, targeted, restarts):
    model = D.trained("mlp")
    x, y = D.digits()[2][:64], D.digits()[3][:64]
    target = (y + 1) % 10 if targeted else y
    eps = torch.linspace(0.0, BUDGET[norm][0] * 2, 64)  # per-example eps, including 0
    adv = pgd(model, x, target, eps, BUDGET[norm][1], 7, norm, True, restarts, loss, targeted)
    assert adv.shape == x.shape and not adv.requires_grad
    _in_ball(adv, x, eps, norm)
    assert torch.equal(adv[0], x[0])  # eps = 0


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_at_least_as_strong_as_plain_pgd(norm):
    eps, alpha = BUDGET[norm]
    _, _, x, y = D.digits()
    for model in (D.trained("mlp"), D.trained("mlp", 0.1)):
        ours, ref = [], []
        for seed in range(2):
            torch.manual_seed(seed)
            ours.append(D.accuracy(model, pgd(model, x, y, eps, alpha, 10, norm), y))
            torch.manual_seed(seed)
            ref.append(D.accuracy(model, plain_pgd(model, x, y, eps, alpha, 10, norm), y))
        assert sum(ours) / 2 <= sum(ref) / 2 + 0.01, (ours, ref)
        assert sum(ours) / 2 < D.accuracy(model, x, y)  # the attack does something


def test_restarts_never_weaker_and_targeted_hits():
    model = D.trained("mlp", 0.1)
    _, _, x, y = D.digits()
    torch.manual_seed(0)
    one = pgd(model, x, y, 0.15, 0.04, 5)
    torch.manual_seed(0)
    four = pgd(model, x, y, 0.15, 0.04, 5, restarts=4)
    torch.manual_seed(0)
    four_seq = pgd(model, x, y, 0.15, 0.04, 5, restarts=4, batch_restarts=False)
    assert D.accuracy(model, four, y) <= D.accuracy(model, one, y) + 0.005
    assert D.accuracy(model, four_seq, y) <= D.accuracy(model, one, y) + 0.005
    target = (y + 3) % 10
    adv = pgd(model, x, target, 0.4, 0.05, 20, targeted=True)
    with torch.no_grad():
        assert float((model(adv).argmax(1) == target).float().mean()) > 0.8


def test_only_input_gradients_and_mode_untouched():
    model = D.trained("cnn")
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    bn = model[1]
    stats = bn.running_mean.clone()
    bn.eval()  # a mixed-mode model: the classes must restore exactly this
    model.zero_grad(set_to_none=True)
    x, y = D.digits()[2][:16], D.digits()[3][:16]
    PGD(model, eps=0.1, alpha=0.02, steps=3)(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and not bn.training
    assert torch.equal(bn.running_mean, stats)
    frozen.requires_grad_(True)
    model.eval()


def test_classes_match_functions():
    model = D.trained("mlp")
    x, y = D.digits()[2][:32], D.digits()[3][:32]
    for atk, norm in ((PGD(model, eps=0.1, alpha=0.02, steps=4), "linf"),
                      (PGDL2(model, eps=1.0, alpha=0.2, steps=4), "l2")):
        torch.manual_seed(1)
        a = atk(x, y)
        torch.manual_seed(1)
        b = pgd(model, x, y, atk.eps, atk.alpha, 4, norm)
        assert torch.equal(a, b)
        assert "eps" in repr(atk)
    adv = FGSM(model, eps=0.1)(x, y)
    _in_ball(adv, x, 0.1, "linf")
    # FGSM without random start moves every pixel with a nonzero gradient by exactly eps (unless clamped)
    adv = fgsm(model, x, y, 0.1)
    moved = (adv - x).abs()
    assert bool((((moved - 0.1).abs() < 1e-6) | (adv == 0) | (adv == 1) | (moved == 0)).all())
    adv = fgsm(model, x, y, 0.1, random_start=True)
    _in_ball(adv, x, 0.1, "linf")


def test_margin_objective_and_steps_zero():
    z = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(attack_objective(z, y, "margin"), torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(attack_objective(z, y, "margin", targeted=True), torch.tensor([1.0, -2.0]))
    model = D.trained("mlp")
    x, y = D.digits()[2][:4], D.digits()[3][:4]
    assert torch.equal(pgd(model, x, y, 0.1, 0.01, 0, random_start=False), x)


def test_bad_input_errors():
    model = D.trained("mlp")
    x, y = D.digits()[2][:4], D.digits()[3][:4]
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd(model, x, y, -0.1, 0.01, 3)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        pgd(model, x, y, 0.1, 0.0, 3)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        pgd(model, x, y, 0.1, 0.01, -1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        pgd(model, x, torch.tensor([0, 1, 2, 10]), 0.1, 0.01, 2)
    with pytest.raises(ValueError, match=r"targets must lie"):
        pgd(model, x, torch.tensor([0, 1, 2, -1]), 0.1, 0.01, 2, targeted=True)
    with pytest.raises(ValueError, match="norm must be"):
        pgd(model, x, y, 0.1, 0.01, 2, norm="l1")
    with pytest.raises(ValueError, match="loss must be"):
        pgd(model, x, y, 0.1, 0.01, 2, loss="dlr")
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        pgd(model, x, y.float(), 0.1, 0.01, 2)
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, x, y, 0.1, 0.01, 2, restarts=0)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_graph_loop_matches_eager(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(32, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    eps, alpha = BUDGET[norm]
    want = pgd(model, x, y, eps, alpha, 5, norm, random_start=False)
    for _ in range(2):  # capture, then replay
        got = pgd(model, x, y, eps, alpha, 5, norm, random_start=False, cuda_graph=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    x2 = torch.rand_like(x)  # new inputs through the same graph
    torch.testing.assert_close(pgd(model, x2, y, eps, alpha, 5, norm, random_start=False, cuda_graph=True),
                               pgd(model, x2, y, eps, alpha, 5, norm, random_start=False), atol=1e-5, rtol=0)
    with torch.no_grad():
        model[0].weight.mul_(1.5)                           # in place: the captured graph sees it
    torch.testing.assert_close(pgd(model, x2, y, eps, alpha, 5, norm, random_start=False, cuda_graph=True),
                               pgd(model, x2, y, eps, alpha, 5, norm, random_start=False), atol=1e-5, rtol=0)
    model[0].weight.data = model[0].weight.data * 0.5       # reallocated: a new capture, not stale memory
    torch.testing.assert_close(pgd(model, x2, y, eps, alpha, 5, norm, random_start=False, cuda_graph=True),
                               pgd(model, x2, y, eps, alpha, 5, norm, random_start=False), atol=1e-5, rtol=0)


def test_graph_key_follows_where_the_parameters_live():
    """A captured loop reads the addresses it was captured with: in-place updates keep the key (the replay sees
    them), reallocated parameters or buffers, another mode or shape give a new key (a new capture)."""
    from robustkern.attacks.pgd import graph_key

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.rand(2, 4)
    key = graph_key(model, x, 5, "linf", "ce", False)
    with torch.no_grad():
        model[0].weight.add_(1.0)                       # optimizer.step(): in place
        model.load_state_dict(model.state_dict())       # copies into the same storage
    assert graph_key(model, x, 5, "linf", "ce", False) == key
    assert graph_key(model, x, 6, "linf", "ce", False) != key
    assert graph_key(model, torch.rand(3, 4), 5, "linf", "ce", False) != key
    model.train(False)
    assert graph_key(model, x, 5, "linf", "ce", False) != key
    model.train(True)
    model[0].weight.data = model[0].weight.data.clone()  # what .to()/.cuda() do to a parameter
    assert graph_key(model, x, 5, "linf", "ce", False) != key
    key2 = graph_key(model, x, 5, "linf", "ce", False)
    model[1].running_mean = model[1].running_mean.clone()  # a buffer replaced
    assert graph_key(model, x, 5, "linf", "ce", False) != key2
