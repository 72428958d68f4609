"""The ``robustkern`` command: help texts, exit codes, eval/analyze/bench/info end to end."""
import json
import urllib.request

import pytest
import torch

from robustkern_cli.main import main

SUBCOMMANDS = ("train", "eval", "certify", "analyze", "bench", "demo", "info")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_explains_itself(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"robustkern {cmd}" in out and "exit codes" in out
    assert len(out) > 300  # a description, not just the usage line


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["train"]) == 2 and "--config is required" in capsys.readouterr().err
    assert main(["train", "-c", "digits_standard", "training_params:epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'training_params:epoch'" in err and "epochs" in err


def test_missing_data_exits_3(tmp_path, capsys):
    rc = main(["eval", "-q", "-c", "digits_standard", "data:dataset=mnist", "--data-dir", str(tmp_path)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte" in err and str(tmp_path) in err


def test_methods_without_their_library_part_exit_4(tmp_path, capsys):
    assert main(["train", "-q", "-c", "macer_0.25", "--out", str(tmp_path)]) == 4
    assert "robustkern.smoothing" in capsys.readouterr().err
    assert main(["certify", "-c", "cohen_gaussian_0.25"]) == 4
    assert "robustkern.smoothing" in capsys.readouterr().err
    assert main(["eval", "-c", "lfr_mnist_0.3"]) == 4  # PGD evaluation: before any data is looked for
    assert "robustkern.attacks" in capsys.readouterr().err


def test_train_then_eval_from_the_checkpoint_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), "training_params:epochs=1"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert json.loads(capsys.readouterr().out) == ev
    assert ev["method"] == "clean" and ev["n"] == 360
    assert ev["acc"] == pytest.approx(trained["test_acc"])
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "eval_params:num_examples=50"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 50


def test_resume_flag_before_an_override_is_not_taken_as_a_path(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), "training_params:epochs=1"]) == 0
    assert main(["train", "-q", "--out", str(run), "--resume", "training_params:epochs=2"]) == 0
    assert [m["epoch"] for m in torch.load(run / "checkpoint.pt", weights_only=False)["metrics"]] == [1, 2]


def test_analyze_certify_logs(tmp_path, capsys):
    log = tmp_path / "cert.tsv"
    log.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                   "0\t3\t3\t0.5\t1\t0:00:14.172309\n"
                   "20\t8\t8\t0.3\t1\t15.4\n"
                   "40\t1\t-1\t0.0\t0\t0:00:13.0\n"
                   "60\t0\t6\t1.2\t0\t0:00:12.5\n")
    plot = tmp_path / "curves.png"
    assert main(["analyze", str(log), "--radii", "0,0.4", "--format", "tsv", "--plot", str(plot)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    values = dict(zip(header.split("\t"), row.split("\t")))
    assert values["n"] == "4" and values["abstain"] == "0.250"
    assert values["acr"] == "0.200"  # (0.5 + 0.3) / 4: wrong and abstained rows count as radius 0
    assert values["0"] == "0.500" and values["0.4"] == "0.250"
    assert plot.stat().st_size > 1000
    assert main(["analyze", str(tmp_path / "missing.tsv")]) == 3
    assert main(["analyze", str(log), "--radii", "0:1:0"]) == 2


def test_bench_and_info(capsys):
    assert main(["bench", "-q", "-c", "digits_standard", "--steps", "2", "--batch-size", "16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch"] == 16 and res["train_step_ms"] > 0 and res["params"] > 1000
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "library parts:" in out and "digits_standard" in out and "resnet110" in out
