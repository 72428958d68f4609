"""Certified-accuracy curves and average certified radius from certification logs.

Reads the tab-separated format of Cohen et al.'s ``certify.py`` (``idx label predict radius correct time``;
``predict = -1`` is an abstention; the time column may be seconds or ``H:MM:SS.ffffff``), which MACER,
SmoothAdv, TRADES+RS and robustkern's certify runner all write. Certified accuracy at radius r is the share of
rows with ``correct == 1`` and ``radius >= r`` (``ApproximateAccuracy`` in Cohen's ``analyze.py``); ACR is the
mean of ``radius * correct`` (MACER). Both are counted on the radius as written: robustkern's runner writes
the certified radius in full, so the counts are exact; logs of Cohen's ``certify.py`` (and its descendants)
hold radii rounded to three significant digits, to the nearest, so a radius within half a unit of the third
digit below a grid radius (e.g. 0.2497 written as 0.25) counts there although it was not certified.

Each log is labelled by its run: the folder it lies in, the training method (from the run's ``config.json``),
sigma and N (from the settings recorded beside the log, ``<log>.json``, or sigma from a ``sigma_0.25``-style
file name), so that two runs' ``certify_sigma0.25.tsv`` get different rows and legend entries.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, DataMissingError, optional_import

__all__ = ["read_certify_log", "certified_accuracy", "average_certified_radius", "parse_radii", "log_info",
           "run_labels", "summarize", "format_table", "plot_curves"]


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def log_info(path: str | Path) -> dict:
    """What is known about the run behind a log: ``run`` (its folder), ``method``, ``sigma``, ``N`` (None where
    unknown)."""
    from robustkern.smoothing.runner import settings_path
    path = Path(path)
    settings = _read_json(settings_path(path))
    config = _read_json(path.parent / "config.json")
    sigma = settings.get("sigma")
    if sigma is None:
        found = re.search(r"sigma_?(\d+(?:\.\d+)?)", path.name)
        sigma = float(found.group(1)) if found else None
    tp = config.get("training_params")
    method = tp.get("method") if isinstance(tp, dict) else None
    return {"run": path.resolve().parent.name, "method": method, "sigma": sigma, "N": settings.get("N")}


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """One label per log, ``folder (method, sigma 0.25, N 1000)``; where two would be equal, the folder is given
    as its path, then the log's own path is used."""
    infos = [log_info(p) for p in paths]

    def label(run: str, info: dict) -> str:
        parts = [info["method"], f"sigma {info['sigma']:g}" if info["sigma"] is not None else None,
                 f"N {info['N']}" if info["N"] is not None else None]
        parts = [p for p in parts if p]
        return f"{run} ({', '.join(parts)})" if parts else run

    labels = [label(info["run"], info) for info in infos]
    for where in (lambda p: str(Path(p).parent), str):
        if len(set(labels)) == len(labels):
            break
        labels = [label(where(p), info) for p, info in zip(paths, infos)]
    return labels


def summarize(paths: Sequence[str | Path], radii: Sequence[float], scale: float = 1.0) -> list[dict]:
    """One row per log: ``name`` (:func:`run_labels`), ``n``, ``abstain``, ``acr``, ``acc@r`` for each radius.
    ``scale`` multiplies the radii in the logs first (e.g. ``1/sqrt(d)`` to read L2 radii as L-inf radii)."""
    out = []
    for p, name in zip(paths, run_labels(paths)):
        log = read_certify_log(p)
        radius = log["radius"] * scale
        row = {"name": name, "n": int(len(radius)), "abstain": float(np.mean(log["predict"] < 0)),
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


def plot_curves(paths: Sequence[str | Path], out: str | Path, linf_dim: int = 0, points: int = 200) -> Path:
    """Certified accuracy against radius, one line per log labelled by run (:func:`run_labels`), saved to
    ``out`` (PNG/PDF/SVG by extension). The x axis is the L2 radius, or with ``linf_dim`` the L-inf radius
    ``L2 / sqrt(linf_dim)``; sigma and N shared by all logs go into the title. Needs matplotlib
    (:class:`~robustkern_cli.errors.MissingDependency` otherwise)."""
    matplotlib = optional_import("matplotlib", "matplotlib", "plotting certified accuracy")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = 1.0 / float(np.sqrt(linf_dim)) if linf_dim else 1.0
    logs = [read_certify_log(p) for p in paths]
    infos = [log_info(p) for p in paths]
    rmax = max(float((lg["radius"] * scale).max()) for lg in logs) or 1.0
    grid = np.linspace(0.0, rmax * 1.05, points)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, lg in zip(run_labels(paths), logs):
        ax.plot(grid, certified_accuracy(lg["radius"] * scale, lg["correct"], grid), label=label)
    ax.set_xlabel(f"L-inf radius (L2 radius / sqrt({linf_dim}))" if linf_dim else "L2 radius")
    ax.set_ylabel("certified accuracy")
    shared = []
    for key, name in (("sigma", "sigma"), ("N", "N")):
        values = {info[key] for info in infos}
        if len(values) == 1 and None not in values:
            shared.append(f"{name} = {values.pop():g}")
    ax.set_title("Certified accuracy of the smoothed classifier" + (f" ({', '.join(shared)})" if shared else ""),
                 fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
