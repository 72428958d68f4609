"""benchmarks/common.py's output options and merge, and benchmarks/gpu_suite.sh's step table: --results-dir sends
a run's RESULTS.md block and CSV rows to a folder, --commit names the commit where there is no git checkout, a
folder of results merges back (newer blocks only, missing CSV rows), and every step of the suite names options its
script has, in the order bounds, smoothing, attacks, flatness."""
import csv
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from _bench import BENCH_DIR, load_bench

common = load_bench("common")


@pytest.fixture
def results_in(tmp_path, monkeypatch):
    """common's output globals restored after the test (use_output_options sets them)."""
    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)
    monkeypatch.setattr(common, "RESULTS_MD", common.RESULTS_MD)
    monkeypatch.setattr(common, "_COMMIT", [])
    return tmp_path


def _env(date="2026-01-02T03:04:05+00:00", commit="abc1234"):
    return common.Environment(device="Some GPU", torch="2.13.0", triton="3.6.0", commit=commit, date=date,
                              command="python benchmarks/bench_x.py")


def _row(ms):
    return common.Row({"model": "m", "batch": 4}, "robustkern", common.Timing(ms, ms, ms, 3), None)


def test_results_dir_and_commit_options(results_in, monkeypatch):
    import argparse
    p = argparse.ArgumentParser()
    common.add_output_options(p)
    args = p.parse_args(["--results-dir", str(results_in / "out"), "--commit", "feedbee"])
    common.use_output_options(args)
    common.update_results_md("x", "Title", "| a |", _env())
    common.append_csv("x", [_row(1.0)], _env(), torch.device("cpu"))
    assert "<!-- BEGIN x some-gpu -->" in (results_in / "out" / "RESULTS.md").read_text()
    assert (results_in / "out" / "results" / "x.csv").is_file()
    assert not (BENCH_DIR / "results" / "x.csv").exists()

    def no_git(*a, **k):
        raise OSError("no git")
    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.git_commit() == "feedbee"
    monkeypatch.setattr(common.sys, "argv", ["bench_x.py", "--batch", "4", "--results-dir", "/o", "--commit=c1",
                                             "--commit", "c2", "--quick"])
    assert common.Environment.capture(torch.device("cpu")).command.endswith("bench_x.py --batch 4 --quick")


def test_merge_takes_newer_and_missing_blocks_and_rows(results_in):
    here, there = results_in / "here", results_in / "there"
    for folder, date, ms in ((here, "2026-01-02T00:00:00+00:00", 1.0), (there, "2026-03-04T00:00:00+00:00", 2.0)):
        common.RESULTS_DIR, common.RESULTS_MD = folder / "results", folder / "RESULTS.md"
        common.update_results_md("x", "Title", f"| {ms} |", _env(date))
        common.append_csv("x", [_row(ms)], _env(date), torch.device("cpu"))
    common.RESULTS_MD = there / "RESULTS.md"
    common.update_results_md("y", "Other", "| y |", _env())            # absent here: inserted
    (here / "RESULTS.md").write_text((here / "RESULTS.md").read_text() + "\nkept text\n")
    report = common.merge_results(there, here)
    text = (here / "RESULTS.md").read_text()
    assert "| 2.0 |" in text and "| 1.0 |" not in text and "| y |" in text and "kept text" in text
    assert report[0].startswith("RESULTS.md: 2 block(s) applied")
    with open(here / "results" / "x.csv", newline="") as f:
        assert [r["median_ms"] for r in csv.DictReader(f)] == ["1.0", "2.0"]
    assert common.merge_results(there, here)[0] == "RESULTS.md: 0 block(s) applied"     # nothing new the 2nd time
    older = results_in / "older"
    common.RESULTS_DIR, common.RESULTS_MD = older / "results", older / "RESULTS.md"
    common.update_results_md("x", "Title", "| 0.5 |", _env("2025-01-01T00:00:00+00:00"))
    common.merge_results(older, here)
    assert "| 2.0 |" in (here / "RESULTS.md").read_text()                              # an older block is not taken


SUITE = BENCH_DIR / "gpu_suite.sh"


def _suite_rows():
    body = SUITE.read_text().split("read -r -d '' STEPS <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    return [[f.strip() for f in line.split("|")] for line in body.splitlines() if line and not line.startswith("#")]


def test_every_suite_step_names_options_its_script_has():
    rows = _suite_rows()
    benches = []
    for step, limit, gpu, dry in rows:
        assert int(limit) > 0
        for cmd in (gpu, dry):
            if cmd.startswith("@"):
                continue
            words = shlex.split(cmd)
            script = (BENCH_DIR / words[0]).read_text()
            defined = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script))
            defined |= {"--results-dir", "--commit"} if "add_output_options" in script else set()
            assert {w for w in words if w.startswith("--")} <= defined, (step, cmd)
        if not gpu.startswith("@"):
            benches.append(shlex.split(gpu)[0])
    scripts = {p.name for p in BENCH_DIR.glob("bench_*.py")} | {"gpu_soundness.py"}
    assert set(benches) == scripts, scripts - set(benches)
    order = ["gpu_soundness", "bench_ibp", "bench_crown", "bench_smoothing", "bench_macer_tail", "bench_attacks",
             "bench_flatness"]
    first = [min(i for i, b in enumerate(benches) if b.startswith(name)) for name in order]
    assert first == sorted(first)
    steps = [r[0] for r in rows]
    assert steps[:2] == ["env", "build"] and all(s.startswith("test-") for s in steps[2:7])


def test_suite_refuses_what_it_cannot_run(tmp_path):
    def run(*args):
        return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True)
    assert run("--steps", "bogus", str(tmp_path)).returncode == 2
    assert run("--budget", "soon", str(tmp_path)).returncode == 2
    listed = run("--list")
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()[1:]] == \
        [r[0] for r in _suite_rows()]
