"""The op floor: one table of robustkern's ops, and the one place that chooses and runs their implementations.

Every op is an ``Op`` here (one per name, each family module under ``robustkern/ops/`` registers its own): its
pure-PyTorch reference (``robustkern.reference``), its Triton kernel (``robustkern.kernels``), whether it has
C++ kernels (``robustkern._C``, schema in ``csrc/ops.cpp``), the rule for when a backend cannot serve a call
(shapes, dtypes, a double backward), and its autograd formula (``setup_context`` + ``backward``, whose backward
passes are ops of this table again, so double backward works). ``robustkern/ops/README.md`` lists the places to
touch to add one.

Calling an op (``op(*args)``, after the public function in the family module has checked its arguments once):

1. the backend: ``robustkern._backend.select`` for the device (``ROBUSTKERN_BACKEND`` / ``use_backend``, read
   per call from the context and ``os.environ``'s own store; an explicitly requested backend that is absent
   raises; the choice is cached per device type and request), then the op's ``serves`` rule: a backend that
   cannot serve these arguments hands the call to the reference, without an error (an optimisation never
   changes what works);
2. a *native* op (``Op.native_autograd``: a C++ op that declares which tensors its formula ``keeps``; the
   extension's Autograd kernel, ``csrc/autograd.cpp``, is attached to it when the extension loads) served by its
   C++ kernel is called on the dispatcher op as it is: the Autograd kernel runs the kernel below autograd and,
   when a gradient is to be recorded, records a C++ node that keeps the declared tensors and whose backward runs
   the op's own ``setup_context`` and ``backward`` (``run_saved_backward``); no Python pass over the arguments,
   no Python node (``benchmarks/bench_dispatch.py``: the whole floor, checks included, under 10 us per call on the CPU
   with a gradient recorded);
3. otherwise, without a gradient to record, the implementation runs directly: the C++ kernel below the autograd
   layer, the Triton launcher or the reference; an ``ieee`` op's reference and Triton run inside
   ``ieee_products``, its compiled kernels hold their own scope;
4. with one, through ``_OpFunction``, a Python ``autograd.Function`` that runs the same implementation and
   applies the same formula: the same gradients on every backend, one formula per op;
5. under ``torch.compile`` (and for tensor subclasses) the dispatcher op ``torch.ops.robustkern.<name>`` is
   called instead, with its fake kernel and, for an op that is not native, its autograd registered from this
   table (``register_dispatcher``).

Ops without C++ kernels are defined here from their ``schema``, with CPU and CUDA kernels that run the chosen
implementation, so ``torch.ops.robustkern.<name>``, ``opcheck`` and ``torch.compile`` treat every op alike.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _backend, _ext
from .._numerics import ieee_products, ieee_products_held

__all__ = ["Op", "define_op", "triton_kernel", "register", "OPS", "load", "register_dispatcher", "fresh", "cpu_options"]

OPS: dict[str, "Op"] = {}
_LIB = torch.library.Library("robustkern", "FRAGMENT")   # the ops without C++ kernels are defined in it
_below_autograd = torch._C._AutoDispatchBelowAutograd
_COMPILED = ("cpp", "cuda")


def fresh(outs, inputs):
    """Outputs that alias an input, or each other, copied: an op's outputs are new tensors. (Storages are told
    apart by their identity, which fake tensors under ``torch.compile`` tracing have too.)"""
    single = isinstance(outs, Tensor)
    outs = (outs,) if single else tuple(outs)
    seen = {t.untyped_storage()._cdata for t in inputs if isinstance(t, Tensor) and t.numel()}
    result = []
    for o in outs:
        if isinstance(o, Tensor) and o.numel():
            key = o.untyped_storage()._cdata
            if key in seen:
                o = o.clone()
                key = o.untyped_storage()._cdata
            seen.add(key)
        result.append(o)
    return result[0] if single else tuple(result)


class Op:
    """One op of the table (see the module docstring). ``reference``: the pure-PyTorch implementation
    (float64-capable, the ground truth). ``triton``: the Triton launcher or None. ``cpp``/``cuda``: the op has C++
    kernels for CPU / CUDA tensors in ``robustkern._C``. ``schema``: the op's schema when it has no C++ kernel
    (for C++ ops it is in ``csrc/ops.cpp``). ``serves(backend, args)``: None, or why ``backend`` cannot serve
    ``args`` (the reference runs instead). ``prepare(backend, args)``: the arguments a backend is called with, when
    they depend on it. ``fake``, ``setup_context``, ``backward``: the meta kernel and the autograd formula
    (``backward`` None: the op has no derivative). ``public``: an explicitly requested backend the op lacks raises
    ``BackendUnavailable``; for an internal op (a backward pass) the reference runs instead. ``ieee``: every
    implementation runs with IEEE float32 products and autocast off, which the rounding-error bounds of the bound
    ops assume, whatever the user's precision settings: the reference and Triton inside
    ``robustkern._numerics.ieee_products``, the C++/CUDA kernels inside their own ``IeeeFp32Scope``
    (``csrc/include/robustkern/ieee_fp32.h``, which also excludes autocast), or with no ATen products at all.
    ``composite``: the op has one implementation (``reference``), built from ATen and other ops of the table,
    which choose their own backends; it runs whatever backend is requested. ``keeps``: for a C++ op with a
    derivative, ``(argument positions, output indices)`` of the tensors its ``setup_context`` saves or reads
    beyond their shape, dtype and device: the extension then records the op's gradient in a C++ node
    (``csrc/autograd.cpp``) that keeps only these until backward (the formula gets same-shaped stand-ins for the
    others) and runs ``setup_context`` and ``backward`` there. Not for a formula that saves tensors it computes
    (those must be made in the forward, by the Python node)."""

    def __init__(self, name: str, *, reference: Callable, triton: Optional[Callable] = None, cpp: bool = False,
                 cuda: bool = False, schema: Optional[str] = None, fake: Optional[Callable] = None,
                 setup_context: Optional[Callable] = None, backward: Optional[Callable] = None,
                 serves: Optional[Callable] = None, prepare: Optional[Callable] = None, public: bool = True,
                 ieee: bool = False, composite: bool = False,
                 keeps: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None):
        self.compiled = cpp or cuda
        if self.compiled == (schema is not None):
            raise ValueError(f"op {name}: give a schema exactly when the op has no C++ kernels")
        self.name = name
        self.qualname = f"robustkern::{name}"
        self.reference, self.triton, self.schema, self.public, self.ieee = reference, triton, schema, public, ieee
        self.composite = composite
        self.kernels = tuple(k for k, has in (("triton", triton is not None), ("cpp", cpp), ("cuda", cuda)) if has)
        self.fake, self.setup_context, self.backward = fake, setup_context, backward
        self.serves, self.prepare = serves, prepare
        if keeps is not None and (not self.compiled or backward is None or prepare is not None):
            raise ValueError(f"op {name}: only a C++ op with a derivative and no prepare rule records a C++ node")
        self.keeps = keeps
        self._kernel = None                    # torch.ops.robustkern.<name>.default, once the extension is loaded
        self.native_autograd = False           # the extension holds its Autograd kernel (csrc/autograd.cpp)
        self._dispatch = None                  # then: the dispatcher op's C++ callable
        self._choice: dict = {}               # (device type, requested backend) -> (backend, implementation)

    # ------------------------------------------------------------------------------------------ choice
    def backend(self, device: torch.device) -> str:
        """The backend that runs this op's calls on ``device`` (before the ``serves`` rule)."""
        return self._chosen(device.type)[0]

    def _chosen(self, device_type: str) -> tuple[str, Callable]:
        """(backend, implementation) for ``device_type`` and the requested backend, chosen once per pair."""
        key = (device_type, _backend.requested_backend())
        choice = self._choice.get(key)
        if choice is None:
            if self.composite:
                name = "reference"
            else:
                try:
                    name = _backend.select(device_type, op=self.name, kernels=self.kernels)
                except _backend.BackendUnavailable:
                    if self.public:
                        raise
                    name = "reference"
            choice = self._choice[key] = (name, self.implementation(name))
        return choice

    def implementation(self, backend: str) -> Callable:
        if backend == "reference":
            return self.reference
        if backend == "triton":
            return self.triton
        if self._kernel is None:
            load()
            self._kernel = getattr(torch.ops.robustkern, self.name).default
        return self._kernel

    def _choose(self, args, tensor: Optional[Tensor] = None) -> tuple[str, Callable]:
        """(backend, implementation) for a call with ``args`` (on the device of ``tensor``, else of the first
        tensor argument), after the ``serves`` rule."""
        if tensor is None:
            tensor = _first_tensor(args)
        backend, impl = self._chosen("cpu" if tensor.is_cpu else tensor.device.type)
        if self.serves is not None and backend != "reference" and self.serves(backend, args) is not None:
            return "reference", self.reference
        return backend, impl

    def dispatcher(self):
        """``torch.ops.robustkern.<name>``, with the table's fake kernel and autograd attached."""
        if self.compiled:
            load()
        return getattr(torch.ops.robustkern, self.name)

    def run_implementation(self, backend: str, impl: Callable, args):
        """One call of ``impl`` (no autograd recorded), its outputs new tensors."""
        if self.prepare is not None:
            args = self.prepare(backend, args)
        if self.ieee and backend not in _COMPILED:     # compiled kernels hold their own IEEE scope
            device_type = _device_type(args)
            if not ieee_products_held(device_type):
                with ieee_products(device_type):
                    return self._run(backend, impl, args)
        return self._run(backend, impl, args)

    @staticmethod
    def _run(backend, impl, args):
        if backend in _COMPILED:
            with _below_autograd():
                return impl(*args)
        return fresh(impl(*args), args)

    # ------------------------------------------------------------------------------------------ call
    def __call__(self, *args):
        if _is_compiling() or _dispatch_stack_depth():
            return self.dispatcher()(*args)     # traced: the opaque op
        if self.native_autograd and not _functorch_active():
            first = args[0]                     # a native op's first argument is a tensor
            backend, impl = self._chosen("cpu" if first.is_cpu else first.device.type)
            if backend in _COMPILED and (self.serves is None or self.serves(backend, args) is None):
                return self._dispatch(*args)    # the dispatcher: tensor subclasses, a C++ node when one is due
        first, record = None, False
        grad = self.backward is not None and _grad_enabled()
        for a in args:                          # one pass: tensor subclasses, the device, a gradient to record
            if isinstance(a, Tensor):
                if type(a) not in _PLAIN:       # a tracing wrapper (fake / functional / proxy tensor)
                    return self.dispatcher()(*args)
                if first is None:
                    first = a
                if grad and not record:
                    record = a.requires_grad
        backend, impl = self._choose(args, first)
        if self.native_autograd and backend in _COMPILED and not _functorch_active():
            return self._dispatch(*args)        # the extension was loaded by this choice
        if record:
            if _functorch_active():
                return _OpFunction.apply(self, backend, impl, *args)
            return _apply_plain(self, backend, impl, *args)
        return self.run_implementation(backend, impl, args)

    def __repr__(self) -> str:
        return f"Op({self.qualname}: {', '.join(('reference',) + self.kernels)})"


