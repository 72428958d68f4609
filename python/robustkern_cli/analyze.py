"""Certified-accuracy curves and average certified radius from certification logs.

Reads the tab-separated format of Cohen et al.'s ``certify.py`` (``idx label predict radius correct time``;
``predict = -1`` is an abstention; the time column may be seconds or ``H:MM:SS.ffffff``), which MACER,
SmoothAdv, TRADES+RS and robustkern's certify runner all write. Certified accuracy at radius r is the share of
rows with ``correct == 1`` and ``radius >= r`` (``ApproximateAccuracy`` in Cohen's ``analyze.py``); ACR is the
mean of ``radius * correct`` (MACER).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, DataMissingError

__all__ = ["read_certify_log", "certified_accuracy", "average_certified_radius", "parse_radii", "summarize",
           "format_table", "plot_curves"]


def read_certify_log(path: str | Path) -> dict:
    """Columns ``radius``, ``correct``, ``predict`` (numpy arrays) of one certification log."""
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(f"certification log {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    need = {"radius", "correct", "predict"}
    if not need <= set(rows[0]):
        raise ConfigError(f"{path}: expected tab-separated columns idx, label, predict, radius, correct, time; "
                          f"got {', '.join(rows[0])}")
    try:
        radius = np.array([float(r["radius"]) for r in rows])
        correct = np.array([int(r["correct"]) for r in rows])
        predict = np.array([int(r["predict"]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: malformed row ({exc})") from None
    return {"radius": radius, "correct": correct, "predict": predict}


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    ok = correct.astype(bool)
    return np.array([float(np.mean(ok & (radius >= r))) for r in radii])


def average_certified_radius(radius: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean(radius * (correct == 1)))


def parse_radii(spec: str) -> list[float]:
    """``"0:2.25:0.25"`` (start:stop:step, stop included) or ``"0,0.25,0.5"``."""
    try:
        if ":" in spec:
            start, stop, step = (float(p) for p in spec.split(":"))
            if step <= 0:
                raise ValueError
            n = int(np.floor((stop - start) / step + 1e-9)) + 1
            return [round(start + i * step, 10) for i in range(n)]
        return [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"radii '{spec}' must be start:stop:step (step > 0) or a comma-separated list") from None


def summarize(paths: Sequence[str | Path], radii: Sequence[float], scale: float = 1.0) -> list[dict]:
    """One row per log: ``name``, ``n``, ``abstain``, ``acr``, ``acc@r`` for each radius. ``scale`` multiplies
    the radii in the logs first (e.g. ``1/sqrt(d)`` to read L2 radii as L-inf radii)."""
    out = []
    for p in paths:
        log = read_certify_log(p)
        radius = log["radius"] * scale
        row = {"name": Path(p).name, "n": int(len(radius)), "abstain": float(np.mean(log["predict"] < 0)),
               "acr": average_certified_radius(radius, log["correct"])}
        for r, a in zip(radii, certified_accuracy(radius, log["correct"], radii)):
            row[f"{r:g}"] = float(a)
        out.append(row)
    return out


def format_table(rows: list[dict], fmt: str = "markdown") -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    if fmt == "tsv":
        return "\n".join(["\t".join(keys)] + ["\t".join(cell(r[k]) for k in keys) for r in rows]) + "\n"
    if fmt != "markdown":
        raise ConfigError(f"format must be markdown or tsv, got '{fmt}'")
    head = "| " + " | ".join(k if k in ("name", "n", "abstain", "acr") else f"r={k}" for k in keys) + " |"
    sep = "|" + "|".join("---" for _ in keys) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]) + "\n"


def plot_curves(paths: Sequence[str | Path], out: str | Path, scale: float = 1.0, points: int = 200) -> Path:
    """Certified accuracy against radius, one line per log, saved to ``out`` (PNG/PDF/SVG by extension)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = [read_certify_log(p) for p in paths]
    rmax = max(float((lg["radius"] * scale).max()) for lg in logs) or 1.0
    grid = np.linspace(0.0, rmax * 1.05, points)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for p, lg in zip(paths, logs):
        ax.plot(grid, certified_accuracy(lg["radius"] * scale, lg["correct"], grid), label=Path(p).name)
    ax.set_xlabel("radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
