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


def test_loss_landscape_recipe_loads_and_asks_for_its_data(tmp_path, capsys):
    """llm_mnist_0.4 (crown_ibp_ours) is a method the app runs: without MNIST it stops at the data (exit 3)."""
    assert main(["train", "-q", "-c", "llm_mnist_0.4", "--out", str(tmp_path / "run"), "--data-dir",
                 str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte" in err or "train-images-idx3-ubyte" in err


def test_certify_usage_and_data_errors(tmp_path, capsys):
    assert main(["certify", "-c", "cohen_gaussian_0.25"]) == 2  # no weights to certify
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["certify", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_gaussian", "--out", str(run), "training_params:epochs=1",
                 "data:num_train=64"]) == 0
    ckpt = str(run / "checkpoint.pt")
    assert main(["certify", "-q", "--checkpoint", ckpt, "certify_params:N=0"]) == 2
    assert main(["certify", "-q", "--checkpoint", ckpt, "data:dataset=mnist", "--data-dir", str(tmp_path)]) == 2
    assert "does not match the model" in capsys.readouterr().err  # digits weights in an MNIST-shaped model
    from robustkern_cli.config import load_config
    from robustkern_cli.evaluate import model_from_config
    mnist = load_config("digits_gaussian", ["data:dataset=mnist"])
    torch.save({"state_dict": model_from_config(mnist).state_dict()}, tmp_path / "mnist.pt")
    assert main(["certify", "-q", "-c", "digits_gaussian", "data:dataset=mnist", "--checkpoint",
                 str(tmp_path / "mnist.pt"), "--data-dir", str(tmp_path)]) == 3  # weights fit, data missing
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err


def test_certify_writes_cohens_tsv_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_gaussian", "--out", str(run), "training_params:epochs=1"]) == 0
    capsys.readouterr()
    args = ["certify", "-q", "--checkpoint", str(run / "checkpoint.pt"), "certify_params:N0=20",
            "certify_params:N=200", "certify_params:max=10", "--format", "tsv"]
    assert main(args) == 0
    tsv = run / "certify_sigma0.25.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(lines) == 11
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(10))
    for idx, label, pred, radius, correct, elapsed in rows:
        assert 0 <= int(label) < 10 and -1 <= int(pred) < 10 and float(radius) >= 0
        assert int(correct) == int(int(pred) == int(label)) and ":" in elapsed
        assert (int(pred) == -1) <= (float(radius) == 0)
    header, row = capsys.readouterr().out.strip().splitlines()
    summary = dict(zip(header.split("\t"), row.split("\t")))
    assert summary["n"] == "10" and {"acr", "0", "0.25", "0.5", "1"} <= set(summary)
    assert all(0 <= float(summary[k]) <= 1 for k in ("0", "0.25", "0.5", "abstain"))
    # a rerun resumes: nothing is certified twice; a larger max only adds the new images
    assert main(args) == 0
    assert tsv.read_text().splitlines() == lines
    assert main(args[:-3] + ["certify_params:max=12", "--outfile", str(tsv)]) == 0
    again = tsv.read_text().splitlines()
    assert again[:11] == lines and [line.split("\t")[0] for line in again[11:]] == ["10", "11"]


def test_demo_prints_one_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--certify-images", "8", "--certify-n", "200",
                 "--pgd-steps", "3"]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "model" and header[-1] == "ACR" and len(header) == 8
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in table[1:])}
    assert set(rows) == {"standard", "ibp", "gaussian"}
    for name, cells in rows.items():
        numbers = cells[:3] if name != "gaussian" else cells[:6]
        assert all(0 <= float(v) <= 1 for v in numbers), (name, cells)
        if name != "gaussian":
            assert cells[3:] == ["-"] * 4
    assert float(rows["gaussian"][6]) >= 0
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    assert len((out / "gaussian" / "certify_sigma0.25.tsv").read_text().splitlines()) == 9


def test_train_then_eval_from_the_checkpoint_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), "training_params:epochs=1"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert f"clean accuracy {ev['acc']:.3f}" in capsys.readouterr().out
    assert ev["method"] == "clean" and ev["n"] == 360
    assert ev["acc"] == pytest.approx(trained["test_acc"])
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "eval_params:num_examples=50",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 50
    # PGD evaluation (the seeds' PGD column): the attack lowers accuracy on a standard-trained model
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "eval_params:method=pgd",
                 "eval_params:epsilon=0.1", "eval_params:method_params:num_steps=5",
                 "eval_params:method_params:step_size=0.05", "--json"]) == 0
    pgd = json.loads(capsys.readouterr().out)
    assert pgd["n"] == 360 and pgd["acc"] == pytest.approx(ev["acc"]) and pgd["pgd_acc"] < pgd["acc"]
    assert main(["eval", "-q", "--checkpoint", str(run / "checkpoint.pt"), "eval_params:method=autoattack",
                 "eval_params:epsilon=0.1", "eval_params:method_params:num_steps=5",
                 "eval_params:num_examples=60", "--json"]) == 0
    aa = json.loads(capsys.readouterr().out)
    assert aa["n"] == 60 and aa["autoattack_acc"] < aa["acc"] and "upper bound" in aa["note"]


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
    assert main(["bench", "-q", "-c", "digits_standard", "--steps", "2", "--batch-size", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch"] == 16 and res["train_step_ms"] > 0 and res["params"] > 1000
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "environment:" in out and "digits_standard" in out and "resnet110" in out


def test_info_reports_the_environment_variables(monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTKERN_DATA", "/data/somewhere")
    monkeypatch.delenv("ROBUSTKERN_JIT", raising=False)
    monkeypatch.setenv("ROBUSTKERN_BACKEND", "reference")
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    env = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ROBUSTKERN_")}
    assert env == {"ROBUSTKERN_BACKEND": "reference", "ROBUSTKERN_JIT": "(unset)", "ROBUSTKERN_DATA": "/data/somewhere"}
