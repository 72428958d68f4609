"""Specifications and the IBP training loss."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["margin_spec", "robust_cross_entropy"]


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The margin specification ``C`` (B, K-1, K): row j is ``e_y - e_j`` for each class ``j != y``, so
    ``C z`` are the margins ``z_y - z_j`` and the label is verified when all their lower bounds are > 0
    (Gowal et al. 2018; the same matrix as auto_LiRPA's ``get_spec_matrix``)."""
    if y.dim() != 1:
        raise ValueError(f"margin_spec: y must be a (B,) tensor of labels, got shape {tuple(y.shape)}")
    if num_classes < 2:
        raise ValueError("margin_spec: num_classes must be >= 2")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"margin_spec: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)                      # (B, K, K): e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)  # (B, K)
    return C[keep].reshape(y.shape[0], num_classes - 1, num_classes)


def robust_cross_entropy(lb_margins: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the worst-case logits implied by lower bounds ``lb`` of the margins ``z_y - z_j``:
    ``CE(-[0, lb], 0) = log(1 + sum_j exp(-lb_j))`` (Gowal et al. 2018; Zhang et al. 2020, CROWN-IBP)."""
    if lb_margins.dim() != 2:
        raise ValueError(f"robust_cross_entropy: expects (B, K-1) margin lower bounds, got {tuple(lb_margins.shape)}")
    logits = torch.cat([lb_margins.new_zeros(lb_margins.shape[0], 1), -lb_margins], dim=1)
    loss = torch.logsumexp(logits, dim=1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"robust_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
