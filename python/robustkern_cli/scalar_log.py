"""Training's scalar log: TensorBoard event files when the ``tensorboard`` package is installed, else a CSV.

:func:`open_scalar_log` returns ``torch.utils.tensorboard.SummaryWriter(logdir)`` when ``tensorboard`` imports
(``pip install tensorboard``, or the ``tensorboard`` extra), and otherwise a :class:`CsvScalarLog` that appends
the same scalars to ``<logdir>/scalars.csv`` (columns ``wall_time, step, tag, value``), saying once how to get
TensorBoard's files. Both have ``add_scalar(tag, value, step)``, ``flush()`` and ``close()``.
:func:`read_scalars` reads either back.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Callable

from .errors import install_hint, optional_import

__all__ = ["open_scalar_log", "CsvScalarLog", "read_scalars", "is_finite_number", "CSV_NAME"]

CSV_NAME = "scalars.csv"
FIELDS = ("wall_time", "step", "tag", "value")


class CsvScalarLog:
    """``add_scalar(tag, value, step)`` rows appended to ``<logdir>/scalars.csv`` (header once, so a resumed run
    goes on in the same file)."""

    def __init__(self, logdir: str | os.PathLike):
        self.path = Path(logdir) / CSV_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(FIELDS)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.writerow((f"{time.time():.3f}", int(step), tag, repr(float(value))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def open_scalar_log(logdir: str | os.PathLike, log: Callable[[str], None] = print):
    """A TensorBoard ``SummaryWriter`` for ``logdir`` when ``tensorboard`` is installed, else a
    :class:`CsvScalarLog` there (``log`` gets one line saying so and how to get TensorBoard's files)."""
    if tensorboard_installed():
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(logdir))
    writer = CsvScalarLog(logdir)
    log(f"note: tensorboard is not installed, so the scalars go to {writer.path}; for TensorBoard's event files: "
        f"{install_hint('tensorboard')}")
    return writer


def read_scalars(logdir: str | os.PathLike) -> dict:
    """``{tag: [(step, value), ...]}`` of a scalar log: ``<logdir>/scalars.csv`` in the order written, or
    TensorBoard's event files in ``logdir`` (read with the tensorboard package)."""
    path = Path(logdir) / CSV_NAME
    out: dict = {}
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                out.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
        return out
    events = optional_import("tensorboard.backend.event_processing.event_accumulator", "tensorboard",
                             "reading TensorBoard's event files")
    acc = events.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
