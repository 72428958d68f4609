"""Keys for caches of captured CUDA graphs (``torch.cuda.CUDAGraph``), shared by the algorithms that replay them
(``robustkern.attacks.pgd``, ``robustkern.smoothing.Smooth``)."""
from __future__ import annotations

import torch

__all__ = ["storage_key"]


def storage_key(module: torch.nn.Module) -> tuple:
    """Where every parameter and buffer of ``module`` lives (address, dtype, shape). A captured CUDA graph reads
    the addresses it was captured with, so a cache of graphs keys on this: in-place updates (an optimiser step,
    ``load_state_dict``) keep the key, a module moved or re-created by ``.to()``/``.half()`` changes it."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*module.parameters(), *module.buffers()))
