"""auto_LiRPA's ``BoundedTensor`` (a tensor carrying a perturbation) and ``BoundedParameter``."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["BoundedTensor", "BoundedParameter", "plain"]


class BoundedTensor(Tensor):
    """A tensor carrying a perturbation ``ptb``. Arithmetic on it gives plain tensors (the perturbation
    belongs to this input only); ``to``/``cuda``/``cpu`` and ``clone`` keep it a ``BoundedTensor`` with its
    perturbation (``to`` moves the perturbation's ``x_L``/``x_U``/``eps`` tensors too, in place, as
    auto_LiRPA does)."""

    @staticmethod
    def __new__(cls, x, ptb=None):
        x = torch.as_tensor(x)
        return Tensor._make_subclass(cls, x.detach() if not x.requires_grad else x, x.requires_grad)

    def __init__(self, x, ptb=None):
        self.ptb = ptb

    def __repr__(self) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return f"<BoundedTensor: {Tensor.__repr__(self)}, {self.ptb!r}>"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def _rewrap(self, t: Tensor) -> "BoundedTensor":
        return BoundedTensor(t, self.ptb)

    def to(self, *args, **kwargs):
        ptb = self.ptb
        for name in ("x_L", "x_U", "eps", "x0"):
            v = getattr(ptb, name, None)
            if isinstance(v, Tensor):
                setattr(ptb, name, v.to(*args, **kwargs))
        return self._rewrap(plain(self).to(*args, **kwargs))

    def cuda(self, device=None, non_blocking=False, **kwargs):
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return self.to(dev, non_blocking=non_blocking)

    def cpu(self):
        return self.to("cpu")

    def clone(self, *args, **kwargs):
        return BoundedTensor(plain(self).clone(*args, **kwargs), copy.deepcopy(self.ptb))


def plain(x):
    """``x`` as a plain tensor (a view of the same data without the perturbation)."""
    return x.as_subclass(Tensor) if isinstance(x, BoundedTensor) else x


class BoundedParameter(nn.Parameter):
    """auto_LiRPA's perturbed parameter (weight perturbation): not supported."""

    def __new__(cls, data=None, ptb=None, requires_grad=True):
        raise NotImplementedError("BoundedParameter: perturbed parameters are not supported by robustkern; keep "
                                  "nn.Parameter weights and perturb the input (BoundedTensor)")
