"""Data-parallel training under ``torchrun``: process group, per-rank device and seeds, gradient
synchronisation, and cross-rank averages.

``torchrun --nproc_per_node=N -m robustkern_cli train ...`` starts N processes with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads them, starts the process group
(NCCL for CUDA devices, Gloo on the CPU) and pins each process to ``cuda:LOCAL_RANK``. Without them (or with
``WORLD_SIZE=1``) everything here is a no-op and training is exactly the single-process loop.

Gradient synchronisation (:class:`GradientSync`), chosen per method by ``training_params:grad_sync``:

* ``"ddp"``: the model is wrapped in ``DistributedDataParallel`` and the loss calls the wrapper; gradients are
  all-reduced in buckets while the backward pass runs (``no_sync`` on all but the last micro-batch of a
  ``batch_multiplier`` accumulation). DDP assumes one forward and one backward through the parameters per
  step, so it suits only methods that do exactly that (``standard``, ``gaussian``).
* ``"allreduce"``: the loss gets the plain module; after the (accumulated) backward the gradients are
  averaged over the ranks in one flat all-reduce per dtype before clipping and the optimiser step. Every
  method works this way. The bound-propagation losses need it: they capture the module with ``torch.fx``
  (``BoundedModule``), and fx cannot trace the DDP wrapper ("torch.fx could not trace
  DistributedDataParallel"). Losses that run the model many times per step (attack iterations taking input
  gradients with ``torch.autograd.grad``, TRADES' clean and adversarial forwards) ran correctly through DDP
  in torch 2.13 probes, but every such forward would broadcast buffers and arm DDP's reducer. The flat
  all-reduce is one collective per step and exactly the averaged gradient, whatever the loss does. A
  parameter that got no gradient on any rank keeps ``grad = None``, so optimisers skip it as in a single
  process.
* ``"auto"`` (default): ``ddp`` for ``standard`` and ``gaussian``, ``allreduce`` otherwise.

Data (:class:`GlobalBatchSampler`): the ranks draw the single-process run's batches (the same shuffling
generator, the same ``RandomSampler``/``BatchSampler`` order, no padding) and rank r takes examples r, r+N,
... of each global batch; a rank's mean loss is weighted by ``N * n_r / n_global`` (1 for equal shards), so
the averaged gradient is exactly the gradient of the mean loss over the global batch, the last, smaller batch
included. A rank left without an example (a last batch smaller than N) runs one example with weight 0, so
every rank takes part in every all-reduce. Both sync modes thus give the single-process gradient.

Buffers (BatchNorm running statistics) follow DDP's rule, rank 0's values: DDP broadcasts them before each
forward; ``allreduce`` broadcasts them before evaluation and checkpoints, which
gives the same values since rank 0's running statistics depend only on rank 0's batches.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from .errors import ConfigError

__all__ = ["DistContext", "setup", "cleanup", "session", "env_world_size", "rank_seed", "GradientSync",
           "DDP_METHODS", "GlobalBatchSampler", "allreduce_gradients", "broadcast_module", "reduce_sums",
           "gather_objects", "barrier"]

DDP_METHODS = frozenset({"standard", "gaussian"})  # one forward + one backward through the parameters per step


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    owns_group: bool = False  # this process started the group (and destroys it in cleanup)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from None


def _env_int(name: str) -> int:
    if name not in os.environ:
        raise ConfigError(f"WORLD_SIZE > 1 but {name} is not set: start distributed runs with torchrun")
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got '{os.environ[name]}'") from None


def _rank_device(device: str, local_rank: int) -> str:
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def setup(device: str = "cpu") -> DistContext:
    """The distributed context of this process; starts the process group under torchrun (WORLD_SIZE > 1).

    An already initialised group (a caller's own) is used as it is and left alone by :func:`cleanup`."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = _rank_device(device, local)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        return DistContext(rank, world, local, dev, dist.get_backend(), owns_group=False)
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"WORLD_SIZE > 1 but {name} is not set: start distributed runs with torchrun")
    dev = _rank_device(device, local)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} under torchrun, but CUDA is not available")
        if torch.device(dev).index >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} wants {dev} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(torch.device(dev))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, dev, backend, owns_group=True)


