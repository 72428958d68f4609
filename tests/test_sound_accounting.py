"""The rounding-error accounting of sound backward passes (``robustkern.bounds.step_errors``): a ReLU's term
``|A| v`` rides on the pass of the step below it, and that carried term still bounds both steps' errors exactly,
for slopes up to one ulp above 1; rows every example shares take one product; the pass count halves."""
from fractions import Fraction
from types import SimpleNamespace

import torch
from torch import nn

import robustkern.bounds.crown as crown
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.step_errors import ErrorSum, abs_dot, float32_upper_product


def exact_abs_dot(A: torch.Tensor, v: torch.Tensor) -> list:
    """``sum |A| v`` per (example, row) in exact rational arithmetic."""
    B, S = A.shape[:2]
    a, w = A.reshape(B, S, -1).tolist(), v.reshape(B, -1).tolist()
    return [[sum(abs(Fraction(x)) * Fraction(y) for x, y in zip(a[b][s], w[b])) for s in range(S)] for b in range(B)]


def exact_dot_rounded_up(A, v, _node=None):
    """The exact ``sum |A| v`` moved up to the next float64: a dot with no rounding error of its own, so that only
    ``ErrorSum``'s own widening is under test."""
    out = torch.tensor([[float(t) for t in row] for row in exact_abs_dot(A, v)], dtype=torch.float64)
    exact = exact_abs_dot(A, v)
    for b, row in enumerate(exact):
        for s, t in enumerate(row):
            if Fraction(float(out[b, s])) < t:
                out[b, s] = torch.nextafter(out[b, s], torch.tensor(float("inf"), dtype=torch.float64))
    return out


def chain_ctx(users: int = 1):
    """A context with a linear node ``fc`` read by the ReLU ``act`` (and ``users - 1`` other nodes)."""
    fc = SimpleNamespace(name="fc", kind="linear", users=users, inputs=["x"])
    act = SimpleNamespace(name="act", kind="relu", users=1, inputs=["fc"])
    return SimpleNamespace(by_name={"fc": fc, "act": act}, index={"x": 0, "fc": 1, "act": 2}), fc, act


def test_carried_relu_term_bounds_both_steps_for_slopes_an_ulp_above_one():
    """``A' = A d`` with every slope one float64 ulp above 1 (no relaxation has them, a kernel's rounding might):
    the carried term ``|A| (v_relu + (1 + 8u) v)`` still bounds ``|A| v_relu + |A'| v`` exactly. Without the
    factor (``v_relu + v``) the exact dot falls short of ``|A'| v`` by one ulp of it."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    d = torch.nextafter(torch.ones(7, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    A_in = A * d
    v_relu = torch.zeros(2, 7, dtype=torch.float64)
    v = torch.rand(2, 7, generator=g, dtype=torch.float64) + 0.5
    ctx, fc, act = chain_ctx()
    errs = ErrorSum(ctx, torch.zeros(2, 3, dtype=torch.float64), exact_dot_rounded_up, {})
    errs.relu(act, A, v_relu)
    assert float(errs.err.abs().max()) == 0.0          # held for the step below, not added yet
    errs.add(fc, A_in, v)
    total = errs.total()
    need = [[r + q for r, q in zip(x, y)] for x, y in zip(exact_abs_dot(A, v_relu), exact_abs_dot(A_in, v))]
    plain = exact_abs_dot(A, v_relu + v)
    for b in range(2):
        for s in range(3):
            assert Fraction(float(total[b, s])) >= need[b][s]
            assert plain[b][s] < need[b][s]              # the bound without the factor would not hold


def test_relu_term_is_not_carried_to_a_node_with_other_users():
    """Where the ReLU's input node has another user its coefficients are a sum of branches, not bounded by the
    ReLU's ``|A|``: the ReLU's term is added at once."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    v = torch.rand(2, 5, generator=g, dtype=torch.float64)
    ctx, fc, act = chain_ctx(users=2)
    errs = ErrorSum(ctx, torch.zeros(2, 3, dtype=torch.float64), exact_dot_rounded_up, {})
    errs.relu(act, A, v)
    assert not errs.held
    torch.testing.assert_close(errs.err, exact_dot_rounded_up(A, v), rtol=0, atol=0)