_PLAIN = (Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active


def _first_tensor(args) -> Tensor:
    for a in args:
        if isinstance(a, Tensor):
            return a
    raise TypeError("an op takes at least one tensor")


def _device_type(args) -> str:
    return _first_tensor(args).device.type


class _CtxView:
    """The autograd context as an op's backward formula sees it: its inputs start after ``_OpFunction``'s own three
    (``needs_input_grad`` is shifted; the setup functions get the context itself and do not read it)."""

    __slots__ = ("_ctx",)
    _SKIP = 3

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)

    @property
    def needs_input_grad(self):
        return self._ctx.needs_input_grad[self._SKIP:]

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


class _OpFunction(torch.autograd.Function):
    """Runs an op's chosen implementation and applies the op's own autograd formula."""

    @staticmethod
    def forward(ctx, op: Op, backend: str, impl: Callable, *args):
        out = op.run_implementation(backend, impl, args)
        ctx.op = op
        op.setup_context(ctx, args, out)    # the formulas' setup reads no needs_input_grad: no view needed
        return out

    @staticmethod
    def backward(ctx, *grads):
        g = ctx.op.backward(_CtxView(ctx), *grads)
        return (None, None, None) + (tuple(g) if isinstance(g, (tuple, list)) else (g,))


# ``_OpFunction.apply`` without ``Function.apply``'s Python preamble, which only unwraps functorch wrappers (none
# reach it outside functorch transforms: other tensor subclasses go to the dispatcher) and binds defaults of a
# ``setup_context``-style forward (not used here): the autograd node is the same. None where torch lacks it.
try:
    _apply_plain = super(torch.autograd.Function, _OpFunction).apply
