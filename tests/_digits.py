"""Tiny classifiers trained in-process on scikit-learn's 8x8 digits (1797 images, pixels scaled to [0, 1]),
shared by the attack tests. Nothing is cached on disk; each model is trained once per test process."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))


def _train(model, epochs, adv_eps=0.0, seed=0):
    from robustkern.attacks import pgd_at_loss

    torch.manual_seed(seed)
    xtr, ytr, _, _ = digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 100):
            idx = perm[i:i + 100]
            x, y = xtr[idx], ytr[idx]
            if adv_eps:
                loss = pgd_at_loss(model, x, y, adv_eps, adv_eps / 4, 5)
            else:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained(kind="mlp", adv_eps=0.0):
    """A trained digits model: ``kind`` 'mlp' or 'cnn' (with BatchNorm); PGD-AT when ``adv_eps`` > 0. The
    initialisation is seeded too, so the weights do not depend on which tests ran before in the process."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = mlp() if kind == "mlp" else cnn()
    return _train(model, epochs=15 if not adv_eps else 8, adv_eps=adv_eps)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tiny models run fastest on one thread, and the 2-core test machines are shared: use 1, then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
