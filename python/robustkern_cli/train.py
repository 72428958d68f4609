"""The training loop shared by every method: data, model, optimiser, LR and epsilon schedules, gradient
accumulation (``batch_multiplier``, CROWN-IBP's large-batch trick), a checkpoint and a CSV row per epoch, and
exact resumption.

Each epoch writes ``<run_dir>/checkpoint.pt`` (model, optimiser, LR scheduler, config, epoch, per-epoch metrics,
the Python/NumPy/torch/loader RNG states and the state a method carries across steps, such as BCP's and LMT's
power-iteration iterates) and rewrites ``<run_dir>/log.csv`` from the metrics history.
Resuming restores all of it, so a run interrupted after epoch k and resumed ends with the same weights and
metrics as an uninterrupted run (same device and thread count).

Under ``torchrun`` (``WORLD_SIZE > 1``, see :mod:`robustkern_cli.distributed`) the loop is data-parallel.
``data:batch_size`` stays the global batch: the ranks draw exactly the single-process run's batches (same
seed, same shuffling) and rank r takes examples r, r+N, ... of each (:class:`distributed.GlobalBatchSampler`,
no padding; each rank's mean loss is weighted by its share of the batch). The gradients are averaged over
the ranks (``training_params:grad_sync``), so a deterministic method ends with the single-process weights
up to float rounding. The epoch metrics and the test evaluation (test split sharded over the ranks) are
averaged over all ranks, and only rank 0 writes the checkpoint, ``log.csv``, ``config.json``, TensorBoard events and log lines. Every rank seeds the model
initialisation with the run seed (identical weights) and then its own streams (noise, random starts) with
``rank_seed(seed, rank)``; the checkpoint keeps every rank's RNG state (``rng_ranks``), so resuming with the
same number of processes is exact too.

A run folder is never overwritten by accident: when ``<run_dir>`` already holds a run (``checkpoint.pt`` or
``log.csv``) that this call does not resume in place, :func:`train` refuses before it reads any data, unless
``overwrite=True`` (``--overwrite``). Nothing is written before the config and the data have been checked, so
a refused run leaves no folder behind.

``training_params:tensorboard`` (or ``--tensorboard DIR``) logs ``train/loss``, ``train/lr`` and
``train/eps`` per optimiser step (the loss averaged over the step's micro-batches and all ranks), every
per-epoch metric of ``log.csv`` as ``epoch/<name>`` and the test evaluation as ``eval/<name>``
(:mod:`robustkern_cli.scalar_log`: TensorBoard event files when ``tensorboard`` is installed, else
``<dir>/scalars.csv``).

``eps`` (the ``log.csv`` column, the log line, ``train/eps``) is the radius the method itself used on the
step, as its loss reports it in ``metrics["eps"]`` (:mod:`robustkern_cli.losses`): the scheduled epsilon for
IBP/CROWN-IBP, the method's own ``method_params:epsilon`` for pgd, trades, trades_rs and lfr, SmoothAdv's
warmed-up epsilon. The epoch's value is that of its last step. A method without a radius (standard, gaussian,
macer, consistency, grad_norm) reports none, and then no ``eps`` is logged (no column or an empty cell).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .data import augment_batch, dataset_info, load_dataset, make_loader
from .errors import ConfigError
from .evaluate import clean_metrics, model_from_config
from .losses import StepState, scheduled_epsilon, training_loss
from .scalar_log import is_finite_number, open_scalar_log

__all__ = ["TrainResult", "train", "default_run_dir", "existing_run_files", "build_optimizer", "build_lr_scheduler",
           "OPTIMIZERS", "LR_SCHEDULES"]

RUN_FILES = ("checkpoint.pt", "log.csv")  # what makes a folder a run that overwriting would lose


@dataclass
class TrainResult:
    run_dir: Path
    history: list  # one dict of metrics per completed epoch
    model: torch.nn.Module
    rank: int = 0  # this process's rank under torchrun (only rank 0 writes files)
    world_size: int = 1

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def default_run_dir(cfg: dict) -> Path:
    return Path(cfg["output"]["dir"]) / (cfg.get("name") or "run")


def existing_run_files(run_dir: str | Path) -> list[str]:
    """The files of :data:`RUN_FILES` that ``run_dir`` holds (empty: no run there to lose)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def _check_run_dir(run_dir: Path, resume, overwrite: bool, ctx: distributed.DistContext) -> None:
    """Refuse (ConfigError) to write into a folder holding another run, unless ``overwrite``; resuming a run in
    its own folder is allowed. Under torchrun every rank takes rank 0's view, before any rank writes."""
    in_place = resume is not None and Path(resume).resolve().parent == run_dir.resolve()
    found = [] if overwrite or in_place else existing_run_files(run_dir)
    if distributed.reduce_sums({"found": len(found) if ctx.is_main else 0}, ctx)["found"] > 0:
        what = ", ".join(found) if found else "a run"
        raise ConfigError(f"{run_dir} already holds a run ({what}): continue it with --resume "
                          f"{run_dir / 'checkpoint.pt'}, choose another --out, or pass --overwrite to replace it")


OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "multistep", "step", "cosine", "step_after_ramp")


def build_optimizer(params, tp: dict) -> torch.optim.Optimizer:
    """``training_params:optimizer`` (one of :data:`OPTIMIZERS`, checked when the config is loaded)."""
    name = tp["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=tp["lr"], momentum=tp["momentum"], nesterov=tp["nesterov"],
                               weight_decay=tp["weight_decay"])
    optimizer = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer(params, lr=tp["lr"], weight_decay=tp["weight_decay"])


def build_lr_scheduler(opt, tp: dict):
    """``training_params:lr_schedule`` (one of :data:`LR_SCHEDULES`, checked when the config is loaded)."""
    kind = tp["lr_schedule"]
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(tp["lr_milestones"]), gamma=tp["lr_gamma"])
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=tp["lr_step"], gamma=tp["lr_gamma"])
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp["epochs"])
    if kind == "step_after_ramp":
        ramp_end, step, gamma = tp["schedule_start"] + tp["schedule_length"] - 1, tp["lr_step"], tp["lr_gamma"]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma ** (max(e - ramp_end, 0) // step))
    return None  # constant


def _write_config(cfg: dict, path: Path) -> None:
    """The run's full config (defaults, recipe and overrides merged), as JSON beside its checkpoints."""
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=False)
        f.write("\n")


def _write_csv(path: Path, history: list) -> None:
    fields: list = []
    for row in history:
        fields += [k for k in row if k not in fields]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(history)
    tmp.replace(path)


def train(cfg: dict, run_dir: str | Path | None = None, *, data_dir=None, download: bool = False,
          resume: str | Path | None = None, device: str = "cpu", progress: bool | None = None,
          log: Callable[[str], None] | None = None, tensorboard: str | Path | None = None,
          overwrite: bool = False, trust_checkpoint: bool = False) -> TrainResult:
    """Train as ``cfg`` says. ``resume``: a checkpoint.pt to continue from (its model, optimiser, schedules,
    metrics and RNG states are restored; ``cfg`` should be the checkpoint's config, possibly with a larger
    ``training_params:epochs``). ``tensorboard``: a folder for TensorBoard events (default
    ``training_params:tensorboard``; empty = none). ``overwrite``: replace a run already in ``run_dir`` (else
    ConfigError). ``trust_checkpoint``: load ``resume`` and ``training_params:init_checkpoint`` even if they
    hold pickled Python objects (:func:`robustkern_cli.checkpoint.read_checkpoint`). Under torchrun this starts
    (and on return or error destroys) the process group, unless the caller started one."""
    with distributed.session(device) as ctx:
        return _train(cfg, run_dir, ctx, data_dir=data_dir, download=download, resume=resume, progress=progress,
                      log=log, tensorboard=tensorboard, overwrite=overwrite, trust=trust_checkpoint)


def _train_loaders(cfg: dict, train_ds, test_ds, ctx: distributed.DistContext, gen: torch.Generator):
    """(train loader, its GlobalBatchSampler or None, test loader of this rank's shard)."""
    dcfg = cfg["data"]
    if not ctx.enabled:
        loader = make_loader(train_ds, dcfg["batch_size"], shuffle=dcfg["shuffle_train"], generator=gen,
                             num_workers=dcfg["num_workers"])
        return loader, None, make_loader(test_ds, dcfg["test_batch_size"])
    bs, world = int(dcfg["batch_size"]), ctx.world_size
    if bs < world:
        raise ConfigError(f"data:batch_size ({bs}) is the global batch and must be at least the number of "
                          f"processes ({world})")
    sampler = distributed.GlobalBatchSampler(train_ds, bs, ctx.rank, world, dcfg["shuffle_train"], gen)
    loader = DataLoader(train_ds, batch_sampler=sampler, generator=gen, num_workers=dcfg["num_workers"])
    shard = Subset(test_ds, range(ctx.rank, len(test_ds), world))  # no padding: every example counted once
    return loader, sampler, make_loader(shard, dcfg["test_batch_size"])


