"""The training loop shared by every method: data, model, optimiser, LR and epsilon schedules, gradient
accumulation (``batch_multiplier``, CROWN-IBP's large-batch trick), a checkpoint and a CSV row per epoch, and
exact resumption.

Each epoch writes ``<run_dir>/checkpoint.pt`` (model, optimiser, LR scheduler, config, epoch, per-epoch metrics
and the Python/NumPy/torch/loader RNG states) and rewrites ``<run_dir>/log.csv`` from the metrics history.
Resuming restores all of it, so a run interrupted after epoch k and resumed ends with the same weights and
metrics as an uninterrupted run (same device and thread count).
"""
from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_weights, rng_state, save_checkpoint, seed_everything, set_rng_state
from .config import save_config
from .data import augment_batch, dataset_info, load_dataset, make_loader
from .errors import ConfigError
from .evaluate import clean_metrics
from .losses import LOSSES, EpsilonScheduler, StepState, check_available
from .models import build_model_for

__all__ = ["TrainResult", "train", "default_run_dir", "build_optimizer", "build_lr_scheduler"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list  # one dict of metrics per completed epoch
    model: torch.nn.Module

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def default_run_dir(cfg: dict) -> Path:
    return Path(cfg["output"]["dir"]) / (cfg.get("name") or "run")


def build_optimizer(params, tp: dict) -> torch.optim.Optimizer:
    name = tp["optimizer"].lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=tp["lr"], momentum=tp["momentum"], nesterov=tp["nesterov"],
                               weight_decay=tp["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=tp["lr"], weight_decay=tp["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=tp["lr"], weight_decay=tp["weight_decay"])
    raise ConfigError(f"training_params:optimizer must be sgd, adam or adamw, got '{tp['optimizer']}'")


def build_lr_scheduler(opt, tp: dict):
    kind = tp["lr_schedule"]
    if kind == "constant":
        return None
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(tp["lr_milestones"]), gamma=tp["lr_gamma"])
    if kind == "step":
        if tp["lr_step"] <= 0:
            raise ConfigError("training_params:lr_schedule=step needs training_params:lr_step > 0")
        return torch.optim.lr_scheduler.StepLR(opt, step_size=tp["lr_step"], gamma=tp["lr_gamma"])
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp["epochs"])
    if kind == "step_after_ramp":
        if tp["lr_step"] <= 0:
            raise ConfigError("training_params:lr_schedule=step_after_ramp needs training_params:lr_step > 0")
        ramp_end, step, gamma = tp["schedule_start"] + tp["schedule_length"] - 1, tp["lr_step"], tp["lr_gamma"]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: gamma ** (max(e - ramp_end, 0) // step))
    raise ConfigError("training_params:lr_schedule must be constant, multistep, step, cosine or step_after_ramp, "
                      f"got '{kind}'")


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
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train as ``cfg`` says. ``resume``: a checkpoint.pt to continue from (its model, optimiser, schedules,
    metrics and RNG states are restored; ``cfg`` should be the checkpoint's config, possibly with a larger
    ``training_params:epochs``)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    progress = sys.stderr.isatty() if progress is None else progress
    tp, dcfg = cfg["training_params"], cfg["data"]
    method = tp["method"]
    check_available(method, cfg)
    loss_fn = LOSSES[method]
    info = dataset_info(dcfg["dataset"])
    data_dir = data_dir or dcfg["data_dir"] or None
    train_ds = load_dataset(info.name, "train", data_dir, download, limit=dcfg["num_train"])
    test_ds = load_dataset(info.name, "test", data_dir, download, limit=dcfg["num_test"])

    seed_everything(cfg["seed"])
    model = build_model_for(cfg["model"]["name"], cfg["model"]["kwargs"], info.shape, info.num_classes)
    if tp["init_checkpoint"] and resume is None:
        load_weights(model, torch.load(tp["init_checkpoint"], map_location="cpu", weights_only=False))
    model.to(device)
    opt = build_optimizer(model.parameters(), tp)
    sched = build_lr_scheduler(opt, tp)
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    loader = make_loader(train_ds, dcfg["batch_size"], shuffle=dcfg["shuffle_train"], generator=gen,
                         num_workers=dcfg["num_workers"])
    test_loader = make_loader(test_ds, dcfg["test_batch_size"])
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    start_epoch, history = 0, []
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("lr_scheduler") is not None:
            sched.load_state_dict(ckpt["lr_scheduler"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["metrics"])
        set_rng_state(ckpt["rng"], gen)
        log(f"resumed from {resume} after epoch {start_epoch}")
    save_config(cfg, run_dir / "config.json")

    k = max(int(tp["batch_multiplier"]), 1)
    steps_per_epoch = max(math.ceil(len(loader) / k), 1)
    eps_sched = EpsilonScheduler(tp["schedule_type"], tp["schedule_start"], tp["schedule_length"],
                                 tp["starting_epsilon"], tp["epsilon"], steps_per_epoch)
    state = StepState(steps_per_epoch=steps_per_epoch, max_eps=float(tp["epsilon"]))
    epochs = int(tp["epochs"])
    if start_epoch >= epochs:
        log(f"nothing to do: checkpoint is at epoch {start_epoch}, training_params:epochs is {epochs}")
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        model.train()
        sums: dict = {}
        n = 0
        opt.zero_grad(set_to_none=True)
        bar = tqdm(loader, disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for i, (x, y) in enumerate(bar):
            x = augment_batch(x.to(device), dcfg["augment"])
            y = y.to(device)
            state.epoch, state.batch_idx = epoch, i // k
            state.eps = eps_sched.get_eps(epoch, i // k)
            loss, metrics = loss_fn(model, x, y, cfg, state)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, batch {i}: {metrics}")
            (loss / k).backward()
            if (i + 1) % k == 0 or i + 1 == len(loader):
                if tp["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tp["grad_clip"])
                opt.step()
                opt.zero_grad(set_to_none=True)
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v) * len(y)
            n += len(y)
            if progress:
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}" if "loss" in sums else None)
        if sched is not None:
            sched.step()
        row = {"epoch": epoch + 1, "lr": lr, "eps": state.eps}
        row.update({f"train_{key}": v / max(n, 1) for key, v in sums.items() if key != "eps"})
        if tp["eval_every"] > 0 and ((epoch + 1) % tp["eval_every"] == 0 or epoch + 1 == epochs):
            test = clean_metrics(model, test_loader, device)
            row.update(test_acc=test["acc"], test_loss=test["loss"])
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        content = dict(model=model.state_dict(), optimizer=opt.state_dict(),
                       lr_scheduler=sched.state_dict() if sched is not None else None, config=cfg,
                       epoch=epoch + 1, metrics=history, rng=rng_state(gen), model_name=cfg["model"]["name"])
        save_checkpoint(run_dir / "checkpoint.pt", **content)
        if cfg["output"]["keep_epoch_checkpoints"]:
            save_checkpoint(run_dir / f"checkpoint_epoch{epoch + 1}.pt", **content)
        _write_csv(run_dir / "log.csv", history)
        log("epoch {epoch}/{total}: ".format(epoch=epoch + 1, total=epochs) + ", ".join(
            f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items() if key != "epoch"))
    return TrainResult(run_dir=run_dir, history=history, model=model)
