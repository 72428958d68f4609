"""benchmarks/bench_crown.py with --device: the GPU target lines, the per-provider CUDA timing that drops a failing
provider, the device check, and a batch-1 CPU run that writes neither RESULTS.md nor, with --no-save, the CSV."""

import pytest
import torch

from _bench import load_bench as _load


crown_bench = _load("bench_crown")
common = crown_bench.common


def _row(mode, provider, ms, mb):
    return common.Row({"model": "m", "batch": 64, "mode": mode}, provider, common.Timing(ms, ms, ms, 5),
                      None if mb is None else int(mb * 2**20))


def test_crown_target_lines():
    rows = [_row("fwd", "robustkern", 10.0, 40), _row("fwd", "auto_lirpa", 35.0, 100),
            _row("fwd", "robustkern-lf", 8.0, 10), _row("fwd", "auto_lirpa-lf", 6.0, 20),
            _row("fwd+bwd", "robustkern", 10.0, 60), _row("fwd+bwd", "auto_lirpa", 25.0, 100),
            common.Row({"model": "m", "batch": 64, "mode": "fwd+bwd"}, "auto_lirpa-lf", None, None, "failed: x")]
    lines = crown_bench.target_lines(rows)
    assert lines == [
        "- m batch 64 fwd: robustkern speed-up over auto_lirpa: 3.50x -> met (target >= 3.0x)",
        "- m batch 64 fwd: robustkern peak memory over auto_lirpa's: 0.40x -> met (target <= 0.5x)",
        "- m batch 64 fwd: robustkern-lf speed-up over auto_lirpa-lf: 0.75x -> MISSED (target > 1x)",
        "- m batch 64 fwd+bwd: robustkern speed-up over auto_lirpa: 2.50x -> MISSED (target >= 3.0x)",
        "- m batch 64 fwd+bwd: robustkern peak memory over auto_lirpa's: 0.60x -> MISSED (target <= 0.5x)",
        "- m batch 64 fwd+bwd: robustkern-lf speed-up over auto_lirpa-lf: not measured (target > 1x)"]


def test_crown_cuda_timing_drops_a_failing_provider(monkeypatch):
    def fake_time_cuda(fn):
        fn()
        return common.Timing(1.0, 1.0, 1.0, 5)

    def oom():
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(common, "time_cuda", fake_time_cuda)
    called = []
    fns, notes = {"a": lambda: called.append("a"), "b": oom, "c": lambda: called.append("c")}, {}
    timings = crown_bench._time_cuda_each(fns, notes)
    assert set(timings) == set(fns) == {"a", "c"} and called == ["a", "c"]
    assert notes == {"b": "failed: OutOfMemoryError: out of memory (simulated)"}


def test_crown_rejects_other_devices(capsys):
    with pytest.raises(SystemExit):
        crown_bench.main(["--device", "meta", "--no-save"])
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_crown_cpu_batch1_runs_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    providers = ["plain", "robustkern", "robustkern-lf", "eager"]
    threads = torch.get_num_threads()
    try:
        crown_bench.main(["--device", "cpu", "--models", "cifar_medium:padding=1", "--batch", "1", "--rounds", "1",
                          "--providers", ",".join(providers), "--no-save"])
    finally:
        torch.set_num_threads(threads)
    assert list(tmp_path.iterdir()) == []                  # no RESULTS.md, no CSV
    out = capsys.readouterr().out
    assert "GPU targets" not in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert "| saved MB |" in table[0] and "| min ms |" in table[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[2], r[3].strip("*")) for r in rows] == [(m, p) for m in ("fwd", "fwd+bwd") for p in providers]
    for r in rows:
        assert float(r[4]) > 0 and r[10] == ""             # timed, no failure note
        assert (r[9] == "-") == (r[2] == "fwd")            # CPU: saved bytes for fwd+bwd rows only
    saved = {r[3].strip("*"): float(r[9]) for r in rows if r[2] == "fwd+bwd"}
    assert saved["robustkern-lf"] < saved["robustkern"] < saved["eager"]   # what the fused ops / loss fusion save
