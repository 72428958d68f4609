"""auto_LiRPA's ``auto_LiRPA.utils`` helpers that training scripts import: ``logger``, ``MultiAverageMeter``,
``MultiTimer`` and ``get_spec_matrix``."""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch
from torch import Tensor

from ...bounds import margin_spec

__all__ = ["logger", "MultiAverageMeter", "MultiTimer", "get_spec_matrix"]

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
