"""An optional ``torch.compile`` (inductor) forward for the certification loop of ``Smooth``.

The base classifier's private copy is compiled for inference with inductor's *freezing* (weights become
constants: convolution + batch-norm folding, oneDNN weight prepacking, convolution + ReLU / add post-op fusion)
and ``dynamic=False`` for the one full-batch shape of the loop; a partial last batch runs the eager copy
instead of triggering a recompilation. The compiled logits equal the eager ones up to float rounding (another
summation order, folded batch norm), so a vote can differ from eager only where two logits (nearly) tie.

Measured on a 1-thread AVX2 CPU (see benchmarks/bench_smoothing.py): for the DM-small CNN (``cifar_small``)
inductor's graph is the same two oneDNN convolutions and two MKL GEMMs the eager channels-last copy already runs,
so compiling gains nothing (7 s of compilation); for ``resnet110`` (batch norm, residual adds) it saves about
20 % of the forward after about 30 s of compilation. Hence ``compile="auto"`` compiles only once a ``Smooth`` has
enough work to amortise that: at least ``AUTO_MIN_SAMPLES`` noisy samples and ``AUTO_MIN_FORWARDS`` full
batches (counting the call about to run), on the CPU, for 4-D images with ``rng="philox"``.

Frozen weights do not follow later changes of the user's model: a snapshot of the user's parameters and
buffers is kept and compared at every call; on a change the compiled forward is dropped and rebuilt lazily.
If compiling (or a compiled call) fails, a warning is issued once and the eager forward is used from then on.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CompiledForward", "AUTO_MIN_SAMPLES", "AUTO_MIN_FORWARDS", "check_compile_option"]

AUTO_MIN_SAMPLES = 400_000      # four images at Cohen's n = 100,000
AUTO_MIN_FORWARDS = 100         # and at least this many full batches (tiny batches compile for nothing)
_OPTIONS = (True, False, "auto")


def check_compile_option(compile) -> object:
    if not any(compile is o or (isinstance(o, str) and compile == o) for o in _OPTIONS):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


class CompiledForward:
    """Holds the compiled copy (built lazily), its batch shape, and the fallback state."""

    def __init__(self, option):
        self.option = check_compile_option(option)
        self.failed = False
        self.compile_seconds: Optional[float] = None   # wall time of the last compilation (first call included)
        self.samples_done = 0
        self.forwards_done = 0
        self._fn = None
        self._shape = None
        self._snapshot: Optional[list] = None

    def wanted(self, batch: Tensor, rng: str, planned_samples: int, planned_forwards: int) -> bool:
        """Whether this call's full batches should use the compiled forward (and bookkeeping for "auto")."""
        self.samples_done += planned_samples
        self.forwards_done += planned_forwards
        if self.failed or self.option is False:
            return False
        if self.option is True:
            return True
        return (batch.device.type == "cpu" and rng == "philox" and batch.dim() == 4
                and self.samples_done >= AUTO_MIN_SAMPLES and self.forwards_done >= AUTO_MIN_FORWARDS)

    def drop_if_stale(self, user_model: torch.nn.Module) -> None:
        """Forget the compiled copy when the user's parameters / buffers changed since it was frozen."""
        if self._snapshot is None:
            return
        now = list(user_model.parameters()) + list(user_model.buffers())
        if len(now) != len(self._snapshot) or not all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().to(b.device), b)
                for a, b in zip(now, self._snapshot)):
            self._fn, self._shape, self._snapshot = None, None, None

    def __call__(self, model: torch.nn.Module, user_model: torch.nn.Module, batch: Tensor) -> Optional[Tensor]:
        """Logits of ``batch`` from the compiled copy of ``model`` (compiled on first use for this shape), or
        ``None`` when compilation failed (the caller then runs the eager model)."""
        if self.failed:
            return None
        shape = (tuple(batch.shape), batch.dtype, batch.device, batch.is_contiguous())
        try:
            # inductor reads `freezing` when it compiles, which happens lazily inside a call (also on a guard
            # failure), so every call runs under the patch (torch.compile(options=...) did not enable it)
            from torch._inductor import config as inductor_config

            with inductor_config.patch(freezing=True):
                return self._call(model, user_model, batch, shape)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
            self.failed, self._fn, self._snapshot = True, None, None
            warnings.warn(f"robustkern Smooth: torch.compile of the base classifier failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"running it eagerly", RuntimeWarning, stacklevel=4)
            return None

    def _call(self, model, user_model, batch, shape) -> Tensor:
        if self._fn is None or self._shape != shape:
            t0 = time.perf_counter()
            frozen = copy.deepcopy(model).eval()
            frozen(batch)           # eager once: fills lazily built caches (permuted Linear) so no guard fails later
            self._fn = torch.compile(frozen, dynamic=False)
            out = self._fn(batch)
            self.compile_seconds = time.perf_counter() - t0
            self._shape = shape
            self._snapshot = [t.detach().clone() for t in list(user_model.parameters()) + list(user_model.buffers())]
            return out
        return self._fn(batch)
