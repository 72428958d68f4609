"""The device-independent parts of benchmarks/bench_flatness_fused.py and benchmarks/bench_macer_tail.py: the GPU
target lines, the CPU-only option refused on CUDA, the choice of the repeat shown, and a tiny MACER tail case."""
import argparse

import pytest
import torch

from _bench import load_bench as _load


fused_bench = _load("bench_flatness_fused")
macer_bench = _load("bench_macer_tail")
common = fused_bench.common


def _row(model, provider, ms, mb):
    return common.Row({"model": model, "batch": 128}, provider, common.Timing(ms, ms, ms, 5), int(mb * 2**20))


def test_flatness_fused_target_lines():
    rows = [_row("a", "plain", 10.0, 100), _row("a", "torch-db", 40.0, 300), _row("a", "robustkern", 19.0, 125),
            _row("b", "plain", 10.0, 100), _row("b", "robustkern", 25.0, 140),
            _row("c", "torch-db", 40.0, 300), _row("c", "robustkern", 19.0, 125)]     # c: no plain row
    lines = fused_bench.target_lines(rows)
    assert len(lines) == 2
    assert lines[0] == ("a batch 128: robustkern step time 1.90x (met: target <= 2.0x), memory 1.25x (met: target "
                        "<= 1.3x) of plain; torch-db 4.00x time, 3.00x memory")
    assert "time 2.50x (MISSED: target <= 2.0x)" in lines[1] and "memory 1.40x (MISSED: target <= 1.3x)" in lines[1]
    assert "torch-db - time, - memory" in lines[1]


def test_flatness_fused_keep_freed_memory_is_cpu_only(capsys):
    with pytest.raises(SystemExit):
        fused_bench.main(["--device", "cuda", "--keep-freed-memory", "--no-save"])
    assert "CPU runs only" in capsys.readouterr().err


@pytest.mark.parametrize("ratios, shown", [([1.66, 2.66, 1.87], 2), ([3.0, 1.0, 2.0, 4.0], 2), ([0.9], 0)])
def test_macer_tail_median_repeat(ratios, shown):
    assert macer_bench.median_repeat(ratios) == shown


def test_macer_tail_rejects_no_repeats(capsys):
    with pytest.raises(SystemExit):
        macer_bench.main(["--device", "cpu", "--repeats", "0", "--no-save"])
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_macer_tail_tiny_case_on_cpu():
    args = argparse.Namespace(rounds=2, repeats=3)
    rows = macer_bench.run_case(3, 4, 5, args, torch.device("cpu"))
    assert [r.provider for r in rows] == ["original", "robustkern"]
    assert all(r.case == {"batch": 3, "copies": 4, "classes": 5} for r in rows)
    assert all(r.timing.samples == 2 for r in rows)                   # C <= 10: --rounds calls
    assert rows[0].mem_bytes > 0 and rows[1].mem_bytes > 0           # both keep tensors for the backward
    ratios = [float(v) for v in rows[1].note.split("ratios ")[1].split(", ")]
    # the repeat shown has the median ratio (compared as printed: rounded ratios may tie)
    assert len(ratios) == 3 and ratios[rows[1].extra["repeat"]] == sorted(ratios)[1]
