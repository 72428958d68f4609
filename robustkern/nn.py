"""Modules that robustkern's bound propagation understands beyond torch.nn's own."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Normalize"]


class Normalize(nn.Module):
    """Per-channel input normalisation ``y = (x - mean) / std`` (channel dim 1), as a layer.

    Put it first in a model so the model takes pixels in [0, 1]; then perturbation budgets are given in pixel
    units and bound propagation clips boxes to [0, 1] before normalising (Cohen et al.'s ``NormalizeLayer``
    plays the same role). Bound propagation treats it as the per-channel affine map ``scale = 1/std``,
    ``shift = -mean/std``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.shape != std_t.shape:
            raise ValueError(f"Normalize: mean has {mean_t.numel()} entries but std has {std_t.numel()}")
        if not bool((std_t > 0).all()):
            raise ValueError("Normalize: every std must be > 0")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def scale_shift(self):
        """The equivalent per-channel affine map ``(scale, shift)``."""
        return 1.0 / self.std, -self.mean / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
