"""The test suite runs the Triton kernels where it says it does, and the bound kernels use no TF32.

* Only tests/conftest.py sets TRITON_INTERPRET, and only when there is no CUDA device: a test module that set it
  unconditionally would make a GPU run test the interpreter on the CPU instead of the compiled kernels, and,
  since Triton reads the variable when a kernel is defined and again at each launch, could flip other modules.
  Checked in the source of every tests/*.py (AST), and at run time: the interpreter is on exactly as conftest's
  rule says, and every Triton kernel of robustkern.kernels was defined in the mode the run uses.
* Triton's ``tl.dot`` multiplies float32 in TF32 on GPUs unless told otherwise, whatever torch's flags say:
  every ``tl.dot`` of robustkern.kernels passes ``input_precision="ieee"``.
* The helpers of tests/_devices.py that the GPU tests rely on (``cuda_settings``, ``tf32_allowed``,
  ``Fp32GemmRecorder``) work: they act on global settings and are checked here on the CPU.
"""
import ast
import importlib
import os
import pkgutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conftest
from _devices import Fp32GemmRecorder, cuda_settings, tf32_allowed
from robustkern._backend import ieee_fp32
from robustkern.kernels._config import is_interpreting

TESTS = Path(__file__).resolve().parent
KERNELS = TESTS.parent / "robustkern" / "kernels"
VAR = "TRITON_INTERPRET"
_WRITERS = {"setdefault", "setenv", "putenv", "update", "__setitem__"}


def _mentions_var(node) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == VAR for n in ast.walk(node))


def _is_cuda_absent_guard(node) -> bool:
    return isinstance(node, ast.If) and "not torch.cuda.is_available()" in ast.unparse(node.test)


def forced_interpret_sites(source: str, filename: str = "<test>") -> list[str]:
    """``file:line: code`` of each place in ``source`` that writes ``TRITON_INTERPRET`` (``os.environ[...] =``,
    ``setdefault``, ``monkeypatch.setenv``, ``putenv``, ``update``, ``del``) other than in the body of an
    ``if not torch.cuda.is_available():`` block."""
    tree = ast.parse(source, filename)
    guarded = set()
    for node in ast.walk(tree):
        if _is_cuda_absent_guard(node):
            for stmt in node.body:
                guarded.update(id(n) for n in ast.walk(stmt))
    sites = []
    for node in ast.walk(tree):
        write = False
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            write = any(isinstance(t, ast.Subscript) and _mentions_var(t.slice) for t in targets)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _WRITERS:
            write = any(_mentions_var(a) for a in node.args) or any(k.arg == VAR for k in node.keywords)
        if write and id(node) not in guarded:
            sites.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return sites


def test_the_checker_finds_forced_interpreter_and_accepts_the_guard():
    bad = ['import os\nos.environ.setdefault("TRITON_INTERPRET", "1")\n',
           'import os\nos.environ["TRITON_INTERPRET"] = "1"\n',
           'def test_x(monkeypatch):\n    monkeypatch.setenv("TRITON_INTERPRET", "1")\n',
           'import os\nos.environ.update({"TRITON_INTERPRET": "1"})\n',
           'import os\nos.environ.update(TRITON_INTERPRET="1")\n',
           'import os, torch\nif torch.cuda.is_available():\n    os.environ["TRITON_INTERPRET"] = "1"\n',
           'import os, torch\nif not torch.cuda.is_available():\n    pass\nelse:\n'
           '    os.environ["TRITON_INTERPRET"] = "1"\n']
    for src in bad:
        assert len(forced_interpret_sites(src)) == 1, src
    good = ['import os, torch\nif not torch.cuda.is_available():\n    os.environ.setdefault("TRITON_INTERPRET", "1")\n',
            'import os\nflag = os.environ.get("TRITON_INTERPRET", "0")\n']
    for src in good:
        assert forced_interpret_sites(src) == [], src


def test_no_test_module_forces_the_interpreter():
    files = sorted(TESTS.glob("*.py"))
    assert len(files) > 20 and TESTS / "conftest.py" in files
    sites = [s for f in files for s in forced_interpret_sites(f.read_text(), f.name)]
    assert sites == [], "set TRITON_INTERPRET only in conftest.py, when there is no CUDA device:\n" + "\n".join(sites)
    # conftest does set it, under the guard: the rule this suite relies on
    conftest_src = (TESTS / "conftest.py").read_text()
    assert any(_is_cuda_absent_guard(n) and _mentions_var(n) for n in ast.walk(ast.parse(conftest_src)))


