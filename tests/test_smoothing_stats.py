"""robustkern.smoothing.statistics and the certify_dataset runner (Cohen's TSV, resume, shards)."""
import math

import numpy as np
import pytest
import torch

from robustkern.smoothing import Smooth, statistics as st
from robustkern.smoothing.runner import HEADER, certify_dataset, merge_parts, read_results


def test_clopper_pearson_known_values():
    # Values from the research notes (Cohen's proportion_confint(NA, N, 2 alpha, "beta")[0]), N=1e5, alpha=1e-3.
    assert st.lower_confidence_bound(100_000, 100_000, 0.001) == pytest.approx(0.999931, abs=1e-6)
    assert st.lower_confidence_bound(99_000, 100_000, 0.001) == pytest.approx(0.988989, abs=1e-6)
    assert st.lower_confidence_bound(60_000, 100_000, 0.001) == pytest.approx(0.595201, abs=1e-6)
    assert st.lower_confidence_bound(0, 10, 0.1) == 0.0
    assert st.radius(st.lower_confidence_bound(100_000, 100_000, 0.001), 1.0) == pytest.approx(3.8115, abs=1e-4)
    arr = st.lower_confidence_bound(np.array([0, 5, 10]), 10, 0.05)
    assert arr.shape == (3,) and arr[0] == 0 and 0 < arr[1] < 0.5 < arr[2] < 1


def test_two_sided_radius_and_union_bound():
    r_union = st.two_sided_radius(900, 50, 1000, 0.01, 0.5)
    r_plain = st.two_sided_radius(900, 50, 1000, 0.01, 0.5, union_bound=False)
    assert 0 < r_union < r_plain
    # with p_B = 1 - p_A exactly (no union bound) it reduces to Cohen's sigma * Phi^-1(p_A)
    from scipy.stats import norm
    p_a = st.lower_confidence_bound(900, 1000, 0.01)
    assert st.two_sided_radius(900, 100, 1000, 0.01, 0.5, union_bound=False) == pytest.approx(0.5 * norm.ppf(p_a))


def test_linf_acr_certified_accuracy():
    assert st.l2_to_linf(0.5, 3072) == pytest.approx(0.5 / math.sqrt(3072))
    radii = torch.tensor([0.0, 0.5, 1.0, 0.25])
    correct = torch.tensor([0, 1, 1, 0])
    assert st.average_certified_radius(radii, correct) == pytest.approx(0.375)
    assert st.certified_accuracy(radii, correct, 0.5) == 0.5
    assert st.certified_accuracy(radii, correct, [0.0, 0.75, 2.0]) == [0.5, 0.25, 0.0]


def test_bad_statistics_input():
    for alpha in (0, 1, 2):
        with pytest.raises(ValueError, match="alpha"):
            st.lower_confidence_bound(5, 10, alpha)
    with pytest.raises(ValueError):
        st.lower_confidence_bound(11, 10, 0.1)
    with pytest.raises(ValueError):
        st.lower_confidence_bound(0, 0, 0.1)


class _Data:
    def __init__(self, n=7):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 2, 2, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _smooth():
    torch.manual_seed(0)
    return Smooth(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), 3, 0.25)


KW = dict(n0=10, n=100, alpha=0.1, batch_size=64, seed=3, progress=False)


def test_runner_tsv_resume_and_shards(tmp_path):
    data, smooth = _Data(), _smooth()
    out = tmp_path / "cert.tsv"
    certify_dataset(smooth, data, out, skip=2, max=6, **KW)
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER and [int(l.split("\t")[0]) for l in lines[1:]] == [0, 2, 4]
    idx, label, pred, rad, correct, time = lines[1].split("\t")
    assert int(correct) == int(int(pred) == int(label)) and ":" in time and float(rad) >= 0
    # one image for comparison with Smooth.certify keyed by the data set index
    p, r = smooth.certify(data[4][0], 10, 100, 0.1, 64, seed=3, index=4)
    assert read_results(out)[4].split("\t")[2:4] == [str(p), repr(r)]  # the radius in full
    # resume: a truncated last line is dropped and redone; finished lines are kept
    with open(out, "a") as f:
        f.write("6\t1\t")
    certify_dataset(smooth, data, out, **KW)
    full = read_results(out)
    assert sorted(full) == list(range(7))
    assert full[2] == read_results(tmp_path / "cert.tsv")[2]
    # shards by hand (what torchrun does), several images per forward: the same predictions and radii
    sharded = tmp_path / "sharded.tsv"
    for rank in (1, 0):
        certify_dataset(smooth, data, sharded, rank=rank, world_size=2, images_per_batch=3, **KW)
    merge_parts(sharded, 2)
    got = read_results(sharded)
    assert sorted(got) == list(range(7))
    assert all(got[i].split("\t")[:5] == full[i].split("\t")[:5] for i in range(7))
    assert not list(tmp_path.glob("*.part*"))
