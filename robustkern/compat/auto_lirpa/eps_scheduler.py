"""auto_LiRPA's epsilon schedulers (``auto_LiRPA.eps_scheduler``), with its constructor strings and methods.

    sched = SmoothedScheduler(max_eps, "start=3,length=60,mid=0.25,beta=4")
    for epoch in ...:
        sched.train(); sched.step_epoch(); sched.set_epoch_length(batches_per_epoch)
        for batch in ...:
            sched.step_batch(); eps = sched.get_eps(); ...; sched.update_loss(robust - natural)
        sched.eval()   # evaluation: step_epoch/step_batch leave eps unchanged

Epochs are counted from 1 (``step_epoch`` before the first batch), ``start`` is the first epoch of the ramp
and ``length`` its number of epochs. Differences from auto_LiRPA: a malformed option string, a missing ``start``
/ ``length`` or a ``step_batch`` before ``set_epoch_length`` is a one-line ``ValueError`` (auto_LiRPA fails with
a ``KeyError`` or quietly yields NaN); the smoothed ramp with its switch point at the start of the ramp (fewer
than ``1 / mid`` steps) is a straight ramp where auto_LiRPA divides by zero.
"""
from __future__ import annotations

import math

from ...bounds.training import smoothed_eps
from .utils import logger

__all__ = ["BaseScheduler", "FixedScheduler", "LinearScheduler", "RangeScheduler", "BiLinearScheduler",
           "SmoothedScheduler", "AdaptiveScheduler"]


class BaseScheduler:
    """eps state shared by every scheduler: ``max_eps``, ``eps`` (0 at first), ``epoch`` and ``batch``
    counters (moved only in training mode), ``epoch_length`` (NaN until ``set_epoch_length``), the last two
    losses given to ``update_loss``, and ``params``: the ``"key=value,..."`` options as strings."""

    def __init__(self, max_eps: float, opt_str: str = ""):
        self.params = self._parse(opt_str)
        self.prev_loss = self.loss = self.epoch_length = math.nan
        self.eps = 0.0
        self.max_eps = max_eps
        self.is_training = True
        self.epoch = 0
        self.batch = 0

    @staticmethod
    def _parse(opt_str: str) -> dict[str, str]:
        params = {}
        for item in (opt_str or "").split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or "=" in value:
                raise ValueError(f"eps scheduler: options are 'key=value' pairs separated by commas, got {item!r}")
            params[key.strip()] = value.strip()
        return params

    def _need(self, key: str) -> str:
        if key not in self.params:
            raise ValueError(f"{type(self).__name__}: option '{key}' is required, e.g. \"start=3,length=60\"")
        return self.params[key]

    def _epoch_length(self) -> int:
        if self.epoch_length != self.epoch_length:
            raise ValueError(f"{type(self).__name__}: call set_epoch_length(batches per epoch) before step_batch()")
        return self.epoch_length

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: eps {self.eps}, max_eps {self.max_eps}>"

    def get_max_eps(self) -> float:
        return self.max_eps

    def get_eps(self) -> float:
        return self.eps

    def reached_max_eps(self) -> bool:
        return abs(self.eps - self.max_eps) < 1e-3

    def step_batch(self, verbose: bool = False):
        if self.is_training:
            self.batch += 1

    def step_epoch(self, verbose: bool = False):
        if self.is_training:
            self.epoch += 1

    def update_loss(self, new_loss: float):
        self.prev_loss, self.loss = self.loss, new_loss

    def train(self):
        self.is_training = True

    def eval(self):
        self.is_training = False

    def set_epoch_length(self, epoch_length: int):
        """The number of batches in an epoch."""
        self.epoch_length = epoch_length


class FixedScheduler(BaseScheduler):
    """eps = ``max_eps`` throughout (auto_LiRPA's choice for verification)."""

    def __init__(self, max_eps: float, opt_str: str = ""):
        super().__init__(max_eps, opt_str)
        self.eps = self.max_eps


