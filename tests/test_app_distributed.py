"""robustkern_cli.distributed: data-parallel training on 2 CPU processes (Gloo) equals a single-process run.

One torch.multiprocessing spawn (module fixture) runs tests/_distributed_worker.py on 2 ranks; the tests compare
its gradients and weights with single-process computations here. The torchrun command line is tested
separately (slow: a second launch)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import _distributed_worker as W
from robustkern_cli import distributed
from robustkern_cli.checkpoint import load_checkpoint
from robustkern_cli.errors import ConfigError
from robustkern_cli.losses import LOSSES
from robustkern_cli.scalar_log import CSV_NAME, read_scalars
from robustkern_cli.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(W.worker, args=(2, W.free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("case", [c[0] for c in W.GRAD_CASES])
def test_synchronised_gradients_equal_the_concatenated_batch_gradient(spawned, case):
    """Each rank's weighted loss on its shard (4 and 3 of 7 examples), synchronised by DDP or by the flat
    all-reduce, gives the gradient of the single-process loss on all 7 examples, on both ranks. The IBP case
    captures the plain module with torch.fx; the PGD case takes input gradients inside the loss."""
    _, ranks = spawned
    _, method, _, overrides = next(c for c in W.GRAD_CASES if c[0] == case)
    model, x, y = W.grad_case_inputs()
    cfg, state = W.grad_case_cfg(method, overrides)
    loss, _ = LOSSES[method](model, x, y, cfg, state)
    loss.backward()
    single = {k: p.grad for k, p in model.named_parameters()}
    assert any(v.abs().max() > 1e-4 for v in single.values())
    for r in range(2):
        _assert_close(ranks[r]["grads"][case], single)


def test_two_ranks_end_with_identical_weights_equal_to_a_single_process_run(spawned, tmp_path):
    """1 epoch of standard training (Adam, shuffled, 199 examples: the last global batch has 7) on 2 ranks:
    both ranks hold the same weights, which equal a single-process run with the same global batch; the epoch
    metrics (averaged over the ranks) and the test evaluation (sharded) equal the single-process ones; only
    rank 0 saved the checkpoint, once."""
    out, ranks = spawned
    a, b = ranks[0]["standard"], ranks[1]["standard"]
    assert a["world_size"] == 2
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    single = train(W.cfg_for(*W.TRAIN_OVERRIDES), tmp_path / "single", tensorboard=tmp_path / "tb", **QUIET)
    _assert_close(a["state"], single.model.state_dict(), atol=1e-5, rtol=1e-4)
    for key, v in single.final.items():
        if key != "seconds":
            assert a["history"][-1][key] == pytest.approx(v, rel=1e-6, abs=1e-7), key
    assert a["saves"] == [str(out / "standard" / "checkpoint.pt")] and b["saves"] == []
    ckpt = load_checkpoint(out / "standard" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    _assert_close({k: v for k, v in ckpt["model"].items()}, a["state"], atol=0, rtol=0)
    # the scalar log: one file (events or CSV), from rank 0; per-step losses averaged over the ranks =
    # single-process ones
    assert len(list((out / "tb").iterdir())) == 1
    dist_tb, single_tb = read_scalars(out / "tb"), read_scalars(tmp_path / "tb")
    assert [s for s, _ in dist_tb["train/loss"]] == [0, 1, 2, 3]
    assert [v for _, v in dist_tb["train/loss"]] == pytest.approx([v for _, v in single_tb["train/loss"]],
                                                                  rel=1e-5)
    assert dist_tb["eval/test_acc"] == single_tb["eval/test_acc"]


def test_resume_on_two_ranks_is_exact(spawned):
    """Gaussian augmentation (each rank its own noise stream) with SGD momentum and random flips: 1 epoch +
    resume to 2 ends bit-identical to 2 uninterrupted epochs on each rank (every rank's RNG state is kept)."""
    _, ranks = spawned
    for r in range(2):
        res = ranks[r]["resume"]
        for k in res["full"]:
            assert torch.equal(res["full"][k], res["split"][k]), (r, k)
        assert [h["train_loss"] for h in res["full_history"]] == [h["train_loss"] for h in res["split_history"]]
    for k in ranks[0]["resume"]["full"]:
        assert torch.equal(ranks[0]["resume"]["full"][k], ranks[1]["resume"]["full"][k])


def test_global_batch_sampler_splits_the_single_process_batches():
    ds = list(range(11))
    g = [torch.Generator().manual_seed(3) for _ in range(3)]
    single = list(torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(ds, generator=g[0]), 4, False))
    parts = [list(distributed.GlobalBatchSampler(ds, 4, r, 2, True, g[1 + r])) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single) == 3
    for j, batch in enumerate(single):
        assert sorted(parts[0][j] + parts[1][j]) == sorted(batch)
    s = distributed.GlobalBatchSampler(list(range(9)), 4, 1, 2, False)  # last global batch: 1 example
    assert list(s)[-1] == [8] and s.local_count(2) == 0 and s.loss_weight(2) == 0.0  # placeholder, weight 0
    s0 = distributed.GlobalBatchSampler(list(range(9)), 4, 0, 2, False)
    assert s0.loss_weight(2) == 2.0 and s0.loss_weight(0) == 1.0


def test_single_process_context_and_bad_settings(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.device == "cpu"
    assert distributed.reduce_sums({"b": 1.0, "a": 2.0}, ctx) == {"b": 1.0, "a": 2.0}
    model = torch.nn.Linear(2, 2)
    assert distributed.GradientSync(model, ctx, "ibp").model_for_loss is model
    two = distributed.DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="grad_sync=ddp"):
        distributed.GradientSync(model, two, "ibp", "ddp")
    with pytest.raises(ConfigError, match="grad_sync must be"):
        distributed.GradientSync(model, two, "standard", "horovod")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="RANK is not set"):
        distributed.setup("cpu")
    assert distributed.rank_seed(0, 1) != distributed.rank_seed(1, 0) != distributed.rank_seed(0, 0)


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """``python -m torch.distributed.run --nproc_per_node=2 -m robustkern_cli train``: one JSON line (rank 0),
    one checkpoint equal to a single-process ``robustkern train``, per-rank streams recorded."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "python"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={W.free_port()}",
           "-m", "robustkern_cli", "train", "-q", "-c", "digits_standard", "--out", str(tmp_path / "run"),
           "--tensorboard", str(tmp_path / "tb"), *W.TRAIN_OVERRIDES]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    printed = json.loads(lines[0])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["config"]["training_params"]["tensorboard"] == str(tmp_path / "tb")
    single = train(W.cfg_for(*W.TRAIN_OVERRIDES), tmp_path / "single", **QUIET)
    _assert_close(ckpt["model"], single.model.state_dict(), atol=1e-5, rtol=1e-4)
    assert printed["test_acc"] == pytest.approx(single.final["test_acc"])
    # rank 0 alone writes the scalar log (TensorBoard's event file, or scalars.csv without tensorboard)
    tb = tmp_path / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) + len(list(tb.glob(CSV_NAME))) == 1
    scalars = read_scalars(tb)
    assert scalars and all(len({step for step, _ in rows}) == len(rows) for rows in scalars.values()), scalars
