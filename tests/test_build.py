"""The compiled extension: it loads, registers the robustkern C++ ops with the expected schemas and kernels,
and build_info() tells whether the CUDA kernels are in. The loader's fallbacks (JIT, absent) run in
subprocesses so that this process keeps the library it loaded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from robustkern import _ext, ops

UTILITY_OPS = {"build_info", "cpu_options"}      # C++ ops that are not kernels of the op table


def _cpp_ops() -> set[str]:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("robustkern::")}


def test_extension_loads():
    assert _ext.load(), _ext.status()
    assert _ext.available()
    assert _ext.status() in ("prebuilt", "jit")


def test_prebuilt_module_imports():
    if _ext.status() != "prebuilt":
        pytest.skip(f"robustkern._C is not built here (extension: {_ext.status()})")
    import robustkern._C as C

    assert os.path.isfile(C.__file__)


def test_the_extension_defines_every_cpp_op_of_the_table():
    """Each signature is written once, in csrc/ops.cpp: every op of the table that has C++ kernels is defined by
    the extension, with its CPU kernel (and its CUDA kernel where the table says so and CUDA is built), and the
    extension defines nothing else but its utility ops."""
    assert ops.load(), _ext.status()
    compiled = {name for name, op in ops.OPS.items() if op.compiled}
    for name in compiled:
        op = ops.OPS[name]
        schema = getattr(torch.ops.robustkern, name).default._schema
        assert schema.name == f"robustkern::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "CPU"), name
        if "cuda" in op.kernels and _ext.has_cuda_kernels():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "CUDA"), name
    python_defined = {name for name, op in ops.OPS.items() if not op.compiled}
    assert _cpp_ops() - python_defined == compiled | UTILITY_OPS


def test_build_info_names_the_devices():
    assert _ext.load(), _ext.status()
    parts = torch.ops.robustkern.build_info().split(",")
    assert "cpu" in parts and set(parts) <= {"cpu", "cuda"}
    assert _ext.has_cuda_kernels() == ("cuda" in parts)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA device")
def test_cuda_kernels_built_when_torch_has_cuda():
    if _ext.status() != "prebuilt" or os.environ.get("ROBUSTKERN_WITH_CUDA", "auto") == "0":
        pytest.skip("CUDA kernels are only expected in a prebuilt extension with ROBUSTKERN_WITH_CUDA != 0")
    assert _ext.has_cuda_kernels(), torch.ops.robustkern.build_info()


def _run_without_prebuilt(body: str, env: dict) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter in which ``import robustkern._C`` fails."""
    code = "import sys\nsys.modules['robustkern._C'] = None\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=900)


def test_absent_warns_once_and_says_why():
    proc = _run_without_prebuilt("""
        import warnings
        from robustkern import _ext, ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _ext.load() is False and _ext.load() is False
            assert not _ext.available() and not _ext.has_cuda_kernels()
        assert len(caught) == 1, [str(w.message) for w in caught]
        print(_ext.status())
        print(caught[0].message)
    """, {"ROBUSTKERN_JIT": "0"})
    assert proc.returncode == 0, proc.stderr
    status, message = proc.stdout.strip().splitlines()[-2:]
    assert "not built" in status and "ROBUSTKERN_JIT=0" in status
    assert "pip install --no-build-isolation -e ." in message


@pytest.mark.slow
def test_jit_fallback_compiles_and_runs(tmp_path):
    proc = _run_without_prebuilt("""
        import torch
        from robustkern import _ext, ops
        from robustkern.reference import interval as ref
        assert _ext.load(), _ext.status()
        print(_ext.status(), torch.ops.robustkern.build_info())
        mid, rad = torch.randn(4, 5), torch.rand(4, 5)
        got = torch.ops.robustkern.interval_affine(mid, rad, None, None, True, True)
        exp = ref.interval_affine(mid, rad, None, None, True, True)
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    """, {"ROBUSTKERN_JIT": "1", "XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["jit", "cpu"]
