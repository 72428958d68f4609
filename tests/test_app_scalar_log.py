"""robustkern_cli.scalar_log: training's per-step and per-epoch scalars, in TensorBoard's event files through
torch.utils.tensorboard when the tensorboard package is installed, else in <dir>/scalars.csv with one line
saying how to get TensorBoard's files."""
import math

import pytest

from robustkern_cli import scalar_log
from robustkern_cli.checkpoint import load_checkpoint
from robustkern_cli.config import load_config
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern_cli.main import main
from robustkern_cli.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setattr(scalar_log, "tensorboard_installed", lambda: False)


def test_without_tensorboard_the_scalars_go_to_a_csv_and_it_says_so_once(no_tensorboard, tmp_path, capsys):
    args = ["train", "-c", "digits_standard", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb"),
            "data:num_train=64", "training_params:epochs=2", "training_params:eval_every=0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "tensorboard" in line]
    assert len(said) == 1 and "pip install tensorboard" in said[0] and "scalars.csv" in said[0]
    assert not list((tmp_path / "tb").glob("events.out.tfevents.*"))
    s = scalar_log.read_scalars(tmp_path / "tb")
    assert [step for step, _ in s["train/loss"]] == [0, 1]  # one step per epoch


def test_training_logs_steps_epochs_and_evaluation(no_tensorboard, tmp_path):
    """2 epochs of 4 steps each (200 examples, batch 64 with batch_multiplier 1): train/loss per optimiser step
    averages the step's examples, every log.csv metric appears per epoch, the test evaluation under eval/."""
    cfg = load_config("digits_standard", ["training_params:epochs=2", "data:num_train=200",
                                          "training_params:lr_schedule=step", "training_params:lr_step=1",
                                          "training_params:lr_gamma=0.5"], fill_defaults=_fill_all)
    res = train(cfg, tmp_path / "run", tensorboard=tmp_path / "tb", progress=False, log=lambda s: None)
    s = scalar_log.read_scalars(tmp_path / "tb")
    assert [step for step, _ in s["train/loss"]] == list(range(8))
    assert [v for _, v in s["train/lr"]] == pytest.approx([1e-3] * 4 + [5e-4] * 4)
    for e, row in enumerate(res.history):  # the epoch's mean loss is the example-weighted mean of its steps
        steps = [v for _, v in s["train/loss"][4 * e:4 * e + 4]]
        sizes = [64, 64, 64, 8]
        assert sum(v * n for v, n in zip(steps, sizes)) / 200 == pytest.approx(row["train_loss"], rel=1e-5)
        for key in ("train_loss", "train_acc", "lr", "seconds"):
            assert s[f"epoch/{key}"][e] == (e + 1, pytest.approx(row[key], rel=1e-6))
        for key in ("test_acc", "test_loss"):
            assert s[f"eval/{key}"][e] == (e + 1, pytest.approx(row[key], rel=1e-6))
    assert all(math.isfinite(v) for _, v in s["train/loss"])


def test_tensorboard_option_is_kept_in_the_config_and_resumed(no_tensorboard, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "tb"
    args = ["train", "-q", "-c", "digits_standard", "--out", str(run), "--tensorboard", str(logs),
            "data:num_train=64", "training_params:eval_every=0"]
    assert main(args + ["training_params:epochs=1"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["config"]["training_params"]["tensorboard"] == str(logs)
    assert main(["train", "-q", "--resume", str(run / "checkpoint.pt"), "training_params:epochs=2"]) == 0
    s = scalar_log.read_scalars(logs)  # one file, the resumed run continuing the step count
    assert [step for step, _ in s["train/loss"]] == [0, 1]
    assert [step for step, _ in s["epoch/train_loss"]] == [1, 2]


@pytest.mark.skipif(not scalar_log.tensorboard_installed(), reason="tensorboard is not installed")
def test_with_tensorboard_summary_writer_writes_the_event_files(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config("digits_standard", ["training_params:epochs=1", "data:num_train=128"],
                      fill_defaults=_fill_all)
    res = train(cfg, tmp_path / "run", tensorboard=tmp_path / "tb", progress=False)
    assert "tensorboard is not installed" not in capsys.readouterr().err
    assert not (tmp_path / "tb" / scalar_log.CSV_NAME).exists()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    assert acc.Scalars("epoch/train_loss")[0].value == pytest.approx(res.history[0]["train_loss"], rel=1e-6)
    assert scalar_log.read_scalars(tmp_path / "tb")["train/loss"] == [(e.step, e.value)
                                                                      for e in acc.Scalars("train/loss")]
