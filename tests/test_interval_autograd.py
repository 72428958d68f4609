"""Autograd of the interval ops on the compiled backend: the C++ node of ``csrc/autograd.cpp`` runs the one
backward formula of ``robustkern/ops/interval.py`` and gives, on every op, output and epilogue, the gradients the
reference backend (the same formula in a Python ``autograd.Function``) gives; double backward, torch.compile,
version checks of the saved tensors and freeing the graph after a backward behave as on a Python node."""
import pytest
import torch

from robustkern import _ext, ops, use_backend
from robustkern.ops import OPS
from robustkern.testing import tolerance

if not ops.load():
    pytest.skip(f"compiled extension unavailable: {_ext.status()}", allow_module_level=True)

INTERVAL_OPS = ("interval_linear", "interval_conv2d", "interval_affine", "interval_input_box")
DT = torch.float64


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _cases():
    """(name, fn, leaves): calls of every interval op, with and without epilogues, the pre-epilogue box returned
    and used, and the per-example weights and bias of a folded specification."""
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    rp = lambda *s: torch.rand(*s, generator=g, dtype=DT).add(0.1)  # noqa: E731
    cases = []
    for epi in ({}, {"relu": True}, {"scale": rn(4), "shift": rn(4), "relu": True}):
        args = [rn(3, 5), rp(3, 5), rn(4, 5), rn(4)] + [v for v in epi.values() if torch.is_tensor(v)]
        relu = epi.get("relu", False)

        def lin(m, r, w, b, scale=None, shift=None, relu=relu):
            m2, r2, pre = ops.interval_linear(m, r, w, b, scale=scale, shift=shift, relu=relu, return_pre=True)
            return (m2, r2) + (pre if pre is not None else ())
        cases.append((f"linear {sorted(epi)}", lin, args))
    cases.append(("linear per-example", lambda m, r, w, b: ops.interval_linear(m, r, w, b),
                  [rn(2, 5), rp(2, 5), rn(2, 3, 5), rn(2, 3)]))
    cases.append(("conv2d affine+relu",
                  lambda m, r, w, b, s, t: ops.interval_conv2d(m, r, w, b, 2, 1, scale=s, shift=t, relu=True,
                                                               return_pre=True)[:2],
                  [rn(2, 2, 5, 4), rp(2, 2, 5, 4), rn(3, 2, 3, 3), rn(3), rn(3), rn(3)]))
    cases.append(("conv2d plain", lambda m, r, w: ops.interval_conv2d(m, r, w, None, 1, 0, 1, 1),
                  [rn(1, 2, 4, 4), rp(1, 2, 4, 4), rn(2, 2, 2, 2)]))
    cases.append(("affine", lambda m, r, s, t: ops.interval_affine(m, r, s, t, relu=True),
                  [rn(2, 3, 2), rp(2, 3, 2), rn(3), rn(3)]))
    cases.append(("input box", lambda x, e: ops.interval_input_box(x, e, 0.0, 1.0),
                  [torch.rand(2, 5, generator=g, dtype=DT), torch.full((2,), 0.2, dtype=DT)]))
    return cases


def _grads(backend, fn, args, pick=None):
    leaves = [_leaf(a) for a in args]
    with use_backend(backend):
        out = fn(*leaves)
    out = tuple(out)
    used = [o for i, o in enumerate(out) if pick is None or i in pick]
    weights = [torch.linspace(-1, 2, o.numel(), dtype=DT).reshape(o.shape) for o in used]
    loss = sum((o * w).sum() for o, w in zip(used, weights))
    return out, torch.autograd.grad(loss, leaves, allow_unused=True)


