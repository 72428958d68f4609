"""The one place that decides which implementation of an op runs.

Backends: ``triton`` (the Triton kernels in ``robustkern.kernels``; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` for testing), ``cpp`` (the compiled CPU kernels of ``robustkern._C``), ``cuda`` (the
compiled CUDA kernels of ``robustkern._C``) and ``reference`` (``robustkern.reference``: pure PyTorch).

Choice: ``ROBUSTKERN_BACKEND=auto|triton|cpp|cuda|reference`` (read at call time) or the
``use_backend(name)`` context manager, which takes precedence. ``auto`` picks, for CUDA tensors, triton, else
cuda, else reference; for CPU tensors, cpp, else reference. ``auto`` never picks the Triton interpreter: it
is three orders of magnitude slower than the compiled CPU kernels and exists for tests. An explicitly
requested backend that cannot run raises ``BackendUnavailable``; an automatically chosen one falls back. The
error names where the request came from (``ROBUSTKERN_BACKEND=...`` or ``use_backend``), why the backend
cannot run, and what to do; an unknown ``ROBUSTKERN_BACKEND`` value raises ``BackendUnavailable`` listing the
valid ones (an unknown name passed to ``use_backend`` is a ``ValueError``).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "BackendUnavailable", "use_backend", "requested_backend", "select", "available",
           "ieee_fp32"]

BACKENDS = ("auto", "triton", "cpp", "cuda", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("robustkern_backend", default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on the given device."""


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown robustkern backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend ``name`` (one of ``BACKENDS``)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


_ENV = "ROBUSTKERN_BACKEND"
_ENV_KEY = os.environ.encodekey(_ENV) if hasattr(os.environ, "encodekey") else _ENV   # the key as os.environ stores it
_env_parsed: tuple = (None, "auto")   # (raw ROBUSTKERN_BACKEND as the environment holds it, parsed), re-parsed on change


# The mapping's own store, which os.environ's setters keep in step with the process environment: a dictionary
# lookup per call, where os.environ.get encodes the key and decodes the value (about 1 us, paid by every op call).
_ENV_STORE = getattr(os.environ, "_data", None)


def requested_backend() -> str:
    """The backend asked for by ``use_backend`` or ``ROBUSTKERN_BACKEND`` (default ``auto``)."""
    global _env_parsed
    name = _override.get()
    if name is not None:
        return name
    raw_value = _ENV_STORE.get(_ENV_KEY) if _ENV_STORE is not None else os.environ.get(_ENV)   # read per call
    if raw_value == _env_parsed[0]:
        return _env_parsed[1]
    value = os.environ.get(_ENV)
    raw = value or "auto"
    try:
        parsed = _check_name(raw)
    except ValueError:
        raise BackendUnavailable(f"ROBUSTKERN_BACKEND={raw} is not a backend; set it to one of "
                                 f"{', '.join(BACKENDS)}, or unset it") from None
    _env_parsed = (raw_value, parsed)
    return parsed


def _requested_by() -> str:
    if _override.get() is not None:
        return f"use_backend({_override.get()!r})"
    return f"ROBUSTKERN_BACKEND={os.environ.get(_ENV, '')}"


def _triton_interpreting() -> bool:
    from .kernels._config import is_interpreting
    return is_interpreting()


ALL_KERNELS = ("triton", "cpp", "cuda")


def _why_not(backend: str, device_type: str, op: str | None = None, kernels=ALL_KERNELS) -> str | None:
    """None if ``backend`` can run an op (the op named ``op`` with kernels of the kinds in ``kernels``, when
    given) on ``device_type``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend not in kernels:
        return f"{op or 'the op'} has no {backend} kernel"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device_type == "cpu" and not _triton_interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
        return None
    from . import _ext

    if not _ext.load():
        return f"the compiled extension is not available ({_ext.status()})"
    if op is not None and not hasattr(torch.ops.robustkern, op):   # an extension built before the op existed
        return f"the compiled extension has no {op} kernel (an older build: rebuild it)"
    if backend == "cpp":
        return None if device_type == "cpu" else f"the cpp backend runs CPU tensors, not {device_type}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device_type}"
        return None if _ext.has_cuda_kernels() else "robustkern._C was built without CUDA kernels"
    raise AssertionError(backend)


def available(backend: str, device_type: str = "cpu", op: str | None = None, kernels=ALL_KERNELS) -> bool:
    """Whether ``backend`` can run ops (the op named ``op``, with kernels of the kinds in ``kernels``) on tensors
    of ``device_type``."""
    return _why_not(_check_name(backend), device_type, op, kernels) is None


def select(device: torch.device | str, op: str | None = None, kernels=ALL_KERNELS) -> str:
    """The backend that runs an op (named ``op``, implemented by the kernel kinds in ``kernels`` besides the
    reference) on tensors living on ``device``."""
    device_type = torch.device(device).type
    name = requested_backend()
    if name != "auto":
        reason = _why_not(name, device_type, op, kernels)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} was requested ({_requested_by()}) but cannot run here: "
                                     f"{reason}; request another backend, or 'auto' to let robustkern choose")
        return name
    order = ("triton", "cuda", "reference") if device_type == "cuda" else ("cpp", "reference")
    for candidate in order:
        if _why_not(candidate, device_type, op, kernels) is None:
            return candidate
    return "reference"


def ieee_fp32():
    """IEEE float32 products (no TF32, no bf16) and autocast off inside bound computations, the user's settings
    restored after: ``robustkern._numerics.ieee_products``."""
    from ._numerics import ieee_products
    return ieee_products()
