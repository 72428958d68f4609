"""Where the op tests run the Triton kernels, and the (backend, device) pairs they are parametrized over.

tests/conftest.py turns Triton's interpreter on only when there is no CUDA device, and no test module may set
``TRITON_INTERPRET`` itself (tests/test_suite_devices.py checks both). So the Triton kernels run

* interpreted on the CPU when there is no GPU: ``TRITON_DEVICE == "cpu"``, tiny shapes;
* compiled on the GPU when there is one: ``TRITON_DEVICE == "cuda"`` (the pair ``("triton", "cuda")``, marked
  ``gpu``, id ``triton-cuda``; the interpreted pair ``("triton", "cpu")`` is absent there).

A test of such a pair builds its inputs on the CPU, moves them to the pair's device, computes the reference on
the CPU (float64 where the test says so) and compares on the CPU. Shapes may be larger on CUDA (``sized``).

Whole-model bound tests take the fixture ``bound_device`` (``bound_device_params``): the CPU, and CUDA with
``torch.backends.cudnn.benchmark`` off and on, TF32 disallowed (``cuda_settings``); ``Fp32GemmRecorder`` records
whether TF32 was allowed at each float32 matmul or convolution that reaches ATen.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from robustkern import _backend
from robustkern.kernels._config import is_interpreting
from robustkern.testing import backends_for

__all__ = ["CUDA", "TRITON_DEVICE", "backend_device_params", "device_params", "to", "sized", "GPU_BOUND_BACKENDS",
           "bound_device_params", "bound_backend_device_params", "bound_device", "cuda_settings", "tf32_allowed",
           "Fp32GemmRecorder"]

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if is_interpreting() else "cuda"


def _triton_on_cuda() -> bool:
    return CUDA and TRITON_DEVICE == "cuda" and _backend.available("triton", "cuda")


def backend_device_params(*names: str) -> list:
    """``pytest.param(backend, device)`` for the backends ``names`` (default: reference, cpp, triton) present
    here: the CPU backends on ``"cpu"`` (ids ``reference``, ``cpp``, ``triton``; the interpreted Triton one marked
    ``triton``), and, with a GPU and the interpreter off, ``("triton", "cuda")`` marked ``triton`` and ``gpu``."""
    names = names or ("reference", "cpp", "triton")
    params = [pytest.param(b, "cpu", marks=[pytest.mark.triton] if b == "triton" else [], id=b)
              for b in backends_for("cpu") if b in names]
    if "triton" in names and _triton_on_cuda():
        params.append(pytest.param("triton", "cuda", marks=[pytest.mark.triton, pytest.mark.gpu],
                                   id="triton-cuda"))
    return params


def device_params() -> list:
    """``"cpu"``, and ``"cuda"`` (marked ``gpu``) when a GPU is present: for tests of whole algorithms whose
    ops run the Triton kernels on CUDA (``auto`` picks Triton for CUDA tensors)."""
    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")] if CUDA else [])


def to(device, *tensors):
    """The tensors (``None`` and non-tensors passed through) on ``device``."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def sized(device, cpu, cuda):
    """``cpu`` on the CPU (the interpreter is slow: tiny shapes), ``cuda`` on the GPU."""
    return cpu if torch.device(device).type == "cpu" else cuda


# ------------------------------------------------------------------------------------------------ whole-model bounds
GPU_BOUND_BACKENDS = ("triton", "cuda", "reference")   # on CUDA; one that is not available there is skipped
CUDNN_BENCHMARK = (False, True)                       # cuDNN picks convolution algorithms by heuristics / by timing


def bound_device_params() -> list:
    """Values for the indirect fixture ``bound_device``: ``("cpu", None)``, and ``("cuda", benchmark)`` for each
    ``CUDNN_BENCHMARK``, marked ``gpu`` (collected everywhere, skipped without a GPU)."""
    return [pytest.param(("cpu", None), id="cpu")] + [
        pytest.param(("cuda", b), marks=pytest.mark.gpu, id=f"cuda-cudnn_benchmark_{b}") for b in CUDNN_BENCHMARK]