def _test_metrics(model, test_loader, device, ctx) -> dict:
    test = clean_metrics(model, test_loader, device)
    if not ctx.enabled:
        return test
    tot = distributed.reduce_sums({"correct": test["acc"] * test["n"], "loss": test["loss"] * test["n"],
                                   "n": test["n"]}, ctx)
    n = max(tot["n"], 1)
    return {"acc": round(tot["correct"]) / n, "loss": tot["loss"] / n}


def _train(cfg, run_dir, ctx: distributed.DistContext, *, data_dir, download, resume, progress, log,
           tensorboard, overwrite, trust) -> TrainResult:
    if not ctx.is_main:
        log = lambda s: None  # noqa: E731
        progress = False
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = sys.stderr.isatty() if progress is None else progress
    device = ctx.device
    tp, dcfg = cfg["training_params"], cfg["data"]
    loss_fn = training_loss(tp["method"])
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    _check_run_dir(run_dir, resume, overwrite, ctx)
    ckpt = load_checkpoint(resume, trust) if resume is not None else None  # every rank loads the same file
    seed_everything(cfg["seed"])  # every rank: the same initial weights
    init = tp["init_checkpoint"] if resume is None else None
    model = model_from_config(cfg, init or None, trust)  # before the data: a model the config cannot build fails fast
    info = dataset_info(dcfg["dataset"])
    data_dir = data_dir or dcfg["data_dir"] or None
    train_ds = load_dataset(info.name, "train", data_dir, download, limit=dcfg["num_train"])
    test_ds = load_dataset(info.name, "test", data_dir, download, limit=dcfg["num_test"])
    model.to(device)
    if ctx.enabled:
        seed_everything(distributed.rank_seed(cfg["seed"], ctx.rank))  # each rank its own noise
    opt = build_optimizer(model.parameters(), tp)
    sched = build_lr_scheduler(opt, tp)
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    loader, sampler, test_loader = _train_loaders(cfg, train_ds, test_ds, ctx, gen)

    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("lr_scheduler") is not None:
            sched.load_state_dict(ckpt["lr_scheduler"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["metrics"])
        per_rank = ckpt.get("rng_ranks")
        if not ctx.enabled:
            set_rng_state(ckpt["rng"], gen)
        elif per_rank is not None and len(per_rank) == ctx.world_size:
            set_rng_state(per_rank[ctx.rank], gen)
        else:  # another number of processes: the batch order goes on (every rank's loader generator is the
            if "loader" in ckpt["rng"]:  # same), the noise streams restart
                gen.set_state(ckpt["rng"]["loader"])
            seed_everything(distributed.rank_seed(int(cfg["seed"]) + start_epoch, ctx.rank))
            log(f"note: {resume} was written by {len(per_rank) if per_rank else 1} process(es), this run has "
                f"{ctx.world_size}: the random streams restart from new per-rank seeds")
        log(f"resumed from {resume} after epoch {start_epoch}")
    sync = distributed.GradientSync(model, ctx, tp["method"], tp["grad_sync"])
    k = max(int(tp["batch_multiplier"]), 1)
    steps_per_epoch = max(math.ceil(len(loader) / k), 1)
    state = StepState(steps_per_epoch=steps_per_epoch, max_eps=float(tp["epsilon"]))
    if ckpt is not None:
        state.restored = dict(ckpt.get("loss_state") or {})
    if ctx.is_main:  # everything is checked: the first write
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run_dir / "config.json")
    if ctx.enabled:
        log(f"distributed: {ctx.world_size} processes ({ctx.backend}), gradient sync '{sync.mode}', "
            f"global batch {dcfg['batch_size']} split over the ranks")

    epochs = int(tp["epochs"])
    tb_dir = tensorboard if tensorboard is not None else tp.get("tensorboard", "")
    writer = open_scalar_log(tb_dir, log) if tb_dir and ctx.is_main else None
    if start_epoch >= epochs:
        log(f"nothing to do: checkpoint is at epoch {start_epoch}, training_params:epochs is {epochs}")
    try:
        for epoch in range(start_epoch, epochs):
            row = _train_epoch(epoch, epochs, model, sync, loss_fn, loader, sampler, opt, cfg, state, k, ctx,
                               writer, bool(tb_dir), progress)
            if sched is not None:
                sched.step()
            sync.sync_buffers()  # rank 0's BatchNorm statistics everywhere, as DDP keeps them
            if tp["eval_every"] > 0 and ((epoch + 1) % tp["eval_every"] == 0 or epoch + 1 == epochs):
                test = _test_metrics(model, test_loader, device, ctx)
                row.update(test_acc=test["acc"], test_loss=test["loss"])
            row["seconds"] = round(time.perf_counter() - row.pop("_t0"), 3)
            history.append(row)
            rng_ranks = distributed.gather_objects(rng_state(gen), ctx)
            if ctx.is_main:
                content = dict(model=model.state_dict(), optimizer=opt.state_dict(),
                               lr_scheduler=sched.state_dict() if sched is not None else None, config=cfg,
                               epoch=epoch + 1, metrics=history, rng=rng_ranks[0], model_name=cfg["model"]["name"],
                               loss_state=state.loss_state())
                if ctx.enabled:
                    content.update(rng_ranks=rng_ranks, world_size=ctx.world_size)
                save_checkpoint(run_dir / "checkpoint.pt", **content)
                if cfg["output"]["keep_epoch_checkpoints"]:
                    save_checkpoint(run_dir / f"checkpoint_epoch{epoch + 1}.pt", **content)
                _write_csv(run_dir / "log.csv", history)
                if writer is not None:
                    for key, v in row.items():
                        if key != "epoch" and is_finite_number(v):
                            writer.add_scalar(("eval/" if key.startswith("test_") else "epoch/") + key, v, epoch + 1)
                    writer.flush()
            log("epoch {epoch}/{total}: ".format(epoch=epoch + 1, total=epochs) + ", ".join(
                f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()
                if key != "epoch"))
        distributed.barrier(ctx)  # the last checkpoint is on disk before any rank returns
    finally:
        if writer is not None:
            writer.close()
    return TrainResult(run_dir=run_dir, history=history, model=model, rank=ctx.rank, world_size=ctx.world_size)


