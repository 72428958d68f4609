"""What the ``robustkern`` command prints: the demo's table before its plot (and without the optional packages),
``analyze`` curves labelled by run, readable ``eval``/``bench`` lines, interrupt messages that say how to
resume, and certified accuracy counted on the certified radii (not on rounded ones)."""
import json
import re
import shlex
import sys

import pytest
import torch

from _app_runs import gaussian_run  # noqa: F401 - a fixture
from robustkern_cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO_QUICK = ["--epochs", "1", "--certify-images", "4", "--certify-n", "100", "--pgd-steps", "1"]


def without(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------------------------------------------ demo
def test_demo_without_scikit_learn_says_so_before_any_work(tmp_path, monkeypatch, capsys):
    without(monkeypatch, "sklearn")
    assert main(["demo", "--out", str(tmp_path / "demo"), *DEMO_QUICK]) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "scikit-learn" in err and "pip install" in err
    assert not (tmp_path / "demo" / "standard" / "checkpoint.pt").exists()


def test_demo_prints_its_table_and_skips_the_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    without(monkeypatch, "matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *DEMO_QUICK]) == 0
    captured = capsys.readouterr()
    table = [line for line in captured.out.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and table[0].startswith("| model |")
    notes = [line for line in (captured.out + captured.err).splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "pip install" in notes[0]
    assert not (out / "certified_accuracy.png").exists()


def test_analyze_plot_without_matplotlib_prints_the_table_then_one_line(tmp_path, monkeypatch, capsys):
    log = tmp_path / "cert.tsv"
    log.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t1\t0:00:01.0\n")
    without(monkeypatch, "matplotlib")
    assert main(["analyze", str(log), "--plot", str(tmp_path / "c.png")]) == 4
    captured = capsys.readouterr()
    assert captured.out.startswith("| name |")
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err and "pip install" in err


# --------------------------------------------------------------------------------------------------- analyze
def _certify_run(folder, method, sigma, n):
    """A run folder as ``robustkern train`` + ``certify`` leave it: config.json and a certification log."""
    from robustkern.smoothing import Smooth
    from robustkern.smoothing.runner import certify_dataset
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"training_params": {"method": method}}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = [(torch.rand(1, 2, 2), i % 3) for i in range(6)]
    out = folder / f"certify_sigma{sigma:g}.tsv"
    certify_dataset(Smooth(model, 3, sigma), data, out, n0=10, n=n, alpha=0.1, batch_size=64, progress=False)
    return out


def test_analyze_labels_curves_by_run(tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    a = _certify_run(tmp_path / "runA", "gaussian", 0.25, 100)
    b = _certify_run(tmp_path / "runB", "macer", 0.25, 200)
    assert a.name == b.name
    plot = tmp_path / "curves.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        assert main(["analyze", str(a), str(b), "--format", "tsv", "--plot", str(plot)]) == 0
    header, row_a, row_b = capsys.readouterr().out.strip().splitlines()
    name_a, name_b = row_a.split("\t")[0], row_b.split("\t")[0]
    assert name_a != name_b
    assert "runA" in name_a and "gaussian" in name_a and "0.25" in name_a and "100" in name_a
    assert "runB" in name_b and "macer" in name_b and "200" in name_b
    svg = plot.read_text()
    assert "runA" in svg and "runB" in svg
    assert "L2 radius" in svg and "sigma" in svg and "certified accuracy" in svg


# ---------------------------------------------------------------------------------------------- eval, bench
def test_eval_prints_a_readable_line_and_json_on_request(gaussian_run, tmp_path, capsys):
    ckpt = str(gaussian_run / "checkpoint.pt")
    assert main(["eval", "-q", "--checkpoint", ckpt, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert main(["eval", "-q", "--checkpoint", ckpt]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and not line.startswith("{")
    assert "accuracy" in line and f"{res['acc']:.3f}" in line and str(res["n"]) in line
    # --json FILE writes the file; the readable line stays on stdout; an override after --json is an override
    assert main(["eval", "-q", "--checkpoint", ckpt, "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["acc"] == res["acc"]
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "-q", "--checkpoint", ckpt, "--json", "eval_params:num_examples=10"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10


def test_bench_prints_a_readable_line_and_json_on_request(capsys):
    args = ["bench", "-q", "-c", "digits_standard", "--steps", "1", "--batch-size", "8"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch"] == 8
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and not line.startswith("{")
    assert "ms" in line and "digits_cnn" in line and "batch 8" in line


# --------------------------------------------------------------------------------------------- interrupts
def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from robustkern_cli import train as train_mod
    real_epoch = train_mod._train_epoch

    def interrupted_in_epoch_2(epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(epoch, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", interrupted_in_epoch_2)
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), "training_params:epochs=2",
                 "data:num_train=64"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "checkpoint.pt") in err
    command = shlex.split(err.split("continue with: ", 1)[1])
    assert command[:3] == ["robustkern", "train", "--resume"]
    monkeypatch.undo()
    assert main(command[1:] + ["-q"]) == 0  # the command it printed works
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_an_interrupted_certify_says_how_to_resume(gaussian_run, tmp_path, monkeypatch, capsys):
    from robustkern.smoothing import Smooth
    real = Smooth.certify_batch
    calls = []

    def interrupted_after_one(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Smooth, "certify_batch", interrupted_after_one)
    tsv = tmp_path / "c.tsv"
    args = ["certify", "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt"), "--outfile", str(tsv),
            "--images-per-batch", "1", "certify_params:N0=20", "certify_params:N=100", "certify_params:max=3"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tsv) in err and "same command" in err
    first = tsv.read_text().splitlines()
    assert len(first) == 2
    monkeypatch.undo()
    assert main(args) == 0
    assert tsv.read_text().splitlines()[:2] == first and len(tsv.read_text().splitlines()) == 4


# ------------------------------------------------------------------------------------------ radius rounding
def test_certify_counts_the_certified_radius_not_a_rounded_one(gaussian_run, tmp_path, monkeypatch, capsys):
    """A radius of 0.2497 is not certified at r = 0.25, in the TSV, in analyze and in certify's summary."""
    from robustkern.smoothing import Smooth
    from robustkern_cli.data import load_dataset
    labels = load_dataset("digits", "test").tensors[1]

    def just_below(self, x, n0, n, alpha, batch_size, seed=None, indices=None):
        return labels[list(indices)].clone(), torch.full((len(indices),), 0.2497, dtype=torch.float64)

    monkeypatch.setattr(Smooth, "certify_batch", just_below)
    tsv = tmp_path / "c.tsv"
    assert main(["certify", "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt"), "--outfile", str(tsv),
                 "certify_params:max=5", "--radii", "0,0.2497,0.25", "--format", "tsv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    summary = dict(zip(header.split("\t"), row.split("\t")))
    assert summary["0"] == summary["0.2497"] == "1.000" and summary["0.25"] == "0.000"
    radii = [float(line.split("\t")[3]) for line in tsv.read_text().splitlines()[1:]]
    assert radii == [0.2497] * 5
    assert main(["analyze", str(tsv), "--radii", "0.25", "--format", "tsv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert dict(zip(header.split("\t"), row.split("\t")))["0.25"] == "0.000"
    assert re.fullmatch(r"\d+\.\d+", tsv.read_text().splitlines()[1].split("\t")[3])