def test_shared_rows_take_one_product_and_stay_an_upper_bound():
    """Rows every example shares (an expanded identity, stride 0 over the batch): the bound from one product of
    ``|A[0]|`` is an upper bound of the exact sums and matches the per-example product's."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    A = rows.expand(6, -1, -1, -1)
    v = torch.rand(6, 3, 5, generator=g, dtype=torch.float64) * 1e-3
    shared, full = abs_dot(A, v), abs_dot(A.contiguous(), v)
    exact = exact_abs_dot(A, v)
    for b in range(6):
        for s in range(4):
            assert Fraction(float(shared[b, s])) >= exact[b][s]
    torch.testing.assert_close(shared, full, rtol=1e-14, atol=0)


def test_a_chain_of_layers_and_relus_takes_one_pass_over_abs_A_per_layer(monkeypatch):
    """CROWN-IBP's pass over Linear-ReLU-Linear-ReLU-Linear: three passes over ``|A|`` (one per layer, each ReLU's
    term carried to the layer below it), not five."""
    calls = []

    def counting(A, v):
        calls.append(A.shape)
        return abs_dot(A, v)

    monkeypatch.setattr(crown, "abs_dot", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.rand(3, 6)
    bm = BoundedModule(model, x)
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    with torch.no_grad():
        bm.compute_bounds(x, 0.1, C=C, method="CROWN-IBP", bound_upper=False)
    assert len(calls) == 3


def test_float32_product_for_error_vectors_bounds_the_exact_product():
    """``float32_upper_product``: the float32 GEMM of magnitudes rounded up and ``|W|``, widened by
    ``gamma_{k+1}(2^-24)``, bounds ``mag |W|^T`` in exact arithmetic on every entry, although the plain float32
    product falls below it on some (full-mantissa products round, and so do the sums)."""
    g = torch.Generator().manual_seed(3)
    k = 257
    mag = torch.rand(4, k, generator=g, dtype=torch.float64) + 1.0 / 3.0
    w = torch.randn(24, k, generator=g).abs()
    bound = float32_upper_product(mag, w, k)
    plain = mag.float() @ w.t()
    m, wl = mag.tolist(), w.tolist()
    below = 0
    for b in range(4):
        for n in range(24):
            exact = sum(Fraction(x) * Fraction(y) for x, y in zip(m[b], wl[n]))
            assert Fraction(float(bound[b, n])) >= exact
            below += Fraction(float(plain[b, n])) < exact
    assert below > 0          # the widening is needed: the unwidened float32 product is not an upper bound


def test_kept_float64_weights_follow_every_change_of_the_weights():
    """A float32 model's float64 weights are kept across sound calls; a change of the weights by an in-place step
    (version bumped) or through ``.data`` (the version does not see it) gives the new model's bounds, as a fresh
    ``BoundedModule`` computes them."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.rand(3, 6)
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    bm = BoundedModule(model, x)

    def check():
        with torch.no_grad():
            kept = bm.compute_bounds(x, 0.05, C=C, method="CROWN-IBP")
            fresh = BoundedModule(model, x, keep_wide_weights=False).compute_bounds(x, 0.05, C=C, method="CROWN-IBP")
        for a, b in zip(kept, fresh):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    for _ in range(3):          # the copies are made and then served
        check()
    assert any(e[2] is not None for e in bm._wide._entries.values())
    with torch.no_grad():
        model[0].weight.mul_(1.5)           # an optimizer-like step: the version changes
    check()
    check()
    model[2].weight.data.mul_(-1.0)         # the version does not change
    check()
