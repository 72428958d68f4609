"""MACER's API (``robustkern.compat.macer``) gives the numbers of RuntianZ/macer on its MNIST ``LeNet`` (whose
``x.view(-1, 4*4*50)`` needs NCHW memory): ``macer_train`` prints the original's line with the epoch averages of
the transcription ``robustkern.reference.macer.macer_train_reference`` (1e-6) and leaves the same weights;
``Smooth(..., mode=)`` certifies (hard, soft, both) with the labels of the transcription
``robustkern.reference.macer.MacerSmoothReference`` given the same seed (``rng="torch"``) and its radii, and runs
with robustkern's default options too."""
import copy
import re

import pytest
import torch

from robustkern.compat.macer import Smooth, macer_train
from robustkern.reference.published.macer import MacerSmoothReference, macer_train_reference
from robustkern.reference.published.seed_models import LeNet


def lenet(seed=0):
    torch.manual_seed(seed)
    return LeNet()


def test_macer_train_prints_the_original_line_and_trains_as_it(capsys):
    model = lenet()
    reference_model = copy.deepcopy(model)
    torch.manual_seed(1)
    loader = [(torch.rand(3, 1, 28, 28), torch.tensor([0, 5, 9])), (torch.rand(2, 1, 28, 28), torch.tensor([1, 1]))]
    args = (0.25, 12.0, 4, 16.0, 8.0, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference_model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(2)
    assert macer_train(*args, model, loader, opt, "cpu") is None
    line = capsys.readouterr().out.strip()
    torch.manual_seed(2)
    want = macer_train_reference(*args, reference_model, loader, ref_opt, "cpu")
    match = re.fullmatch(r"Classification Loss: (\S+)  Robustness Loss: (\S+)", line)
    assert match, line
    assert [float(v) for v in match.groups()] == pytest.approx(want, rel=1e-6)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    macer_train(*args, model, loader, opt, "cpu", verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("mode", ["hard", "soft", "both"])
@pytest.mark.parametrize("seed", range(2))
def test_certify_equals_the_original(mode, seed):
    model = lenet(seed).eval()
    torch.manual_seed(10 + seed)
    x = torch.rand(1, 28, 28)
    torch.manual_seed(seed)
    got = Smooth(model, 10, 0.5, "cpu", mode, beta=50.0, rng="torch").certify(x, 16, 96, 0.01, 40)
    torch.manual_seed(seed)
    want = MacerSmoothReference(model, 10, 0.5, mode, beta=50.0).certify(x, 16, 96, 0.01, 40)
    assert len(got) == len(want) == (4 if mode == "both" else 2)
    assert all(label != Smooth.ABSTAIN for label in got[0::2])      # a case that certifies
    assert got[0::2] == want[0::2]
    assert got[1::2] == pytest.approx(want[1::2], rel=1e-9, abs=1e-12)


def test_predict_and_default_options_run_on_lenet():
    model = lenet(3).eval()
    x = torch.rand(1, 28, 28)
    for mode in ("hard", "soft", "both"):
        smooth = Smooth(model, 10, 0.25, "cpu", mode, beta=16.0)
        c = smooth.predict(x, 20, 10, seed=1)
        for label in (c if mode == "both" else (c,)):
            assert 0 <= label < 10
        out = smooth.certify(x, 10, 40, 0.001, 20, seed=2)
        assert all(lbl == Smooth.ABSTAIN or 0 <= lbl < 10 for lbl in out[0::2])
    with pytest.raises(ValueError, match="mode"):
        Smooth(model, 10, 0.25, "cpu", "medium")
