"""Certify a data set with a smoothed classifier and write Cohen et al.'s (2019) ``certify.py`` log.

Output: a TSV with the header ``idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime``, one line per image, written
and flushed as soon as the image is certified; ``time`` is a ``datetime.timedelta`` string, as in Cohen's
script (with ``images_per_batch > 1`` each image gets its share of the batch's time). Images: ``i`` in
``range(len(dataset))`` with ``i % skip == 0``, stopping at ``i == max`` (Cohen's ``--skip``/``--max``).

``radius`` is written in full: Python's shortest representation that reads back as exactly the certified
float (``repr``, e.g. ``0.24970318745366236``). Cohen's ``certify.py`` writes ``{:.3}``, three significant
digits rounded to the nearest, so a certified radius of 0.2497 reads back as 0.25 and is counted as certified
at r = 0.25, which it is not. Writing every digit keeps the format (a decimal number in the same column, read
by Cohen's ``analyze.py``, pandas and ``robustkern analyze`` alike), keeps certified accuracy and ACR exact
after a round trip through the file, and makes a resumed run's summary use the values that were certified.

Settings: the log's settings (``sigma``, ``N0``, ``N``, ``alpha``, ``seed`` and the caller's ``identity``, e.g.
a hash of the weights) are recorded beside it in ``<outfile>.json`` (:func:`settings_path`; a separate file,
so the TSV stays exactly Cohen's format). Resume: lines already in the output (or in this rank's part file)
are kept and their indices skipped, but only when the recorded settings equal this run's; otherwise, or when
results exist without a record, :class:`SettingsMismatch` is raised before anything is written, so results
made with different settings never share a file. ``overwrite=True`` discards the old results instead.

Sharding (torchrun): when ``torch.distributed`` is initialised, or ``rank``/``world_size`` are given, the
``j``-th selected image goes to rank ``j % world_size`` (the position, not the data set index, so that
``skip`` does not leave ranks idle); each rank writes ``<outfile>.part<rank>``; under torch.distributed rank 0
merges all parts after a barrier into ``outfile`` sorted by index (shards run by hand, with ``rank`` and
``world_size`` given, are merged by calling ``merge_parts``). The noise of image ``i`` is keyed by
``(seed, i)``, so results do not depend on the number of ranks or on ``images_per_batch``.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from .core import Smooth

__all__ = ["HEADER", "SettingsMismatch", "certify_dataset", "read_results", "merge_parts", "settings_path",
           "read_settings"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


class SettingsMismatch(ValueError):
    """A certification log holds results made with other settings than this run's (or with unknown ones)."""


def settings_path(outfile) -> Path:
    """Where the settings of the log ``outfile`` are recorded: ``<outfile>.json``."""
    return Path(f"{outfile}.json")


def read_settings(outfile) -> Optional[dict]:
    """The recorded settings of the log ``outfile`` (None when there is no record)."""
    path = settings_path(outfile)
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SettingsMismatch(f"{path} is not a settings record ({exc})") from None
    if not isinstance(settings, dict):
        raise SettingsMismatch(f"{path} is not a settings record")
    return settings


