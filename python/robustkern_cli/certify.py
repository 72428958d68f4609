"""Randomised-smoothing certification of a checkpoint (``robustkern certify``): Cohen et al.'s CERTIFY through
``robustkern.smoothing.Smooth`` and ``robustkern.smoothing.runner.certify_dataset`` (Cohen's TSV log, resume,
torchrun sharding), parameters from ``certify_params`` (sigma, N0, N, alpha, batch, skip, max).

A log resumes only under the settings it was made with: sigma, N0, N, alpha, the run seed, the data set and
the SHA-256 of the weights file (recorded in ``<outfile>.json``); otherwise the command refuses with one line
(another ``--outfile`` keeps both, ``--overwrite`` starts the log afresh)."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from robustkern.smoothing import Smooth
from robustkern.smoothing.runner import SettingsMismatch, certify_dataset

from .analyze import parse_radii, summarize
from .data import dataset_info, load_dataset
from .errors import ConfigError

__all__ = ["certify_params", "default_outfile", "default_radii", "certify_checkpoint", "certify_summary",
           "file_sha256"]


def certify_params(cfg: dict) -> dict:
    """``certify_params`` typed: sigma, n0, n, alpha, batch, skip, max (their ranges are checked when the config
    is loaded, :func:`robustkern_cli.config.check_values`). ``start`` other than 0 (MACER's ``start_img``) is
    refused here, the only command that reads it."""
    cp = cfg["certify_params"]
    if cp["start"] != 0:
        raise ConfigError("certify_params:start is not supported by the certify runner (Cohen's --skip/--max "
                          "select images from index 0); use skip and max")
    return {"sigma": float(cp["sigma"]), "n0": int(cp["N0"]), "n": int(cp["N"]), "alpha": float(cp["alpha"]),
            "batch": int(cp["batch"]), "skip": int(cp["skip"]), "max": int(cp["max"])}


def default_outfile(out_dir: str | Path, sigma: float) -> Path:
    return Path(out_dir) / f"certify_sigma{sigma:g}.tsv"


def default_radii(sigma: float) -> list[float]:
    """0, 0.25, ... up to at least 1 and 4 sigma (the largest radius N = 100k samples can certify is ~3.8 sigma)."""
    stop = max(1.0, math.ceil(4 * sigma / 0.25) * 0.25)
    return parse_radii(f"0:{stop}:0.25")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def certify_checkpoint(cfg: dict, model: torch.nn.Module, outfile: str | Path, *, data_dir=None,
                       download: bool = False, device: str = "cpu", progress: bool = False,
                       images_per_batch: int | None = None, num_examples: int = 0,
                       weights: str | Path | None = None, overwrite: bool = False) -> Path:
    """Certify the test split of ``cfg``'s data set with the smoothed ``model`` and write Cohen's TSV to
    ``outfile`` (resuming it when it already holds lines made with the same settings, see the module doc;
    ``weights``: the file ``model``'s weights came from, whose SHA-256 is one of them). ``num_examples > 0``
    caps the selection like ``certify_params:max`` (the smaller wins). ``overwrite`` discards the results
    already in ``outfile``. Returns the path written (a part file on ranks > 0 under torchrun)."""
    p = certify_params(cfg)
    info = dataset_info(cfg["data"]["dataset"])
    ds = load_dataset(info.name, "test", data_dir or cfg["data"]["data_dir"] or None, download)
    stop = p["max"]
    if num_examples and num_examples > 0:
        stop = num_examples if stop < 0 else min(stop, num_examples)
    if images_per_batch is None:  # several images share a forward when N is small against the batch
        images_per_batch = max(1, min(64, p["batch"] // max(p["n"], 1)))
    model = model.to(device).eval()
    smooth = Smooth(model, info.num_classes, p["sigma"])
    identity = {"dataset": info.name, "weights_sha256": file_sha256(weights) if weights else None}
    try:
        return certify_dataset(smooth, ds, outfile, n0=p["n0"], n=p["n"], alpha=p["alpha"], batch_size=p["batch"],
                               skip=p["skip"], max=stop, seed=int(cfg.get("seed", 0)),
                               images_per_batch=images_per_batch, device=torch.device(device), progress=progress,
                               identity=identity, overwrite=overwrite)
    except SettingsMismatch as exc:
        raise ConfigError(f"{exc}: certify into another --outfile to keep both, or pass --overwrite to start it "
                          "afresh") from None


def certify_summary(outfile: str | Path, radii, linf_dim: int = 0) -> list[dict]:
    """analyze.summarize of one log; with ``linf_dim`` a second row reads the L2 radii as L-inf radii."""
    rows = summarize([outfile], radii)
    if linf_dim and linf_dim > 0:
        row = summarize([outfile], radii, scale=1.0 / math.sqrt(linf_dim))[0]
        row["name"] += f" (L-inf, /sqrt({linf_dim}))"
        rows.append(row)
    return rows


def is_rank0() -> bool:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0