def cleanup(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "cpu"):
    """``with session(device) as ctx:`` — :func:`setup`, and :func:`cleanup` on exit, also on an error."""
    ctx = setup(device)
    try:
        yield ctx
    finally:
        cleanup(ctx)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for ``rank``'s own random streams (noise, random starts), derived from the run seed with
    NumPy's SeedSequence so that different (seed, rank) pairs do not collide the way ``seed + rank`` does."""
    return int(np.random.SeedSequence([int(seed) % (2 ** 32), int(rank)]).generate_state(1)[0])


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device(ctx.device) if ctx.backend == "nccl" else torch.device("cpu")


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_module(module: nn.Module, ctx: DistContext, src: int = 0, params: bool = True,
                     buffers: bool = True) -> None:
    """Copy rank ``src``'s parameters and/or buffers to every rank (one flat broadcast per dtype)."""
    if not ctx.enabled:
        return
    tensors = ([p.data for p in module.parameters()] if params else []) + \
              ([b for b in module.buffers()] if buffers else [])
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in sorted(groups.items(), key=lambda kv: str(kv[0])):
        flat = torch.cat([t.reshape(-1) for t in ts]).to(_comm_device(ctx))
        dist.broadcast(flat, src)
        flat = flat.to(device)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def allreduce_gradients(params, ctx: DistContext) -> None:
    """Replace every ``p.grad`` by its mean over the ranks (a missing gradient counts as zero; it stays None
    only if no rank has one). One flat all-reduce per dtype plus one for the presence flags."""
    if not ctx.enabled:
        return
    params = [p for p in params if p.requires_grad]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_comm_device(ctx))
    dist.all_reduce(present)
    groups: dict = {}
    for p, has_grad in zip(params, present.tolist()):
        if has_grad > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault(p.grad.dtype, []).append(p)
    for dtype in sorted(groups, key=str):
        ps = groups[dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in ps]).to(_comm_device(ctx))
        dist.all_reduce(flat)
        flat.div_(ctx.world_size)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def reduce_sums(values: dict, ctx: DistContext) -> dict:
    """Sum each entry of ``values`` (floats; the same keys on every rank) over the ranks, in float64."""
    if not ctx.enabled:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t)
    out = dict(zip(keys, t.tolist()))
    return {k: out[k] for k in values}  # the caller's key order


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchSampler(Sampler):
    """This rank's share of the single-process batches: each batch of ``BatchSampler(RandomSampler(data,
    generator) or SequentialSampler(data), batch_size)`` (what ``DataLoader(shuffle=..., generator=...)``
    draws) split as ``batch[rank::world]``. Pass the same ``generator`` to the DataLoader too: a DataLoader
    draws its workers' base seed from it before the sampler runs, and so does the single-process loader."""

    def __init__(self, data_source, batch_size: int, rank: int, world_size: int, shuffle: bool,
                 generator: torch.Generator | None = None):
        inner = RandomSampler(data_source, generator=generator) if shuffle else SequentialSampler(data_source)
        self.batches = BatchSampler(inner, int(batch_size), drop_last=False)
        self.n, self.batch_size = len(data_source), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self):
        for batch in self.batches:
            local = batch[self.rank::self.world_size]
            yield local if local else batch[:1]  # placeholder example, weight 0

    def __len__(self) -> int:
        return len(self.batches)

    def global_count(self, j: int) -> int:
        return max(min(self.batch_size, self.n - j * self.batch_size), 0)

    def local_count(self, j: int) -> int:
        return len(range(self.rank, self.global_count(j), self.world_size))

    def loss_weight(self, j: int) -> float:
        """``N * n_r / n_global``: averaging the ranks' weighted mean losses gives the global-batch mean."""
        return self.world_size * self.local_count(j) / max(self.global_count(j), 1)


class GradientSync:
    """How the ranks' gradients are combined; see the module docstring. ``model_for_loss`` is what the loss
    function receives; ``module`` is always the plain model (for checkpoints, evaluation, the optimiser)."""

    MODES = ("auto", "ddp", "allreduce")

    def __init__(self, module: nn.Module, ctx: DistContext, method: str, mode: str = "auto"):
        if mode not in self.MODES:
            raise ConfigError(f"training_params:grad_sync must be one of {', '.join(self.MODES)}, got '{mode}'")
        self.module, self.ctx = module, ctx
        if not ctx.enabled:
            self.mode = "none"
        elif mode == "auto":
            self.mode = "ddp" if method in DDP_METHODS else "allreduce"
        else:
            self.mode = mode
        if self.mode == "ddp" and method not in DDP_METHODS:
            raise ConfigError(f"training_params:grad_sync=ddp supports the methods that run one forward and one "
                              f"backward per step ({', '.join(sorted(DDP_METHODS))}), not '{method}': use "
                              f"'allreduce' or 'auto'")
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            dev = torch.device(ctx.device)
            self.model_for_loss = DistributedDataParallel(
                module, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            if self.mode == "allreduce":
                broadcast_module(module, ctx)  # identical start (DDP does this in its constructor)
            self.model_for_loss = module

    def accumulate(self, last_microbatch: bool):
        """Context for one micro-batch's forward+backward: DDP skips its all-reduce except on the last."""
        if self.mode == "ddp" and not last_microbatch:
            return self.model_for_loss.no_sync()
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Call after the last micro-batch's backward, before clipping and the optimiser step."""
        if self.mode == "allreduce":
            allreduce_gradients(self.module.parameters(), self.ctx)

    def sync_buffers(self) -> None:
        """Rank 0's buffers everywhere (before evaluation and checkpoints)."""
        if self.mode in ("ddp", "allreduce"):
            broadcast_module(self.module, self.ctx, params=False, buffers=True)
