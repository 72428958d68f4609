"""Worker of tests/test_app_distributed.py, run in 2 processes (Gloo on the CPU) by torch.multiprocessing.spawn.

Each rank writes ``<out>/rank<r>.pt``: the gradients of every gradient-sync case, and the final weights, the
number of checkpoint saves and the history of the training runs."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

GRAD_CASES = (  # (name, method, grad_sync, overrides)
    ("standard_ddp", "standard", "ddp", []),
    ("standard_allreduce", "standard", "allreduce", []),
    ("ibp_allreduce", "ibp", "allreduce", ["training_params:epsilon=0.1"]),
    ("pgd_allreduce", "pgd", "allreduce", ["training_params:method_params:epsilon=0.1",
                                           "training_params:method_params:step_size=0.05",
                                           "training_params:method_params:num_steps=2",
                                           "training_params:method_params:random_start=false"]),
)
GRAD_BATCH = 7  # split 4 / 3 over two ranks: the loss weights 8/7 and 6/7 are exercised

TRAIN_OVERRIDES = ["training_params:epochs=1", "data:num_train=199", "data:batch_size=64",  # last batch 7
                   "data:num_test=121"]  # test shards of 61 and 60
RESUME_OVERRIDES = ["training_params:method=gaussian", "data:num_train=100", "data:batch_size=32",
                    "data:augment=flip", "training_params:optimizer=sgd", "training_params:lr=0.05",
                    "training_params:eval_every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_for(*overrides):
    from robustkern_cli.config import load_config
    from robustkern_cli.evaluate import fill_all_defaults as _fill_all
    return load_config("digits_standard", list(overrides), fill_defaults=_fill_all)


def grad_case_inputs():
    from robustkern.models import build_model_for
    torch.manual_seed(0)
    model = build_model_for("digits_cnn", {}, (1, 8, 8), 10)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(GRAD_BATCH, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (GRAD_BATCH,), generator=g)
    return model, x, y


def grad_case_cfg(method, overrides):
    from robustkern_cli.losses import StepState
    cfg = cfg_for(f"training_params:method={method}", *overrides)
    eps = float(cfg["training_params"]["epsilon"])
    return cfg, StepState(eps=eps, max_eps=eps)


def _gradients(ctx, out):
    from robustkern_cli import distributed
    from robustkern_cli.losses import LOSSES
    res = {}
    for name, method, mode, overrides in GRAD_CASES:
        model, x, y = grad_case_inputs()
        cfg, state = grad_case_cfg(method, overrides)
        sync = distributed.GradientSync(model, ctx, method, mode)
        idx = list(range(ctx.rank, GRAD_BATCH, ctx.world_size))
        weight = ctx.world_size * len(idx) / GRAD_BATCH
        loss, _ = LOSSES[method](sync.model_for_loss, x[idx], y[idx], cfg, state)
        (loss * weight).backward()
        sync.synchronize()
        res[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    return res


def _trainings(out: Path):
    import robustkern_cli.train as train_mod
    saves = []
    real_save = train_mod.save_checkpoint

    def counting_save(path, **content):
        saves.append(str(path))
        real_save(path, **content)

    train_mod.save_checkpoint = counting_save
    quiet = dict(progress=False, log=lambda s: None)
    res = {}
    r = train_mod.train(cfg_for(*TRAIN_OVERRIDES), out / "standard", tensorboard=out / "tb", **quiet)
    res["standard"] = {"state": r.model.state_dict(), "history": r.history, "saves": list(saves),
                       "world_size": r.world_size}
    full = train_mod.train(cfg_for(*RESUME_OVERRIDES, "training_params:epochs=2"), out / "full", **quiet)
    train_mod.train(cfg_for(*RESUME_OVERRIDES, "training_params:epochs=1"), out / "split", **quiet)
    split = train_mod.train(cfg_for(*RESUME_OVERRIDES, "training_params:epochs=2"), out / "split",
                            resume=out / "split" / "checkpoint.pt", **quiet)
    res["resume"] = {"full": full.model.state_dict(), "split": split.model.state_dict(),
                     "full_history": full.history, "split_history": split.history}
    return res


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from robustkern_cli import distributed
    out = Path(out)
    with distributed.session("cpu") as ctx:
        assert ctx.owns_group and ctx.backend == "gloo" and ctx.rank == rank
        res = {"grads": _gradients(ctx, out), **_trainings(out)}
    torch.save(res, out / f"rank{rank}.pt")
