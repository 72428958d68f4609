"""benchmarks/common.py's CUDA timing logic, on the CPU: the quantiles of per-call times, the choice between
``triton.testing.do_bench`` and the own CUDA-event loop, and ``time_cuda``'s control flow with the CUDA parts
replaced by fakes (the CUDA-event loop itself runs only on a GPU: ``test_time_cuda_on_gpu``)."""
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
import triton.testing

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("robustkern_bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = common          # dataclasses look their module up there
_spec.loader.exec_module(common)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 37])
def test_timing_from_samples_matches_torch_quantile(n):
    rng = random.Random(n)
    ms = [rng.uniform(0.1, 500.0) for _ in range(n)]
    t = common.timing_from_samples(ms)
    want = torch.quantile(torch.tensor(ms, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    assert (t.median_ms, t.low_ms, t.high_ms) == pytest.approx(want.tolist(), rel=1e-12)
    assert t.samples == n
    assert min(ms) <= t.low_ms <= t.median_ms <= t.high_ms <= max(ms)


def test_timing_from_samples_small_cases_by_hand():
    t = common.timing_from_samples([40.0, 10.0, 30.0, 20.0, 50.0])   # sorted 10..50: points 2, 0.8, 3.2
    assert (t.median_ms, t.low_ms, t.high_ms, t.samples) == pytest.approx((30.0, 18.0, 42.0, 5))
    one = common.timing_from_samples([7.5])
    assert (one.median_ms, one.low_ms, one.high_ms, one.samples) == (7.5, 7.5, 7.5, 1)
    with pytest.raises(ValueError, match="no timed calls"):
        common.timing_from_samples([])


@pytest.mark.parametrize("estimate, rep, min_reps, own", [
    (100.0, 200, 5, True),     # do_bench would time int(2) calls
    (40.0, 200, 5, False),     # exactly 5
    (40.1, 200, 5, True),      # int(4.98) = 4
    (0.05, 200, 5, False),     # a fast call: thousands of calls
    (250.0, 200, 1, False),    # do_bench's max(1, ...) already gives one
    (0.0, 200, 5, False),      # no estimate: leave it to do_bench
])
def test_needs_own_loop(estimate, rep, min_reps, own):
    assert common.needs_own_loop(estimate, rep, min_reps) is own


class _FakeCuda:
    """Stands in for the CUDA parts of time_cuda: every call of the timed function "takes" ``ms``."""

    def __init__(self, monkeypatch, ms, do_bench_all=True):
        self.ms, self.calls, self.loops, self.do_bench_args = ms, 0, [], None
        monkeypatch.setattr(common.torch.cuda, "synchronize", lambda *a: None)

        def event_times(fn, n, grad_to_none=None):
            self.loops.append(n)
            out = []
            for i in range(n):
                fn()
                out.append(ms * (1 + 0.01 * i))
            return out

        def do_bench(fn, grad_to_none=None, rep=100, quantiles=None, return_mode="mean"):
            self.do_bench_args = dict(rep=rep, quantiles=quantiles, return_mode=return_mode)
            if return_mode == "all" and not do_bench_all:
                raise AssertionError                                   # an old Triton
            if quantiles is not None:
                return [ms, 0.9 * ms, 1.1 * ms]
            n = max(1, int(rep / ms))
            for _ in range(n):
                fn()
            return [ms] * n

        monkeypatch.setattr(common, "_cuda_event_times", event_times)
        monkeypatch.setattr(triton.testing, "do_bench", do_bench)

    def fn(self):
        self.calls += 1


def test_time_cuda_times_slow_calls_itself(monkeypatch):
    fake = _FakeCuda(monkeypatch, ms=120.0)
    t = common.time_cuda(fake.fn, rep_ms=200, min_reps=5)
    assert fake.loops == [1, 5] and fake.do_bench_args is None
    assert fake.calls == 1 + 1 + 5                                   # warm-up, estimate, the timed calls
    assert t.samples == 5 and t.median_ms == pytest.approx(120.0 * 1.02)
    assert t.low_ms < t.median_ms < t.high_ms


def test_time_cuda_leaves_fast_calls_to_do_bench(monkeypatch):
    fake = _FakeCuda(monkeypatch, ms=2.0)
    t = common.time_cuda(fake.fn, rep_ms=200, min_reps=5)
    assert fake.loops == [1]
    assert fake.do_bench_args == dict(rep=200, quantiles=None, return_mode="all")
    assert t.samples == 100 and t.median_ms == 2.0


def test_time_cuda_old_triton_fallback(monkeypatch):
    fake = _FakeCuda(monkeypatch, ms=2.0, do_bench_all=False)
    t = common.time_cuda(fake.fn, rep_ms=200)
    assert fake.do_bench_args["quantiles"] == [0.5, 0.2, 0.8]
    assert (t.median_ms, t.low_ms, t.high_ms, t.samples) == pytest.approx((2.0, 1.8, 2.2, -1))


def test_time_cuda_rejects_min_reps_below_one():
    with pytest.raises(ValueError, match="min_reps"):
        common.time_cuda(lambda: None, min_reps=0)


@pytest.mark.gpu
def test_time_cuda_on_gpu():
    w = torch.ones(3, device="cuda", requires_grad=True)
    cleared = []

    def slow():                               # ~50 ms of GPU time: do_bench(rep=100) would time 2 calls
        cleared.append(w.grad is None)
        w.grad = torch.ones_like(w)
        torch.cuda._sleep(100_000_000)

    t = common.time_cuda(slow, grad_to_none=[w], rep_ms=100, min_reps=5)
    assert t.samples == 5 and 5.0 < t.low_ms <= t.median_ms <= t.high_ms
    assert cleared[-6:] == [True] * 6         # the estimate and the 5 timed calls start without a gradient
    a = torch.randn(256, 256, device="cuda")
    fast = common.time_cuda(lambda: a + 1, rep_ms=50, min_reps=5)
    assert fast.samples >= 5 and 0 < fast.low_ms <= fast.median_ms <= fast.high_ms
