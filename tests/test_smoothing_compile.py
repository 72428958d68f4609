"""Smooth(compile=...): the torch.compile (inductor, frozen weights) forward gives eager's certificates, follows
changes of the user's model, falls back to eager with one warning, and "auto" leaves small calls alone."""
import warnings

import pytest
import torch

from robustkern.smoothing import Smooth
from robustkern.smoothing import compiled_forward
from robustkern.smoothing.compiled_forward import AUTO_MIN_FORWARDS, AUTO_MIN_SAMPLES, CompiledForward


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _run(smooth, x):
    # 330 samples per image, batch 64: full batches (compiled) and a partial last batch (eager)
    return smooth.certify_batch(x, 30, 300, 0.05, 64, seed=11, return_counts=True)


@pytest.mark.slow
def test_compiled_forward_matches_eager_and_follows_the_model():
    net, x = _net(), torch.rand(3, 3, 6, 6)
    smooth = Smooth(net, 3, 0.5, compile=True)
    pred, rad, counts = _run(smooth, x)
    want = _run(Smooth(net, 3, 0.5, compile=False), x)
    assert smooth._compiled.compile_seconds is not None and not smooth._compiled.failed
    assert torch.equal(pred, want[0]) and torch.allclose(rad, want[1])
    # votes may differ from eager only where two logits tie up to rounding: none here
    assert int((counts - want[2]).abs().sum()) <= 2
    with torch.no_grad():
        net[5].bias.add_(torch.tensor([0.0, 0.0, 50.0]))      # the user changes the model: class 2 always wins
    pred, _, counts = _run(smooth, x)
    assert (pred == 2).all() and int(counts[:, :, 2].sum()) == 3 * 330


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled_forward.torch, "compile", broken)
    net, x = _net(), torch.rand(2, 3, 6, 6)
    smooth = Smooth(net, 3, 0.5, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile of the base classifier failed"):
        got = _run(smooth, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no second warning
        again = _run(smooth, x)
    want = _run(Smooth(net, 3, 0.5, compile=False), x)
    assert smooth._compiled.failed
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(again, want))


def test_auto_compiles_only_big_cpu_philox_work(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled_forward.torch, "compile", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("auto must not compile a small call")))
    net, x = _net(), torch.rand(2, 3, 6, 6)
    smooth = Smooth(net, 3, 0.5)                                  # compile="auto"
    _run(smooth, x)
    assert calls == [] and smooth._compiled.compile_seconds is None and not smooth._compiled.failed
    img = torch.zeros(1, 3, 4, 4)
    half = AUTO_MIN_SAMPLES // 2
    cf = CompiledForward("auto")
    assert not cf.wanted(img, "philox", half, AUTO_MIN_FORWARDS)
    assert cf.wanted(img, "philox", half, 0)                      # cumulative: the second half reaches both
    assert not CompiledForward("auto").wanted(img, "torch", AUTO_MIN_SAMPLES, AUTO_MIN_FORWARDS)
    assert not CompiledForward("auto").wanted(img[0], "philox", AUTO_MIN_SAMPLES, AUTO_MIN_FORWARDS)
    assert not CompiledForward("auto").wanted(img, "philox", AUTO_MIN_SAMPLES, AUTO_MIN_FORWARDS - 1)
    assert not CompiledForward(False).wanted(img, "philox", 10 * AUTO_MIN_SAMPLES, 10 * AUTO_MIN_FORWARDS)
    assert CompiledForward(True).wanted(img, "philox", 1, 0)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile must be"):
            Smooth(net, 3, 0.5, compile=bad)