def _write_settings(outfile, settings: dict) -> None:
    tmp = Path(f"{settings_path(outfile)}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, settings_path(outfile))


def _shown(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + "..."


def _check_settings(outfile, results: dict, settings: dict) -> None:
    """Raise SettingsMismatch unless the log's recorded settings equal ``settings`` (or it has no results)."""
    recorded = read_settings(outfile)
    if recorded is None:
        if results:
            raise SettingsMismatch(f"{outfile} holds {len(results)} results but no record of the settings they "
                                   f"were certified with ({settings_path(outfile).name})")
        return
    differ = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
    if differ:
        old = ", ".join(f"{k}={_shown(recorded.get(k))}" for k in differ)
        new = ", ".join(f"{k}={_shown(settings.get(k))}" for k in differ)
        raise SettingsMismatch(f"{outfile} holds results certified with {old}; this run has {new}")


def read_results(path) -> dict:
    """``{idx: line}`` of the result lines of a TSV written by ``certify_dataset`` (empty if absent)."""
    out = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        if not line.strip() or line.startswith("idx"):
            continue
        fields = line.split("\t")
        if len(fields) == 6 and fields[0].isdigit():         # a half-written last line is dropped
            out[int(fields[0])] = line
    return out


def merge_parts(outfile, world_size: int) -> Path:
    """Merge ``outfile`` and ``outfile.part<r>`` (r < world_size) into ``outfile``, sorted by index; the part
    files are removed."""
    outfile = Path(outfile)
    lines = read_results(outfile)
    parts = [Path(f"{outfile}.part{r}") for r in range(world_size)]
    for p in parts:
        lines.update(read_results(p))
    tmp = Path(f"{outfile}.tmp")
    tmp.write_text(HEADER + "\n" + "".join(lines[i] + "\n" for i in sorted(lines)))
    os.replace(tmp, outfile)
    for p in parts:
        if p.exists():
            p.unlink()
    return outfile


def _dist_info(rank, world_size):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return (rank or 0), (world_size or 1), False


def certify_dataset(smooth: Smooth, dataset, outfile, *, n0: int = 100, n: int = 100_000, alpha: float = 0.001,
                    batch_size: int = 1000, skip: int = 1, max: int = -1, seed: int = 0,
                    images_per_batch: int = 1, device: Optional[torch.device] = None, progress: bool = True,
                    rank: Optional[int] = None, world_size: Optional[int] = None, identity: Optional[dict] = None,
                    overwrite: bool = False) -> Path:
    """Certify ``dataset[i] = (image, label)`` for the selected ``i`` with ``smooth.certify_batch`` and write the
    TSV log (see the module docstring). ``identity``: more settings that must match on resume (JSON values,
    e.g. ``{"weights_sha256": ...}``). ``overwrite``: discard results already in the log (else a log made with
    other settings raises :class:`SettingsMismatch`). Returns the path of the finished ``outfile`` (on rank 0;
    other ranks return their part file)."""
    if skip < 1:
        raise ValueError(f"skip must be >= 1, got {skip}")
    if images_per_batch < 1:
        raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
    rank, world, distributed = _dist_info(rank, world_size)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    mine = outfile if world == 1 else Path(f"{outfile}.part{rank}")
    settings = {"sigma": float(smooth.sigma), "N0": int(n0), "N": int(n), "alpha": float(alpha), "seed": seed,
                **(identity or {})}
    if overwrite:
        if rank == 0:
            outfile.unlink(missing_ok=True)
        kept = {}
        done = set()
    else:
        kept = read_results(mine)
        previous = {**read_results(outfile), **kept}
        _check_settings(outfile, previous, settings)
        done = set(previous)
    _write_settings(outfile, settings)
    selected = []
    for i in range(len(dataset)):
        if i == max:
            break
        if i % skip == 0:
            selected.append(i)
    todo = [i for j, i in enumerate(selected) if j % world == rank and i not in done]

    with open(mine, "w") as f:                               # rewrite without a possibly truncated last line
        f.write(HEADER + "\n" + "".join(kept[i] + "\n" for i in sorted(kept)))
        f.flush()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="img", desc=f"certify[rank {rank}]" if world > 1 else "certify",
                       dynamic_ncols=True)
        for lo in range(0, len(todo), images_per_batch):
            idx = todo[lo:lo + images_per_batch]
            items = [dataset[i] for i in idx]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            if device is not None:
                x = x.to(device)
            t0 = time.time()
            pred, rad = smooth.certify_batch(x, n0, n, alpha, batch_size, seed=seed, indices=idx)
            share = (time.time() - t0) / len(idx)
            for k, i in enumerate(idx):
                label, p, r = int(items[k][1]), int(pred[k]), float(rad[k])
                elapsed = str(datetime.timedelta(seconds=share))
                f.write(f"{i}\t{label}\t{p}\t{r!r}\t{int(p == label)}\t{elapsed}\n")
            f.flush()
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
    if world == 1 or not distributed:
        return mine                      # shards run by hand: merge with merge_parts(outfile, world_size)
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        return merge_parts(outfile, world)
    return mine
