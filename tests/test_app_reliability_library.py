"""The library pieces under the command's reliability: the certification log keeps the certified radius and
the settings it was made with, the ROBUSTKERN_BACKEND value is checked with a message naming the variable, the
compiled-kernel fallback warning gives advice that applies, and the adversarial-training loop warns nothing."""
import json
import types
import warnings

import numpy as np
import pytest
import torch

from robustkern.smoothing import runner
from robustkern_cli.analyze import certified_accuracy, read_certify_log, summarize

RADII = [0.2497, 0.24999999999999997, 0.25, 0.2500000001, 1.0 / 3.0, 0.0]


class _FixedSmooth:
    """Stands in for ``Smooth``: every image is predicted correctly (label ``i % 3``) with a fixed radius."""
    sigma = 0.25

    def certify_batch(self, x, n0, n, alpha, batch_size, seed=None, indices=None):
        idx = list(indices)
        return torch.tensor([i % 3 for i in idx]), torch.tensor([RADII[i] for i in idx], dtype=torch.float64)


def _data(n=len(RADII)):
    return [(torch.zeros(1, 2, 2), i % 3) for i in range(n)]


KW = dict(n0=10, n=100, alpha=0.1, batch_size=64, seed=3, progress=False)


def test_written_radii_read_back_as_certified(tmp_path):
    out = runner.certify_dataset(_FixedSmooth(), _data(), tmp_path / "c.tsv", **KW)
    log = read_certify_log(out)
    assert log["radius"].tolist() == RADII  # exact round trip
    # a radius just below the grid radius is not certified at it
    acc = certified_accuracy(log["radius"], log["correct"], [0.25])[0]
    assert acc == pytest.approx(3 / len(RADII))  # 0.25, 0.2500000001 and 1/3
    row = summarize([out], [0.25])[0]
    assert row["acr"] == pytest.approx(float(np.mean(RADII)), rel=1e-15)


def test_settings_are_recorded_and_checked_on_resume(tmp_path):
    out = tmp_path / "c.tsv"
    runner.certify_dataset(_FixedSmooth(), _data(3), out, identity={"weights_sha256": "abc"}, **KW)
    settings = runner.read_settings(out)
    assert settings == json.loads(runner.settings_path(out).read_text())
    assert settings["N"] == 100 and settings["N0"] == 10 and settings["alpha"] == 0.1 and settings["seed"] == 3
    assert settings["sigma"] == 0.25 and settings["weights_sha256"] == "abc"
    before = out.read_text()
    with pytest.raises(runner.SettingsMismatch, match="N=100.*N=200"):
        runner.certify_dataset(_FixedSmooth(), _data(), out, identity={"weights_sha256": "abc"},
                               **{**KW, "n": 200})
    with pytest.raises(runner.SettingsMismatch, match="weights_sha256"):
        runner.certify_dataset(_FixedSmooth(), _data(), out, identity={"weights_sha256": "def"}, **KW)
    assert out.read_text() == before
    runner.certify_dataset(_FixedSmooth(), _data(), out, identity={"weights_sha256": "abc"}, **KW)  # resumes
    assert out.read_text().startswith(before) and len(out.read_text().splitlines()) == len(RADII) + 1
    runner.certify_dataset(_FixedSmooth(), _data(2), out, identity={"weights_sha256": "def"}, overwrite=True,
                           **KW)
    assert len(out.read_text().splitlines()) == 3
    assert runner.read_settings(out)["weights_sha256"] == "def"


def test_sharded_runs_share_the_settings_check(tmp_path):
    out = tmp_path / "c.tsv"
    runner.certify_dataset(_FixedSmooth(), _data(), out, rank=1, world_size=2, **KW)
    with pytest.raises(runner.SettingsMismatch):
        runner.certify_dataset(_FixedSmooth(), _data(), out, rank=0, world_size=2, **{**KW, "seed": 4})


def test_backend_variable_names_itself(monkeypatch):
    from robustkern import _backend
    monkeypatch.setenv("ROBUSTKERN_BACKEND", "bogus")
    with pytest.raises(_backend.BackendUnavailable, match="ROBUSTKERN_BACKEND=bogus.*auto, triton"):
        _backend.requested_backend()
    monkeypatch.setenv("ROBUSTKERN_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailable, match="ROBUSTKERN_BACKEND"):
        _backend.select("meta")


@pytest.mark.parametrize("jit_env, advice, not_advice", [
    ("1", "ninja", "ROBUSTKERN_JIT=1"),     # the JIT build is on and failed: how to make it work
    ("0", "unset ROBUSTKERN_JIT", None),    # it was switched off: switching it on is the way
])
def test_fallback_warning_gives_advice_that_applies(jit_env, advice, not_advice, monkeypatch):
    from robustkern import _ext
    monkeypatch.setenv("ROBUSTKERN_JIT", jit_env)
    monkeypatch.setattr(_ext, "_outcome", None)

    def missing(name):
        raise ModuleNotFoundError("No module named 'robustkern._C'", name="robustkern._C")

    def jit_fails():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(_ext, "importlib", types.SimpleNamespace(import_module=missing))
    monkeypatch.setattr(_ext, "_jit_compile", jit_fails)
    with pytest.warns(RuntimeWarning) as record:
        assert _ext.load() is False
    text = str(record[0].message)
    assert advice in text
    if not_advice:
        assert not_advice not in text


def test_adversarial_training_epoch_warns_nothing():
    from robustkern.attacks.schedules import adversarial_training_epoch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = adversarial_training_epoch(model, loader, opt, eps=0.1, alpha=0.05, steps=2)
    assert rec["n"] == 5 and rec["loss"] > 0
