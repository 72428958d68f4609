"""Certify a data set with a smoothed classifier and write Cohen et al.'s (2019) ``certify.py`` log.

Output: a TSV with the header ``idx\\tlabel\\tpredict\\tradius\\tcorrect\\ttime``, one line per image, written
and flushed as soon as the image is certified; ``radius`` is formatted ``{:.3}`` and ``time`` is a
``datetime.timedelta`` string, as in Cohen's script (with ``images_per_batch > 1`` each image gets its
share of the batch's time). Images: ``i`` in ``range(len(dataset))`` with ``i % skip == 0``, stopping at
``i == max`` (Cohen's ``--skip``/``--max``).

Resume: lines already in the output (or in this rank's part file) are kept and their indices skipped.

Sharding (torchrun): when ``torch.distributed`` is initialised, or ``rank``/``world_size`` are given, the
``j``-th selected image goes to rank ``j % world_size`` (the position, not the data set index, so that
``skip`` does not leave ranks idle); each rank writes ``<outfile>.part<rank>``; under torch.distributed rank 0
merges all parts after a barrier into ``outfile`` sorted by index (shards run by hand, with ``rank`` and
``world_size`` given, are merged by calling ``merge_parts``). The noise of image ``i`` is keyed by
``(seed, i)``, so results do not depend on the number of ranks or on ``images_per_batch``.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Optional

import torch

from .core import Smooth

__all__ = ["HEADER", "certify_dataset", "read_results", "merge_parts"]

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


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
                    rank: Optional[int] = None, world_size: Optional[int] = None) -> Path:
    """Certify ``dataset[i] = (image, label)`` for the selected ``i`` with ``smooth.certify_batch`` and write the
    TSV log (see the module docstring). Returns the path of the finished ``outfile`` (on rank 0; other ranks
    return their part file)."""
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
    done = set(read_results(outfile)) | set(read_results(mine))
    selected = []
    for i in range(len(dataset)):
        if i == max:
            break
        if i % skip == 0:
            selected.append(i)
    todo = [i for j, i in enumerate(selected) if j % world == rank and i not in done]

    kept = read_results(mine)                                # rewrite without a possibly truncated last line
    with open(mine, "w") as f:
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
                f.write(f"{i}\t{label}\t{p}\t{r:.3}\t{int(p == label)}\t{elapsed}\n")
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