except AttributeError:  # pragma: no cover - a torch without the C apply
    _apply_plain = _OpFunction.apply


class _SavedContext:
    """The context an op's formula sees in the backward of a node recorded by the extension's Autograd kernel
    (``csrc/autograd.cpp``): ``setup_context`` fills it from the saved arguments and outputs, then ``backward``
    reads it, as on a ``torch.autograd.Function``'s context."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = bool(value)

    def mark_non_differentiable(self, *tensors):
        raise RuntimeError("an op whose outputs are not all differentiable cannot use the extension's Autograd "
                           "kernel: do not declare `keeps` for it in the op table")


def run_saved_backward(qualname: str, args: tuple, outputs: tuple, grads: tuple, needs_input_grad: tuple):
    """The backward of a node recorded by the extension's Autograd kernel (``csrc/autograd.cpp``, which calls
    this): the op's own ``setup_context`` on its saved arguments and outputs (the tensors unpacked and
    version-checked), then its ``backward``; one gradient (or None) per argument. The same formula, with the same
    context, as ``_OpFunction`` and ``torch.library.register_autograd`` run."""
    op = OPS[qualname.split("::", 1)[1]]
    ctx = _SavedContext(needs_input_grad)
    op.setup_context(ctx, args, outputs[0] if len(outputs) == 1 else outputs)
    if ctx.materialize_grads:
        grads = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs))
    g = op.backward(ctx, *grads)
    return tuple(g) if isinstance(g, (tuple, list)) else (g,)


def triton_kernel(family: str, name: str) -> Callable:
    """The Triton launcher ``robustkern.kernels.<family>.<name>``, imported on first call (triton is optional,
    and importing the kernels touches no device)."""
    def launch(*args):
        module = importlib.import_module(f"robustkern.kernels.{family}")
        return getattr(module, name)(*args)
    launch.__name__ = name
    return launch


def define_op(name: str, **kw) -> Op:
    """``register(Op(name, **kw))``: how the family modules add their ops to the table."""
    return register(Op(name, **kw))


def register(op: Op) -> Op:
    """Add ``op`` to the table; an op without C++ kernels is defined in ``robustkern::`` now."""
    if op.name in OPS:
        raise ValueError(f"op {op.qualname} is registered twice")
    OPS[op.name] = op
    if op.schema is not None:
        _LIB.define(op.schema)
        for key in ("CPU", "CUDA"):
            _LIB.impl(op.name, _router(op), key)
        _attach(op)
    return op


def _router(op: Op):
    def kernel(*args):
        backend, impl = op._choose(args)
        return op.run_implementation(backend, impl, args)
    return kernel


def _attach(op: Op) -> None:
    if op.fake is not None:
        torch.library.register_fake(op.qualname, op.fake, lib=_LIB)
    if op.backward is None:
        return
    if op.keeps is not None:                  # a C++ op: attached once the extension is loaded
        attach = getattr(torch.ops.robustkern, "attach_formula_node", None)
        if attach is not None:   # absent from a stale build of the extension: the Python node below
            attach(op.name, list(op.keeps[0]), list(op.keeps[1]))
            op.native_autograd = True         # the extension's kernel (csrc/autograd.cpp) runs this formula
            kernel = getattr(torch.ops.robustkern, op.name).default
            op._dispatch = getattr(kernel, "_op", kernel)   # the C++ callable, without OpOverload's Python frame
            return
    torch.library.register_autograd(op.qualname, op.backward, setup_context=op.setup_context, lib=_LIB)


_REGISTERED: list[bool] = []


def load() -> bool:
    """Load the compiled kernels (``robustkern._ext``) and attach the fake kernels and autograd formulas of the
    table to their dispatcher ops (once). True when the C++ kernels are there."""
    ok = _ext.load()
    if ok and not _REGISTERED:
        _REGISTERED.append(True)
        register_dispatcher()
    return ok


def register_dispatcher() -> None:
    """Fake kernels and autograd formulas of the C++ ops (defined by ``robustkern._C``), and, on devices where
    an op has no C++ kernel, a kernel that runs the op's chosen implementation (Triton or the reference)."""
    for op in OPS.values():
        if not op.compiled:
            continue
        _attach(op)
        for key, kind in (("CPU", "cpp"), ("CUDA", "cuda")):
            if kind not in op.kernels or (kind == "cuda" and not _ext.has_cuda_kernels()):
                _LIB.impl(op.name, _router(op), key)


def cpu_options(*, portable_simd: Optional[bool] = None, huge_pages: Optional[bool] = None) -> tuple[bool, bool]:
    """Set the process-wide options of the C++ CPU kernels that are given, and return the values before:
    ``(portable_simd, huge_pages)``. ``portable_simd``: run the portable code paths instead of the AVX2 ones
    (for comparing the two). ``huge_pages``: advise transparent huge pages for kernel outputs of 8 MB or more
    (on by default: fresh large outputs are then not faulted in 4 KB at a time; ``csrc/include/robustkern/
    alloc.h``). Returns ``(False, False)`` and changes nothing when the compiled kernels are absent."""
    if not load():
        return False, False
    return tuple(torch.ops.robustkern.cpu_options(portable_simd, huge_pages))