def test_the_compiled_interval_ops_record_a_cpp_node_that_runs_the_python_formula():
    """With the compiled backend the recorded node is the extension's (no Python autograd.Function, no
    torch.library autograd registered beside it); the formula stays the op's one Python formula."""
    for name in INTERVAL_OPS:
        assert OPS[name].native_autograd, name
    m, r = _leaf(torch.randn(2, 3)), torch.rand(2, 3)
    with use_backend("cpp"):
        out = ops.interval_affine(m, r, relu=True)
    assert out[0].grad_fn is not None
    assert not isinstance(out[0].grad_fn, torch.autograd.function.BackwardCFunction)
    with use_backend("reference"):
        ref = ops.interval_affine(m, r, relu=True)
    assert isinstance(ref[0].grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("name,fn,args", _cases(), ids=[c[0] for c in _cases()])
def test_cpp_node_gives_the_reference_backends_gradients(name, fn, args):
    """Every argument's gradient (including scale, shift, the per-example bias, eps) equals the reference
    backend's, with the sound outputs, with all outputs used and with only the radius used (absent output
    gradients arrive as None, as the formula asks)."""
    for pick in (None, (1,)):
        out_c, got = _grads("cpp", fn, args, pick)
        out_r, want = _grads("reference", fn, args, pick)
        assert len(out_c) == len(out_r)
        for g, h in zip(got, want):
            assert (g is None) == (h is None), name
            if g is not None:
                torch.testing.assert_close(g, h, **tolerance(DT))


def test_double_backward_through_the_cpp_node_matches_the_reference():
    """A gradient of an input gradient (as flatness regularisers take it) through linear and conv nodes."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 5, 5, generator=g, dtype=DT)
    cw, w = torch.randn(3, 2, 3, 3, generator=g, dtype=DT), torch.randn(4, 12, generator=g, dtype=DT)

    def second(backend):
        xl, cwl, wl = _leaf(x), _leaf(cw), _leaf(w)
        with use_backend(backend):
            m, r = ops.interval_input_box(xl, torch.full((2,), 0.05, dtype=DT))
            m, r = ops.interval_conv2d(m, r, cwl, None, 2, 0, relu=True)
            m, r = ops.interval_linear(m.flatten(1), r.flatten(1), wl, None)
        (gx,) = torch.autograd.grad((m + r).square().sum(), xl, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (cwl, wl))

    for a, b in zip(second("cpp"), second("reference")):
        torch.testing.assert_close(a, b, **tolerance(DT))


def test_saved_tensors_are_version_checked_and_freed_after_backward():
    m, r, w = _leaf(torch.randn(2, 3)), torch.rand(2, 3), torch.randn(4, 3)
    with use_backend("cpp"):
        out = ops.interval_linear(m, r, w, None)
    r.add_(1.0)  # a saved input modified in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out[1].sum().backward()
    with use_backend("cpp"):
        out = ops.interval_linear(m, torch.rand(2, 3), w, None)
    out[0].sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out[0].sum().backward()


def test_torch_compile_gives_eager_gradients():
    """The dispatcher op under torch.compile (AOTAutograd traces the C++ node and the formula it runs)."""
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(3, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g))

    def f(x, w, b):
        m, r = ops.interval_input_box(x, 0.1, -10.0, 10.0)
        m, r = ops.interval_linear(m, r, w, b, relu=True)
        return (m + r).sum()

    def grads(fn):
        leaves = [_leaf(t) for t in (x, w, b)]
        with use_backend("cpp"):
            fn(*leaves).backward()
        return [t.grad for t in leaves]

    torch._dynamo.reset()
    for a, e in zip(grads(torch.compile(f, backend="aot_eager", fullgraph=True)), grads(f)):
        torch.testing.assert_close(a, e, **tolerance(torch.float32))


def test_only_the_needed_gradients_are_computed_and_match():
    """Some arguments require grad, others not (and optional ones are None): the node maps the needed-gradient
    flags back to the op's argument positions; the gradients equal the reference backend's."""
    g = torch.Generator().manual_seed(3)
    mid, rad = torch.randn(3, 5, generator=g, dtype=DT), torch.rand(3, 5, generator=g, dtype=DT)
    w, scale = torch.randn(4, 5, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)

    def grads(backend):
        wl, sl = _leaf(w), _leaf(scale)
        with use_backend(backend):
            m, r = ops.interval_linear(mid, rad, wl, None, scale=sl, relu=True)
        return torch.autograd.grad((m * 2 + r).sum(), (wl, sl))

    for a, b in zip(grads("cpp"), grads("reference")):
        torch.testing.assert_close(a, b, **tolerance(DT))


def _other_cases():
    """(name, fn, leaves): the other compiled ops whose gradient the extension records (``keeps`` in the table)."""
    g = torch.Generator().manual_seed(2)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    x = torch.rand(2, 3, 4, generator=g, dtype=DT)
    src, counter = torch.tensor([0, 1, 1, 0]), torch.tensor([[0, k, 0] for k in range(4)])
    std = torch.rand(3, generator=g, dtype=DT).add(0.5)
    return [
        ("pgd_step linf", lambda a, gr, o: (ops.pgd_step(a, gr, o, 0.1, 0.03, "linf"),),
         [x + 0.01 * rn(2, 3, 4), rn(2, 3, 4), x]),
        ("pgd_step l2", lambda a, gr, o: (ops.pgd_step(a, gr, o, 0.5, 0.2, "l2"),),
         [x + 0.01 * rn(2, 3, 4), rn(2, 3, 4), x]),
        ("crown_relu_backward", lambda A, lo, up: ops.crown_relu_backward(A, lo, up, "adaptive", True),
         [rn(2, 3, 5), -torch.rand(2, 5, generator=g, dtype=DT), torch.rand(2, 5, generator=g, dtype=DT)]),
        ("smoothing_noise", lambda xx: (ops.smoothing_noise(xx, src, counter, 7, 0.25, mean=std - 0.5, std=std,
                                                            out_dtype=DT),), [x]),
    ]


@pytest.mark.parametrize("name,fn,args", _other_cases(), ids=[c[0] for c in _other_cases()])
def test_other_compiled_ops_record_the_cpp_node_with_the_reference_gradients(name, fn, args):
    """pgd_step, crown_relu_backward and smoothing_noise record the extension's node too (their non-tensor
    arguments, a string, an int mode, a dtype, reach the formula as Python values) and give the reference
    backend's gradients."""
    out_c, got = _grads("cpp", fn, args)
    assert out_c[0].grad_fn.name() == "robustkern::PythonFormulaNode", name
    out_r, want = _grads("reference", fn, args)
    assert isinstance(out_r[0].grad_fn, torch.autograd.function.BackwardCFunction)
    for g, h in zip(got, want):
        assert (g is None) == (h is None), name
        if g is not None:
            torch.testing.assert_close(g, h, **tolerance(DT))