def bound_backend_device_params(cpu_backends) -> list:
    """``(backend, bound_device)`` params: each of ``cpu_backends`` on the CPU (id: the backend), and each of
    ``GPU_BOUND_BACKENDS`` on CUDA for each ``CUDNN_BENCHMARK``, marked ``gpu``."""
    return [pytest.param(b, ("cpu", None), id=b) for b in cpu_backends] + [
        pytest.param(b, ("cuda", bench), marks=pytest.mark.gpu, id=f"cuda-{b}-cudnn_benchmark_{bench}")
        for b in GPU_BOUND_BACKENDS for bench in CUDNN_BENCHMARK]


def skip_unavailable(backend: str, device: str) -> None:
    if not _backend.available(backend, device):
        pytest.skip(f"backend {backend!r} is not available for {device} tensors here")


def tf32_allowed() -> tuple[bool, bool]:
    """Whether float32 (cuBLAS matmuls, cuDNN convolutions) may use TF32 now. Read from the ``fp32_precision``
    settings (an op's own, else its backend's, else the global one; ``"none"`` defers), which the legacy
    ``allow_tf32`` flags also set; ``robustkern._backend.ieee_fp32`` sets the op-level ones to ``"ieee"``."""
    b = torch.backends

    def first(*levels):
        return next((p for p in levels if p != "none"), "none") == "tf32"

    return (first(b.cuda.matmul.fp32_precision, b.fp32_precision),
            first(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision))


@contextlib.contextmanager
def cuda_settings(cudnn_benchmark: bool, tf32: bool):
    """``torch.backends.cudnn.benchmark = cudnn_benchmark`` and the user's TF32 permission set with the flags
    users set (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``); everything
    restored after. Global settings: this runs on the CPU too."""
    b = torch.backends
    knobs = (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn)
    saved = (b.cudnn.benchmark, [k.fp32_precision for k in knobs])
    b.cudnn.benchmark = cudnn_benchmark
    b.cuda.matmul.allow_tf32 = tf32
    b.cudnn.allow_tf32 = tf32
    assert tf32_allowed() == (tf32, tf32)
    try:
        yield
    finally:
        b.cudnn.benchmark = saved[0]
        for k, v in zip(knobs, saved[1]):
            k.fp32_precision = v


@pytest.fixture
def bound_device(request):
    """The device of a whole-model bound test (indirect values from ``bound_device_params``). On CUDA: cuDNN's
    algorithm choice as the param says and TF32 disallowed by the user's flags, which the bound computations must
    leave as they are (checked after the test)."""
    device, cudnn_benchmark = request.param
    if device == "cpu":
        yield "cpu"
        return
    with cuda_settings(cudnn_benchmark, tf32=False):
        yield "cuda"
        assert tf32_allowed() == (False, False), "a bound computation changed the user's TF32 flags"
        assert torch.backends.cudnn.benchmark == cudnn_benchmark


_GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "convolution", "_convolution",
                    "convolution_backward", "cudnn_convolution", "cudnn_convolution_transpose"})


class Fp32GemmRecorder(TorchDispatchMode):
    """While active, records each matmul or convolution with a float32 tensor on ``device_type`` that reaches
    ATen, as ``(op name, whether TF32 was allowed for it at that moment)``. A robustkern op is one call: what
    runs inside it (a Triton kernel, the C++ kernels, the reference under ``ieee_fp32``) is not seen."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.calls: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _GEMMS and any(isinstance(t, torch.Tensor) and t.dtype == torch.float32
                                  and t.device.type == self.device_type for t in pytree.tree_leaves((args, kwargs))):
            matmul, conv = tf32_allowed()
            self.calls.append((str(func), conv if "conv" in name else matmul))
        return func(*args, **kwargs)

    def with_tf32(self) -> list[str]:
        return [name for name, tf32 in self.calls if tf32]
