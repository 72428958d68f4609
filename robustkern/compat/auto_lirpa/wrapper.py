"""auto_LiRPA's model wrappers and operator registry: ``CrossEntropyWrapper`` (loss fusion),
``BoundDataParallel`` and ``register_custom_op``."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

__all__ = ["CrossEntropyWrapper", "CrossEntropyWrapperMultiInput", "BoundDataParallel", "register_custom_op",
           "unregister_custom_op", "LOSS_FUSION_ADVICE"]

LOSS_FUSION_ADVICE = ("use robustkern.bounds.crown_ibp_loss(bm, x, y, eps, loss_fusion=True) (or "
                      "fused_robust_ce_upper) on the model itself")


def _exp_margin_sum(z: Tensor, labels: Tensor) -> Tensor:
    return torch.exp(z - torch.gather(z, -1, labels.unsqueeze(-1))).sum(-1, keepdim=True)


class CrossEntropyWrapper(nn.Module):
    """``forward(x, labels) = sum_j exp(z_j - z_y)`` (B, 1) for ``z = model(x)``: the argument of the log in the
    cross-entropy, the module auto_LiRPA bounds for loss fusion. As a plain module it works; bounding it
    through the facade's ``BoundedModule`` is not supported (see ``LOSS_FUSION_ADVICE``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, labels):
        return _exp_margin_sum(self.model(x), labels)


class CrossEntropyWrapperMultiInput(nn.Module):
    """``CrossEntropyWrapper`` for a model of several inputs: ``forward(labels, *x)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, labels, *x):
        return _exp_margin_sum(self.model(*x), labels)


class BoundDataParallel(nn.Module):
    """auto_LiRPA's ``BoundDataParallel(bounded_module)``: calls go to the wrapped ``BoundedModule`` on its own
    device (``bdp(x)``, ``bdp(method_opt="compute_bounds", ...)``, ``bdp.compute_bounds(...)``); the batch is not
    split over several GPUs (a warning says so when more than one is visible). For several GPUs run one process
    per GPU (torch.distributed), as robustkern's command line does."""

    def __init__(self, module: nn.Module, device_ids=None, output_device=None, dim: int = 0, **kwargs):
        super().__init__()
        self.module = module
        if (device_ids is None or len(device_ids) > 1) and torch.cuda.is_available() and \
                torch.cuda.device_count() > 1:
            warnings.warn("BoundDataParallel: robustkern runs the whole batch on the module's device; use one "
                          "process per GPU (torch.distributed) to use several", stacklevel=2)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def compute_bounds(self, *args, **kwargs):
        return self.module.compute_bounds(*args, **kwargs)


def register_custom_op(op_name: str, bound_obj=None):
    """auto_LiRPA's registry of bound classes for custom operators: not supported."""
    raise NotImplementedError("register_custom_op: custom bound operators are not supported; robustkern.bounds "
                              "takes the layers listed in robustkern.bounds.graph (write the model with them)")


def unregister_custom_op(op_name: str):
    """See ``register_custom_op``."""
    raise NotImplementedError("unregister_custom_op: custom bound operators are not supported; robustkern.bounds "
                              "takes the layers listed in robustkern.bounds.graph")