def test_every_op_declaring_what_it_keeps_is_recorded_by_the_extension():
    declared = {name for name, op in OPS.items() if op.keeps is not None}
    assert set(INTERVAL_OPS) | {"pgd_step", "crown_relu_backward", "smoothing_noise"} <= declared
    for name in declared:
        assert OPS[name].native_autograd, name


def _use_count(t):
    """References to ``t``'s storage, besides ``t`` and the storage object made to ask."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 2


def test_the_cpp_node_keeps_only_the_tensors_the_formula_reads():
    """interval_conv2d's formula reads its outputs' shape, not their values, and the pre-epilogue box: the node
    keeps the latter only. smoothing_noise's formula reads ``src`` and ``std``, not ``x``: a non-leaf ``x`` is
    freed when the caller drops it (what the node kept would keep it alive)."""
    import weakref
    m, r, w = _leaf(torch.randn(2, 2, 5, 5)), torch.rand(2, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with use_backend("cpp"):
        a, b, (pm, pr) = ops.interval_conv2d(m, r, w, None, 1, 0, scale=torch.rand(3), shift=torch.rand(3),
                                             relu=True, return_pre=True)
    assert (_use_count(a), _use_count(b)) == (0, 0)
    assert (_use_count(pm), _use_count(pr)) == (1, 1)
    x = _leaf(torch.rand(2, 3, 4)) * 1.0
    src = torch.tensor([0, 1, 1])
    with use_backend("cpp"):
        out = ops.smoothing_noise(x, src, torch.tensor([[0, k, 0] for k in range(3)]), 3, 0.5)
    x_ref, src_ref = weakref.ref(x), weakref.ref(src)
    del x, src
    assert x_ref() is None
    assert src_ref() is not None
    out.sum().backward()   # the formula still runs with its kept tensors
