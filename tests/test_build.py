"""The compiled extension: it loads, registers the robustkern_ext ops with the expected schemas and kernels,
and build_info() tells whether the CUDA kernels are in. The loader's fallbacks (JIT, absent) run in
subprocesses so that this process keeps the library it loaded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from robustkern import _ext

SCHEMAS = {
    "interval_linear": "robustkern_ext::interval_linear(Tensor mid, Tensor rad, Tensor weight, Tensor? bias, "
                       "Tensor? scale, Tensor? shift, bool relu, bool sound) -> (Tensor, Tensor, Tensor, Tensor)",
    "interval_conv2d": "robustkern_ext::interval_conv2d(Tensor mid, Tensor rad, Tensor weight, Tensor? bias, "
                       "int[] stride, int[] padding, int[] dilation, int groups, Tensor? scale, Tensor? shift, "
                       "bool relu, bool sound) -> (Tensor, Tensor, Tensor, Tensor)",
    "interval_affine": "robustkern_ext::interval_affine(Tensor mid, Tensor rad, Tensor? scale, Tensor? shift, "
                       "bool relu, bool sound) -> (Tensor, Tensor)",
    "interval_input_box": "robustkern_ext::interval_input_box(Tensor x, Tensor eps, float x_min, float x_max, "
                          "bool sound) -> (Tensor, Tensor)",
    "smoothing_noise": "robustkern_ext::smoothing_noise(Tensor x, Tensor src, Tensor counter, Tensor seed, "
                       "float sigma, Tensor? mean, Tensor? std, ScalarType out_dtype) -> Tensor",
    "smoothing_count": "robustkern_ext::smoothing_count(Tensor logits, Tensor group, int num_groups) -> Tensor",
    "build_info": "robustkern_ext::build_info() -> str",
}
DEVICE_OPS = [name for name in SCHEMAS if name != "build_info"]
CPU_ONLY_OPS = {"smoothing_noise", "smoothing_count"}   # no CUDA kernels (CUDA runs the Triton ones)


def test_extension_loads():
    assert _ext.load(), _ext.status()
    assert _ext.available()
    assert _ext.status() in ("prebuilt", "jit")


def test_prebuilt_module_imports():
    if _ext.status() != "prebuilt":
        pytest.skip(f"robustkern._C is not built here (extension: {_ext.status()})")
    import robustkern._C as C

    assert os.path.isfile(C.__file__)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema(name):
    assert _ext.load(), _ext.status()
    assert str(getattr(torch.ops.robustkern_ext, name).default._schema) == SCHEMAS[name]


def test_build_info_matches_registered_kernels():
    assert _ext.load(), _ext.status()
    parts = torch.ops.robustkern_ext.build_info().split(",")
    assert "cpu" in parts and set(parts) <= {"cpu", "cuda"}
    assert _ext.has_cuda_kernels() == ("cuda" in parts)
    for name in DEVICE_OPS:
        qualified = f"robustkern_ext::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), name
        has_cuda = "cuda" in parts and name not in CPU_ONLY_OPS
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA") == has_cuda, name


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None, reason="needs a CUDA device")
def test_cuda_kernels_built_when_torch_has_cuda():
    if _ext.status() != "prebuilt" or os.environ.get("ROBUSTKERN_WITH_CUDA", "auto") == "0":
        pytest.skip("CUDA kernels are only expected in a prebuilt extension with ROBUSTKERN_WITH_CUDA != 0")
    assert _ext.has_cuda_kernels(), torch.ops.robustkern_ext.build_info()


def _run_without_prebuilt(body: str, env: dict) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter in which ``import robustkern._C`` fails."""
    code = "import sys\nsys.modules['robustkern._C'] = None\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=900)


def test_absent_warns_once_and_says_why():
    proc = _run_without_prebuilt("""
        import warnings
        from robustkern import _ext
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
        from robustkern import _ext
        from robustkern.reference import interval as ref
        assert _ext.load(), _ext.status()
        print(_ext.status(), torch.ops.robustkern_ext.build_info())
        mid, rad = torch.randn(4, 5), torch.rand(4, 5)
        got = torch.ops.robustkern_ext.interval_affine(mid, rad, None, None, True, True)
        exp = ref.interval_affine(mid, rad, None, None, True, True)
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    """, {"ROBUSTKERN_JIT": "1", "XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["jit", "cpu"]