class LinearScheduler(BaseScheduler):
    """Options ``start``, ``length`` (epochs). Epoch ``e >= start`` runs from ``max_eps (e - start) / length``
    to ``max_eps (e - start + 1) / length`` (capped at ``max_eps``) in equal steps per batch, the first batch
    at the epoch's start value; before ``start`` eps is 0. A batch beyond ``set_epoch_length``'s count logs a
    warning and takes the epoch's end value. ``step_epoch`` counts epochs in evaluation mode too, as
    auto_LiRPA's does."""

    def __init__(self, max_eps: float, opt_str: str):
        super().__init__(max_eps, opt_str)
        self.schedule_start = int(self._need("start"))
        self.schedule_length = int(self._need("length"))
        self.epoch_start_eps = self.epoch_end_eps = 0.0

    def __repr__(self) -> str:
        return f"<LinearScheduler: start_eps {self.epoch_start_eps:.3f}, end_eps {self.epoch_end_eps:.3f}>"

    def step_epoch(self, verbose: bool = True):
        self.epoch += 1
        self.batch = 0
        if self.epoch < self.schedule_start:
            self.epoch_start_eps = self.epoch_end_eps = 0.0
        elif self.schedule_length == 0:
            self.epoch_start_eps = self.epoch_end_eps = self.max_eps
        else:
            k = self.epoch - self.schedule_start
            per_epoch = self.max_eps / self.schedule_length
            self.epoch_start_eps = min(k * per_epoch, self.max_eps)
            self.epoch_end_eps = min((k + 1) * per_epoch, self.max_eps)
        self.eps = self.epoch_start_eps
        if verbose:
            logger.info("Epoch %3d eps start %7.5f end %7.5f", self.epoch, self.epoch_start_eps, self.epoch_end_eps)

    def step_batch(self, verbose: bool = False):
        if not self.is_training:
            return
        length = self._epoch_length()
        self.batch += 1
        per_batch = (self.epoch_end_eps - self.epoch_start_eps) / length
        self.eps = self.epoch_start_eps + per_batch * (self.batch - 1)
        if self.batch > length:
            logger.warning("expected %s batches in this epoch but this is batch %s", length, self.batch)
            self.eps = self.epoch_end_eps


class RangeScheduler(BaseScheduler):
    """eps = ``max_eps`` in epochs ``[start, start + length)``, 0 outside; constant within an epoch."""

    def __init__(self, max_eps: float, opt_str: str):
        super().__init__(max_eps, opt_str)
        self.schedule_start = int(self._need("start"))
        self.schedule_length = int(self._need("length"))

    def step_epoch(self, verbose: bool = True):
        self.epoch += 1
        inside = self.schedule_start <= self.epoch < self.schedule_start + self.schedule_length
        self.eps = self.max_eps if inside else 0.0

    def step_batch(self, verbose: bool = False):
        pass


class BiLinearScheduler(LinearScheduler):
    """Up and down: linear from 0 to ``max_eps`` over the first half of ``length`` epochs from ``start``, then
    back down by the same amount per epoch (not below 0); per-batch steps as ``LinearScheduler``."""

    def __init__(self, max_eps: float, opt_str: str):
        super().__init__(max_eps, opt_str)
        self.schedule_length_half = self.schedule_length / 2

    def step_epoch(self, verbose: bool = True):
        self.epoch += 1
        self.batch = 0
        if self.epoch < self.schedule_start:
            self.epoch_start_eps = self.epoch_end_eps = 0.0
        else:
            k = self.epoch - self.schedule_start
            per_epoch = self.max_eps / self.schedule_length_half
            if k < self.schedule_length_half:
                self.epoch_start_eps = min(k * per_epoch, self.max_eps)
                self.epoch_end_eps = min((k + 1) * per_epoch, self.max_eps)
            else:
                self.epoch_start_eps = max(0.0, self.max_eps - (k - self.schedule_length_half) * per_epoch)
                self.epoch_end_eps = max(0.0, self.epoch_start_eps - per_epoch)
        self.eps = self.epoch_start_eps
        if verbose:
            logger.info("Epoch %3d eps start %7.5f end %7.5f", self.epoch, self.epoch_start_eps, self.epoch_end_eps)


