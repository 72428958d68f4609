"""The compiled extension: it loads, registers the robustkern C++ ops with the expected schemas and kernels,
and build_info() tells whether the CUDA kernels are in. The loader's fallbacks (JIT, absent) run in
subprocesses so that this process keeps the library it loaded. The two builds (setup.py ahead of time, the JIT
build on first use) compile the same sources with the same flags, and CMakeLists.txt globs the same sources."""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from robustkern import _ext, ops

ROOT = Path(__file__).resolve().parents[1]

UTILITY_OPS = {"build_info", "cpu_options", "attach_formula_node"}   # C++ ops that are not kernels of the op table


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


def _setup_py():
    """setup.py as a module: its functions, without running setup()."""
    spec = importlib.util.spec_from_file_location("robustkern_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_extension(monkeypatch):
    """The extension setup.py builds without CUDA and without DEBUG, and its build_ext command class."""
    monkeypatch.setenv("ROBUSTKERN_WITH_CUDA", "0")
    monkeypatch.delenv("DEBUG", raising=False)
    [extension], cmdclass = _setup_py().extension_modules()
    return extension, cmdclass


def _record_jit_build(monkeypatch, tmp_path) -> list[dict]:
    """Replace cpp_extension.load by a recorder that writes an empty library where load would write one."""
    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        Path(kwargs["build_directory"], kwargs["name"] + ".so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return calls


def test_jit_build_compiles_what_setup_py_compiles(monkeypatch, tmp_path):
    extension, _ = _cpu_extension(monkeypatch)
    calls = _record_jit_build(monkeypatch, tmp_path)
    _ext._jit_compile()
    [jit] = calls
    assert sorted((ROOT / s).resolve() for s in extension.sources) == sorted(Path(s).resolve() for s in jit["sources"])
    torch_dirs = {Path(d).resolve() for d in cpp_extension.include_paths()}
    own_dirs = [Path(d).resolve() for d in extension.include_dirs if Path(d).resolve() not in torch_dirs]
    assert own_dirs == [Path(d).resolve() for d in jit["extra_include_paths"]]
    setup_flags = extension.extra_compile_args["cxx"] + [f"-D{k}={v}" for k, v in extension.define_macros]
    assert setup_flags == jit["extra_cflags"]
    assert "-g0" in setup_flags  # no debug information unless DEBUG=1: it doubles the compile time


def test_jit_build_says_once_that_it_compiles(monkeypatch, tmp_path, capsys):
    calls = _record_jit_build(monkeypatch, tmp_path)
    _ext._jit_compile()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "compiling" in lines[0] and re.search(r"about \d+", lines[0]), lines[0]
    _ext._jit_compile()  # the library is there and newer than every source: nothing to say
    assert capsys.readouterr().err == ""
    assert len(calls) == 2


def test_builds_keep_their_objects_in_the_checkout(monkeypatch, tmp_path):
    """pip's editable build points build_temp at a fresh temporary folder; setup.py's build_ext keeps the
    objects in build/ instead, so that ninja recompiles only what changed. An explicit --build-temp wins."""
    from setuptools import Distribution

    extension, cmdclass = _cpu_extension(monkeypatch)

    def build_ext(build_temp=None):
        dist = Distribution({"name": "robustkern", "ext_modules": [extension], "cmdclass": cmdclass})
        dist.get_command_obj("build").build_temp = str(tmp_path / "pip-build-temp")
        cmd = dist.get_command_obj("build_ext")
        if build_temp:
            cmd.build_temp = build_temp
        cmd.ensure_finalized()
        return Path(cmd.build_temp)

    assert build_ext().parent == ROOT / "build"
    assert build_ext(str(tmp_path / "mine")) == tmp_path / "mine"


def test_cmake_globs_the_sources_setup_py_compiles(monkeypatch):
    extension, _ = _cpu_extension(monkeypatch)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    globs = set(re.findall(r"\$\{PROJECT_SOURCE_DIR\}/(csrc/[^\s)]*\*[^\s)]*)", cmake))
    cmake_sources = {p.resolve() for g in globs if not g.startswith("csrc/cuda/") for p in ROOT.glob(g)}
    assert cmake_sources == {(ROOT / s).resolve() for s in extension.sources}
    for name, value in extension.define_macros:
        assert re.search(rf"\b{name}=", cmake), f"CMakeLists.txt does not define {name}"
    for flag in extension.extra_compile_args["cxx"]:
        assert flag.startswith(("-O", "-g")) or flag in cmake, f"CMakeLists.txt does not pass {flag}"


def test_jit_build_without_ninja_fails_before_announcing(monkeypatch, tmp_path, capsys):
    calls = _record_jit_build(monkeypatch, tmp_path)

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    with pytest.raises(RuntimeError, match="Ninja"):
        _ext._jit_compile()
    assert capsys.readouterr().err == "" and calls == []
