"""Smooth / certify_batch: soundness on a linear classifier, determinism, independence, Cohen parity."""
import math

import pytest
import torch
from scipy.stats import binom

from robustkern.reference.published.smoothing import CohenSmooth
from robustkern.smoothing import Smooth, certify_batch
from robustkern.testing import backend

from _devices import backend_device_params


class Linear2(torch.nn.Module):
    """Binary linear classifier: class 1 iff w.x + b > 0; the smoothed radius is (w.x + b) / ||w||."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1).float() @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def _linear(d=4):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, generator=g)
    x = torch.rand(d, generator=g)
    b = 0.3 * w.norm() - float(x @ w)                         # true radius 0.3
    return Linear2(w, b), x.view(1, 2, 2), 0.3


def test_linear_radius_sound_and_tight():
    model, x, truth = _linear()
    sigma, alpha, trials = 0.5, 0.1, 200
    smooth = Smooth(model, 2, sigma)
    xs = x.expand(trials, 1, 2, 2)                           # 200 independent trials: distinct noise keys
    pred, rad = smooth.certify_batch(xs, 20, 200, alpha, 10_000, seed=123)
    fails = int(((pred == 1) & (rad > truth)).sum() + (pred == 0).sum())
    assert fails <= binom.ppf(1 - 1e-4, trials, alpha), fails
    # more samples: the certified radius approaches the truth from below
    pred_big, rad_big = smooth.certify_batch(xs[:20], 20, 20_000, alpha, 100_000, seed=7)
    assert (pred_big == 1).all()
    assert float(rad_big.mean()) > float(rad[pred == 1].mean())
    assert abs(float(rad_big.mean()) - truth) < 0.05


def test_batch_size_and_shards_do_not_change_results():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.rand(5, 3, 2, 2)
    smooth = Smooth(net, 4, 0.3)
    base = smooth.certify_batch(x, 30, 300, 0.01, 1000, seed=42, return_counts=True)
    for bs in (7, 64, 330):
        got = smooth.certify_batch(x, 30, 300, 0.01, bs, seed=42, return_counts=True)
        assert all(torch.equal(a, b) for a, b in zip(got, base))
    shard_a = smooth.certify_batch(x[0::2], 30, 300, 0.01, 50, seed=42, indices=[0, 2, 4], return_counts=True)
    shard_b = smooth.certify_batch(x[1::2], 30, 300, 0.01, 50, seed=42, indices=[1, 3], return_counts=True)
    assert torch.equal(shard_a[2], base[2][0::2]) and torch.equal(shard_b[2], base[2][1::2])
    for i in range(5):
        assert smooth.certify(x[i], 30, 300, 0.01, 17, seed=42, index=i) == (int(base[0][i]), float(base[1][i]))


def test_selection_and_estimation_are_independent():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    smooth = Smooth(net, 2, 1.0, store_noise=True)
    x = torch.zeros(2, 1, 2, 2)
    smooth.certify_batch(x, 50, 50, 0.1, 64, seed=3)
    counters = torch.cat([c for _, _, c in smooth.stored_noise])
    assert counters.shape[0] == 2 * 100
    assert torch.unique(counters, dim=0).shape[0] == counters.shape[0]     # no counter used twice
    noise = torch.cat([n for n, _, _ in smooth.stored_noise]).flatten(1)
    sel = noise[(counters[:, 2] == 0) & (counters[:, 0] == 0)]
    est = noise[(counters[:, 2] == 1) & (counters[:, 0] == 0)]
    corr = torch.corrcoef(torch.stack([sel.flatten(), est.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.2


def test_stored_noise_replays_through_reference():
    from robustkern.reference import smoothing as ref

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    smooth = Smooth(net, 3, 0.25, mean=mean, std=std, store_noise=True)
    x = torch.rand(2, 3, 2, 2)
    _, _, counts = smooth.certify_batch(x, 10, 40, 0.1, 32, seed=9, return_counts=True)
    total = torch.zeros(3, dtype=torch.int64)
    for noisy, src, counter in smooth.stored_noise:
        replay = ref.smoothing_noise(x, src, counter, torch.tensor([9]), 0.25, torch.tensor(mean),
                                     torch.tensor(std), torch.float32)
        assert torch.equal(noisy, replay)
        total += ref.smoothing_count(net(replay), torch.zeros_like(src), 1)[0]
    assert torch.equal(total, counts.sum((0, 1)))


def test_torch_rng_reproduces_cohen_loop():
    from robustkern.nn import Normalize

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 5))
    mean, std = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
    cohen = CohenSmooth(torch.nn.Sequential(Normalize(mean, std), net), 5, 0.25)
    ours = Smooth(net, 5, 0.25, mean=mean, std=std, rng="torch")
    x = torch.rand(3, 3, 6, 6)
    for i in range(3):
        torch.manual_seed(10 + i)
        want = cohen.certify(x[i], 20, 150, 0.05, 64)
        torch.manual_seed(10 + i)
        got = ours.certify(x[i], 20, 150, 0.05, 64)
        assert got[0] == want[0] and got[1] == float(want[1])
        torch.manual_seed(i)
        want_p = cohen.predict(x[i], 150, 0.05, 40)
        torch.manual_seed(i)
        assert ours.predict(x[i], 150, 0.05, 40) == int(want_p)
        torch.manual_seed(i)
        want_c = cohen._sample_noise(x[i], 77, 30)
        torch.manual_seed(i)
        assert (ours._sample_noise(x[i], 77, 30) == want_c).all()


@pytest.mark.parametrize("bk, device", backend_device_params("triton"))
def test_triton_backend_end_to_end(bk, device):
    """The Triton kernels (interpreted on the CPU; compiled on CUDA when a GPU is present, against the reference
    backend on CUDA) give the reference's votes and certificates, exactly. On CUDA the compiled noise kernel may
    round x + sigma z once instead of twice (tests/test_smoothing_ops.py); a vote could change only if two of
    this linear model's logits tied to ~1e-6 (probability ~1e-4 over the 64 samples), so the votes are still
    compared exactly."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).to(device)
    x = torch.rand(2, 3, 2, 2).to(device)
    smooth = Smooth(net, 3, 0.5, mean=[0.5] * 3, std=[0.25] * 3)
    with backend("reference"):
        want = smooth.certify_batch(x, 8, 24, 0.1, 16, seed=5, return_counts=True)
    with backend(bk):
        got = smooth.certify_batch(x, 8, 24, 0.1, 16, seed=5, return_counts=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bf16_and_channels_last_modes():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(2, 3, 4, 4)
    p32, r32 = Smooth(net, 3, 0.25).certify_batch(x, 10, 100, 0.1, 64, seed=1)
    pb, rb = Smooth(net, 3, 0.25, dtype=torch.bfloat16).certify_batch(x, 10, 100, 0.1, 64, seed=1)
    pc, rc = Smooth(net, 3, 0.25, channels_last=True).certify_batch(x, 10, 100, 0.1, 64, seed=1)
    pn, rn = Smooth(net, 3, 0.25, channels_last=False).certify_batch(x, 10, 100, 0.1, 64, seed=1)
    assert pb.shape == (2,) and rb.dtype == torch.float64 and (rb >= 0).all()
    assert torch.equal(pc, p32) and torch.allclose(rc, r32) and torch.equal(pn, p32) and torch.allclose(rn, r32)
    assert net[0].weight.dtype == torch.float32                # the user's model is left alone
    assert net[0].weight.is_contiguous() and isinstance(net[1], torch.nn.Flatten)


def test_channels_last_copy_folds_flatten_and_follows_the_users_model():
    """The channels-last copy reads Flatten -> Linear in place (permuted columns: the same logits up to
    rounding) and is refreshed from the user's model at every call (weights changed in between)."""
    from robustkern.smoothing.core import _ChannelsLastFlattenLinear

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.rand(2, 3, 6, 6)
    smooth = Smooth(net, 3, 0.5, channels_last=True)
    _, _, counts = smooth.certify_batch(x, 10, 200, 0.1, 64, seed=3, return_counts=True)
    _, _, want = Smooth(net, 3, 0.5, channels_last=False).certify_batch(x, 10, 200, 0.1, 64, seed=3,
                                                                         return_counts=True)
    assert torch.equal(counts, want)
    copy_m = smooth._model(True)
    assert any(isinstance(m, _ChannelsLastFlattenLinear) for m in copy_m.modules())
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(copy_m(xc), net(x), atol=1e-5)
        net[3].weight.mul_(-1.0)                              # the user changes the model
        net[5].bias.add_(torch.tensor([5.0, 0.0, 0.0]))       # now class 0 always wins
    _, _, counts = smooth.certify_batch(x, 10, 200, 0.1, 64, seed=3, return_counts=True)
    _, _, want = Smooth(net, 3, 0.5, channels_last=False).certify_batch(x, 10, 200, 0.1, 64, seed=3,
                                                                         return_counts=True)
    assert torch.equal(counts, want) and int(counts[:, :, 0].sum()) == 2 * 210


def test_functional_certify_batch_and_abstain():
    net = Linear2(torch.tensor([1.0, 0.0, 0.0, 0.0]), 0.0)
    x = torch.zeros(1, 1, 2, 2)                               # on the boundary: p_A = 1/2, must abstain
    pred, rad = certify_batch(net, x, 2, 0.5, 20, 500, 0.01, 100, seed=0)
    assert int(pred[0]) == Smooth.ABSTAIN and float(rad[0]) == 0.0


def test_bad_input():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.rand(3, 2, 2)
    for sigma in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            Smooth(net, 3, sigma)
    s = Smooth(net, 3, 0.5, input_shape=(3, 2, 2))
    with pytest.raises(ValueError, match="n0"):
        s.certify(x, 0, 10, 0.1, 10)
    with pytest.raises(ValueError, match="n must"):
        s.certify(x, 10, 0, 0.1, 10)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            s.certify(x, 10, 10, alpha, 10)
    with pytest.raises(ValueError, match="batch_size"):
        s.certify(x, 10, 10, 0.1, 0)
    with pytest.raises(ValueError, match="shape"):
        s.certify(torch.rand(3, 3, 3), 10, 10, 0.1, 10)
    with pytest.raises(ValueError, match="certify_batch"):
        s.certify(x.unsqueeze(0), 10, 10, 0.1, 10)
    with pytest.raises(ValueError, match="image shape|base classifier failed"):
        Smooth(net, 3, 0.5).certify(torch.rand(3, 3, 3), 10, 10, 0.1, 10)
    with pytest.raises(ValueError, match="num_classes=4"):
        Smooth(net, 4, 0.5).certify(x, 10, 10, 0.1, 10)
    with pytest.raises(ValueError, match="rng"):
        Smooth(net, 3, 0.5, rng="numpy")


@pytest.mark.gpu
def test_cuda_graphs_match_eager():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 30 * 30, 10)).cuda()
    x = torch.rand(3, 3, 32, 32, device="cuda")
    want = Smooth(net, 10, 0.25).certify_batch(x, 100, 1000, 0.001, 256, seed=4, return_counts=True)
    got = Smooth(net, 10, 0.25, cuda_graphs=True).certify_batch(x, 100, 1000, 0.001, 256, seed=4,
                                                               return_counts=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


@pytest.mark.gpu
def test_cuda_graphs_follow_a_moved_model():
    """A model whose parameters are reallocated after the capture (what .to() does) is re-captured: the counts
    equal the eager ones with the new weights, not a replay on freed memory."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 30 * 30, 10)).cuda()
    x = torch.rand(2, 3, 32, 32, device="cuda")
    smooth = Smooth(net, 10, 0.25, cuda_graphs=True)
    smooth.certify_batch(x, 100, 1000, 0.001, 256, seed=4, return_counts=True)
    net[0].weight.data = net[0].weight.data.flip(0)
    got = smooth.certify_batch(x, 100, 1000, 0.001, 256, seed=4, return_counts=True)
    want = Smooth(net, 10, 0.25).certify_batch(x, 100, 1000, 0.001, 256, seed=4, return_counts=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