class SmoothedScheduler(BaseScheduler):
    """Options ``start``, ``length`` (epochs), ``mid`` (0.25), ``beta`` (4, at least 2). Batches are counted
    over the whole run (not reset per epoch); batch ``b`` (from 1) gets
    ``robustkern.bounds.smoothed_eps(b - 1, (start - 1) * L, length * L, max_eps, mid, beta)`` with ``L`` the
    epoch length: DeepMind IBP's smooth schedule (Gowal et al. 2018), 0 up to the start, a ``beta``-power ramp
    up to the fraction ``mid`` of the way, then linear to ``max_eps``. ``set_epoch_length`` must give the same
    length every epoch. ``step_epoch(verbose=False)`` also steps through a whole epoch of batches, as
    auto_LiRPA's does (used to fast-forward when resuming)."""

    def __init__(self, max_eps: float, opt_str: str):
        super().__init__(max_eps, opt_str)
        self.schedule_start = int(self._need("start"))
        self.schedule_length = int(self._need("length"))
        self.mid_point = float(self.params.get("mid", 0.25))
        self.beta = float(self.params.get("beta", 4.0))
        if not self.beta >= 2.0:
            raise ValueError(f"SmoothedScheduler: beta must be >= 2, got {self.beta}")
        if not 0.0 <= self.mid_point <= 1.0:
            raise ValueError(f"SmoothedScheduler: mid must lie in [0, 1], got {self.mid_point}")

    def set_epoch_length(self, epoch_length: int):
        if self.epoch_length == self.epoch_length and self.epoch_length != epoch_length:
            raise ValueError(f"SmoothedScheduler: epoch_length must stay the same (was {self.epoch_length}, "
                             f"got {epoch_length})")
        self.epoch_length = epoch_length

    def step_epoch(self, verbose: bool = True):
        super().step_epoch()
        if verbose in (False, 0):
            for _ in range(self._epoch_length()):
                self.step_batch()

    def step_batch(self, verbose: bool = False):
        if not self.is_training:
            return
        length = self._epoch_length()
        self.batch += 1
        self.eps = smoothed_eps(self.batch - 1, (self.schedule_start - 1) * length, self.schedule_length * length,
                                self.max_eps, self.mid_point, self.beta)


class AdaptiveScheduler(BaseScheduler):
    """eps grows from epoch ``start`` on by a step adapted to the loss passed to ``update_loss``: the first two
    batches (no loss history yet) add ``min_step``; then the step is multiplied by ``increase_factor`` (1.5, up
    to ``max_step``) when the loss fell below ``increase_thresh`` (1.0) times the previous one or below
    ``small_loss_thresh`` (0.05), divided by ``decrease_factor`` (2.0, down to ``min_step``) when it rose above
    ``decrease_thresh`` (1.5) times the previous one, and added to eps (capped at ``max_eps``).
    ``min_step`` 1e-9, ``max_step`` 1e-4 by default."""

    def __init__(self, max_eps: float, opt_str: str):
        super().__init__(max_eps, opt_str)
        p = self.params
        self.schedule_start = int(self._need("start"))
        self.min_eps_step = float(p.get("min_step", 1e-9))
        self.max_eps_step = float(p.get("max_step", 1e-4))
        self.eps_increase_thresh = float(p.get("increase_thresh", 1.0))
        self.eps_increase_factor = float(p.get("increase_factor", 1.5))
        self.eps_decrease_thresh = float(p.get("decrease_thresh", 1.5))
        self.eps_decrease_factor = float(p.get("decrease_factor", 2.0))
        self.small_loss_thresh = float(p.get("small_loss_thresh", 0.05))
        self.eps_step = self.min_eps_step

    def step_batch(self, verbose: bool = False):
        if not (self.is_training and self.epoch >= self.schedule_start and self.eps < self.max_eps):
            return
        if self.loss != self.loss or self.prev_loss != self.prev_loss:
            self.eps += self.min_eps_step
            return
        if self.loss < self.eps_increase_thresh * self.prev_loss or self.loss < self.small_loss_thresh:
            self.eps_step = min(self.eps_step * self.eps_increase_factor, self.max_eps_step)
        elif self.loss > self.eps_decrease_thresh * self.prev_loss:
            self.eps_step = max(self.eps_step / self.eps_decrease_factor, self.min_eps_step)
        self.eps = min(self.eps + self.eps_step, self.max_eps)
