"""auto_LiRPA's ``auto_LiRPA.utils`` helpers that its example scripts import: ``logger``, ``MultiAverageMeter``,
``MultiTimer``, ``get_spec_matrix``, the layers ``Flatten`` and ``Unflatten``, ``scale_gradients`` and
``sync_params``. Any other name of auto_LiRPA's module (its engine's internals) raises one ``ImportError`` /
``AttributeError`` line that says so."""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch
from torch import Tensor, nn

from ...bounds import margin_spec

__all__ = ["logger", "MultiAverageMeter", "MultiTimer", "get_spec_matrix", "Flatten", "Unflatten", "scale_gradients",
           "sync_params"]

logger = logging.getLogger("robustkern.compat.auto_lirpa")
"""The logger the facade's schedulers write to (INFO; DEBUG with ``AUTOLIRPA_DEBUG`` set, as auto_LiRPA's).
Unlike auto_LiRPA, importing the facade does not configure the root logger: call ``logging.basicConfig`` in
the script to see the messages."""
logger.setLevel(logging.DEBUG if os.environ.get("AUTOLIRPA_DEBUG") else logging.INFO)


class MultiAverageMeter:
    """Running averages of several named metrics: ``update(key, val, n)`` adds ``val`` with weight ``n``
    (default: ``set_batch_size``'s value, 1 at first; ``val=None`` is skipped; a tensor is read with ``.item()``);
    ``avg(key)`` (0.0 for an unseen key), ``last(key)``; ``str(meter)`` is ``"CE=0.1234 Err=0.5000"`` in the
    order the keys first appeared, as auto_LiRPA prints it."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sum_meter: dict = defaultdict(float)
        self.lasts: dict = defaultdict(float)
        self.counts_meter: dict = defaultdict(int)
        self.batch_size = 1

    def set_batch_size(self, batch_size: int):
        self.batch_size = batch_size

    def update(self, key: str, val, n: int | None = None):
        if val is None:
            return
        weight = self.batch_size if n is None else n
        value = val.item() if isinstance(val, Tensor) else val
        self.lasts[key] = value
        self.sum_meter[key] += value * weight
        self.counts_meter[key] += weight

    def last(self, key: str):
        return self.lasts[key]

    def avg(self, key: str) -> float:
        count = self.counts_meter.get(key, 0)
        return self.sum_meter[key] / count if count else 0.0

    def __repr__(self) -> str:
        return " ".join(f"{key}={self.avg(key):.4f}" for key in self.sum_meter)


class MultiTimer:
    """Total wall-clock time per named part: ``start(key)`` ... ``stop(key)``, ``total(key)``."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.timer_starts: dict = defaultdict(float)
        self.timer_total: dict = defaultdict(float)

    def start(self, key: str):
        if self.timer_starts[key] != 0:
            raise RuntimeError(f"MultiTimer: start({key!r}) called twice without stop()")
        self.timer_starts[key] = time.time()

    def stop(self, key: str):
        if not self.timer_starts.get(key):
            raise RuntimeError(f"MultiTimer: stop({key!r}) without start(); call start() first")
        self.timer_total[key] += time.time() - self.timer_starts[key]
        self.timer_starts[key] = 0

    def total(self, key: str) -> float:
        return self.timer_total[key]

    def __repr__(self) -> str:
        return " ".join(f"{key}_time={t:.3f}" for key, t in self.timer_total.items())


def get_spec_matrix(X: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """The margin specification (B, K-1, K), rows ``e_y - e_j`` for ``j != y``, in ``X``'s dtype and without
    gradient (``robustkern.bounds.margin_spec``)."""
    with torch.no_grad():
        return margin_spec(y, num_classes, dtype=X.dtype).to(X.device)


class Flatten(nn.Flatten):
    """auto_LiRPA's ``Flatten``: ``torch.nn.Flatten`` (all dimensions after the batch one)."""


class Unflatten(nn.Module):
    """auto_LiRPA's ``Unflatten(wh)``: (B, C*wh*wh) back to (B, C, wh, wh) feature maps."""

    def __init__(self, wh: int):
        super().__init__()
        self.wh = wh

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1, self.wh, self.wh)


def scale_gradients(optimizer: torch.optim.Optimizer, gradient_accumulation_steps: int, grad_clip=None):
    """Divide every gradient of ``optimizer``'s parameters by ``gradient_accumulation_steps`` (gradients summed
    over that many batches become their mean); with ``grad_clip``, then clip their total norm to it and return
    the norm before clipping (``torch.nn.utils.clip_grad_norm_``), as auto_LiRPA's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.div_(gradient_accumulation_steps)
    if grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    return None


def sync_params(model_ori: nn.Module, model, loss_fusion: bool = False) -> dict:
    """auto_LiRPA copies the trained parameters of a ``BoundedModule`` (which holds copies) back into the
    original model before saving it. The facade's ``BoundedModule`` bounds ``model_ori`` itself, so its
    parameters are already there: returns ``model_ori.state_dict()`` and copies nothing. A ``model`` that
    bounds another module is refused (its parameters are not ``model_ori``'s)."""
    bounded = getattr(getattr(model, "bm", None), "model", None)
    if bounded is not None and bounded is not model_ori:
        raise ValueError("sync_params: this BoundedModule bounds another module than model_ori; the facade "
                         "trains the module it was built on, so save that one (model.bm.model.state_dict())")
    return model_ori.state_dict()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"auto_LiRPA.utils.{name} is part of auto_LiRPA's own engine and not provided by "
                         f"robustkern's facade (it has {', '.join(__all__)})")
