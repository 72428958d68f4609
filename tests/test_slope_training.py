"""Loss Landscape Matters' CROWN-IBP with trainable ReLU lower slopes (``robustkern.bounds.crown_ibp_slope_loss``)
against the float64 transcription of the original's ``Train_calloss_ours`` (``robustkern.reference.published.
loss_landscape``) given the same initial slopes: the stepped slopes, the loss before and after the step and the
bounds, for the one-step method, the multistep variant and crown-interval-frozen; the fixed relaxations against
the transcription's bound options; and the step lowering the loss on a batch of a trained model."""
import math

import pytest
import torch

from robustkern.bounds import BoundedModule, crown_ibp_loss, crown_ibp_slope_loss
from robustkern.bounds.slope_training import RELAXATIONS, random_slopes, relu_slope_shapes, slope_step
from robustkern.reference.published.crown_ibp import BoundSequentialReference
from robustkern.reference.published.loss_landscape import (SlopeBoundSequentialReference, slope_step_reference,
                                                           train_calloss_reference)
from robustkern.reference.published.seed_models import model_cnn_4layer

EPS = 0.06


def setup(seed=0, batch=3):
    torch.manual_seed(seed)
    model = model_cnn_4layer(1, 8, 1, 8).double()
    x = torch.rand(batch, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    bm = BoundedModule(model, x[:1])
    slopes = random_slopes(bm, x, "uniform", torch.Generator().manual_seed(seed + 1))
    return model, bm, x, y, slopes


def by_layer(bm, slopes):
    """The slopes keyed by the ReLU's layer index (the transcription's keys)."""
    paths = {n.name: int(n.path) for n in bm.nodes if n.kind == "relu"}
    return {paths[k]: v for k, v in slopes.items()}


def close(a, b, rtol=1e-9):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("multistep,frozen", [(False, None), (True, None), (False, 4), (True, 6)])
def test_slope_step_equals_the_transcription(multistep, frozen):
    model, bm, x, y, slopes = setup()
    steps, size = (7, 0.1) if multistep else (1, 2.0)
    loss, info = crown_ibp_slope_loss(bm, x, y, EPS, steps=steps, step_size=size, frozen=frozen,
                                      x_min=-math.inf, x_max=math.inf, init_slopes=slopes)
    want = slope_step_reference(model, x, y, x - EPS, x + EPS, EPS, by_layer(bm, slopes), multistep=multistep,
                                frozen=frozen)
    got, start = by_layer(bm, info["slopes"]), by_layer(bm, slopes)
    assert set(got) == set(want["slopes"])
    moved = 0
    for i, d in want["slopes"].items():
        close(got[i], d)
        moved += int((got[i] != start[i]).sum())
    assert moved > 0                       # the step changed some slopes
    close(info["loss_before_step"], want["loss_before"])
    close(loss, want["loss_after"])
    close(info["lb"], want["lb_after"])


def test_one_step_lands_on_the_ends_and_keeps_zero_gradient_slopes():
    d = {"a": torch.tensor([[0.3, 0.6, 0.5]])}
    g = {"a": torch.tensor([[1.0, -2.0, 0.0]]), "b": None}
    out = slope_step({**d, "b": torch.tensor([0.25])}, g, 2.0)
    assert out["a"].tolist() == [[0.0, 1.0, 0.5]] and out["b"].tolist() == [0.25]
    assert slope_step(d, {"a": torch.tensor([[1.0, -1.0, 1.0]])}, 0.1)["a"][0].tolist() == \
        pytest.approx([0.2, 0.7, 0.4])


@pytest.mark.parametrize("relaxation,opts", [("adaptive", {}), ("same-slope", {"same-slope": True}),
                                             ("zero-lb", {"zero-lb": True}), ("one-lb", {"one-lb": True})])
def test_fixed_relaxations_equal_the_transcription(relaxation, opts):
    model, bm, x, y, _ = setup(seed=3)
    _, info = crown_ibp_slope_loss(bm, x, y, EPS, relaxation=relaxation, x_min=-math.inf, x_max=math.inf)
    ref = SlopeBoundSequentialReference(model, opts)
    _, _, lb = train_calloss_reference(ref, x, y, x - EPS, x + EPS, EPS)
    close(info["lb"], lb)
    assert "slopes" not in info


def test_adaptive_is_crown_ibp_and_beta_mixes_with_ibp():
    _, bm, x, y, _ = setup(seed=4)
    x = x.clamp(0.1, 0.9)
    for beta, kappa in ((1.0, 0.0), (0.4, 0.3), (0.0, 0.5)):
        got, _ = crown_ibp_slope_loss(bm, x, y, EPS, relaxation="adaptive", beta=beta, kappa=kappa)
        want = crown_ibp_loss(bm, x, y, EPS, beta=beta, kappa=kappa)
        want = want[0] if isinstance(want, tuple) else want
        close(got, want, rtol=1e-7)


@pytest.mark.parametrize("kind", ["uniform", "binary"])
def test_random_relaxations_use_the_drawn_slopes_without_a_step(kind):
    model, bm, x, y, _ = setup(seed=5)
    gen = torch.Generator().manual_seed(7)
    loss, info = crown_ibp_slope_loss(bm, x, y, EPS, relaxation=kind, x_min=-math.inf, x_max=math.inf,
                                      generator=gen)
    drawn = info["slopes"]
    assert all(torch.equal(drawn[k], info["initial_slopes"][k]) for k in drawn)
    values = torch.cat([v.flatten() for v in drawn.values()])
    assert ((values == 0) | (values == 1)).all() if kind == "binary" else ((values > 0) & (values < 1)).any()
    ref = SlopeBoundSequentialReference(model)
    ref.slopes = by_layer(bm, drawn)
    want, _, lb = train_calloss_reference(ref, x, y, x - EPS, x + EPS, EPS)
    close(loss, want)
    close(info["lb"], lb)
    again = random_slopes(bm, x, kind, torch.Generator().manual_seed(7))
    assert all(torch.equal(again[k], drawn[k]) for k in drawn)      # the seeded draw is reproducible


def test_step_lowers_the_robust_loss_of_a_trained_model_and_the_weights_get_gradients():
    from _digits import digits, trained
    model = trained("mlp")
    xtr, ytr, _, _ = digits()
    x, y = xtr[:64], ytr[:64]
    bm = BoundedModule(model, x[:1])
    for steps, size in ((1, 2.0), (7, 0.1)):
        loss, info = crown_ibp_slope_loss(bm, x, y, 0.02, steps=steps, step_size=size,
                                          generator=torch.Generator().manual_seed(0))
        assert loss.item() <= info["loss_before_step"].item()
        assert loss.item() < info["loss_before_step"].item() - 1e-3 * abs(info["loss_before_step"].item())
    model.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_bad_arguments_are_clear_errors():
    _, bm, x, y, _ = setup()
    with pytest.raises(ValueError, match="relaxation must be one of"):
        crown_ibp_slope_loss(bm, x, y, EPS, relaxation="optimal")
    with pytest.raises(ValueError, match="steps must be an int"):
        crown_ibp_slope_loss(bm, x, y, EPS, steps=1.5)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        crown_ibp_slope_loss(bm, x, y, EPS, step_size=0)
    with pytest.raises(ValueError, match="frozen must be None or an int"):
        crown_ibp_slope_loss(bm, x, y, EPS, frozen=-1)
    with pytest.raises(ValueError, match="kind must be"):
        random_slopes(bm, x, "gaussian")
    assert set(relu_slope_shapes(bm)) == {n.name for n in bm.nodes if n.kind == "relu"}
    assert RELAXATIONS == ("ours", "uniform", "binary", "adaptive", "same-slope", "zero-lb", "one-lb")