def _truthy(value: str) -> bool:
    return value.strip().lower() not in ("", "0", "false", "off", "no")


def test_interpreter_is_on_exactly_when_conftest_says():
    """Interpreted iff the variable was set on at start-up, or, unset then, when there is no CUDA device. Every
    test module has been imported (collected) by now, so one that set the variable shows here."""
    at_start = conftest.TRITON_INTERPRET_AT_START
    expected = _truthy(at_start) if at_start is not None else not torch.cuda.is_available()
    assert is_interpreting() == expected, (f"TRITON_INTERPRET={os.environ.get(VAR)!r} now, {at_start!r} at start-up, "
                                           f"CUDA available: {torch.cuda.is_available()}")


def _kernels_of(module):
    from triton.runtime.jit import JITFunction

    for value in vars(module).values():
        inner = value
        while hasattr(inner, "fn") and not isinstance(inner, JITFunction) and type(inner).__name__ != \
                "InterpretedFunction":
            inner = inner.fn                                  # Autotuner / Heuristics wrap the kernel
        if isinstance(inner, JITFunction) or type(inner).__name__ == "InterpretedFunction":
            yield inner


def test_triton_kernels_were_defined_in_the_mode_the_run_uses():
    """``triton.jit`` returns an interpreted or a compiled kernel depending on TRITON_INTERPRET at definition;
    a kernel defined in the other mode than the one launches use fails or tests the wrong thing."""
    pytest.importorskip("triton")
    import robustkern.kernels as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    kinds = {}
    for name in names:
        for k in _kernels_of(importlib.import_module(f"robustkern.kernels.{name}")):
            kinds[f"{name}.{getattr(k, '__name__', k)}"] = type(k).__name__ == "InterpretedFunction"
    assert len(kinds) >= 10
    wrong = sorted(k for k, interpreted in kinds.items() if interpreted != is_interpreting())
    assert wrong == [], f"defined {'compiled' if is_interpreting() else 'interpreted'}: {wrong}"


# ------------------------------------------------------------------------------------------------ no TF32
def test_every_tl_dot_of_the_kernels_is_ieee():
    calls = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), path.name)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tl.dot", "triton.language.dot"):
                kw = {k.arg: k.value for k in node.keywords}
                ieee = isinstance(kw.get("input_precision"), ast.Constant) and kw["input_precision"].value == "ieee"
                calls.append((f"{path.name}:{node.lineno}", ieee))
    assert calls, "no tl.dot found: the check looks in the wrong place"
    assert [c for c, ieee in calls if not ieee] == []


def test_cuda_settings_and_the_recorder_on_the_cpu():
    """The GPU tests' instruments, on CPU tensors: the recorder sees float32 matmuls and convolutions with the
    TF32 permission in force (on inside ``cuda_settings(tf32=True)``, off inside ``ieee_fp32``), ignores float64,
    and ``cuda_settings`` restores everything."""
    before = (tf32_allowed(), torch.backends.cudnn.benchmark, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cuda.matmul.fp32_precision)
    a, x, w = torch.randn(4, 4), torch.randn(1, 1, 5, 5), torch.randn(2, 1, 3, 3)
    with cuda_settings(cudnn_benchmark=True, tf32=True):
        assert torch.backends.cudnn.benchmark and tf32_allowed() == (True, True)
        with Fp32GemmRecorder("cpu") as rec:
            a @ a
            F.conv2d(x, w)
            with ieee_fp32():
                assert tf32_allowed() == (False, False)
                a @ a
                F.conv2d(x, w)
            a.double() @ a.double()
        with Fp32GemmRecorder("cuda") as on_cuda:
            a @ a
    assert [tf32 for _, tf32 in rec.calls] == [True, True, False, False]
    assert [n.split(".")[1] for n, _ in rec.calls] == ["mm", "convolution", "mm", "convolution"]
    assert len(rec.with_tf32()) == 2 and on_cuda.calls == []
    with cuda_settings(cudnn_benchmark=False, tf32=False):
        assert tf32_allowed() == (False, False) and not torch.backends.cudnn.benchmark
    after = (tf32_allowed(), torch.backends.cudnn.benchmark, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision)
    assert after == before
