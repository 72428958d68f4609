"""The ``robustkern`` command loses nothing it wrote, trusts no checkpoint blindly, and answers every mistake
with one line: runs are never overwritten silently, certification logs never mix settings, downloads leave no
partial files, checkpoints load without running code, and bad values are refused before anything is written."""
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from _app_runs import QUICK, gaussian_run  # noqa: F401 - a fixture
from robustkern_cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

CERTIFY_QUICK = ["certify_params:N0=20", "certify_params:N=100", "certify_params:max=4"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)


def one_line_error(capsys) -> str:
    """The command's stderr, checked to be a single line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ data loss
def test_train_never_overwrites_an_existing_run_unless_told(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), *QUICK]) == 0
    checkpoint, log = (run / "checkpoint.pt").read_bytes(), (run / "log.csv").read_text()
    capsys.readouterr()
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), *QUICK]) == 2
    err = one_line_error(capsys)
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert (run / "checkpoint.pt").read_bytes() == checkpoint and (run / "log.csv").read_text() == log
    # resuming into another run's folder is the same loss
    other = tmp_path / "other"
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(other), *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "-q", "--resume", str(run / "checkpoint.pt"), "--out", str(other),
                 "training_params:epochs=2"]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(run), "--overwrite", *QUICK,
                 "seed=5"]) == 0
    assert (run / "checkpoint.pt").read_bytes() != checkpoint
    # an empty folder is not a run
    (tmp_path / "empty").mkdir()
    assert main(["train", "-q", "-c", "digits_standard", "--out", str(tmp_path / "empty"), *QUICK]) == 0


def test_demo_refuses_an_out_folder_holding_runs(tmp_path, capsys):
    (tmp_path / "standard").mkdir()
    (tmp_path / "standard" / "log.csv").write_text("epoch\n1\n")
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (tmp_path / "standard" / "log.csv").read_text() == "epoch\n1\n"
    assert not (tmp_path / "ibp").exists()


def test_certify_resume_refuses_other_settings(gaussian_run, tmp_path, capsys):
    ckpt = str(gaussian_run / "checkpoint.pt")
    tsv = tmp_path / "cert.tsv"
    args = ["certify", "-q", "--checkpoint", ckpt, "--outfile", str(tsv), *CERTIFY_QUICK]
    assert main(args) == 0
    lines = tsv.read_text().splitlines()
    assert len(lines) == 5
    capsys.readouterr()
    for change, old, new in (("certify_params:N=200", "N=100", "N=200"),
                             ("certify_params:N0=10", "N0=20", "N0=10"),
                             ("certify_params:alpha=0.01", "alpha=0.001", "alpha=0.01"),
                             ("certify_params:sigma=0.5", "sigma=0.25", "sigma=0.5"),
                             ("seed=7", "seed=0", "seed=7")):
        assert main(args + [change]) == 2, change
        err = one_line_error(capsys)
        assert old in err and new in err and "--outfile" in err and "--overwrite" in err, err
        assert tsv.read_text().splitlines() == lines  # nothing appended, nothing lost
    # other weights under the same path: the run continued for another epoch
    weights = (gaussian_run / "checkpoint.pt").read_bytes()
    other = tmp_path / "other.pt"
    obj = torch.load(gaussian_run / "checkpoint.pt", weights_only=False)  # written by this test
    obj["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in obj["model"].items()}
    torch.save(obj, other)
    assert main(["certify", "-q", "--checkpoint", str(other), "--outfile", str(tsv), *CERTIFY_QUICK]) == 2
    assert "weights" in one_line_error(capsys)
    assert (gaussian_run / "checkpoint.pt").read_bytes() == weights
    # asked for: start the file afresh
    assert main(args + ["certify_params:N=200", "--overwrite"]) == 0
    assert len(tsv.read_text().splitlines()) == 5
    capsys.readouterr()
    assert main(args + ["certify_params:N=200", "certify_params:max=6"]) == 0  # same settings resume
    assert [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]] == [str(i) for i in range(6)]


def test_certify_refuses_to_resume_a_log_of_unknown_settings(gaussian_run, tmp_path, capsys):
    tsv = tmp_path / "cohen.tsv"
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t1\t0:00:01.0\n")
    args = ["certify", "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt"), "--outfile", str(tsv),
            *CERTIFY_QUICK]
    assert main(args) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert len(tsv.read_text().splitlines()) == 2


def test_download_failure_is_one_line_and_leaves_no_files(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["eval", "-q", "-c", "digits_standard", "data:dataset=mnist", "--data-dir", str(data),
                 "--download"]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("downloading http") for line in lines[:-1]), lines  # one per address tried
    err = lines[-1]
    assert "download" in err and "Temporary failure in name resolution" in err and str(data) in err
    assert [p for p in data.rglob("*") if p.is_file()] == []


def test_an_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    from robustkern_cli import data as data_mod

    class Broken:
        def __init__(self):
            self.sent = False

        def read(self, n=-1):
            if not self.sent:
                self.sent = True
                return b"\x1f\x8b" + b"x" * 1000
            raise ConnectionResetError("connection reset by peer")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Broken())
    dest = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(data_mod.DataMissingError, match="connection reset"):
        data_mod.download_dataset("mnist", tmp_path)
    assert not dest.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# -------------------------------------------------------------------------------------------------- security
class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious_copy(run, path, marker):
    obj = torch.load(run / "checkpoint.pt", weights_only=False)  # written by this test
    obj["extra"] = _Payload(marker)
    torch.save(obj, path)
    return path


def test_own_checkpoints_load_with_weights_only(gaussian_run):
    ckpt = torch.load(gaussian_run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "config", "rng", "metrics"} <= set(ckpt)


@pytest.mark.parametrize("command", ["eval", "certify", "train"])
def test_a_malicious_checkpoint_does_not_run(command, gaussian_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _malicious_copy(gaussian_run, tmp_path / "evil.pt", marker)
    args = {"eval": ["eval", "-q", "--checkpoint", str(evil)],
            "certify": ["certify", "-q", "--checkpoint", str(evil), "--outfile", str(tmp_path / "c.tsv"),
                        *CERTIFY_QUICK],
            "train": ["train", "-q", "--resume", str(evil), "training_params:epochs=2"]}[command]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "--trust-checkpoint" in err and "builtins.exec" in err
    assert not marker.exists()


def test_trusting_a_checkpoint_is_explicit(gaussian_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _malicious_copy(gaussian_run, tmp_path / "evil.pt", marker)
    assert main(["eval", "-q", "--checkpoint", str(evil), "--trust-checkpoint"]) == 0
    assert marker.exists()  # the payload is real: trusting the file runs it
    # an older checkpoint with NumPy objects inside (not tensors or plain containers)
    old = torch.load(gaussian_run / "checkpoint.pt", weights_only=False)  # written by this test
    old["rng"]["numpy"] = np.random.get_state()
    torch.save(old, tmp_path / "old.pt")
    capsys.readouterr()
    assert main(["eval", "-q", "--checkpoint", str(tmp_path / "old.pt")]) == 2
    err = one_line_error(capsys)
    assert "--trust-checkpoint" in err and "numpy" in err
    assert main(["eval", "-q", "--checkpoint", str(tmp_path / "old.pt"), "--trust-checkpoint"]) == 0


# ------------------------------------------------------------------------------------ one line, not a traceback
def test_missing_truncated_or_garbage_checkpoints(gaussian_run, tmp_path, capsys):
    good = (gaussian_run / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    for name, needle in (("missing.pt", "does not exist"), ("truncated.pt", "truncated"),
                         ("garbage.pt", "truncated")):
        path = str(tmp_path / name)
        for args in (["eval", "-q", "--checkpoint", path],
                     ["train", "-q", "--resume", path, "training_params:epochs=2"],
                     ["certify", "-q", "--checkpoint", path]):
            assert main(args) == 2, args
            err = one_line_error(capsys)
            assert path in err and needle in err, (args, err)


@pytest.mark.parametrize("method", ["ibp", "pgd"])
def test_negative_epsilon_is_refused_where_it_enters(method, gaussian_run, capsys):
    assert main(["eval", "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt"), f"eval_params:method={method}",
                 "eval_params:epsilon=-0.1"]) == 2
    assert "eval_params:epsilon" in one_line_error(capsys)


def test_backend_variable_errors(gaussian_run, monkeypatch, capsys):
    args = ["eval", "-q", "--device", "cpu", "--checkpoint", str(gaussian_run / "checkpoint.pt"),
            "eval_params:method=ibp", "eval_params:epsilon=0.01"]
    monkeypatch.setenv("ROBUSTKERN_BACKEND", "bogus")
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "ROBUSTKERN_BACKEND" in err and "bogus" in err and "reference" in err
    from robustkern import _backend
    monkeypatch.setenv("ROBUSTKERN_BACKEND", "triton")
    monkeypatch.setattr(_backend, "_triton_interpreting", lambda: False)  # CPU tensors, no interpreter
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "ROBUSTKERN_BACKEND" in err and "triton" in err


def test_a_recipes_normalisation_must_fit_the_data_set(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", "-c", "cifar_ibp_2_255", "data:dataset=digits", "model:name=digits_cnn",
                 "--out", str(run)]) == 2
    err = one_line_error(capsys)
    assert "model:kwargs:mean" in err and "1 channel" in err
    assert not run.exists()


# --------------------------------------------------------------------------------------- refused, not run
@pytest.mark.parametrize("overrides, needle", [
    (["-c", "digits_ibp", "training_params:epsilon=-0.1", "training_params:starting_epsilon=-0.2"],
     "training_params:epsilon"),
    (["-c", "digits_ibp", "training_params:epsilon=0.1", "training_params:starting_epsilon=0.2"],
     "starting_epsilon"),
    (["-c", "digits_gaussian", "training_params:method_params:sigma=0"], "training_params:method_params:sigma"),
    (["-c", "digits_standard", "data:batch_size=0"], "data:batch_size"),
])
def test_refused_values_leave_no_run_folder(overrides, needle, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-q", *overrides, "--out", str(run), "training_params:epochs=1"]) == 2
    assert needle in one_line_error(capsys)
    assert not run.exists()


def test_unexpected_failures_are_one_line_with_exit_1(gaussian_run, monkeypatch, capsys):
    from robustkern_cli import evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line of detail")
    monkeypatch.setitem(evaluate.EVALS, "clean", broken)
    assert main(["eval", "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt")]) == 1
    err = one_line_error(capsys)
    assert "something inside broke" in err and "--traceback" in err
    for argv in (["--traceback", "eval"], ["eval", "--traceback"]):  # before or after the command
        with pytest.raises(RuntimeError, match="something inside broke"):
            main([*argv, "-q", "--checkpoint", str(gaussian_run / "checkpoint.pt")])