def _train_epoch(epoch, epochs, model, sync, loss_fn, loader, sampler, opt, cfg, state, k, ctx, writer,
                 log_steps: bool, progress: bool) -> dict:
    """One epoch; returns its row of metrics (averaged over all examples of all ranks), ``_t0`` its start."""
    tp, dcfg, device = cfg["training_params"], cfg["data"], ctx.device
    t0 = time.perf_counter()
    lr = opt.param_groups[0]["lr"]
    model.train()
    sums: dict = {}
    n = 0
    step_loss, step_n = 0.0, 0
    eps = None  # the radius the method used on the last step, None for a method without one
    opt.zero_grad(set_to_none=True)
    bar = tqdm(loader, disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
    for i, (x, y) in enumerate(bar):
        x = augment_batch(x.to(device), dcfg["augment"])
        y = y.to(device)
        state.epoch, state.batch_idx = epoch, i // k
        state.eps = scheduled_epsilon(tp, epoch, i // k, state.steps_per_epoch)
        last = (i + 1) % k == 0 or i + 1 == len(loader)
        # this rank's examples and its share of the global batch (all of it, weight 1, in a single process)
        count, weight = (len(y), 1.0) if sampler is None else (sampler.local_count(i), sampler.loss_weight(i))
        with sync.accumulate(last):
            loss, metrics = loss_fn(sync.model_for_loss, x, y, cfg, state)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, batch {i}"
                                         f"{f' (rank {ctx.rank})' if ctx.enabled else ''}: {metrics}")
            (loss * weight / k if weight != 1.0 else loss / k).backward()
        if last:
            sync.synchronize()
            if tp["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tp["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        eps = float(metrics["eps"]) if "eps" in metrics else None
        for key, v in metrics.items():
            if key != "eps":
                sums[key] = sums.get(key, 0.0) + float(v) * count
        n += count
        if log_steps:
            step_loss += float(metrics.get("loss", loss.item())) * count
            step_n += count
            if last:
                tot = distributed.reduce_sums({"loss": step_loss, "n": step_n}, ctx)
                if writer is not None:
                    step = epoch * state.steps_per_epoch + i // k
                    writer.add_scalar("train/loss", tot["loss"] / max(tot["n"], 1), step)
                    writer.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
                    if eps is not None:
                        writer.add_scalar("train/eps", eps, step)
                step_loss, step_n = 0.0, 0
        if progress:
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}" if "loss" in sums else None)
    sums["__n"] = n
    sums = distributed.reduce_sums(sums, ctx)
    n = sums.pop("__n")
    row = {"epoch": epoch + 1, "lr": lr} if eps is None else {"epoch": epoch + 1, "lr": lr, "eps": eps}
    row.update({f"train_{key}": v / max(n, 1) for key, v in sums.items()})
    row["_t0"] = t0
    return row
