"""robustkern_cli.tensorboard: the dependency-free event-file writer and reader, and training's TensorBoard log.

The golden bytes below were produced by TensorBoard 2.21's own ``event_pb2.Event(...).SerializeToString()`` and
``record_writer.RecordWriter.write`` (pip install tensorboard, outside this project's dependencies)."""
import importlib.util
import math
import re
import struct

import pytest

from robustkern_cli import tensorboard as tb
from robustkern_cli.checkpoint import load_checkpoint
from robustkern_cli.config import load_config
from robustkern_cli.evaluate import fill_all_defaults as _fill_all
from robustkern_cli.main import main
from robustkern_cli.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_EVENTS = [  # (encode_event arguments, TensorBoard's serialisation)
    ((1.5, 7), {"scalars": {"a/b": 0.25}}, "09000000000000f83f10072a0c0a0a0a03612f62150000803e"),
    ((2.0,), {"file_version": "brain.Event:2"}, "0900000000000000401a0d627261696e2e4576656e743a32"),
    ((2.0, -3), {}, "09000000000000004010fdffffffffffffffff01"),
]
GOLDEN_RECORD = "0500000000000000eab2043e68656c6c6fbb1f1c19"  # RecordWriter.write(b"hello")


def test_crc32c_check_value_and_masking():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 / Castagnoli)
    assert tb.crc32c(b"") == 0
    c = tb.crc32c(b"hello")
    assert tb.masked_crc32c(b"hello") == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.mark.parametrize("args,kwargs,golden", GOLDEN_EVENTS)
def test_events_and_records_match_tensorboards_bytes(args, kwargs, golden):
    assert tb.encode_event(*args, **kwargs).hex() == golden
    ev = tb.decode_event(bytes.fromhex(golden))
    assert ev["wall_time"] == args[0] and ev["step"] == (args[1] if len(args) > 1 else 0)
    assert ev["scalars"] == kwargs.get("scalars", {})
    assert tb._frame(b"hello").hex() == GOLDEN_RECORD


def test_writer_roundtrip_and_corruption_is_detected(tmp_path):
    with tb.EventFileWriter(tmp_path / "logs", flush_every=2) as w:
        for step in range(5):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("eval/acc", 0.875, 10)
        path = w.path
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+\.\d+\.\d+", path.name)
    events = tb.read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and events[0]["scalars"] == {}
    scalars = tb.read_scalars(tmp_path / "logs")
    assert scalars["train/loss"] == [(s, struct.unpack("<f", struct.pack("<f", 1.0 / (s + 1)))[0])
                                     for s in range(5)]
    assert scalars["eval/acc"] == [(10, 0.875)]
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x01  # a payload byte of the last record
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        tb.read_events(path)
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(ValueError, match="truncated"):
        tb.read_events(path)
    with pytest.raises(ValueError, match="closed"):
        w.add_scalar("x", 1.0, 0)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_reads_our_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with tb.EventFileWriter(tmp_path) as w:
        for step in range(3):
            w.add_scalar("train/loss", 2.0 - step, step)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 2.0), (1, 1.0), (2, 0.0)]


def test_training_logs_steps_epochs_and_evaluation(tmp_path):
    """2 epochs of 4 steps each (200 examples, batch 64 with batch_multiplier 1): train/loss per optimiser step
    averages the step's examples, every log.csv metric appears per epoch, the test evaluation under eval/."""
    cfg = load_config("digits_standard", ["training_params:epochs=2", "data:num_train=200",
                                          "training_params:lr_schedule=step", "training_params:lr_step=1",
                                          "training_params:lr_gamma=0.5"], fill_defaults=_fill_all)
    res = train(cfg, tmp_path / "run", tensorboard=tmp_path / "tb", progress=False, log=lambda s: None)
    s = tb.read_scalars(tmp_path / "tb")
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


def test_tensorboard_option_is_kept_in_the_config_and_resumed(tmp_path):
    run, logs = tmp_path / "run", tmp_path / "tb"
    args = ["train", "-q", "-c", "digits_standard", "--out", str(run), "--tensorboard", str(logs),
            "data:num_train=64", "training_params:eval_every=0"]
    assert main(args + ["training_params:epochs=1"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["config"]["training_params"]["tensorboard"] == str(logs)
    assert main(["train", "-q", "--resume", str(run / "checkpoint.pt"), "training_params:epochs=2"]) == 0
    s = tb.read_scalars(logs)  # two files, the resumed one continuing the step count
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in s["train/loss"]] == [0, 1]
    assert [step for step, _ in s["epoch/train_loss"]] == [1, 2]
